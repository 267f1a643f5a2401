import csv
import dataclasses
import math
from pathlib import Path

import numpy as np
import pytest
import timm
import torch

from tests.conftest import TINY_SEGMENTER, TINY_TRAINER
from wsss.lib.artifacts import load_segmenter, predict_split
from wsss.lib.config import Params, SegmenterParams
from wsss.lib.dataset_format import DatasetIndex, read_dataset
from wsss.lib.errors import WsssError
from wsss.lib.images import read_mask
from wsss.models.segmenter import Segmenter
from wsss.tasks.ingest import ingest
from wsss.tasks.train_segmenter import main, train_segmenter


@pytest.fixture(autouse=True)
def one_thread():
    torch.set_num_threads(1)


def _train_gt(dataset: DatasetIndex) -> dict[str, np.ndarray]:
    rows = dataset.split("train")
    return {r.id: read_mask(dataset.path(r.mask)) for r in rows.itertuples(index=False)}


def _params(out: Path) -> SegmenterParams:
    return SegmenterParams(**TINY_SEGMENTER, out=str(out))


@pytest.mark.parametrize("encoder", ["resnet18", "test_efficientnet", "test_vit"])
def test_output_shape(encoder):
    model = Segmenter(encoder, num_classes=4, decoder_channels=16).eval()
    with torch.no_grad():
        assert model(torch.randn(2, 3, 64, 64)).shape == (2, 4, 64, 64)


def test_unknown_encoder_is_a_value_error_that_names_the_fix():
    with pytest.raises(ValueError, match="no_such_net.*features_only"):
        Segmenter("no_such_net")


@pytest.mark.parametrize("encoder", ["test_efficientnet", "test_vit"])
def test_load_encoder_weights(tmp_path, encoder):
    # A full timm classifier state dict (head included); test_vit checks the "model." prefix of ViT wrappers.
    source = timm.create_model(encoder)
    torch.save(source.state_dict(), tmp_path / "w.pt")
    model = Segmenter(encoder, num_classes=3)
    model.load_encoder_weights(tmp_path / "w.pt")
    reference = source.state_dict()
    for key, value in model.encoder.state_dict().items():
        torch.testing.assert_close(value, reference[key.removeprefix("model.")])


def test_load_encoder_weights_errors(tmp_path):
    model = Segmenter("test_efficientnet", num_classes=3)
    with pytest.raises(FileNotFoundError, match="not found"):
        model.load_encoder_weights(tmp_path / "missing.pt")
    torch.save(timm.create_model("test_vit").state_dict(), tmp_path / "vit.pt")
    with pytest.raises(ValueError, match="vit.pt: encoder key .* is missing"):
        model.load_encoder_weights(tmp_path / "vit.pt")


def test_train_segmenter_writes_outputs(tiny_dataset, tmp_path):
    dataset = read_dataset(tiny_dataset)
    out = tmp_path / "seg"
    result = train_segmenter(dataset, _train_gt(dataset), _params(out), out, seed=0, device="cpu", trainer=TINY_TRAINER)

    assert result["epochs"] == 1 and math.isfinite(result["val_miou"]) and 0 <= result["val_miou"] <= 1
    assert {"model.pt", "checkpoint.pt", "history.csv"} <= {p.name for p in out.iterdir()}
    with open(out / "history.csv") as handle:
        (row,) = list(csv.DictReader(handle))
    assert list(row) == ["epoch", "loss", "val_miou", "seconds"] and math.isfinite(float(row["loss"]))
    checkpoint = torch.load(out / "checkpoint.pt", weights_only=False)
    assert checkpoint["epoch"] == 1 and {"model", "optimizer", "params"} <= set(checkpoint)

    model, record = load_segmenter(out / "model.pt")
    predictions = dict(predict_split(model, dataset, "val", record["img_size"], "cpu", batch_size=8))
    val = dataset.split("val")
    assert list(predictions) == val["id"].tolist()
    first = predictions[val["id"][0]]
    assert first.shape == (val["height"][0], val["width"][0]) and first.dtype == np.uint8
    assert first.max() <= dataset.num_classes


def test_gt_masks_path_matches_explicit_gt_masks(tiny_dataset, tmp_path):
    # masks=None must train on the train split's GT: same seed + same targets = same model.
    dataset = read_dataset(tiny_dataset)
    implicit = train_segmenter(
        dataset, None, _params(tmp_path / "a"), tmp_path / "a", seed=0, device="cpu", trainer=TINY_TRAINER
    )
    explicit = train_segmenter(
        dataset, _train_gt(dataset), _params(tmp_path / "b"), tmp_path / "b", 0, "cpu", trainer=TINY_TRAINER
    )
    assert implicit["val_miou"] == pytest.approx(explicit["val_miou"])


def test_bad_training_masks(tiny_dataset, tmp_path):
    dataset = read_dataset(tiny_dataset)
    masks = _train_gt(dataset)
    first = dataset.split("train")["id"][0]
    del masks[first]
    with pytest.raises(WsssError, match=first):
        train_segmenter(dataset, masks, _params(tmp_path), tmp_path, seed=0, device="cpu", trainer=TINY_TRAINER)
    masks[first] = np.zeros((5, 5), np.uint8)
    with pytest.raises(WsssError, match=f"{first}.*shape"):
        train_segmenter(dataset, masks, _params(tmp_path), tmp_path, seed=0, device="cpu", trainer=TINY_TRAINER)


def test_main_names_missing_pseudo_mask_file(tiny_params: Params):
    params = dataclasses.replace(tiny_params, num_threads=1)
    ingest(Path(params.ingest.source), Path(params.ingest.out))
    with pytest.raises(WsssError, match=r"pseudo_masks/train\.parquet"):
        main(params)
    with pytest.raises(WsssError, match="mask source"):
        main(params, mask_source="other")
