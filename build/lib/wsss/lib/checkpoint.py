"""Resumable training: the per-epoch ``checkpoint.pt`` of both trainers and when it may be resumed.

A checkpoint holds everything that decides the rest of a run: weights, optimizer (and scheduler) state,
the number of finished epochs and the history so far. Every random draw of the trainers is a function of
``(seed, epoch)`` or ``(seed, step)`` (sampler, augmentation, masking, gates), so no generator state is
needed and a resumed run continues exactly as the uninterrupted one. The file is written atomically: a
kill during the write leaves the previous checkpoint.

It is resumed only when its fingerprint (params, seed, training data) matches the new run and the run
that wrote it did not finish: rerunning a finished stage (new code, ``dvc repro -f``) trains afresh.
"""

from __future__ import annotations

import hashlib
import json
import pickle
import zipfile
from pathlib import Path
from typing import Any

import torch

from wsss.lib.io import atomic_file


def fingerprint(**parts: Any) -> str:
    """sha256 over JSON-able run settings; tensors enter through :func:`tensor_digest`."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


def tensor_digest(tensor: torch.Tensor) -> str:
    """sha256 of a tensor's bytes (training labels, masks)."""
    return hashlib.sha256(tensor.detach().cpu().contiguous().numpy().tobytes()).hexdigest()


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    """Writes ``state`` to ``path`` atomically (temporary sibling + rename)."""
    with atomic_file(path) as handle:
        torch.save(state, handle)


def load_resumable(path: Path, expected_fingerprint: str, announce: bool = True) -> dict[str, Any] | None:
    """The checkpoint at ``path`` if a run may continue from it, else None (the reason is printed).

    Also removes temporary files that a kill during :func:`save_checkpoint` left behind.

    Args:
        path: the checkpoint file.
        expected_fingerprint: :func:`fingerprint` of the new run.
        announce: print what happens (rank 0 only in data-parallel runs).
    """
    for stale in path.parent.glob(f".{path.name}.*"):
        stale.unlink(missing_ok=True)
    if not path.is_file():
        return None

    def say(message: str) -> None:
        if announce:
            print(f"{path}: {message}", flush=True)

    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, EOFError, ValueError, zipfile.BadZipFile, pickle.UnpicklingError) as err:
        say(f"unreadable ({' '.join(str(err).split())[:200]}); starting fresh")
        return None
    if not isinstance(state, dict) or state.get("fingerprint") != expected_fingerprint:
        say("written with other params or training data; starting fresh")
        return None
    if state.get("finished"):
        say("its run finished; starting fresh")
        return None
    say(f"resuming after epoch {state['epoch']}")
    return state
