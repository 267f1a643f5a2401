"""The training loop both trainers share: resume, epochs, per-epoch validation, checkpoint and history.

In the spirit of torchvision's ``references/segmentation/train.py``: a trainer builds its model, loader and
optimizer, says what one step does (:class:`Loop.step`) and what a finished epoch reports, and
:func:`fit` runs the epochs. Resume, data parallelism and progress are here once:

- every step's randomness is drawn by the trainer from ``(seed, step)``, the loader's order from
  ``(seed, epoch)``, so a run continued from ``checkpoint.pt`` (same fingerprint) computes what an
  uninterrupted one does;
- each rank runs the steps on its share of the global batch; the per-step statistics are summed over the
  epoch and over the ranks, and rank 0 alone validates, prints, writes the checkpoint and ``history.csv``.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from wsss.lib.artifacts import CHECKPOINT_FILE, HISTORY_FILE
from wsss.lib.checkpoint import load_resumable, save_checkpoint
from wsss.lib.distributed import World
from wsss.lib.io import write_csv
from wsss.lib.runtime import autocast

Step = Callable[[int, Any], torch.Tensor]  # (global step, batch) -> statistics to sum over the epoch


@dataclass
class Loop:
    """One training run: what :func:`fit` needs, and where it stands (history, last checkpoint state).

    Args:
        name: progress label (``"classifier"``, ``"segmenter"``).
        model: the bare model (not the DDP wrapper): its state is checkpointed.
        optimizer: its state is checkpointed with the model's.
        loader: the training batches (:func:`wsss.lib.distributed.shard_loader` over a dataset with
            ``set_epoch``).
        epochs: total epochs of the run.
        out: output folder: ``checkpoint.pt`` and ``history.csv`` after every epoch.
        fingerprint: what a checkpoint must match to be continued (params, seed, data).
        world: this process's rank.
        device: the training device (the per-step statistics live there).
        scheduler: stepped by the trainer's step; checkpointed when given.
        extra_state: more entries of every checkpoint (e.g. the params).
    """

    name: str
    model: nn.Module
    optimizer: torch.optim.Optimizer
    loader: DataLoader
    epochs: int
    out: Path
    fingerprint: str
    world: World
    device: torch.device
    scheduler: Any = None
    extra_state: dict[str, Any] = field(default_factory=dict)
    precision: str = "fp32"  # resolved (see :func:`wsss.lib.runtime.resolve_precision`): fp32 | bf16 | fp16
    history: list[dict[str, Any]] = field(default_factory=list)
    first_epoch: int = 0
    seconds_before: float = 0.0
    state: dict[str, Any] | None = None
    _started: float = field(default_factory=time.perf_counter)

    def __post_init__(self) -> None:
        # fp16 gradients underflow without loss scaling; bf16 keeps fp32's exponent range and needs none.
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.precision == "fp16")

    def autocast(self) -> contextlib.AbstractContextManager:
        """The forward pass's mixed precision (a no-op at fp32)."""
        return autocast(self.precision, self.device)

    def optimize(self, loss: torch.Tensor) -> None:
        """One optimizer step on ``loss``: backward, step (through the GradScaler at fp16)."""
        self.optimizer.zero_grad(set_to_none=True)
        if self.scaler.is_enabled():
            self.scaler.scale(loss).backward()
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            loss.backward()
            self.optimizer.step()

    def resume(self) -> None:
        """Continues from ``checkpoint.pt`` when it holds an unfinished run with this fingerprint."""
        state = load_resumable(self.out / CHECKPOINT_FILE, self.fingerprint, announce=self.world.is_main)
        if state is None:
            return
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        if self.scheduler is not None:
            self.scheduler.load_state_dict(state["scheduler"])
        if self.scaler.is_enabled():
            self.scaler.load_state_dict(state["scaler"])
        self.history, self.first_epoch, self.seconds_before = state["history"], state["epoch"], state["train_seconds"]
        self.state = state

    @property
    def steps_per_epoch(self) -> int:
        return len(self.loader)

    def train_seconds(self) -> float:
        """Training time of the whole run so far, earlier (resumed) sessions included."""
        return self.seconds_before + time.perf_counter() - self._started

    def finish(self) -> None:
        """Marks the run finished (rank 0): a later run with these params retrains rather than resuming it."""
        save_checkpoint(self.out / CHECKPOINT_FILE, {**self.state, "finished": True})


def train_one_epoch(loop: Loop, epoch: int, step: Step) -> torch.Tensor:
    """One pass over this rank's batches; returns the sum of ``step``'s statistics over them."""
    loop.model.train()
    loop.loader.dataset.set_epoch(epoch)
    loop.loader.sampler.set_epoch(epoch)
    totals = torch.zeros((), device=loop.device)
    bar = tqdm(
        loop.loader,
        desc=f"{loop.name} epoch {epoch + 1}/{loop.epochs}",
        leave=False,
        mininterval=2.0,
        disable=not loop.world.is_main,
    )
    for batch_index, batch in enumerate(bar):
        totals = totals + step(epoch * loop.steps_per_epoch + batch_index, batch)
    return totals


def fit(
    loop: Loop,
    step: Step,
    validate: Callable[[torch.Tensor], dict[str, Any]],
    describe: Callable[[dict[str, Any]], str],
) -> None:
    """Runs the remaining epochs of ``loop``.

    Args:
        loop: the run (call :meth:`Loop.resume` first to continue a checkpoint).
        step: one optimisation step; returns the statistics to sum (e.g. the loss).
        validate: rank 0, after each epoch: the statistics summed over the epoch's steps and all ranks
            -> the epoch's history row (without ``epoch`` and ``seconds``, which are added here).
        describe: the printed line of a history row.
    """
    loop._started = time.perf_counter()
    for epoch in range(loop.first_epoch, loop.epochs):
        epoch_start = time.perf_counter()
        totals = loop.world.sum(train_one_epoch(loop, epoch, step))
        if not loop.world.is_main:
            continue
        row = {"epoch": epoch + 1, **validate(totals)}
        row["seconds"] = time.perf_counter() - epoch_start
        loop.history.append(row)
        tqdm.write(describe(row))
        loop.state = {
            "fingerprint": loop.fingerprint,
            "epoch": epoch + 1,
            "model": loop.model.state_dict(),
            "optimizer": loop.optimizer.state_dict(),
            **({"scheduler": loop.scheduler.state_dict()} if loop.scheduler is not None else {}),
            **({"scaler": loop.scaler.state_dict()} if loop.scaler.is_enabled() else {}),
            **loop.extra_state,
            "history": loop.history,
            "train_seconds": loop.train_seconds(),
        }
        save_checkpoint(loop.out / CHECKPOINT_FILE, loop.state)
        write_csv(loop.out / HISTORY_FILE, loop.history)


def prepare_model(
    model: nn.Module, device: torch.device, channels_last: bool | None, on_cpu: bool = False
) -> nn.Module:
    """Moves ``model`` to ``device``, in channels-last layout for its convolutions when asked (None: on CUDA, and
    on the CPU where ``on_cpu`` says the model gains by it: a convolutional net, whose oneDNN kernels prefer it)."""
    model.to(device)
    if channels_last if channels_last is not None else (device.type == "cuda" or on_cpu):
        model.to(memory_format=torch.channels_last)
    return model


def param_groups(
    model: nn.Module, lr: float, weight_decay: float, gate_lr: float | None = None, backbone_lr: float | None = None
) -> list[dict]:
    """AdamW groups from what the model declares (timm's convention): weight decay except on 1-d
    parameters and ``model.no_weight_decay()``; the gates (``model.gate_parameter_names()``) in a group of
    their own at ``gate_lr`` without decay, marked ``is_gate``. With ``backbone_lr`` the parameters a pretrained
    checkpoint provides (``model.backbone_parameter_names()``) get it in groups of their own: fine-tuning moves
    them slowly while the new parts (class and [REG] tokens, head) learn at ``lr``."""
    skip, gate_names = model.no_weight_decay(), model.gate_parameter_names()
    backbone = model.backbone_parameter_names() if backbone_lr is not None else set()
    gates, no_decay, decay, backbone_no_decay, backbone_decay = [], [], [], [], []
    for name, param in model.named_parameters():
        if name in gate_names:
            gates.append(param)
        elif param.ndim <= 1 or name in skip:
            (backbone_no_decay if name in backbone else no_decay).append(param)
        else:
            (backbone_decay if name in backbone else decay).append(param)
    groups = [
        {"params": decay, "weight_decay": weight_decay, "lr": lr},
        {"params": no_decay, "weight_decay": 0.0, "lr": lr},
    ]
    if backbone:
        groups += [
            {"params": backbone_decay, "weight_decay": weight_decay, "lr": backbone_lr},
            {"params": backbone_no_decay, "weight_decay": 0.0, "lr": backbone_lr},
        ]
    if gates:
        groups.append({"params": gates, "weight_decay": 0.0, "lr": gate_lr, "is_gate": True})
    return groups
