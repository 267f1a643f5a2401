"""The pseudo-mask rule: class-token attention maps to one mask per image, pure functions.

Shared by the pseudo-mask stage (serial and sharded), ``wsss predict --from-attention``, the ablation
report, ``wsss diagnose-maps`` and the benchmarks, so all of them paint masks alike.

Rule (the paper's, with an explicit background, see README):
1. classes present = the image labels on the training split (the weak supervision); elsewhere the
   classifier's predictions (probability >= 0.5, at least the top-1);
2. each present class's [CLS]_c -> patch attention (the map blocks' open heads averaged, summed over
   the blocks; optionally averaged over test-time views, ``scales``/``flip``) is upsampled bilinearly to
   the image size and min-max normalised to [0, 1];
3. classes are painted in increasing probability, so the most confident class wins overlaps, on the
   pixels where their map is >= ``fg_threshold``;
4. pixels where every present map is < ``bg_threshold`` are background;
5. the remaining pixels take the label of the nearest assigned pixel (Euclidean distance transform);
   or, with ``pixel_refine``, steps 3-5 are refined with the image's own pixels (:mod:`wsss.lib.pixel_refine`:
   PAR or a local dense CRF, peers' methods) over background and the present classes, and each pixel takes
   the argmax.
``fg_threshold``/``bg_threshold`` are params, optionally tuned on a subset of the TRAIN split (never val).
Steps 2-4 run on the device the maps are on (:func:`normalized_maps`, :func:`paint`); only the uint8 mask
comes back for step 5 on the CPU (scipy's distance transform).
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import itertools
import multiprocessing
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage
from tqdm import tqdm

from wsss.lib.artifacts import classifier_images
from wsss.lib.config import PseudoMaskParams, map_block_count
from wsss.lib.dataset_format import DatasetIndex
from wsss.lib.datasets import SplitData, StreamedSplit, aspect_size, normalize, resize_mask, shape_groups
from wsss.lib.errors import WsssError
from wsss.lib.images import read_mask
from wsss.lib.metrics import IGNORE_INDEX, ConfusionMatrix, mean_iou
from wsss.lib.pixel_refine import refine_masks
from wsss.lib.runtime import autocast
from wsss.models.token_masking_vit import TokenMaskingViT

# Marks a pixel no rule step has decided yet (filled from the nearest decided pixel). It shares 255 with
# IGNORE_INDEX only by value: a finished mask never holds it.
UNASSIGNED = 255


AUTO_BLOCK_COUNTS = (1, 2, 3, 4, 6, 8, 12, 16, 24)  # lastK candidates: every K up to 4, then sparser


def block_candidates(model: TokenMaskingViT) -> dict[str, int | None]:
    """What ``map_blocks: auto`` chooses among: ``last``, ``last2``, ``last3``, ``last4``, ``last6``, ``last8``, ...
    and ``all``, one name per distinct set of map blocks (a fully pruned block is skipped, so ``lastK`` over K
    usable blocks is ``all``). Every K up to 4 (all of a 4-block model's choices), then sparser: each candidate
    costs a threshold search, and a 12-block ViT's neighbouring K differ by little (measured on DINOv2-S/14:
    tuning mIoU 0.405-0.421 over last2..last11)."""
    usable = len(model.map_layers(None))
    names = {"last" if k == 1 else f"last{k}": k for k in AUTO_BLOCK_COUNTS if k < usable}
    return names | {"all": None}


@torch.no_grad()
def attention_maps(
    model: TokenMaskingViT,
    images: Sequence[torch.Tensor],
    device: torch.device,
    batch_size: int = 128,
    scales: Sequence[float] = (1.0,),
    flip: bool = False,
    blocks: int | None = 1,
    per_block: bool = False,
    refine: int = 0,
    desc: str = "attention maps",
    on_device: bool = False,
) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Class-attention maps (``[C, h, w]`` per image, on its own token grid) and class probabilities
    ``[N, C]`` of uint8 images ``[channels, H, W]`` (any sizes that are multiples of the patch; ``desc``
    labels the progress bar).

    Images go through the model in runs of ``batch_size``, each run in groups of one size
    (:func:`wsss.lib.datasets.shape_groups`). ``blocks``/``per_block``/``refine`` are the model's
    (:meth:`TokenMaskingViT.class_attention_maps`): the maps of the last ``blocks`` blocks with an open
    head summed (None: all), or kept apart (``[L, C, h, w]`` per image). With several ``scales`` or
    ``flip``, maps and probabilities are averaged over the views of :func:`multi_view_maps`; ``h, w``
    are then the grid of its largest view. ``on_device``: the maps stay where the model is (float32), for
    the rule to run there; probabilities always come back to the CPU.
    """
    model.eval()
    maps: list[torch.Tensor | None] = [None] * len(images)
    probs = torch.empty(len(images), model.num_classes)
    one_run = len(images) <= batch_size  # the caller shows the progress (the pseudo-mask stage's batches)
    for start in tqdm(range(0, len(images), batch_size), desc=desc, leave=False, mininterval=2.0, disable=one_run):
        for indices, group in shape_groups(list(images[start : start + batch_size]), start):
            batch = normalize(group).to(device)
            if list(scales) == [1.0] and not flip:
                m, logits = model.class_attention_maps(batch, blocks=blocks, per_block=per_block, refine=refine)
                p = torch.sigmoid(logits)
            else:
                m, p = multi_view_maps(model, batch, scales, flip, blocks, per_block, refine)
            probs[indices] = p.float().cpu()
            for index, single in zip(indices, m.float() if on_device else m.float().cpu(), strict=True):
                maps[index] = single
    return maps, probs


def multi_view_maps(
    model: TokenMaskingViT,
    batch: torch.Tensor,
    scales: Sequence[float],
    flip: bool,
    blocks: int | None = 1,
    per_block: bool = False,
    refine: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Maps and probabilities of a normalised batch averaged over its scaled (and mirrored) views (each view
    refined on its own grid when ``refine``).

    Each view is the batch resized (bilinear) to the multiple of the patch size nearest to ``scale`` times
    its size (at least one patch); its maps are resized (bilinear) to the grid of the largest view, the finest
    (so ``[2.0]`` gives maps on a grid twice as fine as the input size's), a mirrored view's maps are mirrored
    back first.
    """
    patch = model.patch_size
    sizes = [tuple(max(1, round(scale * d / patch)) * patch for d in batch.shape[-2:]) for scale in scales]
    base = tuple(d // patch for d in max(sizes, key=lambda size: size[0] * size[1]))
    map_sum, prob_sum, views = 0.0, 0.0, 0
    for size in sizes:
        scaled = batch
        if size != tuple(batch.shape[-2:]):
            scaled = F.interpolate(batch, size=size, mode="bilinear", align_corners=False)
        for mirrored in (False, True) if flip else (False,):
            view = scaled.flip(-1) if mirrored else scaled
            m, logits = model.class_attention_maps(view, blocks=blocks, per_block=per_block, refine=refine)
            m = m.flip(-1) if mirrored else m
            if tuple(m.shape[-2:]) != base:
                lead = m.shape[:-2]  # [B, C] or, per block, [B, L, C]
                flat = m.flatten(0, 1) if per_block else m
                m = F.interpolate(flat, size=base, mode="bilinear", align_corners=False).reshape(*lead, *base)
            map_sum, prob_sum, views = map_sum + m, prob_sum + torch.sigmoid(logits), views + 1
    return map_sum / views, prob_sum / views


def normalized_maps(maps: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Upsamples ``[K, h, w]`` maps bilinearly to ``size`` and min-max normalises each to [0, 1], on the
    maps' device (float32)."""
    up = F.interpolate(maps.float()[None], size=size, mode="bilinear", align_corners=False)[0]
    lo = up.amin(dim=(1, 2), keepdim=True)
    hi = up.amax(dim=(1, 2), keepdim=True)
    span = hi - lo
    # A flat map (span at float rounding level) says nothing about location: all zeros, not noise.
    flat = span <= 1e-5 * hi.abs().clamp_min(1e-12)
    return torch.where(flat, torch.zeros_like(up), (up - lo) / span.clamp_min(1e-12))


def present_classes(labels: np.ndarray | None, probs: np.ndarray) -> np.ndarray:
    """Classes to paint: the labels when known, else predicted ones (p >= 0.5, at least the top-1)."""
    if labels is not None:
        return np.flatnonzero(labels > 0)
    predicted = np.flatnonzero(probs >= 0.5)
    return predicted if predicted.size else np.array([int(np.argmax(probs))])


def paint_classes(norm_maps: torch.Tensor, classes: np.ndarray, probs: np.ndarray, fg_threshold: float) -> torch.Tensor:
    """Step 3 of the rule on the maps' device: uint8 ``[H, W]``, each present class where its map is >=
    ``fg_threshold`` (the most probable class last, so it wins overlaps), UNASSIGNED elsewhere; all background
    when no class is present.

    Args:
        norm_maps: normalised maps of the present ``classes``, ``[len(classes), H, W]`` float32.
        classes: the present classes (0-based).
        probs: every class's probability ``[C]`` (the paint order).
    """
    mask = torch.full(norm_maps.shape[1:], UNASSIGNED, dtype=torch.uint8, device=norm_maps.device)
    if len(classes) == 0:
        return mask.zero_()
    for idx in np.argsort(probs[classes], kind="stable"):
        mask[norm_maps[idx] >= fg_threshold] = int(classes[idx]) + 1
    return mask


def paint(
    norm_maps: torch.Tensor, classes: np.ndarray, probs: np.ndarray, fg_threshold: float, bg_threshold: float
) -> torch.Tensor:
    """Steps 3 and 4 of the rule on the maps' device (:func:`paint_classes`, then background where every present
    map is < ``bg_threshold``): uint8 ``[H, W]`` with UNASSIGNED where step 5 fills."""
    mask = paint_classes(norm_maps, classes, probs, fg_threshold)
    return paint_background(mask, norm_maps.amax(dim=0), bg_threshold) if len(classes) else mask


def paint_background(mask: torch.Tensor, top: torch.Tensor, bg_threshold: float) -> torch.Tensor:
    """Step 4 of the rule, in place: background where no class was painted and every present map is below
    ``bg_threshold`` (``top``: their maximum per pixel)."""
    mask[(top < bg_threshold) & (mask == UNASSIGNED)] = 0
    return mask


def merge_maps(
    norm_maps: torch.Tensor | np.ndarray,
    classes: np.ndarray,
    probs: np.ndarray,
    fg_threshold: float,
    bg_threshold: float,
) -> np.ndarray:
    """Turns normalised maps of the present ``classes`` (``[len(classes), H, W]``) into one mask: painted
    where the maps are (:func:`paint`), the unassigned pixels then filled on the CPU (:func:`fill_unassigned`).

    Returns:
        uint8 ``[H, W]``: 0 background, k+1 for class k; every pixel assigned.
    """
    mask = paint(torch.as_tensor(norm_maps), classes, probs, fg_threshold, bg_threshold)
    return fill_unassigned(mask.cpu().numpy())


def fill_unassigned(mask: np.ndarray) -> np.ndarray:
    """Gives every UNASSIGNED pixel the label of its nearest assigned pixel (all background if none is)."""
    holes = mask == UNASSIGNED
    if not holes.any():
        return mask
    if holes.all():
        return np.zeros_like(mask)
    rows, cols = ndimage.distance_transform_edt(holes, return_distances=False, return_indices=True)
    return mask[rows, cols]


def grid_ceiling_mask(gt: np.ndarray, grid: tuple[int, int], num_classes: int) -> np.ndarray:
    """Ground truth reduced to the token grid (majority label per cell) and blown back up (nearest)."""
    valid = gt != IGNORE_INDEX
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
    foreground = (gt != 0) & (gt != IGNORE_INDEX)
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


# Coarse grid of the threshold search; the search then refines around the best pair (FINE_STEPS), so the
# chosen values are not bound to this grid (nor to its edges).
FG_GRID = tuple(np.round(np.arange(0.05, 0.96, 0.1), 2))
BG_GRID = (0.0, 0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7)
FINE_STEPS = (-0.05, -0.025, 0.0, 0.025, 0.05)


# The threshold search scores masks at most this long side (images larger are scored downscaled).
TUNE_SIDE = 128


def tuning_size(size: tuple[int, int]) -> tuple[int, int]:
    """The size a tuning image is scored at: its own up to TUNE_SIDE on the longer side, else scaled down."""
    return tuple(size) if max(size) <= TUNE_SIDE else aspect_size(*size, TUNE_SIDE)


class ThresholdSearch:
    """Search of (fg, bg) thresholds by pseudo-mask mIoU on training images with ground truth.

    :meth:`coarse` scores the grid over [0, 1] (``FG_GRID`` x ``BG_GRID``, bg <= fg), :meth:`refine` a finer
    one of +-0.05 in steps of 0.025 around the best pair so far; pairs already scored are not scored again,
    and ties keep the pair found first.

    Args:
        samples: ``(normalised maps, classes, probs, gt)`` per image.
        num_classes: foreground classes C.
    """

    def __init__(self, samples: list[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]], num_classes: int) -> None:
        self.samples, self.num_classes = samples, num_classes
        self.scores: dict[tuple[float, float], float] = {}

    def _search(self, pairs) -> tuple[float, float, float]:
        # The pairs new to the search, in the order given (the order ties are broken in), grouped by fg: an image's
        # classes are painted once per fg and only the background step and the fill are redone per bg.
        todo: dict[tuple[float, float], ConfusionMatrix] = {}  # each pair's confusion matrix over the images
        for fg, bg in pairs:
            fg, bg = round(float(fg), 4), round(float(bg), 4)
            if bg <= fg and (fg, bg) not in self.scores and bg >= 0.0 and fg <= 1.0:
                todo.setdefault((fg, bg), ConfusionMatrix(self.num_classes + 1))
        by_fg: dict[float, list[float]] = {}
        for fg, bg in todo:
            by_fg.setdefault(fg, []).append(bg)
        for maps, classes, probs, gt in self.samples:
            maps = torch.as_tensor(maps)
            top = maps.amax(dim=0).cpu() if len(classes) else None
            for fg, bgs in by_fg.items():
                painted = paint_classes(maps, classes, probs, fg).cpu()
                for bg in bgs:
                    mask = painted if top is None else paint_background(painted.clone(), top, bg)
                    todo[(fg, bg)].update(gt, fill_unassigned(mask.numpy()))
        for pair, confusion in todo.items():
            self.scores[pair] = float(confusion.compute()["miou"])
        (fg, bg), score = max(self.scores.items(), key=lambda item: item[1])  # max keeps the first of equals
        return fg, bg, score

    def coarse(self) -> tuple[float, float, float]:
        """(fg, bg, mIoU) of the best pair of the coarse grid."""
        return self._search(itertools.product(FG_GRID, BG_GRID))

    def refine(self) -> tuple[float, float, float]:
        """(fg, bg, mIoU) of the best pair after the finer grid around the best one so far."""
        fg, bg, _ = self.coarse()  # scored already: only looks the best pair up
        return self._search((fg + a, max(0.0, bg + b)) for a, b in itertools.product(FINE_STEPS, FINE_STEPS))


# The block candidates' coarse searches run in worker processes when there is enough of them: on 2 cores they were a
# third of the pseudo-mask stage, single-threaded (the fill's distance transform holds the GIL between calls).
PARALLEL_SEARCH_MIN = 400  # tuning images x candidates below which starting processes costs more than it saves


def _grid_scores(samples: list, num_classes: int) -> dict[tuple[float, float], float]:
    """One candidate's coarse grid: each scored pair's tuning mIoU."""
    search = ThresholdSearch(samples, num_classes)
    search.coarse()
    return search.scores


def _worker_grid_scores(job: tuple[list, int]) -> dict[tuple[float, float], float]:
    """A worker's share, :func:`_grid_scores` on one thread (the workers share the cores)."""
    torch.set_num_threads(1)
    return _grid_scores(*job)


def coarse_scores(jobs: Iterator[list], num_classes: int, workers: int, total: int) -> list[dict]:
    """The coarse grid's scores of each candidate's tuning samples (``jobs``, made lazily), in ``workers``
    processes (spawned: the parent's torch threads do not survive a fork) when ``total`` samples make it pay and
    this process may have children; the scores are the serial ones, each search being a function of its samples.
    At most ``workers`` candidates' samples are held at once."""
    if workers < 2 or total < PARALLEL_SEARCH_MIN or multiprocessing.current_process().daemon:
        return [_grid_scores(samples, num_classes) for samples in jobs]
    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(workers, mp_context=context) as pool:
        pending, results = [], []
        for samples in jobs:
            if len(pending) == workers:
                results.append(pending.pop(0).result())
            # numpy on the host, not tensors: torch would share each tensor through a file descriptor of its own (and
            # a GPU's maps cannot go to a worker)
            arrays = [(maps.cpu().numpy(), classes, probs, gt) for maps, classes, probs, gt in samples]
            pending.append(pool.submit(_worker_grid_scores, (arrays, num_classes)))
        return results + [future.result() for future in pending]


def tune_thresholds(
    samples: list[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]], num_classes: int, refine: bool = True
) -> tuple[float, float, float]:
    """:class:`ThresholdSearch`'s coarse grid and, with ``refine``, its finer one: (fg, bg, mIoU at them)."""
    search = ThresholdSearch(samples, num_classes)
    return search.refine() if refine else search.coarse()


# --- the rule as the pseudo-mask stage decides it (once per split) and applies it (per image) ---------------


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
    pixel_refine: str = "none"  # none | par | crf: the painted masks refined with the image's pixels
    pixel_iterations: int = 0  # the refiner's iterations (0: none)
    # pixel_refine tuned: tuning mIoU of each candidate iteration count at the thresholds; else None
    pixel_scores: dict[int, float] | None = None

    def masks(
        self, painted: Sequence[torch.Tensor], classes: Sequence[np.ndarray], images: Sequence[torch.Tensor] | None
    ) -> list[np.ndarray]:
        """Step 5 of the rule with this rule's pixel refiner (:func:`finish_masks`)."""
        return finish_masks(painted, classes, images, self.pixel_refine, self.pixel_iterations)


def finish_masks(
    painted: Sequence[torch.Tensor],
    classes: Sequence[np.ndarray],
    images: Sequence[torch.Tensor] | None,
    pixel_refine: str = "none",
    iterations: int = 0,
) -> list[np.ndarray]:
    """Step 5 of the rule for painted masks (:func:`paint`) of the present ``classes``: the nearest-pixel fill, or
    ``pixel_refine`` (``par``/``crf``) for ``iterations`` with the ``images`` (uint8 ``[channels, H, W]``, each its
    mask's size)."""
    if pixel_refine == "none":
        return [fill_unassigned(mask.cpu().numpy()) for mask in painted]
    refined = refine_masks(images, painted, classes, pixel_refine, [iterations])
    return [mask.cpu().numpy() for mask in refined[iterations]]


@dataclass
class SplitMaps:
    """Attention maps and what the rule needs of some images of a split (one shard, or the tuning sample)."""

    data: SplitData
    maps: list[torch.Tensor]  # [C, h, w] per image (per block: [L, C, h, w]) on the model's device, h x w its own grid
    probs: torch.Tensor  # [N, C]
    gt_paths: list[str | None]
    pixels: StreamedSplit  # the same images as read, at their own size (for the pixel refiners)

    def image(self, i: int, size: tuple[int, int] | None = None) -> torch.Tensor:
        """Image ``i`` uint8 ``[channels, H, W]`` at its own size, or resized to ``size``."""
        image = self.pixels.image(i)
        if size is None or tuple(image.shape[-2:]) == tuple(size):
            return image
        resized = F.interpolate(image[None].float(), size=size, mode="bilinear", antialias=True, align_corners=False)
        return resized[0].round().clamp(0, 255).to(torch.uint8)


@contextlib.contextmanager
def thread_count_invariant_kernels(precision: str) -> Iterator[None]:
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


def split_maps(
    model: TokenMaskingViT,
    dataset: DatasetIndex,
    params: PseudoMaskParams,
    device: torch.device,
    positions: slice | list[int],
    blocks: int | None,
    per_block: bool = False,
    desc: str = "attention maps",
    precision: str = "fp32",
) -> SplitMaps:
    """Loads the images at ``positions`` of ``params.split`` at their own aspect ratio (longer side the
    classifier's input size) and computes their maps, in that order (``blocks``/``per_block``: see
    :func:`wsss.lib.mask_rule.attention_maps`)."""
    rows = dataset.split(params.split)
    picked = rows.iloc[positions]
    subset = dataclasses.replace(dataset, manifest=picked)
    data = classifier_images(model, subset, params.split)
    with thread_count_invariant_kernels(precision), autocast(precision, device):
        maps, probs = attention_maps(
            model, data.images, device, params.batch_size, params.scales, params.flip, blocks, per_block,
            refine_steps(params), desc, on_device=True,
        )  # fmt: skip
    gt_paths = [path if isinstance(path, str) else None for path in picked["mask"].tolist()]
    return SplitMaps(data, maps, probs, gt_paths, StreamedSplit(subset, params.split))


def sum_blocks(maps: Sequence[torch.Tensor]) -> torch.Tensor:
    """The blocks' maps summed in the order the model sums them (so the result equals its own sum)."""
    return sum(maps[1:], maps[0])


def refine_steps(params: PseudoMaskParams) -> int:
    """How many times the maps are refined with the patch affinity (0: ``refine: none``)."""
    return params.refine_iterations if params.refine == "affinity" else 0


def image_maps(
    found: SplitMaps, i: int, has_labels: bool, size: tuple[int, int] | None = None
) -> tuple[torch.Tensor, np.ndarray, np.ndarray]:
    """(normalised maps of the present classes at the image's own size, or ``size``; those classes;
    probabilities)."""
    probs = found.probs[i].numpy()
    classes = present_classes(found.data.labels[i].numpy() if has_labels else None, probs)
    size = size or found.data.original_sizes[i]
    return normalized_maps(found.maps[i][classes], size), classes, probs


def tuning_samples(
    sample: SplitMaps, maps: list[torch.Tensor], gts: list[np.ndarray], has_labels: bool
) -> list[tuple[torch.Tensor, np.ndarray, np.ndarray, np.ndarray]]:
    """(normalised maps, classes, probabilities, ground truth) of each tuning image under ``maps``, at the
    size of its ground truth ``gts`` (reduced: :func:`wsss.lib.mask_rule.tuning_size`)."""
    view = dataclasses.replace(sample, maps=maps)
    return [(*image_maps(view, i, has_labels, gt.shape), gt) for i, gt in enumerate(gts)]


def gt_positions(dataset: DatasetIndex, split: str) -> list[int]:
    """Positions in ``split`` of the images that have a ground-truth mask, in split order."""
    return [i for i, path in enumerate(dataset.split(split)["mask"].tolist()) if isinstance(path, str)]


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
    with_gt = gt_positions(dataset, params.split)
    tune = params.tune_thresholds and bool(with_gt)
    spec = params.map_blocks if params.map_blocks != "auto" or tune else "all"
    if not tune:
        layers = tuple(model.map_layers(map_block_count(spec)))
        return MaskRule(
            params.fg_threshold, params.bg_threshold, None, spec, layers, precision=precision,
            pixel_refine=params.pixel_refine, pixel_iterations=refine_count(params),
        )  # fmt: skip
    candidates = block_candidates(model) if spec == "auto" else {spec: map_block_count(spec)}
    has_labels = params.split == "train"
    sample = split_maps(
        model, dataset, params, device, with_gt[: params.tune_images], None, True, "maps for threshold tuning",
        precision,
    )  # fmt: skip
    # Scored at a reduced size (longer side TUNE_SIDE): the search merges every image about 60 times per
    # candidate, and maps blown up from a token grid lose little at that size; the masks are full size.
    pairs = zip(sample.gt_paths, sample.data.original_sizes, strict=True)
    gts = [resize_mask(read_mask(dataset.root / path), tuning_size(size)) for path, size in pairs]
    usable = model.map_layers(None)
    names = sorted(candidates, key=lambda name: -len(model.map_layers(candidates[name])))

    def samples_of(name: str) -> list:
        skip = len(usable) - len(model.map_layers(candidates[name]))
        return tuning_samples(sample, [sum_blocks(maps[skip:].unbind(0)) for maps in sample.maps], gts, has_labels)

    workers = min(torch.get_num_threads(), len(names))
    grids = coarse_scores((samples_of(name) for name in names), dataset.num_classes, workers, len(gts) * len(names))
    scores, best = {}, None
    for name, grid in zip(names, grids, strict=True):
        scores[name] = max(grid.values())  # the first pair of the highest score, as ThresholdSearch picks it
        if best is None or scores[name] > scores[best]:  # strictly better: ties keep more blocks
            best = name
    search = ThresholdSearch(samples_of(best), dataset.num_classes)
    search.scores = dict(grids[names.index(best)])  # the leader's coarse grid is not scored again
    fg, bg, score = search.refine()
    layers = tuple(model.map_layers(candidates[best]))
    pixel_scores = None
    if params.pixel_refine != "none":
        pixel_scores = pixel_tuning(sample, search.samples, fg, bg, params, dataset.num_classes)
    return MaskRule(
        fg, bg, score, best, layers, scores if len(candidates) > 1 else None, precision, params.pixel_refine,
        max(pixel_scores, key=lambda n: (pixel_scores[n], -n)) if pixel_scores else refine_count(params),
        pixel_scores,
    )  # fmt: skip


def refine_count(params: PseudoMaskParams) -> int:
    """The pixel refiner's iterations when they are not tuned: the most listed (0: ``pixel_refine: none``)."""
    return max(params.pixel_refine_iterations) if params.pixel_refine != "none" else 0


def pixel_tuning(
    sample: SplitMaps, samples: list, fg: float, bg: float, params: PseudoMaskParams, num_classes: int
) -> dict[int, float]:
    """Tuning mIoU of the pixel refiner after each of ``params.pixel_refine_iterations``, at the thresholds
    (``fg``, ``bg``) found without it (one pass reaches every count); the thresholds are searched first because
    each refined search would cost the refiner's pass per pair (on seed 0's animals the pair found unrefined
    also led the refined masks among five pairs tried)."""
    painted = [paint(torch.as_tensor(maps), classes, probs, fg, bg) for maps, classes, probs, _ in samples]
    images = [sample.image(i, gt.shape) for i, (*_, gt) in enumerate(samples)]
    refined = refine_masks(images, painted, [s[1] for s in samples], params.pixel_refine,
                           params.pixel_refine_iterations)  # fmt: skip
    gts = [s[3] for s in samples]
    return {
        n: mean_iou(zip(gts, [m.cpu().numpy() for m in masks], strict=True), num_classes + 1)
        for n, masks in sorted(refined.items())
    }
