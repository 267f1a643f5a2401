import numpy as np
import pytest
import torch

from wsss.lib import mask_rule
from wsss.lib.mask_rule import (
    UNASSIGNED,
    class_specificity,
    coarse_scores,
    fill_unassigned,
    grid_ceiling_mask,
    merge_maps,
    normalized_maps,
    present_classes,
)


def test_higher_probability_class_wins_overlaps_whatever_the_order():
    left = np.array([[1.0, 1.0, 0.0]])
    right = np.array([[0.0, 1.0, 1.0]])
    maps = np.stack([left, right])
    classes = np.array([2, 0])  # mask values 3 and 1
    probs = np.array([0.9, 0.0, 0.4])  # class 0 is more confident than class 2
    assert merge_maps(maps, classes, probs, 0.5, 0.1).tolist() == [[3, 1, 1]]
    probs = np.array([0.3, 0.0, 0.4])
    assert merge_maps(maps, classes, probs, 0.5, 0.1).tolist() == [[3, 3, 1]]


def test_background_below_bg_threshold_and_in_between_filled_from_nearest():
    maps = np.array([[[0.9, 0.3, 0.3, 0.05, 0.05]]])
    mask = merge_maps(maps, np.array([1]), np.array([0.0, 0.8]), 0.5, 0.1)
    # 0.3 is between bg and fg: nearest assigned pixel is class 1 (value 2) on the left, bg on the right
    assert mask.tolist() == [[2, 2, 0, 0, 0]]


def _numpy_merge(norm_maps: np.ndarray, classes: np.ndarray, probs: np.ndarray, fg: float, bg: float) -> np.ndarray:
    """The rule written plainly in numpy (steps 3-5), as the stage ran it before it moved to the device."""
    mask = np.full(norm_maps.shape[1:], UNASSIGNED, dtype=np.uint8)
    if len(classes) == 0:
        return np.zeros_like(mask)
    for idx in np.argsort(probs[classes], kind="stable"):
        mask[norm_maps[idx] >= fg] = classes[idx] + 1
    mask[(norm_maps.max(axis=0) < bg) & (mask == UNASSIGNED)] = 0
    return fill_unassigned(mask)


def test_device_rule_paints_the_numpy_rules_masks_bit_for_bit():
    # float32 maps on a 1/40 lattice, so many pixels sit exactly on a threshold: >= and < must agree
    rng = np.random.default_rng(0)
    for trial in range(40):
        k = int(rng.integers(0, 4))
        maps = (rng.integers(0, 41, (k, 23, 31)) / 40).astype(np.float32)
        classes = rng.choice(6, size=k, replace=False)
        probs = rng.random(6)
        fg, bg = float(rng.choice([0.1, 0.175, 0.35, 0.5, 0.725])), float(rng.choice([0.0, 0.05, 0.1, 0.125]))
        expected = _numpy_merge(maps, classes, probs, fg, bg)
        assert np.array_equal(merge_maps(torch.from_numpy(maps), classes, probs, fg, bg), expected), trial
        assert np.array_equal(merge_maps(maps, classes, probs, fg, bg), expected), trial


def test_fill_unassigned_takes_nearest_label():
    u = UNASSIGNED
    mask = np.array([[1, u, u, u, 3], [u, u, u, u, u]], dtype=np.uint8)
    filled = fill_unassigned(mask)
    assert filled[0].tolist() == [1, 1, filled[0, 2], 3, 3]
    assert filled[1, 0] == 1 and filled[1, 4] == 3
    assert fill_unassigned(np.full((2, 2), u, dtype=np.uint8)).tolist() == [[0, 0], [0, 0]]


def test_no_present_class_gives_all_background():
    assert merge_maps(np.zeros((0, 2, 2)), np.array([], dtype=int), np.zeros(3), 0.5, 0.2).sum() == 0


def test_present_classes_labels_or_predictions():
    assert present_classes(np.array([0, 1, 1]), np.array([0.9, 0.1, 0.1])).tolist() == [1, 2]
    assert present_classes(None, np.array([0.9, 0.1, 0.6])).tolist() == [0, 2]
    assert present_classes(None, np.array([0.2, 0.4, 0.1])).tolist() == [1]


def test_normalized_maps_span_unit_interval_at_image_size():
    maps = torch.tensor([[[0.0, 1.0], [2.0, 3.0]], [[5.0, 5.0], [5.0, 5.0]]])
    out = normalized_maps(maps, (6, 4)).numpy()
    assert out.shape == (2, 6, 4)
    assert np.isclose(out[0].min(), 0) and np.isclose(out[0].max(), 1)
    assert np.all(out[1] == 0)  # a flat map carries no location


def test_grid_ceiling_takes_majority_per_cell():
    gt = np.zeros((4, 4), dtype=np.uint8)
    gt[:2, :2] = [[1, 1], [1, 0]]  # top-left cell: mostly class value 1
    gt[2:, 2:] = [[2, 255], [255, 255]]  # ignore pixels do not vote
    out = grid_ceiling_mask(gt, (2, 2), num_classes=2)
    assert out.tolist() == [[1, 1, 0, 0], [1, 1, 0, 0], [0, 0, 2, 2], [0, 0, 2, 2]]


def test_class_specificity_hand_computed():
    gt = np.array([[1, 1, 2, 0]], dtype=np.uint8)
    attention = np.array([[[0.3, 0.3, 0.2, 0.2]], [[0.1, 0.1, 0.6, 0.2]]])
    shares, areas = class_specificity(attention, gt, np.array([0, 1]))
    assert np.allclose(shares, [0.6 / 0.8, 0.6 / 0.8])
    assert np.allclose(areas, [2 / 3, 1 / 3])


def test_threshold_search_refines_off_the_coarse_grid():
    from wsss.lib.mask_rule import FG_GRID, tune_thresholds

    # One image, one class: its map is a ramp 0..1 along x; the object covers x >= 0.6 of the width.
    width = 41
    ramp = np.tile(np.linspace(0.0, 1.0, width), (8, 1))[None]
    gt = np.where(ramp[0] >= 0.6, 1, 0).astype(np.uint8)
    samples = [(ramp, np.array([0]), np.array([0.9]), gt)]
    coarse_fg, _, coarse = tune_thresholds(samples, num_classes=1, refine=False)
    fg, bg, score = tune_thresholds(samples, num_classes=1)
    assert coarse_fg in FG_GRID and coarse < 1.0
    # the coarse grid steps over the object's edge (0.55 / 0.65); the refined pairs hit it
    assert fg not in FG_GRID and 0.575 < fg <= 0.625 and score == pytest.approx(1.0)
    assert 0.0 <= bg <= fg


def test_tuning_scores_large_images_downscaled_and_small_ones_as_they_are():
    from wsss.lib.datasets import resize_mask
    from wsss.lib.mask_rule import TUNE_SIDE, tuning_size

    assert tuning_size((64, 64)) == (64, 64) and tuning_size((TUNE_SIDE, 90)) == (TUNE_SIDE, 90)
    assert tuning_size((375, 500)) == (96, 128) and tuning_size((500, 375)) == (128, 96)
    gt = np.zeros((375, 500), np.uint8)
    gt[:, 250:] = 2  # right half class 2, a column of ignore at the seam
    gt[:, 249] = 255
    small = resize_mask(gt, (96, 128))
    assert small.shape == (96, 128) and set(np.unique(small)) <= {0, 2, 255}
    assert (small[:, :60] == 0).all() and (small[:, 68:] == 2).all()
    assert resize_mask(gt, gt.shape) is gt


@pytest.mark.parametrize(
    "device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no GPU"))]
)
def test_the_candidates_coarse_searches_in_processes_equal_the_serial_ones(monkeypatch, device):
    """The pool is only where the time goes: each candidate's grid scores are the serial search's, exactly (a
    GPU's maps go to the workers through the host)."""
    rng = np.random.default_rng(0)

    def sample() -> tuple:
        gt = rng.integers(0, 4, (16, 16)).astype(np.uint8)
        return torch.rand(2, 16, 16).to(device), np.array([0, 2]), rng.random(3), gt

    candidates = [[sample() for _ in range(5)] for _ in range(3)]
    serial = coarse_scores(iter(candidates), 3, workers=1, total=15)
    monkeypatch.setattr(mask_rule, "PARALLEL_SEARCH_MIN", 0)
    assert coarse_scores(iter(candidates), 3, workers=2, total=15) == serial
    assert len(serial) == 3 and all(len(grid) == len(serial[0]) > 40 for grid in serial)


def test_threshold_search_scores_each_pair_as_the_rule_masks_it():
    """The search paints an image's classes once per fg and only redoes background and fill per bg: every pair's
    score is still the mIoU of the rule's own masks (:func:`merge_maps`) at that pair, exactly."""
    from wsss.lib.mask_rule import ThresholdSearch
    from wsss.lib.metrics import mean_iou

    rng = np.random.default_rng(1)
    samples = []
    for k in (2, 0, 1, 3, 2):  # an image without a present class too
        maps = torch.from_numpy((rng.integers(0, 41, (k, 12, 15)) / 40).astype(np.float32))
        samples.append((maps, rng.choice(4, size=k, replace=False), rng.random(4), rng.integers(0, 5, (12, 15))))
    search = ThresholdSearch(samples, num_classes=4)
    search.refine()
    assert len(search.scores) > 60
    for (fg, bg), score in search.scores.items():
        masks = [merge_maps(m, c, p, fg, bg) for m, c, p, _ in samples]
        assert score == mean_iou(zip([s[3] for s in samples], masks, strict=True), 5), (fg, bg)
