import csv
import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from wsss.lib import artifacts
from wsss.lib.config import Params
from wsss.lib.dataset_format import DatasetIndex, read_dataset, write_mask_table
from wsss.lib.errors import WsssError
from wsss.lib.images import read_mask
from wsss.lib.io import write_json
from wsss.tasks import evaluate, train_segmenter
from wsss.tasks.ingest import ingest


@pytest.fixture(autouse=True)
def one_thread():
    torch.set_num_threads(1)


def _gt(dataset: DatasetIndex, split: str) -> dict[str, np.ndarray]:
    rows = dataset.split(split)
    return {r.id: read_mask(dataset.path(r.mask)) for r in rows.itertuples(index=False)}


def test_perfect_predictions_score_one(tiny_dataset):
    dataset = read_dataset(tiny_dataset)
    result = evaluate.evaluate_masks(dataset, "val", _gt(dataset, "val"))
    assert result["miou"] == pytest.approx(1.0)
    assert result["pixel_accuracy"] == pytest.approx(1.0)
    assert list(result["iou"]) == ["background", *dataset.classes]


def test_bad_predictions_name_the_id(tiny_dataset):
    dataset = read_dataset(tiny_dataset)
    predictions = _gt(dataset, "val")
    missing = dataset.split("val")["id"][3]
    with pytest.raises(WsssError, match=missing):
        evaluate.evaluate_masks(dataset, "val", {k: v for k, v in predictions.items() if k != missing})
    predictions[missing] = np.zeros((4, 4), np.uint8)
    with pytest.raises(WsssError, match=f"{missing}.*shape"):
        evaluate.evaluate_masks(dataset, "val", predictions)
    predictions[missing] = np.full_like(predictions[next(iter(predictions))], 9)
    with pytest.raises(WsssError, match=f"{missing}.*outside"):
        evaluate.evaluate_masks(dataset, "val", predictions)


def test_main_writes_metrics_and_plots(tiny_params: Params):
    params = dataclasses.replace(tiny_params, num_threads=1)
    ingest(Path(params.ingest.source), Path(params.ingest.out))
    dataset = read_dataset(params.ingest.source)
    pseudo = _gt(dataset, "train")
    write_mask_table(artifacts.pseudo_mask_path(params), list(pseudo), list(pseudo.values()))
    write_json(Path(params.pseudo_masks.out) / "stats.json", {"ceiling_miou": 0.7, "grid": [4, 4], "area_share": 0.4})
    write_json(Path(params.classifier.out) / "metrics.json", {"val_map": 0.9, "closed_per_layer": [0, 1]})
    metrics_dir, plots_dir = Path(params.evaluate.metrics_dir), Path(params.evaluate.plots_dir)

    metrics = evaluate.main(params)  # no segmenter yet: pseudo masks only
    assert metrics["pseudo_mask_miou"] == pytest.approx(1.0)
    assert "segmenter_miou" not in metrics
    # flat: the earlier stages' headline numbers only (their lists stay in their own files)
    assert metrics == {
        "pseudo_mask_miou": pytest.approx(1.0),
        "pseudo_mask_pixel_accuracy": pytest.approx(1.0),
        "pseudo_mask_ceiling_miou": 0.7,
        "area_share": 0.4,
        "classifier_val_map": 0.9,
    }
    assert not (plots_dir / "confusion_segmenter.csv").exists()

    train_segmenter.main(params)
    metrics = evaluate.main(params)
    assert 0 <= metrics["segmenter_miou"] <= 1 and "segmenter_gt_miou" not in metrics
    assert json.loads((metrics_dir / "metrics.json").read_text()) == metrics
    per_class = json.loads((metrics_dir / "per_class_iou.json").read_text())
    assert list(per_class) == ["background", *dataset.classes]
    assert set(per_class["background"]) == {"pseudo_mask", "segmenter"}
    with open(plots_dir / "per_class_iou.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 2 * (dataset.num_classes + 1) and list(rows[0]) == ["class", "source", "iou"]
    for name in ("confusion_pseudo_masks.csv", "confusion_segmenter.csv"):
        with open(plots_dir / name) as handle:
            rows = list(csv.DictReader(handle))
        assert rows and list(rows[0]) == ["actual", "predicted"]
        assert {r["actual"] for r in rows} <= {"background", *dataset.classes}
    with Image.open(plots_dir / "grid.png") as grid:
        # 4 columns of 32 px images upscaled x3, and one row per grid image.
        assert grid.width > 4 * 96 and grid.height > params.evaluate.grid_images * 96
    with Image.open(plots_dir / "per_class_iou.png") as bars:  # the per-class bars MLflow shows as a picture
        assert bars.format == "PNG" and bars.width == 700 and bars.height > 100
