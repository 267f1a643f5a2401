"""Stage ``pseudo_masks``: segmentation masks straight from the [CLS]_c self-attention.

The rule, whole, is :mod:`wsss.lib.mask_rule` (maps, normalisation, merge, the threshold and block search, and
:func:`~wsss.lib.mask_rule.decide_rule`, which decides it once for the split on a subset of the TRAIN split, never
val); this stage applies it to every image (:func:`pseudo_mask_shard`, the unit the Dask-sharded flow
distributes), scores the masks against the split's ground truth and writes them.
"""

from __future__ import annotations

import itertools
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from wsss.lib.artifacts import MODEL_FILE, load_map_model, read_ingested
from wsss.lib.config import Params, PseudoMaskParams
from wsss.lib.dataset_format import DatasetIndex, write_encoded_mask_table
from wsss.lib.images import encode_mask_png, read_mask
from wsss.lib.io import check_writable, write_json
from wsss.lib.mask_rule import (
    MaskRule,
    class_specificity,
    decide_rule,
    grid_ceiling_mask,
    image_maps,
    paint,
    refine_steps,
    split_maps,
)
from wsss.lib.metrics import IGNORE_INDEX, ConfusionMatrix, scores_from_confusion
from wsss.lib.runtime import resolve_precision, setup_runtime, write_runtime
from wsss.models.token_masking_vit import TokenMaskingViT


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
        batch = split_maps(model, dataset, params, device, positions, blocks, precision=rule.precision)
        count = len(batch.data.ids)
        found = [image_maps(batch, i, has_labels) for i in range(count)]
        painted = [paint(maps, classes, probs, rule.fg_threshold, rule.bg_threshold) for maps, classes, probs in found]
        images = [batch.image(i) for i in range(count)] if rule.pixel_refine != "none" else None
        for i, mask in enumerate(rule.masks(painted, [classes for _, classes, _ in found], images)):
            grid = tuple(batch.maps[i].shape[-2:])
            grids[grid] += 1
            masks.append(encode_mask_png(mask))
            gt_path = batch.gt_paths[i]
            if gt_path is None:
                continue
            scored += 1
            gt = read_mask(dataset.root / gt_path)
            pseudo_cm.update(gt, mask)
            ceiling_cm.update(gt, grid_ceiling_mask(gt, grid, num_classes))
            gt_classes = np.unique(gt[(gt != 0) & (gt != IGNORE_INDEX)]).astype(int) - 1
            if len(gt_classes) >= 2:
                raw = F.interpolate(
                    batch.maps[i][gt_classes][None], size=gt.shape, mode="bilinear", align_corners=False
                )
                s, a = class_specificity(raw[0].cpu().numpy(), gt, gt_classes)
                shares += s
                areas += a
        ids += batch.data.ids
        bar.update(len(batch.data.ids))
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
        "pixel_refine": rule.pixel_refine,
        "pixel_refine_iterations": rule.pixel_iterations,
        "pixel_refine_tuning": {str(n): score for n, score in rule.pixel_scores.items()} if rule.pixel_scores else None,
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
            + (
                f"  pixel refine {stats['pixel_refine']} x{stats['pixel_refine_iterations']}"
                if stats["pixel_refine"] != "none"
                else ""
            )  # fmt: skip
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
    write_runtime(params.pseudo_masks.out, params.trainer.precision, device)
    return stats
