"""Stage ``train_classifier``: the token-masking ViT, trained with BCE + lambda * L0 gate penalty."""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import timm
import torch
import torch.nn.functional as F

import wsss.models  # noqa: F401  (registers the wsss_vit_* and wsss_cam_vit_* models with timm)
from wsss.lib.artifacts import MODEL_FILE, read_ingested
from wsss.lib.checkpoint import fingerprint, tensor_digest
from wsss.lib.config import ClassifierParams, Params, TrainerParams, key_settings
from wsss.lib.dataset_format import DatasetIndex
from wsss.lib.datasets import AugmentedSplit, SplitData, StreamedSplit, image_batches, normalize
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
from wsss.lib.io import atomic_file, check_writable, write_csv, write_json
from wsss.lib.metrics import f1_scores, mean_average_precision
from wsss.lib.runtime import resolve_precision, write_runtime
from wsss.lib.training import Loop, fit, param_groups, prepare_model
from wsss.models.token_masking_vit import (
    TokenMaskingViT,
    class_map_diversity,
    load_timm_vit_weights,
    present_class_separation,
)


def build_classifier(params: ClassifierParams, num_classes: int, in_chans: int = 3) -> TokenMaskingViT:
    """Creates the registered timm model named by ``params.model`` (plus local weights when given).

    ``wsss_vit_*`` is the token-masking ViT, ``wsss_cam_vit_*`` its single-[CLS] CAM baseline.
    """
    known = timm.list_models("wsss_vit_*") + timm.list_models("wsss_cam_vit_*")
    if params.model not in known:
        raise WsssError(f"classifier.model: unknown model {params.model!r} (known: {', '.join(known)})")
    try:
        model = timm.create_model(params.model, **model_kwargs(params, num_classes, in_chans))
    except ValueError as err:  # e.g. a CAM baseline with mask_ratio > 0
        raise WsssError(f"classifier ({params.model}): {err}") from None
    for name in ("diversity", "separation"):
        if getattr(params, name) > 0 and not model.class_token_per_class:
            raise WsssError(
                f"classifier.{name}: {params.model} has one [CLS] token, the loss needs one per class "
                f"(a wsss_vit_* model, or classifier.{name}=0)"
            )
        if getattr(params, name) > 0 and params.class_sample:
            raise WsssError(
                f"classifier.{name}: the loss reads every class token's map, class_sample leaves tokens out "
                f"(classifier.class_sample=0 or classifier.{name}=0)"
            )
    if params.pretrained:
        try:
            load_timm_vit_weights(model, params.pretrained, params.class_token_spread)
        except (FileNotFoundError, ValueError) as err:
            raise WsssError(f"classifier.pretrained: {err}") from None
    return model


def model_kwargs(params: ClassifierParams, num_classes: int, in_chans: int) -> dict[str, Any]:
    """The registered model's arguments from the params (saved in ``model.pt`` to rebuild it)."""
    kwargs = dict(
        num_classes=num_classes,
        in_chans=in_chans,
        img_size=params.img_size,
        mask_ratio=params.mask_ratio,
        reg_token=params.reg_token,
        head=params.head,
        class_tokens=params.class_tokens,
        gates=params.gates,
        gate_init=params.gate_init,
    )
    # options added later only when on: older records rebuild without them
    return (
        kwargs
        | ({"patch_cam": True} if params.patch_cam else {})
        | ({"class_sample": params.class_sample} if params.class_sample else {})
    )


def scheduled_mask_ratio(schedule: list[list[float]], step: int, total: int) -> float:
    """``classifier.mask_schedule``'s ratio at optimizer step ``step`` of ``total``: the last pair whose fraction
    of the steps has been reached, 0 before the first."""
    reached = [ratio for fraction, ratio in schedule if step >= fraction * total]
    return reached[-1] if reached else 0.0


def _lr_factor(step: int, total: int, warmup: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1.0 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


@torch.no_grad()
def predict_probabilities(
    model: TokenMaskingViT,
    data: SplitData | StreamedSplit,
    device: torch.device,
    batch_size: int = 256,
    num_workers: int = 0,
) -> torch.Tensor:
    """Sigmoid class probabilities ``[N, C]`` for a split (eval mode, no masking)."""
    model.eval()
    probs = torch.empty(len(data), model.num_classes)
    for indices, images in image_batches(data, batch_size, num_workers):
        probs[indices] = torch.sigmoid(model(normalize(images).to(device))).float().cpu()
    return probs


def classification_metrics(probs: torch.Tensor, targets: torch.Tensor) -> dict[str, float]:
    """mAP and F1 at 0.5 of multi-label predictions."""
    f1 = f1_scores(probs.numpy(), targets.numpy())
    return {
        "map": float(mean_average_precision(probs.numpy(), targets.numpy())),
        "f1_macro": float(f1["macro"]),
        "f1_micro": float(f1["micro"]),
    }


def gate_report(model: TokenMaskingViT) -> dict[str, Any]:
    """Closed heads in total and per layer, and the block the attention maps come from."""
    open_heads = model.open_heads()
    closed_per_layer = (~open_heads).sum(dim=1).tolist()
    return {
        "closed_heads": int(sum(closed_per_layer)),
        "total_heads": int(open_heads.numel()),
        "closed_fraction": float((~open_heads).float().mean()),
        "closed_per_layer": closed_per_layer,
        # None: every head closed (e.g. mask_ratio 1 at gate_lambda 0.01); the pseudo-mask stage then stops.
        "map_layer": model.map_layer() if open_heads.any() else None,
        "log_alpha": [g.log_alpha.detach().cpu().tolist() for g in model.gate_modules()],
    }


def train_classifier(
    dataset: DatasetIndex,
    params: ClassifierParams,
    out: Path,
    seed: int,
    device: torch.device,
    world: World | None = None,
    trainer: TrainerParams | None = None,
    epoch_end: Callable[[TokenMaskingViT], dict[str, float]] | None = None,
) -> dict[str, Any]:
    """Trains the classifier on the train split, scores the val split each epoch, writes ``out/``.

    ``epoch_end``: called with the model after each epoch's val pass (rank 0); the numbers it returns join that
    epoch's row of ``history.csv`` (a probe of the research bench, e.g. ``wsss-research curve``).

    Writes ``checkpoint.pt`` and ``history.csv`` every epoch, then ``model.pt``, ``gates.json`` and
    ``metrics.json`` (each file atomically). Continues from ``checkpoint.pt`` when it holds an unfinished
    run with the same params and data (lib/checkpoint.py). With several ranks (``world``), every rank
    trains on its share of each global batch and rank 0 alone evaluates and writes. Returns the final
    metrics (on every rank).
    """
    world = world or World()
    trainer = trainer or TrainerParams()
    num_workers = trainer.num_workers
    out = Path(out)
    if world.is_main:
        check_writable(out)  # before minutes of training, not after them
    # Streamed: only the manifest is held; images are decoded where they are used (DataLoader workers),
    # training images at their original size (crops are cut from it), val ones at their own aspect ratio.
    train = StreamedSplit(dataset, "train")
    if (train.labels.sum(dim=1) == 0).any():
        bad = train.ids[int((train.labels.sum(dim=1) == 0).nonzero()[0])]
        raise WsssError(f"{dataset.root}: train image {bad} has no labels (every training image needs ≥ 1)")
    in_chans = train.image(0).shape[0]
    run_id = fingerprint(
        params={k: v for k, v in key_settings(params).items() if k != "out"},
        seed=seed,
        classes=dataset.classes,
        train_ids=train.ids,
        train_labels=tensor_digest(train.labels),
        in_chans=in_chans,
    )
    torch.manual_seed(seed)
    model = build_classifier(params, dataset.num_classes, in_chans=in_chans)
    if world.distributed:
        model = global_batch_norm(model, device)
    prepare_model(model, device, trainer.channels_last)
    val = StreamedSplit(dataset, "val", params.img_size, model.patch_size)
    augmented = AugmentedSplit(train, train=True, size=params.img_size, crop_scale_min=params.crop_scale_min, seed=seed)
    loader = shard_loader(augmented, params.batch_size, seed, world, num_workers, pin_memory=device.type == "cuda")
    optimizer = torch.optim.AdamW(
        param_groups(model, params.lr, params.weight_decay, params.gate_lr, params.backbone_group_lr)
    )
    base_lrs = [group["lr"] for group in optimizer.param_groups]  # before a resume overwrites them
    precision = resolve_precision(trainer.precision, device)
    loop = Loop("classifier", model, optimizer, loader, params.epochs, out, run_id, world, device, precision=precision)
    loop.resume()
    network = data_parallel(model, device, world, find_unused=bool(model.gate_modules()))
    network = torch.compile(network) if trainer.compile else network
    total_steps = params.epochs * loop.steps_per_epoch
    warmup_steps = max(1, int(params.warmup_epochs * loop.steps_per_epoch))
    gate_start_step = int(params.gate_start * total_steps)
    maps_needed = params.diversity > 0 or params.separation > 0  # the training maps of the class tokens

    def step(index: int, batch: tuple[torch.Tensor, torch.Tensor, Any]) -> torch.Tensor:
        images, labels, _ = batch
        # Masking and gate samples come from (seed, step): equal on every rank and after a resume.
        seed_step(seed, index)
        mask_noise = world.local_rows(torch.rand(len(labels) * world.size, labels.shape[1]))
        # drawn after the masking noise, and only when sampling, so the default runs draw what they always drew
        sample_noise = None
        if params.class_sample:
            sample_noise = world.local_rows(torch.rand(len(labels) * world.size, labels.shape[1])).to(device)
        model.set_gates_active(index >= gate_start_step)
        if params.mask_schedule:  # the model reads its ratio at each forward
            model.mask_ratio = scheduled_mask_ratio(params.mask_schedule, index, total_steps)
        factor = _lr_factor(index, total_steps, warmup_steps)
        for group, base in zip(optimizer.param_groups, base_lrs, strict=True):
            # Gates are trained at a constant lr once pruning starts: the cosine tail would freeze them.
            group["lr"] = base if group.get("is_gate") else base * factor
        images, labels = images.to(device), labels.to(device)
        with loop.autocast():
            out = network(
                images, labels, mask_noise=mask_noise.to(device), class_attention=maps_needed,
                patch_logits=params.patch_cam, sample_noise=sample_noise,
            )  # fmt: skip
        logits, *extra = out if isinstance(out, tuple) else (out,)
        maps = extra.pop(0) if maps_needed else None
        bce = F.binary_cross_entropy_with_logits(logits.float(), labels)
        if params.patch_cam:  # MCTformer-V2: the PatchCAMs' own classification loss, weight 1
            bce = bce + F.binary_cross_entropy_with_logits(extra.pop(0).float(), labels)
        penalty = model.gate_penalty(params.gate_penalty)
        diversity = class_map_diversity(maps) if params.diversity > 0 else bce.new_zeros(())
        separation = present_class_separation(maps, labels) if params.separation > 0 else bce.new_zeros(())
        loss = bce + params.gate_lambda * penalty + params.diversity * diversity + params.separation * separation
        loop.optimize(loss)
        return torch.stack([loss.detach(), bce.detach(), penalty.detach(), diversity.detach()])

    last_val: dict[str, torch.Tensor] = {}  # the last epoch's val probabilities: the final ones, not recomputed

    def validate(totals: torch.Tensor) -> dict[str, Any]:
        # Each rank's mean is over an equal share of the global batch: the global mean is their mean.
        means = (totals / (world.size * loop.steps_per_epoch)).tolist()
        with loop.autocast():
            probs = last_val["probs"] = predict_probabilities(model, val, device, num_workers=num_workers)
        metrics = classification_metrics(probs, val.labels)
        return {
            **dict(zip(("loss", "bce", "penalty", "diversity"), means, strict=True)),
            "val_map": metrics["map"],
            "val_f1_macro": metrics["f1_macro"],
            "closed_heads": model.num_closed_heads(),
            **(epoch_end(model) if epoch_end is not None else {}),
        }

    def describe(row: dict[str, Any]) -> str:
        return (
            f"epoch {row['epoch']:>3}  loss {row['loss']:.4f}  val mAP {row['val_map']:.3f}  "
            f"F1 {row['val_f1_macro']:.3f}  closed heads {row['closed_heads']}/{model.open_heads().numel()}  "
            f"{row['seconds']:.1f}s"
        )

    fit(loop, step, validate, describe)
    result = None
    if world.is_main:
        with loop.autocast():  # the final val pass at the training precision, as every epoch's
            result = _write_outputs(model, dataset, params, out, val, device, loop.history, in_chans, last_val)
        result["train_seconds"] = loop.train_seconds()
        result["precision"] = precision
        write_json(out / "metrics.json", result)
        write_runtime(out, trainer.precision, device)
        loop.finish()
    return world.broadcast(result)


def _write_outputs(
    model: TokenMaskingViT,
    dataset: DatasetIndex,
    params: ClassifierParams,
    out: Path,
    val: StreamedSplit,
    device: torch.device,
    history: list[dict[str, Any]],
    in_chans: int,
    last_val: dict[str, torch.Tensor],
) -> dict[str, Any]:
    """Writes ``model.pt``, ``history.csv`` and ``gates.json``; returns the final metrics (from the last epoch's
    val pass: the model has not changed since; computed here when a resumed run had no epoch left)."""
    probs = last_val.get("probs")
    final = classification_metrics(
        probs if probs is not None else predict_probabilities(model, val, device), val.labels
    )
    gates = gate_report(model)
    record = {
        "model_name": params.model,
        "model_kwargs": model_kwargs(params, dataset.num_classes, in_chans),
        "state_dict": model.state_dict(),
        "classes": dataset.classes,
        "params": vars(params),
    }
    with atomic_file(out / MODEL_FILE) as handle:
        torch.save(record, handle)
    write_csv(out / "history.csv", history)
    write_json(out / "gates.json", gates)
    return {
        "val_map": final["map"],
        "val_f1_macro": final["f1_macro"],
        "val_f1_micro": final["f1_micro"],
        "closed_heads": gates["closed_heads"],
        "closed_fraction": gates["closed_fraction"],
        "closed_per_layer": gates["closed_per_layer"],
        "map_layer": gates["map_layer"],
    }


def main(params: Params) -> dict[str, Any] | None:
    """CLI entry: reads the ingested data set and trains with the ``classifier`` params section.

    With ``trainer.nproc > 1`` outside torchrun it re-launches itself under torchrun and returns None
    (rank 0 of the workers prints the result).
    """
    if needs_launch(params.trainer.nproc):
        launch(["train-classifier"], params)
        return None
    with process_group(params) as (device, world):
        dataset = read_ingested(Path(params.ingest.out))
        result = train_classifier(
            dataset, params.classifier, Path(params.classifier.out), params.seed, device, world,
            params.trainer,
        )  # fmt: skip
    if world.is_main:
        print(
            f"classifier: val mAP {result['val_map']:.3f}  F1 {result['val_f1_macro']:.3f}  "
            f"closed heads {result['closed_heads']} ({result['closed_fraction']:.0%}) per layer "
            f"{result['closed_per_layer']}  maps from block {result['map_layer']}"
        )
    return result
