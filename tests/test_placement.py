"""`wsss-research placement`: a pixel refiner on the decided mask vs on the class maps, on synthetic images whose
maps are blown up from a coarse grid (so their boundaries miss the colour edges a refiner can find)."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from wsss.lib.mask_rule import merge_maps, normalized_maps
from wsss.lib.metrics import mean_iou
from wsss.research import placement
from wsss.research.cli import main


def _sample(seed: int) -> tuple[tuple, torch.Tensor]:
    """A dark square of class 0 (mask label 1) on a light background, 32 px; its map is the truth at 4 x 4 cells
    blown up bilinearly, as a token grid's map is."""
    rng = np.random.default_rng(seed)
    top, left, side = rng.integers(3, 12), rng.integers(3, 12), rng.integers(10, 17)
    image = torch.full((3, 32, 32), 220, dtype=torch.uint8)
    image[:, top : top + side, left : left + side] = 30
    truth = np.zeros((32, 32), np.uint8)
    truth[top : top + side, left : left + side] = 1
    coarse = F.interpolate(torch.from_numpy(truth).float()[None, None], size=(4, 4), mode="area")[0]
    maps = normalized_maps(coarse, (32, 32))
    return (maps, np.array([0]), np.array([0.9]), truth), image


def test_map_scores_put_background_beside_the_maps_and_sum_to_one():
    maps = torch.tensor([[[0.0, 0.5, 1.0]], [[0.2, 0.9, 0.0]]])
    scores = placement.map_scores(maps)
    assert scores.shape == (3, 1, 3)
    torch.testing.assert_close(scores.sum(0), torch.ones(1, 3))
    assert scores[0, 0, 0] > scores[1:, 0, 0].max()  # both maps low: background leads
    assert scores.argmax(0).tolist() == [[0, 2, 1]]
    assert placement.map_scores(torch.zeros(0, 2, 2)).tolist() == [[[1.0, 1.0], [1.0, 1.0]]]


def test_placement_scores_every_refiner_place_and_count_and_refining_the_mask_beats_the_fill():
    pairs = [_sample(seed) for seed in range(6)]
    samples, images = [s for s, _ in pairs], [i for _, i in pairs]
    result = placement.placement_scores(
        samples[:3], samples[3:], images[:3], images[3:], (0.5, 0.2), num_classes=1, iterations=(2, 10)
    )
    places = {(r["refiner"], r["acts_on"], r["iterations"]) for r in result["rows"]}
    assert places == {(f, p, n) for f in ("par", "crf") for p in ("mask", "maps") for n in (2, 10)}
    unrefined = result["unrefined"]
    rule = mean_iou(((gt, merge_maps(maps, classes, probs, 0.5, 0.2)) for maps, classes, probs, gt in samples[3:]), 2)
    assert unrefined == pytest.approx(rule)  # the rule's own masks at the given thresholds
    best = {(r["refiner"], r["acts_on"]): r["miou"] for r in result["rows"] if r["iterations"] == 10}
    assert best[("par", "mask")] > unrefined + 0.02, (best, unrefined)
    for row in result["rows"]:
        assert 0.0 <= row["miou"] <= 1.0 and 0.0 <= row["bg"] <= row["fg"] <= 1.0
    assert "| par | mask |" in placement.table({**result, "cell": "s/v/seed0", "tune_images": 3, "scored_images": 3,
                                                 "map_blocks": "last"})  # fmt: skip


def test_placement_needs_images_left_to_score(capsys):
    assert main(["placement", "--variant", "patch_cam", "--images", "200", "--tune", "200"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["wsss-research placement: error: placement: --tune 200 leaves no image of --images 200 to score"]
