"""Process-wide settings every stage applies first: threads, seed, device; the precision models run at."""

from __future__ import annotations

import contextlib
import random

import numpy as np
import torch

from wsss.lib.errors import WsssError


def resolve_device(name: str) -> torch.device:
    """``auto`` -> CUDA when present, else CPU; ``cuda`` without a GPU is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise WsssError("device: cuda requested but no CUDA device is available (use device=auto or cpu)")
    return torch.device(name)


def setup_runtime(seed: int, num_threads: int, device: str) -> torch.device:
    """Seeds python/numpy/torch, caps intra-op threads (2 jobs on 2 cores thrash) and picks the device."""
    torch.set_num_threads(num_threads)
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    return resolve_device(device)


def resolve_precision(precision: str, device: torch.device) -> str:
    """``trainer.precision`` for this device: ``auto`` is bf16 on CUDA, fp32 elsewhere (the tiny CPU default
    ran 2.6x slower under bf16 autocast here)."""
    if precision == "auto":
        return "bf16" if device.type == "cuda" else "fp32"
    return precision


def autocast(precision: str, device: torch.device) -> contextlib.AbstractContextManager:
    """Mixed precision for the forward passes at a resolved ``precision`` (a no-op at fp32)."""
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16 if precision == "bf16" else torch.float16)
