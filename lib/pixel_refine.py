"""Pixel-level refinement of pseudo masks with the image's own colours: weight-free, in torch (CPU or GPU).

Two peers' refiners, both labelled as such (neither is the paper's):

- :func:`par`: pixel-adaptive refinement as AFA (Ru et al., CVPR 2022) and ToCo (CVPR 2023) define it: each pixel
  becomes the weighted mean of its 8 neighbours at a few dilations, the weights a softmax of colour similarity
  (scaled by the neighbourhood's own colour spread) plus a small softmax of nearness, iterated. Ours normalises the
  weights to sum 1 (theirs sum to 1 + w2), so refined maps stay in [0, 1] and the rule's thresholds keep their meaning.
- :func:`conv_crf_steps`: a fully connected CRF's mean-field inference (Krähenbühl & Koltun 2011; the dense CRF of
  MCTformer, IRN and PSA) restricted to a local window as ConvCRF (Teichmann & Cipolla 2019) does, so it needs no
  compiled extension: Gaussian bilateral (position + colour) and spatial kernels, Potts compatibility.

Both act on the decided mask (:func:`mask_scores`: confident scores where the mask rule painted a pixel, uniform
over the image's labels where it left the pixel to the nearest-neighbour fill), after which each pixel takes the
argmax: refining the class maps before the rule instead measured lower with either refiner (docs/results.md).
Spatial sizes are given for a 112-px longer side and scale with the image (:func:`spatial_scale`), so a photo reads
the same neighbourhood relative to its objects.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from wsss.lib.config import PIXEL_REFINERS, PREDICT_PIXEL_ITERATIONS
from wsss.lib.datasets import image_tensor
from wsss.lib.errors import WsssError

REFERENCE_SIDE = 112  # the pixel sizes below are for an image whose longer side is this


def check_pixel_refine(refiner: object, iterations: object) -> tuple[str, int]:
    """A refiner asked for at predict time (``wsss predict``, the served segmenter), checked before anything runs.

    Raises:
        WsssError: a refiner that is not one of ``PIXEL_REFINERS``, or an iteration count that is not an integer > 0.
    """
    if refiner not in PIXEL_REFINERS:
        raise WsssError(f"pixel_refine: {refiner!r} is not one of {', '.join(PIXEL_REFINERS)}")
    if isinstance(iterations, bool) or not isinstance(iterations, int | np.integer) or iterations <= 0:
        raise WsssError(f"pixel_refine_iterations: expected a count > 0, got {iterations!r}")
    return str(refiner), int(iterations)


@dataclass(frozen=True)
class ParSettings:
    """PAR's constants (AFA/ToCo's w1 = 0.3, w2 = 0.01; their dilations 1, 2, 4, 8, 12, 24 at 448-512 px read
    1, 2, 4, 8 at our 112 px) and its iterations (theirs: 10 on the CAMs)."""

    dilations: tuple[int, ...] = (1, 2, 4, 8)
    iterations: int = 10
    w_colour: float = 0.3
    w_position: float = 0.01


@dataclass(frozen=True)
class CrfSettings:
    """The dense CRF's usual pseudo-label setting (IRN/PSA on VOC at ~500 px: bilateral xy 80, rgb 13, weight 10;
    spatial xy 3, weight 3) with xy scaled to 112 px, a window of ``radius`` px sampled every ``stride`` px, 5
    mean-field steps (the pseudo-mask stage tunes the steps, ``pseudo_masks.pixel_refine_iterations``)."""

    bilateral_xy: float = 18.0
    bilateral_rgb: float = 13.0
    bilateral_weight: float = 10.0
    spatial_xy: float = 3.0
    spatial_weight: float = 3.0
    radius: int = 8
    stride: int = 2
    iterations: int = 5


def spatial_scale(size: Sequence[int]) -> float:
    """How much larger than the reference side the image is (the factor applied to pixel sizes)."""
    return max(size) / REFERENCE_SIDE


def _shifted(x: torch.Tensor, offsets: Sequence[tuple[int, int]], mode: str) -> Iterator[torch.Tensor]:
    """``x`` ``[B, C, H, W]`` moved by each ``(dy, dx)`` (pixel p reads p + offset; past the border ``mode``
    padding, ``replicate`` or ``constant`` zeros), one view at a time."""
    reach = max(max(abs(dy), abs(dx)) for dy, dx in offsets)
    h, w = x.shape[-2:]
    padded = torch.nn.functional.pad(x, (reach,) * 4, mode=mode)
    for dy, dx in offsets:
        yield padded[..., reach + dy : reach + dy + h, reach + dx : reach + dx + w]


def _weighted_sum(
    x: torch.Tensor, weights: torch.Tensor, offsets: Sequence[tuple[int, int]], mode: str
) -> torch.Tensor:
    """Sum over the offsets of ``x`` ``[B, L, H, W]`` shifted, times ``weights`` ``[B, N, H, W]`` (one per offset)."""
    out = torch.zeros_like(x)
    for k, moved in enumerate(_shifted(x, offsets, mode)):
        out.addcmul_(moved, weights[:, k : k + 1])
    return out


def _par_offsets(dilations: Sequence[int]) -> list[tuple[int, int]]:
    ring = [(dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1) if (dy, dx) != (0, 0)]
    return [(d * dy, d * dx) for d in dilations for dy, dx in ring]


def par_weights(images: torch.Tensor, settings: ParSettings = ParSettings()) -> tuple[torch.Tensor, list]:
    """PAR's neighbour weights ``[B, N, H, W]`` (summing to 1 over N) of images ``[B, channels, H, W]``, and the
    offsets."""
    factor = spatial_scale(images.shape[-2:])
    offsets = _par_offsets(sorted({max(1, round(d * factor)) for d in settings.dilations}))
    x = images.float()
    # The neighbours' colour spread (std over the N offsets, unbiased as torch.std) in two passes over the shifted
    # views rather than one stacked [B, C, N, H, W] tensor: N times less memory, and a batch stays in cache.
    mean = sum(_shifted(x, offsets, "replicate")) / len(offsets)
    var = sum((moved - mean).square() for moved in _shifted(x, offsets, "replicate")) / (len(offsets) - 1)
    scale = 1.0 / ((var.sqrt() + 1e-8) * settings.w_colour)
    colour = -torch.stack([((moved - x) * scale).square().mean(1) for moved in _shifted(x, offsets, "replicate")], 1)
    distance = torch.tensor([math.hypot(dy, dx) for dy, dx in offsets], device=x.device)
    position = (-((distance / (distance.std() + 1e-8) / settings.w_colour) ** 2)).softmax(0)
    weights = colour.softmax(1) + settings.w_position * position[:, None, None]
    return weights / weights.sum(1, keepdim=True), offsets


def par(images: torch.Tensor, scores: torch.Tensor, settings: ParSettings = ParSettings()) -> Iterator[torch.Tensor]:
    """Pixel-adaptive refinement (AFA/ToCo's PAR, weights normalised) of ``scores`` ``[B, L, H, W]`` with
    ``images`` ``[B, channels, H, W]`` of the same size: yields the scores after each of ``settings.iterations``
    weighted neighbour means (so one pass serves every iteration count)."""
    weights, offsets = par_weights(images, settings)
    out = scores.float()
    for _ in range(settings.iterations):
        out = _weighted_sum(out, weights, offsets, "replicate")
        yield out


def crf_kernel(images: torch.Tensor, settings: CrfSettings = CrfSettings()) -> tuple[torch.Tensor, list]:
    """The CRF's pairwise weights ``[B, N, H, W]`` over the window's offsets (zero where a neighbour lies outside
    the image) of images ``[B, channels, H, W]``, and the offsets."""
    factor = spatial_scale(images.shape[-2:])
    radius, stride = max(1, round(settings.radius * factor)), max(1, round(settings.stride * factor))
    steps = range(-(radius // stride) * stride, radius + 1, stride)
    offsets = [(dy, dx) for dy in steps for dx in steps if (dy, dx) != (0, 0)]
    x = images.float()
    colour = torch.stack([((moved - x) ** 2).sum(1) for moved in _shifted(x, offsets, "replicate")], 1)
    d2 = torch.tensor([dy * dy + dx * dx for dy, dx in offsets], dtype=torch.float32, device=x.device)[:, None, None]
    bxy, sxy = settings.bilateral_xy * factor, settings.spatial_xy * factor
    bilateral = torch.exp(-d2 / (2 * bxy**2) - colour / (2 * settings.bilateral_rgb**2))
    kernel = settings.bilateral_weight * bilateral + settings.spatial_weight * torch.exp(-d2 / (2 * sxy**2))
    inside = torch.cat(list(_shifted(torch.ones_like(x[:, :1]), offsets, "constant")), 1)  # 0 past the border
    return kernel * inside, offsets


def conv_crf_steps(
    images: torch.Tensor, scores: torch.Tensor, settings: CrfSettings = CrfSettings()
) -> Iterator[torch.Tensor]:
    """Mean-field marginals ``[B, L, H, W]`` of the local-window dense CRF whose unary is ``-log scores``
    (``scores`` ``[B, L, H, W]``, each pixel's summing to 1; a label scored 0 stays 0) with ``images``
    ``[B, channels, H, W]`` in the bilateral kernel, after each of ``settings.iterations`` mean-field steps."""
    kernel, offsets = crf_kernel(images, settings)
    unary = scores.float().log()  # -inf: a label the image does not have (padding) never wins
    q = unary.softmax(1)
    for _ in range(settings.iterations):
        # Potts: each neighbour's belief in a label adds its kernel weight to that label (the constant part of
        # the label-disagreement penalty cancels in the softmax).
        q = (unary + _weighted_sum(q, kernel, offsets, "constant")).softmax(1)
        yield q


CONFIDENCE = 0.8  # a decided pixel's score for its label (pydensecrf's unary_from_labels uses 0.5-0.7 with gt_prob)


def mask_scores(painted: torch.Tensor, classes: np.ndarray, confidence: float = CONFIDENCE) -> torch.Tensor:
    """Scores ``[1 + K, H, W]`` over background and the image's ``classes`` from a painted mask (0 background,
    k+1 class k, anything else undecided): ``confidence`` on the decided label (the rest shared by the others),
    uniform where undecided (seeding those pixels with the nearest decided label instead measured no better)."""
    labels = [0, *(int(c) + 1 for c in classes)]
    count = len(labels)
    scores = torch.full((count, *painted.shape), 1.0 / count, device=painted.device)
    for index, label in enumerate(labels):
        decided = painted == label
        scores[:, decided] = (1.0 - confidence) / max(count - 1, 1)
        scores[index, decided] = confidence
    return scores


def labels_of(scores: torch.Tensor, classes: np.ndarray) -> torch.Tensor:
    """The mask ``[H, W]`` uint8 (0 background, k+1 class k) of the argmax of background/``classes`` scores."""
    lookup = torch.tensor([0, *(int(c) + 1 for c in classes)], dtype=torch.uint8, device=scores.device)
    return lookup[scores.argmax(0)]


def refine_masks(
    images: Sequence[torch.Tensor],
    painted: Sequence[torch.Tensor],
    classes: Sequence[np.ndarray],
    refiner: str,
    iterations: Sequence[int],
    batch_size: int = 16,
) -> dict[int, list[torch.Tensor]]:
    """Masks refined by ``refiner`` (``par`` or ``crf``) from painted masks (:func:`mask_scores`), each image
    ``[channels, H, W]`` the size of its mask: ``{n: [uint8 [H, W] per image]}`` after each ``n`` of
    ``iterations`` (one pass reaches all; batching: :func:`_refined_batches`)."""
    out: dict[int, list] = {n: [None] * len(images) for n in iterations}
    keys = [(tuple(mask.shape), len(labels)) for mask, labels in zip(painted, classes, strict=True)]

    def score_of(i: int) -> torch.Tensor:  # made when its batch is: float scores of every image would be held at once
        return mask_scores(painted[i], classes[i])

    for group, step, refined in _refined_batches(images, score_of, keys, refiner, iterations, batch_size):
        for row, i in enumerate(group):
            out[step][i] = labels_of(refined[row], classes[i])
    return out


def refine_scores(
    images: Sequence[torch.Tensor],
    scores: Sequence[torch.Tensor],
    refiner: str,
    iterations: Sequence[int],
    batch_size: int = 16,
) -> dict[int, list[torch.Tensor]]:
    """Per-pixel label scores ``[L, H, W]`` (one tensor per image, its image's size) after each ``n`` of
    ``iterations`` of ``refiner`` (``par`` or ``crf``): ``{n: [[L, H, W] per image]}``."""
    out: dict[int, list] = {n: [None] * len(images) for n in iterations}
    keys = [tuple(score.shape) for score in scores]
    for group, step, refined in _refined_batches(images, scores.__getitem__, keys, refiner, iterations, batch_size):
        for row, i in enumerate(group):
            out[step][i] = refined[row]
    return out


def _refined_batches(
    images: Sequence[torch.Tensor],
    score_of: Callable[[int], torch.Tensor],
    keys: Sequence[tuple],
    refiner: str,
    iterations: Sequence[int],
    batch_size: int = 16,
) -> Iterator[tuple[list[int], int, torch.Tensor]]:
    """``(image indices, n, their scores [B, L, H, W] after n steps)`` for each ``n`` of ``iterations`` and each batch
    of images whose ``keys`` (size and label count) agree, ``batch_size`` at most; ``score_of(i)`` gives image ``i``'s
    scores ``[L, H, W]`` when its batch is made. (16 112-px images keep a step's tensors in cache: 1.9x faster than
    64 on a CPU and as fast as 8, the same masks bit for bit; one label count per batch, so no step spends time on
    padded labels: 0.85x the time on 1-3 labels an image.)"""
    last = max(iterations)
    groups: dict[tuple, list[int]] = {}
    for index, key in enumerate(keys):
        groups.setdefault(key, []).append(index)
    for indices in groups.values():
        for start in range(0, len(indices), batch_size):
            group = indices[start : start + batch_size]
            scores = torch.stack([score_of(i) for i in group])
            batch = torch.stack([images[i].to(scores.device) for i in group]).float()
            steps = (
                par(batch, scores, ParSettings(iterations=last))
                if refiner == "par"
                else conv_crf_steps(batch, scores, CrfSettings(iterations=last))
            )
            for step, refined in enumerate(steps, 1):
                if step in iterations:
                    yield group, step, refined


def refine_predicted(
    pixels: Sequence[np.ndarray], masks: Sequence[np.ndarray], refiner: str, iterations: int = PREDICT_PIXEL_ITERATIONS
) -> list[np.ndarray]:
    """Masks a model decided for every pixel (``wsss predict``'s, HxW uint8) refined by ``refiner`` with their
    uint8 HxWxC images, among the labels each mask holds."""
    images = [image_tensor(image) for image in pixels]
    painted = [torch.from_numpy(np.asarray(mask, dtype=np.uint8)) for mask in masks]
    classes = [np.setdiff1d(np.unique(mask), [0]).astype(int) - 1 for mask in masks]
    refined = refine_masks(images, painted, classes, refiner, [iterations])[iterations]
    return [mask.cpu().numpy() for mask in refined]
