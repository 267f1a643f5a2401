"""Stage ``train_segmenter``: a FPN segmenter trained on pseudo masks (or GT: the upper bound)."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from wsss.lib.artifacts import (
    HISTORY_FILE,
    MODEL_FILE,
    iter_predictions,
    pseudo_mask_path,
    read_ingested,
    segmenter_dir,
    segmenter_split,
)
from wsss.lib.checkpoint import fingerprint
from wsss.lib.config import Params, SegmenterParams, TrainerParams
from wsss.lib.dataset_format import DatasetIndex, read_mask_table
from wsss.lib.datasets import AugmentedSplit, StreamedSplit, masks_digest
from wsss.lib.distributed import (
    World,
    data_parallel,
    global_batch_norm,
    launch,
    needs_launch,
    process_group,
    seed_step,
    shard_loader,
)
from wsss.lib.errors import WsssError
from wsss.lib.images import read_mask
from wsss.lib.io import atomic_file, check_writable, write_csv
from wsss.lib.metrics import IGNORE_INDEX, mean_iou
from wsss.lib.runtime import resolve_precision, write_runtime
from wsss.lib.training import Loop, fit, prepare_model
from wsss.models.segmenter import Segmenter, vit_encoder_kwargs

MASK_SOURCES = ("pseudo", "gt")


def _check_masks(data: StreamedSplit, num_classes: int) -> None:
    """Every training image has a mask of its size with values 0..C or 255 (decoded one at a time)."""
    for index, (image_id, shape) in enumerate(zip(data.ids, data.original_sizes, strict=True)):
        if image_id not in data.given_masks:
            raise WsssError(f"training mask for id {image_id!r} is missing")
        mask = data.original_mask(index)
        if mask.shape != tuple(shape):
            raise WsssError(f"training mask for id {image_id!r} has shape {mask.shape}, image is {tuple(shape)}")
        if ((mask > num_classes) & (mask != IGNORE_INDEX)).any():
            raise WsssError(f"training mask for id {image_id!r} has a value above {num_classes} (not 255)")


def train_segmenter(
    dataset: DatasetIndex,
    masks: dict[str, np.ndarray] | None,
    params: SegmenterParams,
    out: Path,
    seed: int,
    device: torch.device | str,
    world: World | None = None,
    trainer: TrainerParams | None = None,
) -> dict[str, Any]:
    """Trains on the train split, scores val mIoU against GT each epoch, writes ``out/``.

    Continues from ``checkpoint.pt`` when it holds an unfinished run with the same params and training
    masks (lib/checkpoint.py). With several ranks every rank trains on its share of each global batch
    (BatchNorm over the global batch) and rank 0 alone evaluates and writes.

    Args:
        dataset: the ingested data set.
        masks: original-size training masks ``{id: HxW array or PNG bytes}`` (the pseudo masks); None =
            the train split's GT masks (the fully supervised upper bound).
        params: the ``segmenter`` params section.
        out: output folder; gets ``checkpoint.pt`` and ``history.csv`` every epoch, then ``model.pt``.
        seed: seeds the weights, the loader order and the augmentation.
        device: "cpu", "cuda" or a torch.device.
        world: this process's rank among the training processes (default: the only one).
        trainer: how to train (DataLoader workers, precision, channels-last, compile); default: TrainerParams().

    Returns:
        ``{"val_miou", "epochs", "seconds"}`` (on every rank).
    """
    world = world or World()
    trainer = trainer or TrainerParams()
    num_workers = trainer.num_workers
    device = torch.device(device)
    out = Path(out)
    if world.is_main:
        check_writable(out)  # before minutes of training, not after them
    num_classes = dataset.num_classes + 1
    # Streamed: only the manifest (and the given masks) is held; images are decoded where they are used.
    # Streamed: only the manifest (and the given masks, PNG-encoded) is held; images are decoded where
    # they are used, at their original size (the training crops are cut from it).
    train = StreamedSplit(dataset, "train", with_masks=masks is None, masks=masks)
    if masks is not None:
        _check_masks(train, dataset.num_classes)
    val_rows = dataset.split("val")
    val_gt = {r.id: r.mask for r in val_rows.itertuples(index=False) if isinstance(r.mask, str)}

    model_kwargs = {
        "encoder_name": params.encoder,
        "num_classes": num_classes,
        "decoder_channels": params.decoder_channels,
        "in_chans": train.image(0).shape[0],
        **vit_encoder_kwargs(params.encoder, params.img_size),
    }
    run_id = fingerprint(
        params={k: v for k, v in dataclasses.asdict(params).items() if k != "out"},
        seed=seed,
        model_kwargs=model_kwargs,
        train_ids=train.ids,
        train_masks=masks_digest(train),
    )
    torch.manual_seed(seed)
    try:
        model = Segmenter(**model_kwargs)
        if params.pretrained:
            model.load_encoder_weights(params.pretrained)
    except (FileNotFoundError, ValueError) as err:  # models/ raises plain errors; the app's are one line
        raise WsssError(f"segmenter: {err}") from None
    if world.distributed:
        model = global_batch_norm(model, device)
    # channels-last on the CPU too: EfficientNet-Lite0's training step at 112 px took 1.13 s instead of 1.64 s
    # (2 threads, AVX2); its depthwise convolutions are oneDNN's fast path in that layout
    prepare_model(model, device, trainer.channels_last, on_cpu=True)
    val = segmenter_split(model, dataset, "val", params.img_size)
    augmented = AugmentedSplit(train, train=True, size=params.img_size, seed=seed)
    loader = shard_loader(augmented, params.batch_size, seed, world, num_workers, pin_memory=device.type == "cuda")
    optimizer = torch.optim.AdamW(model.parameters(), lr=params.lr, weight_decay=params.weight_decay)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=params.epochs * len(loader))
    loop = Loop(
        "segmenter", model, optimizer, loader, params.epochs, out, run_id, world, device,
        scheduler=scheduler, extra_state={"params": dataclasses.asdict(params)},
        precision=resolve_precision(trainer.precision, device),
    )  # fmt: skip
    loop.resume()
    network = data_parallel(model, device, world)
    network = torch.compile(network) if trainer.compile else network

    def step(index: int, batch: tuple[torch.Tensor, Any, torch.Tensor]) -> torch.Tensor:
        images, _, targets = batch
        seed_step(seed, index)  # any random layer draws alike on all ranks
        images, targets = images.to(device), targets.to(device)
        # Sum / valid pixels of the global batch instead of the mean: a batch that is all "ignore"
        # gives 0, not NaN, and ranks with more ignored pixels do not weigh more.
        valid = world.sum((targets != IGNORE_INDEX).sum()).clamp(min=1)
        with loop.autocast():
            logits = network(images)
        loss = F.cross_entropy(logits.float(), targets, ignore_index=IGNORE_INDEX, reduction="sum") / valid
        # DDP averages gradients over ranks; this rank's share of the global loss is summed instead.
        loop.optimize(loss * world.size)
        scheduler.step()
        return loss.detach()

    def validate(total_loss: torch.Tensor) -> dict[str, Any]:
        predictions = iter_predictions(model, val, device, params.batch_size, num_workers)
        pairs = ((read_mask(dataset.path(val_gt[i])), mask) for i, mask in predictions if i in val_gt)
        with loop.autocast():
            val_miou = mean_iou(pairs, num_classes)
        return {"loss": float(total_loss) / loop.steps_per_epoch, "val_miou": val_miou}

    def describe(row: dict[str, Any]) -> str:
        return f"epoch {row['epoch']:>3}  loss {row['loss']:.4f}  val mIoU {row['val_miou']:.3f}  {row['seconds']:.1f}s"

    fit(loop, step, validate, describe)
    result = None
    if world.is_main:
        record = {
            "model_kwargs": model_kwargs,
            "state_dict": model.state_dict(),
            "classes": dataset.classes,
            "img_size": params.img_size,
        }
        with atomic_file(out / MODEL_FILE) as handle:
            torch.save(record, handle)
        write_csv(out / HISTORY_FILE, loop.history)
        write_runtime(out, trainer.precision, device)
        loop.finish()
        result = {"val_miou": loop.history[-1]["val_miou"], "epochs": params.epochs, "seconds": loop.train_seconds()}
    return world.broadcast(result)


def main(params: Params, mask_source: str = "pseudo") -> dict[str, Any] | None:
    """CLI entry: trains on the pseudo masks (``mask_source="pseudo"``) or on the train GT (``"gt"``).

    With ``trainer.nproc > 1`` outside torchrun it re-launches itself under torchrun and returns None
    (rank 0 of the workers prints the result).
    """
    if mask_source not in MASK_SOURCES:
        raise WsssError(f"mask source {mask_source!r} is not one of {', '.join(MASK_SOURCES)}")
    if needs_launch(params.trainer.nproc):
        launch(["train-segmenter", "--masks", mask_source], params)
        return None
    with process_group(params) as (device, world):
        dataset = read_ingested(Path(params.ingest.out))
        masks = read_mask_table(pseudo_mask_path(params), encoded=True) if mask_source == "pseudo" else None
        out = segmenter_dir(params, mask_source)
        result = train_segmenter(dataset, masks, params.segmenter, out, params.seed, device, world, params.trainer)
    if world.is_main:
        print(f"segmenter ({mask_source} masks): val mIoU {result['val_miou']:.3f} in {result['seconds']:.0f}s")
    return result
