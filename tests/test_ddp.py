"""Data-parallel training: `wsss train-* -S trainer.nproc=2` runs two gloo processes on CPU under torchrun,
and they compute what one process computes with the same global batch (up to float summation order)."""

from __future__ import annotations

import csv
import dataclasses
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import yaml
from timm.layers import BatchNormAct2d
from torch import nn
from torch.utils.data import TensorDataset

from wsss.lib import artifacts
from wsss.lib.config import ConfigError, Params, load_params
from wsss.lib.distributed import CrossRankBatchNorm, World, shard_loader
from wsss.lib.errors import WsssError
from wsss.tasks import train_classifier, train_segmenter
from wsss.tasks.ingest import ingest


def _history(path: Path) -> list[dict[str, float]]:
    with open(path, newline="") as handle:
        return [{k: float(v) for k, v in row.items() if k != "seconds"} for row in csv.DictReader(handle)]


def _assert_same_training(single: Path, parallel: Path, lr: float, steps: int) -> None:
    """Same per-epoch losses (per-rank BatchNorm statistics or masking already fail here), val metrics and weights.

    Val metrics are argmax/rank based: a few pixels or scores may flip with the last bits of the weights.
    Adam moves a coordinate by about lr * g / (|g| + eps): where the gradient is rounding noise (the
    attention's key bias, directions BatchNorm makes irrelevant) the two runs may step in opposite
    directions. Measured here: 99.9 % of the weights agree within 2e-5; 350 of 11 M segmenter weights
    differ by more than 1e-4, at most 9e-4 (< 2 lr per step).
    """
    rows_single, rows_parallel = _history(single / "history.csv"), _history(parallel / "history.csv")
    assert len(rows_single) == len(rows_parallel)
    for row_single, row_parallel in zip(rows_single, rows_parallel, strict=True):
        for key, value in row_single.items():
            tolerance = 2e-3 if key.startswith("val_") else 1e-4 * abs(value) + 1e-5
            assert row_parallel[key] == pytest.approx(value, abs=tolerance), key
    weights = torch.load(single / "model.pt", weights_only=False)["state_dict"]
    weights_parallel = torch.load(parallel / "model.pt", weights_only=False)["state_dict"]
    assert weights.keys() == weights_parallel.keys()
    diffs = torch.cat(
        [
            (weights_parallel[k].double() - v.double()).abs().flatten()
            for k, v in weights.items()
            if v.is_floating_point()
        ]
    )
    assert float((diffs > 1e-4).double().mean()) < 1e-3
    assert float(diffs.max()) < 2 * lr * steps


def _two_process_command(params: Params, tmp_path: Path, *argv: str) -> tuple[list[str], dict[str, str]]:
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(params.to_dict(), sort_keys=False))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return [sys.executable, "-m", "wsss.tools.cli", *argv, "--params", str(path), "-S", "trainer.nproc=2"], env


def _run_two_processes(params: Params, tmp_path: Path, *argv: str) -> str:
    command, env = _two_process_command(params, tmp_path, *argv)
    result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "data parallel: 2 processes (gloo), cpu" in result.stdout
    return result.stdout


@pytest.fixture
def cpu_params(tiny_params: Params) -> Params:
    """The tiny config on CPU, one thread per process; 48 train images = 3 global batches of 16 per epoch."""
    params = dataclasses.replace(tiny_params, num_threads=1, device="cpu")
    params.segmenter = dataclasses.replace(params.segmenter, epochs=2)
    ingest(Path(params.ingest.source), Path(params.ingest.out))
    return params


def test_two_process_classifier_matches_one_process(cpu_params: Params, tmp_path: Path):
    # 2 epochs x 3 steps; the gates start at step 2 (gate_start 0.4): masking, gate samples, the gate
    # penalty and the gates' unused-parameter steps all take part.
    single = Path(cpu_params.classifier.out)
    train_classifier.main(cpu_params)
    parallel = tmp_path / "classifier_ddp"
    params = dataclasses.replace(cpu_params, classifier=dataclasses.replace(cpu_params.classifier, out=str(parallel)))
    stdout = _run_two_processes(params, tmp_path, "train-classifier")
    assert "classifier: val mAP" in stdout
    _assert_same_training(single, parallel, cpu_params.classifier.lr, steps=6)


def test_two_process_segmenter_matches_one_process(cpu_params: Params, tmp_path: Path):
    # resnet18 has BatchNorm everywhere: per-rank statistics would not match (global-batch BN does).
    single = artifacts.segmenter_dir(cpu_params, "gt")
    train_segmenter.main(cpu_params, mask_source="gt")
    parallel = tmp_path / "segmenter_ddp"
    params = dataclasses.replace(cpu_params, segmenter=dataclasses.replace(cpu_params.segmenter, out=str(parallel)))
    _run_two_processes(params, tmp_path, "train-segmenter", "--masks", "gt")
    _assert_same_training(single, Path(str(parallel) + "_gt"), cpu_params.segmenter.lr, steps=6)


def test_global_batch_must_split_evenly_over_processes():
    with pytest.raises(ConfigError, match="segmenter.batch_size 30 is not divisible by trainer.nproc 4"):
        load_params(None, ["trainer.nproc=4", "classifier.batch_size=32", "segmenter.batch_size=30"])
    assert load_params(None, ["trainer.nproc=4"]).trainer.nproc == 4


def _process_tree(pid: int) -> list[int]:
    """``pid`` and all its descendants (from /proc), parents first."""
    parents = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            parents[int(stat.parent.name)] = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue  # a process that ended meanwhile
    tree = [pid]
    for parent in tree:
        tree.extend(child for child, of in parents.items() if of == parent)
    return tree


@pytest.mark.slow  # two torchrun starts
def test_killed_two_process_run_resumes(cpu_params: Params, tmp_path: Path):
    # kill -9 torchrun and its workers once epoch 1 is checkpointed, rerun: the result of one
    # uninterrupted process.
    params = dataclasses.replace(cpu_params, classifier=dataclasses.replace(cpu_params.classifier, epochs=6))
    single = Path(params.classifier.out)
    train_classifier.main(params)
    parallel = tmp_path / "classifier_ddp"
    params.classifier = dataclasses.replace(params.classifier, out=str(parallel))
    command, env = _two_process_command(params, tmp_path, "train-classifier")
    process = subprocess.Popen(command, cwd=tmp_path, env=env, stdout=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while process.poll() is None and not (parallel / "history.csv").exists() and time.monotonic() < deadline:
        time.sleep(0.005)
    for pid in _process_tree(process.pid):  # torchrun starts each worker in a session of its own
        os.kill(pid, signal.SIGKILL)
    process.wait()
    assert process.returncode == -signal.SIGKILL and not (parallel / "model.pt").exists()
    epoch = torch.load(parallel / "checkpoint.pt", weights_only=True)["epoch"]
    assert 1 <= epoch < 6

    stdout = _run_two_processes(params, tmp_path, "train-classifier")
    assert f"resuming after epoch {epoch}" in stdout
    _assert_same_training(single, parallel, params.classifier.lr, steps=18)


def test_ranks_share_each_global_batch_in_local_rows_order():
    dataset = TensorDataset(torch.arange(50))
    single = shard_loader(dataset, 8, seed=3, world=World())
    ranks = [shard_loader(dataset, 8, seed=3, world=World(rank, 2)) for rank in range(2)]
    for loader in (single, *ranks):
        loader.sampler.set_epoch(5)
    assert len(single) == len(ranks[0]) == 6  # 50 // 8, the tail is dropped
    for (batch,), *shares in zip(single, *ranks, strict=True):
        for rank, (share,) in enumerate(shares):
            assert share.tolist() == World(rank, 2).local_rows(batch).tolist()
    with pytest.raises(WsssError, match="not divisible"):
        shard_loader(dataset, 9, seed=0, world=World(0, 2))
    with pytest.raises(WsssError, match="need more than batch_size 64"):
        shard_loader(dataset, 64, seed=0, world=World(0, 2))


@pytest.mark.parametrize("momentum", [0.1, None])
def test_cross_rank_batch_norm_equals_batch_norm_on_one_rank(tmp_path: Path, momentum: float | None):
    # One gloo rank: the all-reduced statistics are the local ones, so forward, input and parameter
    # gradients and the running statistics must equal torch's BatchNorm (timm's BatchNormAct2d here).
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        reference = BatchNormAct2d(5, momentum=momentum, act_layer=nn.ReLU)
        with torch.no_grad():
            reference.weight.uniform_(0.5, 1.5), reference.bias.uniform_(-0.5, 0.5)
        converted = CrossRankBatchNorm(BatchNormAct2d(5, momentum=momentum, act_layer=nn.ReLU))
        converted.load_state_dict(reference.state_dict())
        for step in range(3):
            x = (torch.randn(4, 5, 6, 6) * 3 + step).requires_grad_()
            x_copy = x.detach().clone().requires_grad_()
            out, expected = converted(x_copy), reference(x)
            torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
            (expected * torch.arange(out.numel()).view_as(out)).sum().backward()
            (out * torch.arange(out.numel()).view_as(out)).sum().backward()
            torch.testing.assert_close(x_copy.grad, x.grad, rtol=1e-4, atol=1e-4)
        for name, value in reference.state_dict().items():
            torch.testing.assert_close(converted.state_dict()[name], value, rtol=1e-5, atol=1e-6, msg=name)
        torch.testing.assert_close(converted.weight.grad, reference.weight.grad, rtol=1e-4, atol=1e-3)
        converted.eval(), reference.eval()
        x = torch.randn(2, 5, 6, 6)
        torch.testing.assert_close(converted(x), reference(x), rtol=1e-5, atol=1e-5)
    finally:
        dist.destroy_process_group()


@pytest.mark.slow  # a torchrun start
def test_worker_error_ends_the_launching_command(cpu_params: Params, tmp_path: Path):
    params = dataclasses.replace(cpu_params, classifier=dataclasses.replace(cpu_params.classifier, batch_size=64))
    command, env = _two_process_command(params, tmp_path, "train-classifier")
    result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 1
    assert "wsss train-classifier: error: 48 training images: need more than batch_size 64" in result.stderr
    assert re.search(r"wsss train-classifier: error: torchrun worker rank \d failed with exit code 1", result.stderr)
    assert not Path(params.classifier.out, "model.pt").exists()
