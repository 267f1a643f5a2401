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
5. the remaining pixels take the label of the nearest assigned pixel (Euclidean distance transform).
``fg_threshold``/``bg_threshold`` are params, optionally tuned on a subset of the TRAIN split (never val).
Steps 2-4 run on the device the maps are on (:func:`normalized_maps`, :func:`paint`); only the uint8 mask
comes back for step 5 on the CPU (scipy's distance transform).
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage
from tqdm import tqdm

from wsss.lib.datasets import aspect_size, normalize, shape_groups
from wsss.lib.metrics import IGNORE_INDEX, mean_iou
from wsss.models.token_masking_vit import TokenMaskingViT

# Marks a pixel no rule step has decided yet (filled from the nearest decided pixel). It shares 255 with
# IGNORE_INDEX only by value: a finished mask never holds it.
UNASSIGNED = 255
# `pseudo_masks.map_blocks` values besides auto/all: last, last2, last3, ...
MAP_BLOCKS = re.compile(r"last([1-9][0-9]*)?")


def map_block_count(spec: str) -> int | None:
    """``pseudo_masks.map_blocks`` as the model's ``blocks`` argument: ``last`` -> 1, ``lastK`` -> K, ``all``
    -> None (every block with an open head, the reference's sum over layers). ``auto`` is decided by the
    pseudo-mask stage on its tuning sample; any other consumer, which has no ground truth to tune on, takes
    the paper's ``all``."""
    if spec in ("all", "auto"):
        return None
    if MAP_BLOCKS.fullmatch(spec):
        return int(spec[4:] or 1)
    raise ValueError(f"map_blocks must be auto, all, last or lastK (K >= 1), got {spec!r}")


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
    stay the grid of the image's own size. ``on_device``: the maps stay where the model is (float32), for
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


def paint(
    norm_maps: torch.Tensor, classes: np.ndarray, probs: np.ndarray, fg_threshold: float, bg_threshold: float
) -> torch.Tensor:
    """Steps 3 and 4 of the rule on the maps' device: uint8 ``[H, W]`` with UNASSIGNED where step 5 fills.

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
    mask[(norm_maps.amax(dim=0) < bg_threshold) & (mask == UNASSIGNED)] = 0
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
    _, (rows, cols) = ndimage.distance_transform_edt(holes, return_indices=True)
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
        gts = [s[3] for s in self.samples]
        for fg, bg in pairs:
            fg, bg = round(float(fg), 4), round(float(bg), 4)
            if bg > fg or (fg, bg) in self.scores or not (bg >= 0.0 and fg <= 1.0):
                continue
            preds = [merge_maps(m, c, p, fg, bg) for m, c, p, _ in self.samples]
            self.scores[(fg, bg)] = mean_iou(zip(gts, preds, strict=True), self.num_classes + 1)
        (fg, bg), score = max(self.scores.items(), key=lambda item: item[1])  # max keeps the first of equals
        return fg, bg, score

    def coarse(self) -> tuple[float, float, float]:
        """(fg, bg, mIoU) of the best pair of the coarse grid."""
        return self._search(itertools.product(FG_GRID, BG_GRID))

    def refine(self) -> tuple[float, float, float]:
        """(fg, bg, mIoU) of the best pair after the finer grid around the best one so far."""
        fg, bg, _ = self.coarse()  # scored already: only looks the best pair up
        return self._search((fg + a, max(0.0, bg + b)) for a, b in itertools.product(FINE_STEPS, FINE_STEPS))


def tune_thresholds(
    samples: list[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]], num_classes: int, refine: bool = True
) -> tuple[float, float, float]:
    """:class:`ThresholdSearch`'s coarse grid and, with ``refine``, its finer one: (fg, bg, mIoU at them)."""
    search = ThresholdSearch(samples, num_classes)
    return search.refine() if refine else search.coarse()
