import math

import numpy as np
import pytest

from wsss.lib.metrics import (
    ConfusionMatrix,
    average_precision,
    confusion_matrix,
    f1_scores,
    mean_average_precision,
)


def test_confusion_matrix_counts_and_ignores_255():
    gt = np.array([[0, 0, 1], [1, 2, 255]])
    pred = np.array([[0, 1, 1], [1, 0, 2]])
    expected = np.array([[1, 1, 0], [0, 2, 0], [1, 0, 0]])
    np.testing.assert_array_equal(confusion_matrix(gt, pred, 3), expected)


def test_prediction_outside_range_raises():
    with pytest.raises(ValueError, match="prediction"):
        confusion_matrix(np.array([0, 1]), np.array([0, 3]), 3)
    with pytest.raises(ValueError, match="shape"):
        confusion_matrix(np.zeros((2, 2)), np.zeros((2, 3)), 3)
    # A prediction under an ignored pixel is not scored, whatever its value.
    assert confusion_matrix(np.array([255]), np.array([7]), 3).sum() == 0


def test_miou_on_hand_made_matrix():
    # Rows = ground truth, columns = prediction. Class 3 never occurs anywhere -> NaN, excluded from mIoU.
    matrix = np.array(
        [
            [50, 10, 0, 0],
            [5, 20, 5, 0],
            [0, 0, 10, 0],
            [0, 0, 0, 0],
        ]
    )
    gt = np.repeat(np.arange(4), matrix.sum(1))
    pred = np.concatenate([np.repeat(np.arange(4), row) for row in matrix])
    acc = ConfusionMatrix(4)
    acc.update(gt[:40], pred[:40])  # accumulating in two parts must equal one update
    acc.update(gt[40:], pred[40:])
    np.testing.assert_array_equal(acc.matrix, matrix)
    scores = acc.compute()
    # IoU = TP / (TP + FP + FN): 50/(50+5+10), 20/(20+10+10), 10/(10+5+0)
    expected = [50 / 65, 20 / 40, 10 / 15]
    np.testing.assert_allclose(scores["iou"][:3], expected)
    assert math.isnan(scores["iou"][3])
    assert scores["miou"] == pytest.approx(np.mean(expected))
    assert scores["pixel_accuracy"] == pytest.approx(80 / 100)


def test_class_only_predicted_counts_with_zero_iou():
    scores = ConfusionMatrix(3)
    scores.update(np.array([0, 0, 1, 1]), np.array([0, 2, 1, 1]))
    result = scores.compute()
    np.testing.assert_allclose(result["iou"], [0.5, 1.0, 0.0])
    assert result["miou"] == pytest.approx(0.5)


def test_empty_accumulator_gives_nan():
    result = ConfusionMatrix(2).compute()
    assert math.isnan(result["miou"]) and math.isnan(result["pixel_accuracy"])


def test_average_precision_hand_computed():
    # Ranking + - + -: recall steps 0.5 at precision 1, 0.5 at precision 2/3.
    assert average_precision(np.array([0.9, 0.8, 0.7, 0.6]), np.array([1, 0, 1, 0])) == pytest.approx(5 / 6)
    assert average_precision(np.array([0.1, 0.9]), np.array([0, 1])) == 1.0
    assert math.isnan(average_precision(np.array([0.3, 0.2]), np.array([0, 0])))


def test_average_precision_ties_are_one_threshold():
    # The tied pair is a single operating point (P = 1/3, R = 1) whichever of them is the positive.
    scores = np.array([0.9, 0.5, 0.5])
    assert average_precision(scores, np.array([0, 1, 0])) == pytest.approx(1 / 3)
    assert average_precision(scores, np.array([0, 0, 1])) == pytest.approx(1 / 3)
    assert average_precision(np.full(4, 0.5), np.array([1, 0, 0, 1])) == pytest.approx(0.5)


def test_mean_average_precision_skips_classes_without_positives():
    scores = np.array([[0.9, 0.1, 0.8], [0.8, 0.2, 0.1], [0.7, 0.3, 0.6], [0.6, 0.4, 0.7]])
    targets = np.array([[1, 0, 0], [0, 0, 1], [1, 0, 0], [0, 0, 0]])
    # class 0: + - + - -> 5/6; class 1: no positive; class 2: ranking - - - + -> 1/4
    assert mean_average_precision(scores, targets) == pytest.approx((5 / 6 + 1 / 4) / 2)


def test_f1_macro_and_micro():
    probs = np.array([[0.9, 0.2, 0.1], [0.6, 0.7, 0.0], [0.1, 0.4, 0.2]])
    targets = np.array([[1, 0, 0], [0, 1, 0], [1, 1, 0]])
    # class 0: TP 1, FP 1, FN 1 -> 0.5; class 1: TP 1, FN 1 -> 2/3; class 2: absent everywhere -> excluded
    result = f1_scores(probs, targets)
    assert result["macro"] == pytest.approx((0.5 + 2 / 3) / 2)
    assert result["micro"] == pytest.approx(2 * 2 / (2 * 2 + 1 + 2))
    with pytest.raises(ValueError, match="0/1"):
        f1_scores(probs, targets * 2)
