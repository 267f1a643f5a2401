"""Data-parallel training under ``torchrun``: launch, process group, sharding, cross-rank BatchNorm.

Both trainers run one code path for 1..N processes. ``trainer.nproc > 1`` makes ``wsss train-*``
re-run itself under ``torch.distributed.run`` (NCCL on GPUs, one process per GPU; gloo on CPU). The
params' ``batch_size`` is the global batch: each rank takes ``batch_size / nproc`` images of the same
global batch a single process would take, gradients are averaged by DDP, BatchNorm uses the global
batch's statistics, and every random draw is made from ``(seed, step)`` identically on all ranks, so N
processes compute what one process computes (up to floating-point summation order).
"""

from __future__ import annotations

import contextlib
import datetime
import os
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import yaml
from torch import nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from wsss.lib.config import Params
from wsss.lib.errors import WsssError
from wsss.lib.runtime import resolve_threads, setup_runtime

# Rank 0 alone scores the val split after each epoch while the other ranks wait in the next
# collective; the default timeout (10 min for NCCL) would kill long evaluations.
COLLECTIVE_TIMEOUT = datetime.timedelta(hours=2)


@dataclass(frozen=True)
class World:
    """This process's place among the training processes (rank 0 of 1 without torchrun)."""

    rank: int = 0
    size: int = 1

    @property
    def is_main(self) -> bool:
        """Rank 0 logs, evaluates and writes every file."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1

    def local_rows(self, global_rows: torch.Tensor) -> torch.Tensor:
        """This rank's rows of a tensor with one row per image of the global batch (see :func:`shard_loader`)."""
        return global_rows[self.rank :: self.size]

    def sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum over ranks (in place; the tensor must live on the training device: NCCL needs CUDA tensors)."""
        if self.distributed:
            dist.all_reduce(tensor)
        return tensor

    def broadcast(self, value: Any) -> Any:
        """Rank 0's ``value`` on every rank."""
        if not self.distributed:
            return value
        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]


def inside_torchrun() -> bool:
    """True in a worker that ``torchrun`` started (it sets these variables for every worker)."""
    return "LOCAL_RANK" in os.environ and "WORLD_SIZE" in os.environ


def needs_launch(nproc: int) -> bool:
    """A stage asked for several processes and is not yet one of them."""
    return nproc > 1 and not inside_torchrun()


def launch(command: list[str], params: Params) -> None:
    """Runs ``wsss <command>`` in ``params.trainer.nproc`` worker processes with ``torch.distributed.run``.

    The workers read the resolved params (overrides applied) from a temporary file, so they see exactly
    what this process saw.

    Raises:
        WsssError: a worker failed (its own error line is printed above by the worker).
    """
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    nproc = params.trainer.nproc
    # torchrun sets OMP_NUM_THREADS=1 (with a warning) when unset; the workers set num_threads anyway.
    os.environ.setdefault("OMP_NUM_THREADS", str(resolve_threads(params.num_threads, nproc, announce=False)))
    fd, name = tempfile.mkstemp(prefix="wsss-params-", suffix=".yaml")
    try:
        with os.fdopen(fd, "w") as handle:
            yaml.safe_dump(params.to_dict(), handle, sort_keys=False)
        args = ["--standalone", f"--nproc-per-node={nproc}", "--module", "wsss.tools.cli", *command, "--params", name]
        print(f"launching {nproc} processes: torchrun {' '.join(args)}", flush=True)
        try:
            run(parse_args(args))
        except ChildFailedError as err:
            rank, failure = err.get_first_failure()
            raise WsssError(f"torchrun worker rank {rank} failed with exit code {failure.exitcode}") from None
    finally:
        Path(name).unlink(missing_ok=True)


@contextlib.contextmanager
def process_group(params: Params) -> Iterator[tuple[torch.device, World]]:
    """Applies the runtime settings and, inside torchrun, joins the process group for the block.

    Yields the device of this rank (``cuda:LOCAL_RANK`` on GPUs) and its :class:`World`.
    """
    ranks_here = int(os.environ.get("LOCAL_WORLD_SIZE", "1")) if inside_torchrun() else 1
    device = setup_runtime(params.seed, params.num_threads, params.device, share=ranks_here)
    if not inside_torchrun():
        yield device, World()
        return
    local_rank, world_size = int(os.environ["LOCAL_RANK"]), int(os.environ["WORLD_SIZE"])
    if device.type == "cuda":
        if local_rank >= torch.cuda.device_count():
            raise WsssError(f"trainer.nproc: {world_size} processes per node, {torch.cuda.device_count()} GPU(s)")
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend, timeout=COLLECTIVE_TIMEOUT)
    try:
        world = World(dist.get_rank(), dist.get_world_size())
        if world.is_main:
            print(f"data parallel: {world.size} processes ({backend}), {device.type}", flush=True)
        yield device, world
    finally:
        dist.destroy_process_group()


class EpochSampler(DistributedSampler):
    """A DistributedSampler that yields ``(epoch, index)``: the dataset learns the epoch from each key, so
    persistent DataLoader workers (which keep their own copy of the dataset) augment for the right epoch."""

    def __iter__(self) -> Iterator[tuple[int, int]]:
        return ((self.epoch, index) for index in super().__iter__())


def drops_last_batch(images: int, batch_size: int) -> bool:
    """Whether :func:`shard_loader` drops an incomplete last batch: always, unless the whole split is smaller than
    one batch (tiny data sets then train on one partial batch)."""
    return images > batch_size


def steps_per_epoch(images: int, batch_size: int) -> int:
    """Optimizer steps of one epoch of :func:`shard_loader` over ``images`` (global ``batch_size``)."""
    return images // batch_size if drops_last_batch(images, batch_size) else 1


def shard_loader(
    dataset: Dataset, batch_size: int, seed: int, world: World, num_workers: int = 0, pin_memory: bool = False
) -> DataLoader:
    """Shuffled training batches; ``batch_size`` is the global batch, each rank gets ``batch_size / size``.

    The order is a function of ``(seed, epoch)`` only (``loader.sampler.set_epoch``), so nothing hidden
    carries over between epochs and a resumed run sees the batches an uninterrupted one sees. Rank r's
    j-th image of a step is image ``j * size + r`` of the global batch a single process would take. With
    ``num_workers`` the items are made by that many persistent worker processes (same items: an item's
    augmentation depends only on ``(seed, epoch, index)``).

    Raises:
        WsssError: a global batch that does not split evenly, or fewer images than one batch with ranks.
    """
    if batch_size % world.size:
        raise WsssError(f"batch_size {batch_size} is not divisible by trainer.nproc {world.size}")
    drop_last = drops_last_batch(len(dataset), batch_size)
    if world.distributed and not drop_last:
        raise WsssError(f"{len(dataset)} training images: need more than batch_size {batch_size} with trainer.nproc")
    # A dataset with set_epoch (AugmentedSplit) takes (epoch, index) keys: see EpochSampler.
    kind = EpochSampler if hasattr(dataset, "set_epoch") else DistributedSampler
    sampler = kind(dataset, num_replicas=world.size, rank=world.rank, shuffle=True, seed=seed, drop_last=drop_last)
    return DataLoader(
        dataset,
        batch_size=batch_size // world.size,
        sampler=sampler,
        drop_last=drop_last,
        num_workers=num_workers,
        persistent_workers=num_workers > 0,
        pin_memory=pin_memory,
    )


def seed_step(seed: int, step: int) -> None:
    """Seeds torch's global generators from ``(seed, step)``: the same draws on every rank and after a resume."""
    torch.manual_seed(int(np.random.SeedSequence([seed, step]).generate_state(1)[0]))


class _SumOverRanks(torch.autograd.Function):
    """All-reduce (sum) whose gradient is the sum over ranks of the incoming gradients.

    Every rank's loss depends on the summed statistics, so each input receives the gradient of the
    total loss: the sum of all ranks' gradients with respect to the sum.
    """

    @staticmethod
    def forward(ctx: Any, tensor: torch.Tensor) -> torch.Tensor:
        summed = tensor.clone()
        dist.all_reduce(summed)
        return summed

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        summed = grad.clone()
        dist.all_reduce(summed)
        return summed


class CrossRankBatchNorm(nn.modules.batchnorm._BatchNorm):
    """BatchNorm over the global batch on CPU ranks (gloo): ``torch.nn.SyncBatchNorm`` has CUDA kernels only.

    The per-channel mean and variance are computed from sums all-reduced over ranks with a
    differentiable all-reduce (two passes: mean, then squared deviations), so
    forward, backward and the running statistics equal single-process BatchNorm on the whole batch.
    Takes over a BatchNorm module's parameters and buffers; timm's ``BatchNormAct2d`` keeps its
    ``drop`` and ``act`` (applied after the normalisation, as there).
    """

    def __init__(self, source: nn.modules.batchnorm._BatchNorm) -> None:
        super().__init__(source.num_features, source.eps, source.momentum, source.affine, source.track_running_stats)
        self.weight, self.bias = source.weight, source.bias
        self.running_mean, self.running_var = source.running_mean, source.running_var
        self.num_batches_tracked = source.num_batches_tracked
        self.drop = getattr(source, "drop", nn.Identity())
        self.act = getattr(source, "act", nn.Identity())
        self.train(source.training)

    def _check_input_dim(self, input: torch.Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"expected at least 2D input (got {input.dim()}D input)")

    def _normalize(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:  # as torch's SyncBatchNorm: no synchronisation in inference
            batch_stats = self.running_mean is None
            return nn.functional.batch_norm(
                x, self.running_mean, self.running_var, self.weight, self.bias, batch_stats, 0.0, self.eps
            )
        dims = [0, *range(2, x.dim())]
        shape = [1, -1] + [1] * (x.dim() - 2)
        local_count = torch.tensor([x.numel() // x.shape[1]], dtype=x.dtype, device=x.device)
        sums = _SumOverRanks.apply(torch.cat([x.sum(dims), local_count]))
        count = sums[-1]
        mean = sums[:-1] / count
        centered = x - mean.view(shape)
        var = _SumOverRanks.apply((centered * centered).sum(dims)) / count
        if self.training and self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                factor = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
                self.running_mean.lerp_(mean.detach(), factor)
                self.running_var.lerp_(var.detach() * count / (count - 1).clamp(min=1), factor)
        out = centered * torch.rsqrt(var + self.eps).view(shape)
        if self.affine:
            out = out * self.weight.view(shape) + self.bias.view(shape)
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input_dim(x)
        return self.act(self.drop(self._normalize(x)))


def _to_cross_rank(module: nn.Module) -> nn.Module:
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        return CrossRankBatchNorm(module)
    for name, child in list(module.named_children()):
        module.add_module(name, _to_cross_rank(child))
    return module


def global_batch_norm(model: nn.Module, device: torch.device) -> nn.Module:
    """Makes every BatchNorm of ``model`` normalise with the statistics of the global batch.

    CUDA: timm's ``convert_sync_batchnorm`` (``torch.nn.SyncBatchNorm``, and its variant for timm's
    BatchNormAct2d); CPU: :class:`CrossRankBatchNorm`. Parameters are shared, not copied, and state dict
    keys stay those of the plain model.
    """
    if device.type == "cuda":
        from timm.layers import convert_sync_batchnorm

        return convert_sync_batchnorm(model)
    return _to_cross_rank(model)


def data_parallel(model: nn.Module, device: torch.device, world: World, find_unused: bool = False) -> nn.Module:
    """``model`` wrapped in DDP when there are several ranks, else ``model`` itself.

    Buffers are not re-synchronised each step: with global-batch BatchNorm they are equal on every rank.
    ``find_unused``: parameters that get no gradient in some steps (the classifier's gates before
    pruning starts) stay gradient-free on every rank, as in a single process, so AdamW skips them.
    """
    if not world.distributed:
        return model
    device_ids = [device.index] if device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(
        model, device_ids=device_ids, forward_sync_buffers=False, find_unused_parameters=find_unused
    )
