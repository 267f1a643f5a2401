"""Resume: a training run killed with SIGKILL mid-way and rerun ends exactly where an uninterrupted run ends."""

from __future__ import annotations

import csv
import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from wsss.lib import artifacts
from wsss.lib.checkpoint import load_resumable, save_checkpoint
from wsss.lib.config import Params
from wsss.tasks import train_classifier, train_segmenter
from wsss.tasks.ingest import ingest


@pytest.fixture
def params(tiny_params: Params) -> Params:
    """The tiny config on one thread, ingested; batches of 8 (6 steps per epoch) so epochs last a while."""
    params = dataclasses.replace(tiny_params, num_threads=1, device="cpu")
    params.classifier = dataclasses.replace(params.classifier, epochs=12, batch_size=8)
    params.segmenter = dataclasses.replace(params.segmenter, epochs=4, batch_size=8)
    ingest(Path(params.ingest.source), Path(params.ingest.out))
    return params


def _kill_after_first_epoch(params: Params, tmp_path: Path, out: Path, *argv: str) -> int:
    """Runs ``wsss <argv>`` in a subprocess, SIGKILLs it once epoch 1 is checkpointed; returns that epoch.

    history.csv is written right after each checkpoint, so its appearance means the run is past epoch 1.
    """
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(params.to_dict(), sort_keys=False))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "wsss.tools.cli", *argv, "--params", str(path)]
    with open(tmp_path / "killed.log", "w") as log:
        process = subprocess.Popen(command, cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 300
        while process.poll() is None and not (out / "history.csv").exists() and time.monotonic() < deadline:
            time.sleep(0.005)
        process.send_signal(signal.SIGKILL)
        process.wait()
    assert process.returncode == -signal.SIGKILL, (tmp_path / "killed.log").read_text()[-2000:]
    assert not (out / "model.pt").exists()
    return torch.load(out / "checkpoint.pt", weights_only=True)["epoch"]


def _without_seconds(rows: list[dict[str, str]]) -> list[dict[str, str]]:
    return [{k: v for k, v in row.items() if k != "seconds"} for row in rows]


def _history(out: Path) -> list[dict[str, str]]:
    with open(out / "history.csv", newline="") as handle:
        return _without_seconds(list(csv.DictReader(handle)))


def _assert_equal_weights(out: Path, reference: Path) -> None:
    weights = torch.load(out / "model.pt", weights_only=False)["state_dict"]
    expected = torch.load(reference / "model.pt", weights_only=False)["state_dict"]
    assert weights.keys() == expected.keys()
    for key, value in expected.items():
        assert torch.equal(weights[key], value), key


def test_killed_classifier_resumes_to_the_uninterrupted_result(params: Params, tmp_path: Path, capsys):
    reference = Path(params.classifier.out)
    train_classifier.main(params)

    out = tmp_path / "killed_classifier"
    params.classifier = dataclasses.replace(params.classifier, out=str(out))
    epoch = _kill_after_first_epoch(params, tmp_path, out, "train-classifier")
    assert 1 <= epoch < params.classifier.epochs
    capsys.readouterr()
    train_classifier.main(params)
    assert f"resuming after epoch {epoch}" in capsys.readouterr().out

    metrics = json.loads((out / "metrics.json").read_text())
    expected = json.loads((reference / "metrics.json").read_text())
    metrics.pop("train_seconds"), expected.pop("train_seconds")
    assert metrics == expected
    assert _history(out) == _history(reference) and len(_history(out)) == params.classifier.epochs
    assert (out / "gates.json").read_text() == (reference / "gates.json").read_text()
    _assert_equal_weights(out, reference)


def test_killed_segmenter_resumes_to_the_uninterrupted_result(params: Params, tmp_path: Path, capsys):
    reference = artifacts.segmenter_dir(params, "gt")
    train_segmenter.main(params, mask_source="gt")

    params.segmenter = dataclasses.replace(params.segmenter, out=str(tmp_path / "killed_segmenter"))
    out = artifacts.segmenter_dir(params, "gt")
    epoch = _kill_after_first_epoch(params, tmp_path, out, "train-segmenter", "--masks", "gt")
    assert 1 <= epoch < params.segmenter.epochs
    capsys.readouterr()
    train_segmenter.main(params, mask_source="gt")
    assert f"resuming after epoch {epoch}" in capsys.readouterr().out

    assert _history(out) == _history(reference) and len(_history(out)) == params.segmenter.epochs
    _assert_equal_weights(out, reference)


def test_checkpoint_of_other_params_is_not_resumed(params: Params, tmp_path: Path, capsys):
    # An unfinished checkpoint (a run killed after its last epoch) is resumed by the same params only.
    params.classifier = dataclasses.replace(params.classifier, epochs=2)
    out = Path(params.classifier.out)
    train_classifier.main(params)
    unfinished = {**torch.load(out / "checkpoint.pt", weights_only=True), "finished": False}
    save_checkpoint(out / "checkpoint.pt", unfinished)
    (out / "model.pt").unlink()

    other = dataclasses.replace(params, classifier=dataclasses.replace(params.classifier, lr=2e-3))
    capsys.readouterr()
    train_classifier.main(other)
    log = capsys.readouterr().out
    assert "written with other params or training data; starting fresh" in log
    assert "epoch   1" in log and "epoch   2" in log and "resuming" not in log

    save_checkpoint(out / "checkpoint.pt", unfinished)
    train_classifier.main(params)
    log = capsys.readouterr().out
    assert "resuming after epoch 2" in log and "epoch   1" not in log  # nothing left to train
    assert (out / "model.pt").is_file() and len(_history(out)) == 2


def test_load_resumable_rules(tmp_path: Path, capsys):
    path = tmp_path / "checkpoint.pt"
    stale = tmp_path / ".checkpoint.pt.x1y2"  # what a kill during an atomic write leaves behind
    stale.write_bytes(b"half a checkpoint")
    assert load_resumable(path, "abc") is None  # no checkpoint: a silent fresh start
    assert not stale.exists()
    save_checkpoint(path, {"fingerprint": "abc", "epoch": 3, "history": []})
    assert load_resumable(path, "abc")["epoch"] == 3
    assert load_resumable(path, "other") is None
    save_checkpoint(path, {"fingerprint": "abc", "epoch": 3, "finished": True})
    assert load_resumable(path, "abc") is None
    path.write_bytes(path.read_bytes()[:100])  # e.g. a truncated copy
    assert load_resumable(path, "abc") is None
    log = capsys.readouterr().out
    assert "resuming after epoch 3" in log and "other params" in log
    assert "run finished; starting fresh" in log and "unreadable" in log


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_training_runs_on_cpu(tiny_params: Params, precision: str) -> None:
    """bf16 / fp16 autocast (fp16 with a GradScaler) through both trainers, on the CPU of the suite."""
    params = dataclasses.replace(
        tiny_params,
        classifier=dataclasses.replace(tiny_params.classifier, epochs=1),
        trainer=dataclasses.replace(tiny_params.trainer, precision=precision),
    )
    ingest(Path(params.ingest.source), Path(params.ingest.out))
    result = train_classifier.main(params)
    assert result["precision"] == precision and 0.0 <= result["val_map"] <= 1.0
    assert all(torch.isfinite(torch.tensor(float(row["loss"]))) for row in _history(Path(params.classifier.out)))
    segmenter = train_segmenter.main(params, mask_source="gt")
    assert 0.0 <= segmenter["val_miou"] <= 1.0
    state = torch.load(artifacts.segmenter_dir(params, "gt") / "checkpoint.pt", weights_only=False)
    assert ("scaler" in state) == (precision == "fp16")  # the loss scale resumes with the run


def test_diversity_loss_enters_the_classifier_objective(tiny_params: Params) -> None:
    """classifier.diversity > 0 adds the weighted diversity of the class maps to every step's loss."""
    params = dataclasses.replace(tiny_params, classifier=dataclasses.replace(tiny_params.classifier, diversity=0.1))
    ingest(Path(params.ingest.source), Path(params.ingest.out))
    train_classifier.main(params)
    for row in _history(Path(params.classifier.out)):
        bce, penalty, diversity = (float(row[key]) for key in ("bce", "penalty", "diversity"))
        assert 0.0 < diversity <= 6**0.5  # 3 classes in the tiny set: at most sqrt(C^2 - C)
        assert float(row["loss"]) == pytest.approx(bce + params.classifier.gate_lambda * penalty + 0.1 * diversity)
