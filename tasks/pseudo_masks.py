"""Stage ``pseudo_masks``: segmentation masks straight from the [CLS]_c self-attention.

Rule (the paper's, with an explicit background, see README):
1. classes present = the image labels on the training split (the weak supervision); elsewhere the
   classifier's predictions (probability >= 0.5, at least the top-1);
2. each present class's [CLS]_c -> patch attention (last block with open heads, open heads averaged;
   optionally averaged over test-time views, ``scales``/``flip``) is upsampled bilinearly to the image
   size and min-max normalised to [0, 1];
3. classes are painted in increasing probability, so the most confident class wins overlaps, on the
   pixels where their map is >= ``fg_threshold``;
4. pixels where every present map is < ``bg_threshold`` are background;
5. the remaining pixels take the label of the nearest assigned pixel (Euclidean distance transform).
``fg_threshold``/``bg_threshold`` are params, optionally tuned on a subset of the TRAIN split (never val).
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage
from tqdm import tqdm

from models.token_masking_vit import TokenMaskingViT
from tasks.config import Params, PseudoMaskParams
from tasks.datasets import DatasetIndex, SplitData, load_split, normalize, read_mask, write_mask_table
from tasks.errors import WsssError
from tasks.ingest import read_ingested
from tasks.io import write_json
from tasks.metrics import ConfusionMatrix, mean_iou, scores_from_confusion
from tasks.runtime import setup_runtime
from tasks.train_classifier import MODEL_FILE, load_classifier

UNASSIGNED = 255


@torch.no_grad()
def attention_maps(
    model: TokenMaskingViT,
    images: torch.Tensor,
    device: torch.device,
    batch_size: int = 128,
    scales: Sequence[float] = (1.0,),
    flip: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Class-attention maps ``[N, C, h, w]`` and class probabilities ``[N, C]`` of uint8 images.

    With several ``scales`` or ``flip``, the maps and probabilities are averaged over the views of
    :func:`multi_view_maps`; ``h, w`` stay the grid of the images' own size.
    """
    model.eval()
    maps, probs = [], []
    for i in tqdm(range(0, len(images), batch_size), desc="attention maps", leave=False, mininterval=2.0):
        batch = normalize(images[i : i + batch_size]).to(device)
        if list(scales) == [1.0] and not flip:
            m, logits = model.class_attention_maps(batch)
            p = torch.sigmoid(logits)
        else:
            m, p = multi_view_maps(model, batch, scales, flip)
        maps.append(m.float().cpu())
        probs.append(p.float().cpu())
    return torch.cat(maps), torch.cat(probs)


def multi_view_maps(
    model: TokenMaskingViT, batch: torch.Tensor, scales: Sequence[float], flip: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Maps and probabilities of a normalised batch averaged over its scaled (and mirrored) views.

    Each view is the batch resized (bilinear) to the multiple of the patch size nearest to ``scale`` times
    its size (at least one patch); its maps are resized (bilinear) to the grid of scale 1, a mirrored
    view's maps are mirrored back first.
    """
    patch = model.patch_size
    base = tuple(max(1, round(d / patch)) for d in batch.shape[-2:])
    map_sum, prob_sum, views = 0.0, 0.0, 0
    for scale in scales:
        size = tuple(max(1, round(scale * d / patch)) * patch for d in batch.shape[-2:])
        scaled = batch
        if size != tuple(batch.shape[-2:]):
            scaled = F.interpolate(batch, size=size, mode="bilinear", align_corners=False)
        for mirrored in (False, True) if flip else (False,):
            m, logits = model.class_attention_maps(scaled.flip(-1) if mirrored else scaled)
            m = m.flip(-1) if mirrored else m
            if tuple(m.shape[-2:]) != base:
                m = F.interpolate(m, size=base, mode="bilinear", align_corners=False)
            map_sum, prob_sum, views = map_sum + m, prob_sum + torch.sigmoid(logits), views + 1
    return map_sum / views, prob_sum / views


def normalized_maps(maps: torch.Tensor, size: tuple[int, int]) -> np.ndarray:
    """Upsamples ``[K, h, w]`` maps bilinearly to ``size`` and min-max normalises each to [0, 1]."""
    up = F.interpolate(maps[None], size=size, mode="bilinear", align_corners=False)[0]
    lo = up.amin(dim=(1, 2), keepdim=True)
    hi = up.amax(dim=(1, 2), keepdim=True)
    span = hi - lo
    # A flat map (span at float rounding level) says nothing about location: all zeros, not noise.
    flat = span <= 1e-5 * hi.abs().clamp_min(1e-12)
    return torch.where(flat, torch.zeros_like(up), (up - lo) / span.clamp_min(1e-12)).numpy()


def present_classes(labels: np.ndarray | None, probs: np.ndarray) -> np.ndarray:
    """Classes to paint: the labels when known, else predicted ones (p >= 0.5, at least the top-1)."""
    if labels is not None:
        return np.flatnonzero(labels > 0)
    predicted = np.flatnonzero(probs >= 0.5)
    return predicted if predicted.size else np.array([int(np.argmax(probs))])


def merge_maps(
    norm_maps: np.ndarray, classes: np.ndarray, probs: np.ndarray, fg_threshold: float, bg_threshold: float
) -> np.ndarray:
    """Turns normalised maps of the present ``classes`` (``[len(classes), H, W]``) into one mask.

    Returns:
        uint8 ``[H, W]``: 0 background, k+1 for class k; every pixel assigned.
    """
    height, width = norm_maps.shape[1:]
    mask = np.full((height, width), UNASSIGNED, dtype=np.uint8)
    if len(classes) == 0:
        mask[:] = 0
        return mask
    for idx in np.argsort(probs[classes], kind="stable"):
        mask[norm_maps[idx] >= fg_threshold] = classes[idx] + 1
    mask[(norm_maps.max(axis=0) < bg_threshold) & (mask == UNASSIGNED)] = 0
    return fill_unassigned(mask)


def fill_unassigned(mask: np.ndarray) -> np.ndarray:
    """Gives every UNASSIGNED pixel the label of its nearest assigned pixel (all background if none is)."""
    holes = mask == UNASSIGNED
    if not holes.any():
        return mask
    if holes.all():
        return np.zeros_like(mask)
    _, (rows, cols) = ndimage.distance_transform_edt(holes, return_indices=True)
    return mask[rows, cols]


def grid_ceiling_mask(gt: np.ndarray, grid: tuple[int, int], num_classes: int) -> np.ndarray:
    """Ground truth reduced to the token grid (majority label per cell) and blown back up (nearest)."""
    valid = gt != 255
    onehot = np.zeros((num_classes + 1, *gt.shape), dtype=np.float32)
    onehot[gt[valid], *np.nonzero(valid)] = 1.0
    pooled = F.interpolate(torch.from_numpy(onehot)[None], size=grid, mode="area")[0]
    coarse = pooled.argmax(dim=0).to(torch.uint8)
    return F.interpolate(coarse[None, None].float(), size=gt.shape, mode="nearest")[0, 0].to(torch.uint8).numpy()


def class_specificity(attention: np.ndarray, gt: np.ndarray, classes: np.ndarray) -> tuple[list[float], list[float]]:
    """Share of CLS_c's attention on class c's pixels among the image's foreground pixels, per class.

    Args:
        attention: upsampled (not normalised) attention ``[len(classes), H, W]``.
        gt: ground-truth mask ``[H, W]``.
        classes: the classes present in ``gt``.

    Returns:
        (attention shares, area shares) per class; equal shares mean no class specificity.
    """
    foreground = (gt != 0) & (gt != 255)
    shares, areas = [], []
    total_fg = foreground.sum()
    for idx, cls in enumerate(classes):
        on_class = gt == cls + 1
        mass = attention[idx][foreground].sum()
        if mass <= 0 or total_fg == 0:
            continue
        shares.append(float(attention[idx][on_class].sum() / mass))
        areas.append(float(on_class.sum() / total_fg))
    return shares, areas


def tune_thresholds(
    samples: list[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]], num_classes: int
) -> tuple[float, float, float]:
    """Grid search of (fg, bg) thresholds by pseudo-mask mIoU on training images with ground truth.

    Args:
        samples: ``(normalised maps, classes, probs, gt)`` per image.

    Returns:
        (fg_threshold, bg_threshold, mIoU at them).
    """
    gts = [s[3] for s in samples]
    best = (0.5, 0.2, -1.0)
    fg_grid = np.round(np.arange(0.1, 0.81, 0.1), 2)
    bg_grid = (0.0, 0.05, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5)
    for fg, bg in itertools.product(fg_grid, bg_grid):
        if bg > fg:
            continue
        preds = [merge_maps(m, c, p, fg, bg) for m, c, p, _ in samples]
        score = mean_iou(zip(gts, preds, strict=True), num_classes + 1)
        if score > best[2]:
            best = (float(fg), float(bg), score)
    return best


@dataclass(frozen=True)
class MaskRule:
    """What every shard applies alike, decided once before the shards: thresholds and the map layer."""

    fg_threshold: float
    bg_threshold: float
    tuning_miou: float | None  # None: the thresholds are the params' own (not tuned)
    map_layer: int


@dataclass
class ShardResult:
    """One contiguous run of a split's images: their masks in split order and additive statistics."""

    ids: list[str]
    masks: list[np.ndarray]
    grid: tuple[int, int]
    pseudo_confusion: np.ndarray  # int64 [C+1, C+1] over the images with ground truth
    ceiling_confusion: np.ndarray
    specificity_shares: list[float]
    area_shares: list[float]
    scored_images: int  # images with ground truth


@dataclass
class _SplitMaps:
    """Attention maps and what the rule needs of some images of a split (one shard, or the tuning sample)."""

    data: SplitData
    maps: torch.Tensor  # [N, C, h, w]
    probs: torch.Tensor  # [N, C]
    gt_paths: list[str | None]


@contextlib.contextmanager
def _thread_count_invariant_kernels() -> Iterator[None]:
    """Turns torch's oneDNN CPU kernels off inside the block.

    oneDNN's 1x1 convolution rounds differently with another thread count (measured: maps 4e-8 apart with 1
    vs 2 threads on 8-image batches), so 1-thread shard workers would not reproduce the serial stage bit
    for bit; the native kernels gave identical maps (and cost ~5 % here).
    """
    enabled = torch.backends.mkldnn.enabled
    torch.backends.mkldnn.enabled = False
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
) -> _SplitMaps:
    """Loads the images at ``positions`` of ``params.split`` and computes their maps, in that order."""
    rows = dataset.split(params.split)
    picked = rows.iloc[positions]
    subset = dataclasses.replace(dataset, manifest=picked)
    data = load_split(subset, params.split, model.grid_size[0] * model.patch_size, with_masks=False)
    with _thread_count_invariant_kernels():
        maps, probs = attention_maps(model, data.images, device, params.batch_size, params.scales, params.flip)
    gt_paths = [path if isinstance(path, str) else None for path in picked["mask"].tolist()]
    return _SplitMaps(data, maps, probs, gt_paths)


def _image_maps(split_maps: _SplitMaps, i: int, has_labels: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(normalised maps of the present classes at the image's own size, those classes, probabilities)."""
    probs = split_maps.probs[i].numpy()
    classes = present_classes(split_maps.data.labels[i].numpy() if has_labels else None, probs)
    return normalized_maps(split_maps.maps[i, classes], split_maps.data.original_sizes[i]), classes, probs


def decide_rule(
    model: TokenMaskingViT, dataset: DatasetIndex, params: PseudoMaskParams, device: torch.device
) -> MaskRule:
    """The params' thresholds, or with ``tune_thresholds`` the ones grid-searched on the first
    ``tune_images`` images of the split that have ground truth (a single step: it needs the whole sample)."""
    if not any(blk.attn.open_heads().any() for blk in model.blocks):
        raise WsssError("the classifier closed every attention head: no block can provide attention maps")
    rule = MaskRule(params.fg_threshold, params.bg_threshold, None, model.map_layer())
    rows = dataset.split(params.split)
    with_gt = [i for i, path in enumerate(rows["mask"].tolist()) if isinstance(path, str)]
    if not params.tune_thresholds or not with_gt:
        return rule
    sample = _split_maps(model, dataset, params, device, with_gt[: params.tune_images])
    has_labels = params.split == "train"
    samples = [
        (*_image_maps(sample, i, has_labels), read_mask(dataset.root / path)) for i, path in enumerate(sample.gt_paths)
    ]
    fg, bg, tuned_miou = tune_thresholds(samples, dataset.num_classes)
    return MaskRule(fg, bg, tuned_miou, rule.map_layer)


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
    split_maps = _split_maps(model, dataset, params, device, slice(start, stop))
    num_classes = dataset.num_classes
    grid = tuple(split_maps.maps.shape[-2:])
    has_labels = params.split == "train"
    masks = []
    pseudo_cm, ceiling_cm = ConfusionMatrix(num_classes + 1), ConfusionMatrix(num_classes + 1)
    shares, areas = [], []
    for i in tqdm(range(len(split_maps.data.ids)), desc="pseudo masks", leave=False, mininterval=2.0):
        mask = merge_maps(*_image_maps(split_maps, i, has_labels), rule.fg_threshold, rule.bg_threshold)
        masks.append(mask)
        gt_path = split_maps.gt_paths[i]
        if gt_path is None:
            continue
        gt = read_mask(dataset.root / gt_path)
        pseudo_cm.update(gt, mask)
        ceiling_cm.update(gt, grid_ceiling_mask(gt, grid, num_classes))
        gt_classes = np.unique(gt[(gt != 0) & (gt != 255)]).astype(int) - 1
        if len(gt_classes) >= 2:
            raw = F.interpolate(
                split_maps.maps[i, gt_classes][None], size=gt.shape, mode="bilinear", align_corners=False
            )
            s, a = class_specificity(raw[0].numpy(), gt, gt_classes)
            shares += s
            areas += a
    scored = sum(path is not None for path in split_maps.gt_paths)
    return ShardResult(
        list(split_maps.data.ids), masks, grid, pseudo_cm.matrix, ceiling_cm.matrix, shares, areas, scored
    )


def gather(
    shards: list[ShardResult], params: PseudoMaskParams, rule: MaskRule
) -> tuple[list[str], list[np.ndarray], dict[str, Any]]:
    """Joins shard results (in split order) into the stage's ids, masks and ``stats.json`` content.

    Confusion matrices add exactly and the share lists concatenate in split order, so any sharding
    gives the statistics of the serial run bit for bit.
    """
    if not shards:
        raise ValueError("gather needs at least one shard")
    grids = {shard.grid for shard in shards}
    if len(grids) != 1:
        raise ValueError(f"shards disagree on the token grid: {sorted(grids)}")
    ids = [i for shard in shards for i in shard.ids]
    masks = [m for shard in shards for m in shard.masks]
    shares = [s for shard in shards for s in shard.specificity_shares]
    areas = [a for shard in shards for a in shard.area_shares]
    stats: dict[str, Any] = {
        "split": params.split,
        "images": len(masks),
        "grid": list(shards[0].grid),
        "map_layer": rule.map_layer,
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
            multi_class_images_scored=len(shares),
        )
    return ids, masks, stats


def generate_pseudo_masks(
    model: TokenMaskingViT, dataset: DatasetIndex, params: PseudoMaskParams, device: torch.device
) -> tuple[list[str], list[np.ndarray], dict[str, Any]]:
    """Pseudo masks (original image size) for every image of ``params.split`` plus statistics, serially.

    The statistics score the masks against the split's ground truth where it exists: mIoU, the token-grid
    ceiling and the attention class-specificity on multi-class images.
    """
    rule = decide_rule(model, dataset, params, device)
    whole = pseudo_mask_shard(model, dataset, params, rule, 0, len(dataset.split(params.split)), device)
    return gather([whole], params, rule)


def write_pseudo_masks(params: PseudoMaskParams, ids: list[str], masks: list[np.ndarray], stats: dict) -> None:
    """The stage's artifact: ``<out>/<split>.parquet`` (all masks in one table) and ``<out>/stats.json``."""
    out = Path(params.out)
    write_mask_table(out / f"{params.split}.parquet", ids, masks)
    write_json(out / "stats.json", stats)
    if "miou" in stats:
        print(
            f"pseudo masks ({stats['split']}, {stats['images']} images): mIoU {stats['miou']:.3f}  "
            f"ceiling {stats['ceiling_miou']:.3f}  class specificity {stats['class_specificity'] or float('nan'):.3f} "
            f"(area share {stats['area_share'] or float('nan'):.3f})  thresholds fg {stats['fg_threshold']} "
            f"bg {stats['bg_threshold']}"
        )


def load_map_model(params: Params, device: torch.device) -> TokenMaskingViT:
    """The trained classifier with its closed heads physically removed (``prune_heads``).

    The pruned model gives the gated eval model's maps and logits (same map block, same open heads) at
    less cost: closed heads never reach a map or a logit.
    """
    model, _ = load_classifier(Path(params.classifier.out) / MODEL_FILE, device)
    return model.prune_heads()


def main(params: Params) -> dict[str, Any]:
    """CLI entry: pseudo masks of ``pseudo_masks.split`` from the trained classifier, closed heads pruned.

    ``dask.shards`` > 1 runs the Prefect flow ``pseudo-masks-sharded`` (pipelines/pseudo_masks.py) on a
    Dask cluster instead; it writes the same artifact bit for bit.
    """
    if params.dask.shards > 1:
        from pipelines.pseudo_masks import run_sharded  # the flow imports this module: import it lazily

        return run_sharded(params)["stats"]
    device = setup_runtime(params.seed, params.num_threads, params.device)
    dataset = read_ingested(Path(params.ingest.out))
    model = load_map_model(params, device)
    ids, masks, stats = generate_pseudo_masks(model, dataset, params.pseudo_masks, device)
    write_pseudo_masks(params.pseudo_masks, ids, masks, stats)
    return stats
