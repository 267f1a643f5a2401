"""Stage ``evaluate``: mIoU of the pseudo masks (their split) and the segmenters (val); metrics and plots."""

from __future__ import annotations

import csv
import io
import json
import math
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from PIL import Image

from wsss.lib.artifacts import (
    MODEL_FILE,
    classifier_images,
    load_map_model,
    load_segmenter,
    predict_images,
    predict_split,
    pseudo_mask_path,
    read_ingested,
    segmenter_dir,
    segmenter_split,
)
from wsss.lib.config import Params, map_block_count
from wsss.lib.dataset_format import DatasetIndex, read_mask_table
from wsss.lib.errors import WsssError
from wsss.lib.images import decode_mask_png, display_rgb, read_image, read_mask, to_uint8
from wsss.lib.io import atomic_file, check_writable, write_json
from wsss.lib.mask_rule import attention_maps, normalized_maps, present_classes
from wsss.lib.metrics import IGNORE_INDEX, ConfusionMatrix
from wsss.lib.plotting import class_legend, colorize, heatmap, image_grid
from wsss.lib.runtime import autocast, resolve_precision, setup_runtime, write_runtime
from wsss.models.segmenter import Segmenter

# The confusion CSVs hold one (actual, predicted) row per pixel for DVC's confusion template; above this
# many pixels the rows are scaled down proportionally so the file stays small.
MAX_CONFUSION_ROWS = 10_000
# The earlier stages' numbers metrics.json repeats: (its key, the key in that stage's record)
PSEUDO_MASK_METRICS = (
    ("pseudo_mask_ceiling_miou", "ceiling_miou"),
    ("pseudo_mask_fg_threshold", "fg_threshold"),
    ("pseudo_mask_bg_threshold", "bg_threshold"),
    ("pseudo_mask_pixel_refine_iterations", "pixel_refine_iterations"),
    ("class_specificity", "class_specificity"),
    ("area_share", "area_share"),
)
CLASSIFIER_METRICS = (
    ("classifier_val_map", "val_map"),
    ("classifier_val_f1_macro", "val_f1_macro"),
    ("classifier_closed_heads", "closed_heads"),
)
CONFUSION_PLOTS = {"pseudo_mask": "confusion_pseudo_masks.csv", "segmenter": "confusion_segmenter.csv"}


def _predicted_pairs(
    rows: pd.DataFrame, split: str, predictions: Mapping[str, np.ndarray | bytes] | Iterable[tuple[str, np.ndarray]]
) -> Iterator[tuple[str, np.ndarray]]:
    """``(id, mask)`` per image of ``rows``: looked up in a mapping (PNG bytes decoded one at a time), or
    taken from a stream of pairs (a segmenter's predictions as they are made), which must cover the split."""
    if isinstance(predictions, Mapping):
        for image_id in rows["id"]:
            if image_id not in predictions:
                raise WsssError(f"no prediction for id {image_id!r} of split {split!r}")
            mask = predictions[image_id]
            yield image_id, decode_mask_png(mask, f"mask of id {image_id!r}") if isinstance(mask, bytes) else mask
        return
    seen = set()
    for image_id, mask in predictions:
        seen.add(image_id)
        yield image_id, mask
    missing = [i for i in rows["id"] if i not in seen]
    if missing:
        raise WsssError(f"no prediction for id {missing[0]!r} of split {split!r}")


def evaluate_masks(
    dataset: DatasetIndex,
    split: str,
    predictions: Mapping[str, np.ndarray | bytes] | Iterable[tuple[str, np.ndarray]],
) -> dict[str, Any]:
    """Scores original-size predicted masks against the GT masks of ``split`` (rows without a mask skipped).

    ``predictions``: ``{id: mask or PNG bytes}``, or ``(id, mask)`` pairs streamed (one mask in memory at a time).

    Returns:
        ``iou`` ({class name: IoU, "background" first; NaN where a class occurs in neither GT nor
        prediction}), ``pixel_accuracy``, ``miou`` and ``confusion`` (int64 [K, K], rows = GT).

    Raises:
        WsssError: an id of the split has no prediction, a prediction's size differs from its GT or it
            holds a label outside 0..C, or the split has no GT masks.
    """
    rows = dataset.split(split)
    gt_paths = {r.id: r.mask for r in rows.itertuples(index=False) if isinstance(r.mask, str)}
    if not gt_paths:
        raise WsssError(f"{dataset.root}: split {split!r} has no ground-truth masks to score against")
    matrix = ConfusionMatrix(dataset.num_classes + 1)
    for image_id, prediction in _predicted_pairs(rows, split, predictions):
        if image_id not in gt_paths:
            continue
        gt, pred = read_mask(dataset.path(gt_paths[image_id])), np.asarray(prediction)
        if pred.shape != gt.shape:
            raise WsssError(f"prediction for id {image_id!r} has shape {pred.shape}, ground truth {gt.shape}")
        try:
            matrix.update(gt, pred)
        except ValueError as err:
            raise WsssError(f"id {image_id!r}: {err}") from None
    scores = matrix.compute()
    names = ["background", *dataset.classes]
    return {
        "iou": dict(zip(names, scores["iou"].tolist(), strict=True)),
        "pixel_accuracy": scores["pixel_accuracy"],
        "miou": scores["miou"],
        "confusion": matrix.matrix,
    }


def _json_number(value: float) -> float | None:
    """NaN -> None: JSON has no NaN, and DVC/pandas read null as missing."""
    return None if math.isnan(value) else value


def _read_optional_json(path: Path) -> Any:
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise WsssError(f"{path}: cannot read JSON ({err})") from None


def _write_confusion_csv(path: Path, matrix: np.ndarray, names: list[str]) -> None:
    scale = min(1.0, MAX_CONFUSION_ROWS / max(int(matrix.sum()), 1))
    repeats = np.rint(matrix * scale).astype(np.int64)
    with atomic_file(path, "w") as handle:
        writer = csv.writer(handle)
        writer.writerow(["actual", "predicted"])
        for (actual, predicted), count in np.ndenumerate(repeats):
            writer.writerows([[names[actual], names[predicted]]] * count)


def _write_plots(
    plots_dir: Path, results: dict[str, dict[str, Any]], names: list[str], pictures: dict[str, Image.Image]
) -> None:
    with atomic_file(plots_dir / "per_class_iou.csv", "w") as handle:
        writer = csv.writer(handle)
        writer.writerow(["class", "source", "iou"])
        for source, result in results.items():
            for name, iou in result["iou"].items():
                writer.writerow([name, source, "" if math.isnan(iou) else round(iou, 6)])
    for source, filename in CONFUSION_PLOTS.items():
        if source in results:
            _write_confusion_csv(plots_dir / filename, results[source]["confusion"], names)
    for name, picture in pictures.items():
        with atomic_file(plots_dir / name) as handle:
            picture.save(handle, format="PNG")
    with atomic_file(plots_dir / "per_class_iou.png") as handle:
        per_class_bars(results, names).save(handle, format="PNG")


def per_class_bars(results: dict[str, dict[str, Any]], names: list[str]) -> Image.Image:
    """Per-class IoU as grouped horizontal bars (one colour per mask source), as a picture for MLflow."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.0, 0.35 * len(names) * max(1, len(results)) + 1.2))
    y = np.arange(len(names))
    height = 0.8 / len(results)
    for k, (source, result) in enumerate(results.items()):
        values = [0.0 if math.isnan(result["iou"][n]) else result["iou"][n] for n in names]
        ax.barh(y + k * height, values, height, label=f"{source} (mIoU {result['miou']:.3f})")
    ax.set_yticks(y + height * (len(results) - 1) / 2, names)
    ax.invert_yaxis()
    ax.set_xlim(0, 1)
    ax.set_xlabel("IoU")
    ax.set_title("Per-class IoU (pseudo masks: train split; segmenters: val split)")
    ax.legend(loc="lower right", fontsize=8)
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    plt.close(fig)
    buffer.seek(0)
    return Image.open(buffer)


def _grid_image(
    dataset: DatasetIndex,
    split: str,
    pseudo: dict[str, bytes],
    segmenter: tuple[Segmenter, dict[str, Any]] | None,
    num_images: int,
    device: torch.device,
) -> Image.Image:
    """image | ground truth | pseudo mask | segmenter prediction, first images of the pseudo-mask split."""
    rows = dataset.split(split).head(num_images)
    columns: dict[str, list[np.ndarray]] = {"image": [], "ground truth": [], "pseudo mask": []}
    for row in rows.itertuples(index=False):
        image = display_rgb(to_uint8(read_image(dataset.path(row.image)), dataset.bands))
        gt = np.full(image.shape[:2], IGNORE_INDEX, np.uint8)
        if isinstance(row.mask, str):
            gt = read_mask(dataset.path(row.mask))
        columns["image"].append(image)
        columns["ground truth"].append(colorize(gt))
        columns["pseudo mask"].append(colorize(decode_mask_png(pseudo[row.id], f"pseudo mask of id {row.id!r}")))
    if segmenter is not None:
        model, record = segmenter
        subset = DatasetIndex(dataset.root, dataset.classes, rows, dataset.bands)
        data = segmenter_split(model, subset, split, record["img_size"])
        predictions = predict_images(model, data, device, batch_size=num_images)
        columns["segmenter"] = [colorize(predictions[i]) for i in rows["id"]]
    title = f"{split} split, first {len(rows)} images: pseudo masks{' and segmenter' if segmenter else ''}"
    return image_grid(columns, title, class_legend(dataset.classes))


MAPS_PER_IMAGE = 3


def _maps_image(
    dataset: DatasetIndex, split: str, classifier: Path, stats: dict[str, Any], num_images: int, device: torch.device
) -> Image.Image:
    """image | the attention map of each of its classes (up to MAPS_PER_IMAGE), for the first images of the
    pseudo-mask split: the maps the pseudo masks were painted from (same blocks, same refinement)."""
    model = load_map_model(classifier, device)
    rows = dataset.split(split).head(num_images)
    subset = DatasetIndex(dataset.root, dataset.classes, rows, dataset.bands)
    data = classifier_images(model, subset, split)
    blocks = map_block_count(stats["map_blocks"])
    maps, probs = attention_maps(model, data.images, device, blocks=blocks, refine=stats.get("refine_iterations", 0))
    shown = [
        present_classes(data.labels[i].numpy() if split == "train" else None, probs[i].numpy())
        for i in range(len(rows))
    ]
    # As many map columns as the shown images have classes (at most MAPS_PER_IMAGE): no column of empty cells.
    width = min(MAPS_PER_IMAGE, max((len(classes) for classes in shown), default=0))
    columns: dict[str, list[np.ndarray]] = {"image": [], **{f"map {k + 1}": [] for k in range(width)}}
    captions: dict[str, list[str]] = {name: [] for name in list(columns)[1:]}  # the class of each map
    for i, row in enumerate(rows.itertuples(index=False)):
        image = display_rgb(to_uint8(read_image(dataset.path(row.image)), dataset.bands))
        columns["image"].append(image)
        classes = shown[i]
        norm = normalized_maps(maps[i][classes], image.shape[:2]).cpu().numpy()
        for k in range(width):
            has_map = k < len(classes)  # an image with fewer classes: a blank (white, as the grid) cell
            columns[f"map {k + 1}"].append(heatmap(norm[k]) if has_map else np.full_like(image, 255))
            captions[f"map {k + 1}"].append(dataset.classes[classes[k]] if has_map else "")
    source = "labelled" if split == "train" else "predicted"
    what = "[CLS] attention x ReLU(PatchCAM)" if getattr(model, "patch_head", None) is not None else "[CLS] attention"
    title = f"{split} split, first {len(rows)} images: {what} of each {source} class (maps {stats['map_blocks']})"
    return image_grid(columns, title, captions=captions)


def main(params: Params) -> dict[str, Any]:
    """CLI entry: scores pseudo masks and (when trained) the segmenters; writes metrics and plots."""
    device = setup_runtime(params.seed, params.num_threads, params.device)
    for folder in (params.evaluate.metrics_dir, params.evaluate.plots_dir):
        check_writable(folder)
    with autocast(resolve_precision(params.trainer.precision, device), device):
        result = _evaluate(params, device)
    write_runtime(params.evaluate.metrics_dir, params.trainer.precision, device)
    return result


def _evaluate(params: Params, device: torch.device) -> dict[str, Any]:
    dataset = read_ingested(Path(params.ingest.out))
    names = ["background", *dataset.classes]
    split = params.pseudo_masks.split
    pseudo = read_mask_table(pseudo_mask_path(params), encoded=True)  # decoded one at a time
    results = {"pseudo_mask": evaluate_masks(dataset, split, pseudo)}
    segmenter = None
    path = segmenter_dir(params, "pseudo") / MODEL_FILE
    if path.is_file():
        model, record = load_segmenter(path, device)
        if record["classes"] != dataset.classes:
            raise WsssError(f"{path}: trained on classes {record['classes']}, data set has {dataset.classes}")
        predictions = predict_split(model, dataset, "val", record["img_size"], device, params.segmenter.batch_size)
        results["segmenter"] = evaluate_masks(dataset, "val", predictions)
        segmenter = (model, record)

    metrics: dict[str, Any] = {}
    for source, result in results.items():
        metrics[f"{source}_miou"] = _json_number(result["miou"])
        metrics[f"{source}_pixel_accuracy"] = _json_number(result["pixel_accuracy"])
    # A few flat keys from the earlier stages' own records (what `dvc metrics show` lists); the records
    # themselves (stats.json, the classifier's metrics.json) keep everything else.
    stats = _read_optional_json(Path(params.pseudo_masks.out) / "stats.json") or {}
    classifier_record = _read_optional_json(Path(params.classifier.out) / "metrics.json") or {}
    for record, keys in ((stats, PSEUDO_MASK_METRICS), (classifier_record, CLASSIFIER_METRICS)):
        metrics |= {ours: record[theirs] for ours, theirs in keys if isinstance(record.get(theirs), int | float)}
    per_class = {name: {s: _json_number(r["iou"][name]) for s, r in results.items()} for name in names}

    metrics_dir, plots_dir = Path(params.evaluate.metrics_dir), Path(params.evaluate.plots_dir)
    pictures = {}
    if params.evaluate.grid_images > 0:
        pictures["grid.png"] = _grid_image(dataset, split, pseudo, segmenter, params.evaluate.grid_images, device)
        classifier = Path(params.classifier.out) / MODEL_FILE
        if classifier.is_file() and stats.get("map_blocks"):
            pictures["maps.png"] = _maps_image(dataset, split, classifier, stats, params.evaluate.grid_images, device)
    _write_plots(plots_dir, results, names, pictures)
    write_json(metrics_dir / "per_class_iou.json", per_class)
    write_json(metrics_dir / "metrics.json", metrics)
    _print_table(results, names)
    return metrics


def _print_table(results: dict[str, dict[str, Any]], names: list[str]) -> None:
    lines = [("IoU", list(results))]
    lines += [(name, [r["iou"][name] for r in results.values()]) for name in names]
    lines += [("mIoU", [r["miou"] for r in results.values()])]
    lines += [("pixel accuracy", [r["pixel_accuracy"] for r in results.values()])]
    width = max(len(label) for label, _ in lines)
    for label, cells in lines:
        text = [f"{c:>12.3f}" if isinstance(c, float) else f"{c:>12}" for c in cells]
        print(f"{label:<{width}}  " + "  ".join(text))
