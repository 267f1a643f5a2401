"""Stage ``pseudo_masks``: segmentation masks straight from the [CLS]_c self-attention.

The rule itself (maps, normalisation, merge, threshold search) is :mod:`wsss.lib.mask_rule`; this stage
decides it once for the split (thresholds tuned on a subset of the TRAIN split, never val), applies it to
every image (:func:`pseudo_mask_shard`, the unit the Dask-sharded flow distributes), scores the masks
against the split's ground truth and writes them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from wsss.lib.artifacts import MODEL_FILE, classifier_images, load_map_model, read_ingested
from wsss.lib.config import Params, PseudoMaskParams
from wsss.lib.datasets import (
    DatasetIndex,
    SplitData,
    encode_mask_png,
    read_mask,
    resize_mask,
    write_encoded_mask_table,
)
from wsss.lib.errors import WsssError
from wsss.lib.io import check_writable, write_json
from wsss.lib.mask_rule import (
    ThresholdSearch,
    attention_maps,
    block_candidates,
    class_specificity,
    grid_ceiling_mask,
    map_block_count,
    merge_maps,
    normalized_maps,
    present_classes,
    tuning_size,
)
from wsss.lib.metrics import IGNORE_INDEX, ConfusionMatrix, scores_from_confusion
from wsss.lib.runtime import autocast, resolve_precision, setup_runtime
from wsss.models.token_masking_vit import TokenMaskingViT


@dataclass(frozen=True)
class MaskRule:
    """What every shard applies alike, decided once before the shards: thresholds and the map blocks."""

    fg_threshold: float
    bg_threshold: float
    tuning_miou: float | None  # None: the thresholds are the params' own (not tuned)
    map_blocks: str  # the aggregation applied: last, lastK or all (auto resolved to one of them)
    map_layers: tuple[int, ...]  # the blocks it sums
    # map_blocks: auto -> tuning mIoU of each candidate at its best thresholds (coarse grid); else None
    block_scores: dict[str, float] | None = None
    precision: str = "fp32"  # the maps' forward passes (trainer.precision, resolved for the device)


@dataclass
class ShardResult:
    """One contiguous run of a split's images: their masks in split order and additive statistics."""

    ids: list[str]
    masks: list[bytes]  # PNG-encoded, as the mask table stores them
    grids: Counter[tuple[int, int]]  # images per token grid (an image's grid follows its aspect ratio)
    pseudo_confusion: np.ndarray  # int64 [C+1, C+1] over the images with ground truth
    ceiling_confusion: np.ndarray
    specificity_shares: list[float]
    area_shares: list[float]
    scored_images: int  # images with ground truth


@dataclass
class _SplitMaps:
    """Attention maps and what the rule needs of some images of a split (one shard, or the tuning sample)."""

    data: SplitData
    maps: list[torch.Tensor]  # [C, h, w] per image (per block: [L, C, h, w]) on the model's device, h x w its own grid
    probs: torch.Tensor  # [N, C]
    gt_paths: list[str | None]


@contextlib.contextmanager
def _thread_count_invariant_kernels(precision: str) -> Iterator[None]:
    """Turns torch's oneDNN CPU kernels off inside the block, at fp32.

    oneDNN's 1x1 convolution rounds differently with another thread count (measured: maps 4e-8 apart with 1
    vs 2 threads on 8-image batches), so 1-thread shard workers would not reproduce the serial stage bit
    for bit; the native fp32 kernels gave identical maps (and cost ~5 % here). Under bf16/fp16 autocast the
    CPU's fast reduced-precision matmuls are oneDNN's (measured on a ViT-S/14: 9.9 img/s without, 88.6 with),
    so they stay on: reduced-precision maps are reproducible per thread count, not across them.
    """
    enabled = torch.backends.mkldnn.enabled
    torch.backends.mkldnn.enabled = enabled and precision != "fp32"
    try:
        yield
    finally:
        torch.backends.mkldnn.enabled = enabled


def _split_maps(
    model: TokenMaskingViT,
    dataset: DatasetIndex,
    params: PseudoMaskParams,
    device: torch.device,
    positions: slice | list[int],
    blocks: int | None,
    per_block: bool = False,
    desc: str = "attention maps",
    precision: str = "fp32",
) -> _SplitMaps:
    """Loads the images at ``positions`` of ``params.split`` at their own aspect ratio (longer side the
    classifier's input size) and computes their maps, in that order (``blocks``/``per_block``: see
    :func:`wsss.lib.mask_rule.attention_maps`)."""
    rows = dataset.split(params.split)
    picked = rows.iloc[positions]
    subset = dataclasses.replace(dataset, manifest=picked)
    data = classifier_images(model, subset, params.split)
    with _thread_count_invariant_kernels(precision), autocast(precision, device):
        maps, probs = attention_maps(
            model, data.images, device, params.batch_size, params.scales, params.flip, blocks, per_block,
            refine_steps(params), desc, on_device=True,
        )  # fmt: skip
    gt_paths = [path if isinstance(path, str) else None for path in picked["mask"].tolist()]
    return _SplitMaps(data, maps, probs, gt_paths)


def _sum_blocks(maps: Sequence[torch.Tensor]) -> torch.Tensor:
    """The blocks' maps summed in the order the model sums them (so the result equals its own sum)."""
    return sum(maps[1:], maps[0])


def refine_steps(params: PseudoMaskParams) -> int:
    """How many times the maps are refined with the patch affinity (0: ``refine: none``)."""
    return params.refine_iterations if params.refine == "affinity" else 0


def _image_maps(
    split_maps: _SplitMaps, i: int, has_labels: bool, size: tuple[int, int] | None = None
) -> tuple[torch.Tensor, np.ndarray, np.ndarray]:
    """(normalised maps of the present classes at the image's own size, or ``size``; those classes;
    probabilities)."""
    probs = split_maps.probs[i].numpy()
    classes = present_classes(split_maps.data.labels[i].numpy() if has_labels else None, probs)
    size = size or split_maps.data.original_sizes[i]
    return normalized_maps(split_maps.maps[i][classes], size), classes, probs


def _tuning_samples(
    sample: _SplitMaps, maps: list[torch.Tensor], gts: list[np.ndarray], has_labels: bool
) -> list[tuple[torch.Tensor, np.ndarray, np.ndarray, np.ndarray]]:
    """(normalised maps, classes, probabilities, ground truth) of each tuning image under ``maps``, at the
    size of its ground truth ``gts`` (reduced: :func:`wsss.lib.mask_rule.tuning_size`)."""
    view = dataclasses.replace(sample, maps=maps)
    return [(*_image_maps(view, i, has_labels, gt.shape), gt) for i, gt in enumerate(gts)]


def decide_rule(
    model: TokenMaskingViT,
    dataset: DatasetIndex,
    params: PseudoMaskParams,
    device: torch.device,
    precision: str = "fp32",
) -> MaskRule:
    """The map blocks and thresholds every image gets (a single step: it needs the whole tuning sample).

    With ``tune_thresholds`` the thresholds are searched on the first ``tune_images`` images of the split that
    have ground truth (the TRAIN split: never val); ``map_blocks: auto`` also picks the aggregation there:
    each candidate (:func:`wsss.lib.mask_rule.block_candidates`) is scored at its best thresholds of the
    coarse grid, the best one (ties: the one with more blocks, the paper's direction) then gets the fine
    search. One forward pass serves every candidate: the per-block maps of the sample are summed per
    candidate in the order the model sums them, so the maps equal those of the final pass.
    Without tuning (or without ground truth) ``auto`` is the paper's ``all``.
    """
    if not any(blk.attn.open_heads().any() for blk in model.blocks):
        raise WsssError("the classifier closed every attention head: no block can provide attention maps")
    if refine_steps(params) and not model.class_token_per_class:
        raise WsssError("pseudo_masks.refine: affinity refines class-token attention; this classifier has one [CLS]")
    rows = dataset.split(params.split)
    with_gt = [i for i, path in enumerate(rows["mask"].tolist()) if isinstance(path, str)]
    tune = params.tune_thresholds and bool(with_gt)
    spec = params.map_blocks if params.map_blocks != "auto" or tune else "all"
    if not tune:
        layers = tuple(model.map_layers(map_block_count(spec)))
        return MaskRule(params.fg_threshold, params.bg_threshold, None, spec, layers, precision=precision)
    candidates = block_candidates(model) if spec == "auto" else {spec: map_block_count(spec)}
    has_labels = params.split == "train"
    sample = _split_maps(
        model, dataset, params, device, with_gt[: params.tune_images], None, True, "maps for threshold tuning",
        precision,
    )  # fmt: skip
    # Scored at a reduced size (longer side TUNE_SIDE): the search merges every image about 60 times per
    # candidate, and maps blown up from a token grid lose little at that size; the masks are full size.
    pairs = zip(sample.gt_paths, sample.data.original_sizes, strict=True)
    gts = [resize_mask(read_mask(dataset.root / path), tuning_size(size)) for path, size in pairs]
    usable = model.map_layers(None)
    scores, best = {}, None
    for name, count in sorted(candidates.items(), key=lambda item: -len(model.map_layers(item[1]))):
        skip = len(usable) - len(model.map_layers(count))
        summed = [_sum_blocks(maps[skip:].unbind(0)) for maps in sample.maps]
        samples = _tuning_samples(sample, summed, gts, has_labels)
        search = ThresholdSearch(samples, dataset.num_classes)
        scores[name] = search.coarse()[2]
        if best is None or scores[name] > scores[best[0]]:  # strictly better: ties keep more blocks
            best = (name, search)  # only the leader's samples are kept
    fg, bg, score = best[1].refine()  # the coarse grid of the leader is not scored again
    layers = tuple(model.map_layers(candidates[best[0]]))
    return MaskRule(fg, bg, score, best[0], layers, scores if len(candidates) > 1 else None, precision)


def shard_ranges(num_images: int, shards: int, batch_size: int) -> list[tuple[int, int]]:
    """Cuts ``num_images`` into at most ``shards`` contiguous ``[start, stop)`` runs of whole batches.

    Shard edges fall on multiples of ``batch_size``, so every model batch holds the same images as in the
    serial run: the maps cannot differ by batch composition.
    """
    batches = -(-num_images // batch_size)
    count = min(shards, batches)
    edges = [min(num_images, round(k * batches / count) * batch_size) for k in range(count + 1)]
    return list(itertools.pairwise(edges))


def pseudo_mask_shard(
    model: TokenMaskingViT,
    dataset: DatasetIndex,
    params: PseudoMaskParams,
    rule: MaskRule,
    start: int,
    stop: int,
    device: torch.device,
) -> ShardResult:
    """Pseudo masks and their statistics for images ``[start, stop)`` of ``params.split`` under ``rule``.

    A pure function of its inputs: the serial stage runs it once over the whole split, the sharded flow
    once per shard, and :func:`gather` joins the results into the same artifact.
    """
    blocks = len(rule.map_layers) if rule.map_blocks != "all" else None
    num_classes = dataset.num_classes
    has_labels = params.split == "train"
    ids, masks, grids, scored = [], [], Counter(), 0
    pseudo_cm, ceiling_cm = ConfusionMatrix(num_classes + 1), ConfusionMatrix(num_classes + 1)
    shares, areas = [], []
    bar = tqdm(total=stop - start, desc="pseudo masks (all images)", leave=False, mininterval=2.0)
    # One model batch at a time: only its images and maps are in memory; masks are kept PNG-encoded.
    for first in range(start, stop, params.batch_size):
        positions = slice(first, min(stop, first + params.batch_size))
        split_maps = _split_maps(model, dataset, params, device, positions, blocks, precision=rule.precision)
        for i in range(len(split_maps.data.ids)):
            grid = tuple(split_maps.maps[i].shape[-2:])
            grids[grid] += 1
            mask = merge_maps(*_image_maps(split_maps, i, has_labels), rule.fg_threshold, rule.bg_threshold)
            masks.append(encode_mask_png(mask))
            gt_path = split_maps.gt_paths[i]
            if gt_path is None:
                continue
            scored += 1
            gt = read_mask(dataset.root / gt_path)
            pseudo_cm.update(gt, mask)
            ceiling_cm.update(gt, grid_ceiling_mask(gt, grid, num_classes))
            gt_classes = np.unique(gt[(gt != 0) & (gt != IGNORE_INDEX)]).astype(int) - 1
            if len(gt_classes) >= 2:
                raw = F.interpolate(
                    split_maps.maps[i][gt_classes][None], size=gt.shape, mode="bilinear", align_corners=False
                )
                s, a = class_specificity(raw[0].cpu().numpy(), gt, gt_classes)
                shares += s
                areas += a
        ids += split_maps.data.ids
        bar.update(len(split_maps.data.ids))
    bar.close()
    return ShardResult(ids, masks, grids, pseudo_cm.matrix, ceiling_cm.matrix, shares, areas, scored)


def gather(
    shards: list[ShardResult], params: PseudoMaskParams, rule: MaskRule
) -> tuple[list[str], list[bytes], dict[str, Any]]:
    """Joins shard results (in split order) into the stage's ids, masks and ``stats.json`` content.

    Confusion matrices add exactly and the share lists concatenate in split order, so any sharding
    gives the statistics of the serial run bit for bit.
    """
    if not shards:
        raise ValueError("gather needs at least one shard")
    grids = sum((shard.grids for shard in shards), Counter())
    ids = [i for shard in shards for i in shard.ids]
    masks = [m for shard in shards for m in shard.masks]
    shares = [s for shard in shards for s in shard.specificity_shares]
    areas = [a for shard in shards for a in shard.area_shares]
    stats: dict[str, Any] = {
        "split": params.split,
        "images": len(masks),
        "grid": list(grids.most_common(1)[0][0]),  # the most frequent token grid (aspect ratios vary)
        "map_layer": rule.map_layers[-1],
        "map_blocks": rule.map_blocks,
        "map_layers": list(rule.map_layers),
        "map_blocks_tuning": rule.block_scores,
        "refine": params.refine,
        "refine_iterations": refine_steps(params),
        "precision": rule.precision,
        "fg_threshold": rule.fg_threshold,
        "bg_threshold": rule.bg_threshold,
        "thresholds_tuned": rule.tuning_miou is not None,
        "tuning_miou": rule.tuning_miou,
    }
    if sum(shard.scored_images for shard in shards):
        pseudo = scores_from_confusion(sum(shard.pseudo_confusion for shard in shards))
        ceiling = scores_from_confusion(sum(shard.ceiling_confusion for shard in shards))
        stats.update(
            miou=float(pseudo["miou"]),
            pixel_accuracy=float(pseudo["pixel_accuracy"]),
            ceiling_miou=float(ceiling["miou"]),
            class_specificity=float(np.mean(shares)) if shares else None,
            area_share=float(np.mean(areas)) if areas else None,
            image_class_pairs_scored=len(shares),  # one per class of each multi-class image
        )
    return ids, masks, stats


def generate_pseudo_masks(
    model: TokenMaskingViT,
    dataset: DatasetIndex,
    params: PseudoMaskParams,
    device: torch.device,
    precision: str = "fp32",
) -> tuple[list[str], list[bytes], dict[str, Any]]:
    """Pseudo masks (original image size, PNG-encoded) for every image of ``params.split`` plus statistics,
    serially.

    The statistics score the masks against the split's ground truth where it exists: mIoU, the token-grid
    ceiling and the attention class-specificity on multi-class images.
    """
    rule = decide_rule(model, dataset, params, device, precision)
    whole = pseudo_mask_shard(model, dataset, params, rule, 0, len(dataset.split(params.split)), device)
    return gather([whole], params, rule)


def write_pseudo_masks(params: PseudoMaskParams, ids: list[str], masks: list[bytes], stats: dict) -> None:
    """The stage's artifact: ``<out>/<split>.parquet`` (all masks in one table) and ``<out>/stats.json``."""
    out = Path(params.out)
    write_encoded_mask_table(out / f"{params.split}.parquet", ids, masks)
    write_json(out / "stats.json", stats)
    if "miou" in stats:
        print(
            f"pseudo masks ({stats['split']}, {stats['images']} images): mIoU {stats['miou']:.3f}  "
            f"ceiling {stats['ceiling_miou']:.3f}  class specificity {stats['class_specificity'] or float('nan'):.3f} "
            f"(area share {stats['area_share'] or float('nan'):.3f})  thresholds fg {stats['fg_threshold']} "
            f"bg {stats['bg_threshold']}  maps {stats['map_blocks']} (blocks {stats['map_layers']})"
        )


def main(params: Params) -> dict[str, Any]:
    """CLI entry: pseudo masks of ``pseudo_masks.split`` from the trained classifier, closed heads pruned,
    in this process. (``dask.shards`` > 1: the CLI runs the Prefect flow ``pseudo-masks-sharded`` of
    pipelines/pseudo_masks.py instead, which writes the same artifact bit for bit.)"""
    device = setup_runtime(params.seed, params.num_threads, params.device)
    check_writable(params.pseudo_masks.out)
    dataset = read_ingested(Path(params.ingest.out))
    model = load_map_model(Path(params.classifier.out) / MODEL_FILE, device)
    precision = resolve_precision(params.trainer.precision, device)
    ids, masks, stats = generate_pseudo_masks(model, dataset, params.pseudo_masks, device, precision)
    write_pseudo_masks(params.pseudo_masks, ids, masks, stats)
    return stats
