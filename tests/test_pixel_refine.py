"""Pixel refiners (`pseudo_masks.pixel_refine`): oracles for PAR and the local dense CRF written pixel by pixel beside
the shifted, batched ones, and what a refiner must do to a mask whose boundary misses the image's colour edge."""

import math

import numpy as np
import pytest
import torch

from wsss.lib import pixel_refine as pr
from wsss.lib.mask_rule import UNASSIGNED, MaskRule


def _naive_neighbour(x: torch.Tensor, y: int, x0: int, dy: int, dx: int, clamp: bool) -> torch.Tensor | None:
    h, w = x.shape[-2:]
    yy, xx = y + dy, x0 + dx
    if clamp:
        return x[..., min(max(yy, 0), h - 1), min(max(xx, 0), w - 1)]
    return x[..., yy, xx] if 0 <= yy < h and 0 <= xx < w else None


def naive_par_step(image: torch.Tensor, scores: torch.Tensor, settings: pr.ParSettings) -> torch.Tensor:
    """One PAR iteration, one pixel at a time, from the method's description (AFA/ToCo; weights normalised)."""
    factor = pr.spatial_scale(image.shape[-2:])
    offsets = [(d * a, d * b) for d in sorted({max(1, round(k * factor)) for k in settings.dilations})
               for a in (-1, 0, 1) for b in (-1, 0, 1) if (a, b) != (0, 0)]  # fmt: skip
    distance = torch.tensor([math.hypot(*o) for o in offsets])
    position = torch.softmax(-((distance / distance.std() / settings.w_colour) ** 2), 0)
    out = torch.zeros_like(scores)
    h, w = image.shape[-2:]
    for y in range(h):
        for x in range(w):
            near = torch.stack([_naive_neighbour(image, y, x, *o, clamp=True) for o in offsets], 1)  # [C, N]
            colour = -(((near - image[:, y, x, None]).abs() / (near.std(1, keepdim=True) + 1e-8)
                        / settings.w_colour) ** 2).mean(0)  # fmt: skip
            weight = torch.softmax(colour, 0) + settings.w_position * position
            weight = weight / weight.sum()
            values = torch.stack([_naive_neighbour(scores, y, x, *o, clamp=True) for o in offsets], 1)  # [L, N]
            out[:, y, x] = (values * weight).sum(1)
    return out


def naive_crf_step(image: torch.Tensor, unary: torch.Tensor, q: torch.Tensor, s: pr.CrfSettings) -> torch.Tensor:
    """One mean-field step of the dense CRF restricted to the window, one pixel at a time (sizes in pixels of the
    reference side, scaled to the image)."""
    h, w = image.shape[-2:]
    f = pr.spatial_scale((h, w))
    radius, stride = max(1, round(s.radius * f)), max(1, round(s.stride * f))
    bxy, sxy = s.bilateral_xy * f, s.spatial_xy * f
    steps = range(-(radius // stride) * stride, radius + 1, stride)
    out = torch.zeros_like(q)
    for y in range(h):
        for x in range(w):
            message = torch.zeros(q.shape[0])
            for dy in steps:
                for dx in steps:
                    other = _naive_neighbour(q, y, x, dy, dx, clamp=False)
                    if (dy, dx) == (0, 0) or other is None:
                        continue
                    d2 = dy * dy + dx * dx
                    c2 = ((image[:, y + dy, x + dx] - image[:, y, x]) ** 2).sum()
                    k = s.bilateral_weight * math.exp(-d2 / (2 * bxy**2) - c2 / (2 * s.bilateral_rgb**2))
                    k += s.spatial_weight * math.exp(-d2 / (2 * sxy**2))
                    message += k * other
            out[:, y, x] = torch.softmax(unary[:, y, x] + message, 0)
    return out


def _random(seed: int, labels: int = 3, size: int = 9) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    image = torch.randint(0, 256, (3, size, size), generator=g).float()
    scores = torch.rand(labels, size, size, generator=g)
    return image, scores / scores.sum(0, keepdim=True)


def test_par_matches_its_pixel_by_pixel_definition():
    image, scores = _random(0)
    settings = pr.ParSettings(dilations=(1, 2), iterations=2)
    fast = list(pr.par(image[None], scores[None], settings))
    slow = naive_par_step(image, scores, settings)
    torch.testing.assert_close(fast[0][0], slow, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(fast[1][0], naive_par_step(image, slow, settings), atol=1e-5, rtol=1e-5)


def test_crf_matches_its_pixel_by_pixel_definition():
    image, scores = _random(1)
    settings = pr.CrfSettings(radius=40, stride=12, iterations=2, bilateral_xy=40.0, bilateral_rgb=40.0)  # 9 px: 3 / 1
    fast = list(pr.conv_crf_steps(image[None], scores[None], settings))
    unary = scores.log()
    first = naive_crf_step(image, unary, unary.softmax(0), settings)
    torch.testing.assert_close(fast[0][0], first, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(fast[1][0], naive_crf_step(image, unary, first, settings), atol=1e-5, rtol=1e-5)


def test_spatial_sizes_follow_the_image_size():
    """A photo four times the reference side reads a neighbourhood four times as wide (same share of the image)."""
    small, large = torch.zeros(1, 3, 112, 112), torch.zeros(1, 3, 448, 448)
    _, near = pr.par_weights(small)
    _, far = pr.par_weights(large)
    assert max(abs(dy) for dy, _ in far) == 4 * max(abs(dy) for dy, _ in near)


def _edge_case() -> tuple[torch.Tensor, torch.Tensor, np.ndarray, np.ndarray]:
    """A dark square (class 2 in the truth) on a light background; the painted mask is the square grown by 3 px
    and leaves a band undecided, as a blown-up patch map does."""
    image = torch.full((3, 32, 32), 220, dtype=torch.uint8)
    image[:, 10:22, 10:22] = 30
    truth = np.zeros((32, 32), np.uint8)
    truth[10:22, 10:22] = 2
    painted = torch.zeros(32, 32, dtype=torch.uint8)
    painted[7:25, 7:25] = 2
    painted[4:7, 4:28] = UNASSIGNED
    return image, painted, np.array([1]), truth


@pytest.mark.parametrize("refiner", ["par", "crf"])
def test_a_refiner_moves_the_boundary_to_the_colour_edge(refiner):
    image, painted, classes, truth = _edge_case()
    filled = MaskRule(0.5, 0.2, None, "last", (0,)).masks([painted], [classes], None)[0]
    rule = MaskRule(0.5, 0.2, None, "last", (0,), pixel_refine=refiner, pixel_iterations=10)
    refined = rule.masks([painted], [classes], [image])[0]
    errors = lambda mask: int((mask != truth).sum())  # noqa: E731
    assert errors(refined) < errors(filled) / 2, (errors(refined), errors(filled))
    assert set(np.unique(refined)) <= {0, 2}  # only background and the image's own class


def test_refine_masks_batches_images_of_different_sizes_and_label_counts():
    """Each image is refined as if alone: padding a batch's label axis (absent labels score 0) changes nothing."""
    image, painted, classes, _ = _edge_case()
    other = torch.randint(0, 256, (3, 20, 24), dtype=torch.uint8)
    other_painted = torch.randint(0, 4, (20, 24), dtype=torch.uint8)
    other_classes = np.array([0, 1, 2])
    together = pr.refine_masks([image, other, image], [painted, other_painted, painted * 0],
                               [classes, other_classes, np.array([], int)], "par", [3, 5])  # fmt: skip
    for i, (img, mask, cls) in enumerate([(image, painted, classes), (other, other_painted, other_classes)]):
        alone = pr.refine_masks([img], [mask], [cls], "par", [5])
        assert torch.equal(together[5][i], alone[5][0])
    assert not together[5][2].any()  # no class: background everywhere
    assert set(together) == {3, 5}


def test_mask_scores_are_confident_where_decided_and_uniform_elsewhere():
    painted = torch.tensor([[0, 3], [UNASSIGNED, 1]], dtype=torch.uint8)
    scores = pr.mask_scores(painted, np.array([0, 2]))  # labels: background, class 0 (1), class 2 (3)
    torch.testing.assert_close(scores.sum(0), torch.ones(2, 2))
    assert scores[0, 0, 0] == pr.CONFIDENCE and scores[2, 0, 1] == pr.CONFIDENCE and scores[1, 1, 1] == pr.CONFIDENCE
    torch.testing.assert_close(scores[:, 1, 0], torch.full((3,), 1 / 3))
