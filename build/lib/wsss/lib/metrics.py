"""Segmentation and multi-label classification metrics (numpy only).

Segmentation follows the ToCo/DuPL/torchvision convention: one confusion matrix over K = C + 1 classes
(0 = background) accumulated over all pixels whose ground truth is not 255, IoU_k = TP / (TP + FP + FN),
mIoU = mean over the classes that occur in the ground truth or the predictions.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable
from typing import Any

import numpy as np

IGNORE_INDEX = 255


def confusion_matrix(gt: np.ndarray, pred: np.ndarray, num_classes: int) -> np.ndarray:
    """Counts pixels per (ground truth, prediction) pair, skipping ground-truth pixels equal to 255.

    Args:
        gt: Integer label map, values in ``0..num_classes-1`` or 255.
        pred: Integer label map of the same shape, values in ``0..num_classes-1`` where gt is not 255.
        num_classes: K, including background.

    Returns:
        int64 array [K, K]; rows are ground truth, columns predictions.

    Raises:
        ValueError: shapes differ or a label lies outside ``0..K-1``.
    """
    gt = np.asarray(gt)
    pred = np.asarray(pred)
    if gt.shape != pred.shape:
        raise ValueError(f"ground truth shape {gt.shape} != prediction shape {pred.shape}")
    valid = gt != IGNORE_INDEX
    gt = gt[valid].astype(np.int64)
    pred = pred[valid].astype(np.int64)
    # Out-of-range labels would silently land in another class's cell of the bincount.
    for name, values in (("ground truth", gt), ("prediction", pred)):
        if values.size and (values.min() < 0 or values.max() >= num_classes):
            found = f"{values.min()}..{values.max()}"
            raise ValueError(f"{name} label outside 0..{num_classes - 1} (found {found})")
    counts = np.bincount(num_classes * gt + pred, minlength=num_classes * num_classes)
    return counts.reshape(num_classes, num_classes)


def scores_from_confusion(matrix: np.ndarray) -> dict[str, Any]:
    """Per-class IoU (NaN for classes absent from both ground truth and predictions), pixel accuracy, mIoU."""
    matrix = np.asarray(matrix, dtype=np.float64)
    tp = np.diag(matrix)
    union = matrix.sum(0) + matrix.sum(1) - tp
    total = matrix.sum()
    with np.errstate(divide="ignore", invalid="ignore"):
        iou = tp / union
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN -> NaN mIoU is the intended answer
        miou = float(np.nanmean(iou))
    return {
        "iou": iou,
        "pixel_accuracy": float(tp.sum() / total) if total else float("nan"),
        "miou": miou,
    }


class ConfusionMatrix:
    """Accumulates a K x K confusion matrix over many images.

    Args:
        num_classes: K, including background.
    """

    def __init__(self, num_classes: int) -> None:
        self.num_classes = num_classes
        self.matrix = np.zeros((num_classes, num_classes), dtype=np.int64)

    def update(self, gt: np.ndarray, pred: np.ndarray) -> None:
        """Adds one image (or a batch of the same shape); see :func:`confusion_matrix`."""
        self.matrix += confusion_matrix(gt, pred, self.num_classes)

    def compute(self) -> dict[str, Any]:
        """Returns ``iou`` (array [K]), ``pixel_accuracy`` and ``miou``."""
        return scores_from_confusion(self.matrix)


def mean_iou(pairs: Iterable[tuple[np.ndarray, np.ndarray]], num_classes: int) -> float:
    """mIoU over ``(gt, pred)`` mask pairs, accumulated in one confusion matrix of ``num_classes`` (K)."""
    matrix = ConfusionMatrix(num_classes)
    for gt, pred in pairs:
        matrix.update(gt, pred)
    return float(matrix.compute()["miou"])


def _check_pair(scores: np.ndarray, targets: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    scores = np.asarray(scores, dtype=np.float64)
    targets = np.asarray(targets)
    if scores.shape != targets.shape:
        raise ValueError(f"scores shape {scores.shape} != targets shape {targets.shape}")
    if not np.isin(targets, (0, 1)).all():
        raise ValueError("targets must be 0/1")
    return scores, targets.astype(np.int64)


def average_precision(scores: np.ndarray, targets: np.ndarray) -> float:
    """Area under the precision-recall step curve, sum_n (R_n - R_{n-1}) P_n (as scikit-learn).

    Tied scores form one threshold, so the result does not depend on the order of tied samples.

    Args:
        scores: [N] real-valued scores, higher = more likely positive.
        targets: [N] 0/1 labels.

    Returns:
        AP in [0, 1]; NaN when there is no positive.
    """
    scores, targets = _check_pair(scores, targets)
    positives = targets.sum()
    if positives == 0:
        return float("nan")
    order = np.argsort(-scores, kind="stable")
    scores, targets = scores[order], targets[order]
    tp = np.cumsum(targets)
    # Last index of every run of equal scores = one operating point.
    last = np.r_[np.flatnonzero(np.diff(scores)), scores.size - 1]
    precision = tp[last] / (last + 1)
    recall = tp[last] / positives
    return float(np.sum(np.diff(recall, prepend=0.0) * precision))


def mean_average_precision(scores: np.ndarray, targets: np.ndarray) -> float:
    """Mean of per-class AP over the classes with at least one positive.

    Args:
        scores: [N, C] scores.
        targets: [N, C] multi-hot labels.
    """
    scores, targets = _check_pair(scores, targets)
    aps = [average_precision(scores[:, c], targets[:, c]) for c in range(scores.shape[1])]
    aps = [ap for ap in aps if not np.isnan(ap)]
    return float(np.mean(aps)) if aps else float("nan")


def f1_scores(probs: np.ndarray, targets: np.ndarray, threshold: float = 0.5) -> dict[str, float]:
    """Multi-label F1 of ``probs >= threshold``.

    Macro averages per-class F1 = 2TP / (2TP + FP + FN) over the classes that occur in the targets or the
    predictions (like mIoU); micro pools TP/FP/FN over all classes.

    Args:
        probs: [N, C] probabilities.
        targets: [N, C] multi-hot labels.
        threshold: decision threshold.

    Returns:
        ``{"macro": float, "micro": float}``; NaN when nothing is positive or predicted.
    """
    probs, targets = _check_pair(probs, targets)
    pred = probs >= threshold
    truth = targets.astype(bool)
    tp = (pred & truth).sum(0).astype(np.float64)
    fp = (pred & ~truth).sum(0)
    fn = (~pred & truth).sum(0)
    denom = 2 * tp + fp + fn
    present = denom > 0
    macro = float(np.mean(2 * tp[present] / denom[present])) if present.any() else float("nan")
    micro = float(2 * tp.sum() / denom.sum()) if denom.sum() else float("nan")
    return {"macro": macro, "micro": micro}
