"""The embedded data set generator and the ingest stage."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.conftest import tiny_embedded_params
from wsss.lib.artifacts import read_ingested
from wsss.lib.config import Params
from wsss.lib.dataset_format import read_dataset, write_manifest
from wsss.lib.errors import WsssError
from wsss.lib.images import palette, read_mask
from wsss.tasks.ingest import ingest
from wsss.tools.embedded import (
    ANIMAL_CLASSES,
    TRAIN_POOL_FRACTION,
    build_embedded_dataset,
    ignore_band,
    load_silhouettes,
    split_pools,
)


def file_bytes(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


# --- embedded generator ---------------------------------------------------------------------------------


def test_same_seed_gives_identical_bytes(tiny_dataset: Path, tiny_params: Params) -> None:
    rebuilt = build_embedded_dataset(tiny_params.embedded, Path(tiny_params.embedded.out))
    expected = file_bytes(tiny_dataset)
    assert len(expected) == 2 * 64 + 2  # images, masks, classes.json, manifest.parquet
    assert file_bytes(rebuilt) == expected
    assert sorted(p.name for p in rebuilt.parent.iterdir()) == ["embedded"]  # no temp directory left


def test_other_seed_gives_other_images(tiny_dataset: Path, tiny_params: Params) -> None:
    params = dataclasses.replace(tiny_params.embedded, seed=1)
    other = file_bytes(build_embedded_dataset(params, Path(params.out)))
    same = file_bytes(tiny_dataset)
    assert other.keys() == same.keys()
    assert other["manifest.parquet"] != same["manifest.parquet"]
    differing = [name for name in same if name.startswith("images/") and other[name] != same[name]]
    assert len(differing) == 64


def test_split_pools_are_disjoint_and_cover_each_class() -> None:
    _, labels = load_silhouettes()
    class_ids = [ANIMAL_CLASSES.index(c) for c in ("bird", "elephant", "zebra")]
    pools = split_pools(labels, class_ids)
    for k, train, val in zip(class_ids, pools["train"], pools["val"], strict=True):
        assert not set(train) & set(val)
        assert sorted([*train, *val]) == np.flatnonzero(labels == k).tolist()
        assert (labels[train] == k).all() and (labels[val] == k).all()
        assert len(train) == round(TRAIN_POOL_FRACTION * (len(train) + len(val)))


def test_labels_match_masks_and_files_follow_the_format(tiny_dataset: Path) -> None:
    dataset = read_dataset(tiny_dataset, check_files=True)
    voc = palette()
    for item in dataset.manifest.itertuples():
        with Image.open(tiny_dataset / item.image) as image:
            assert image.mode == "RGB" and image.size == (32, 32)
        with Image.open(tiny_dataset / item.mask) as mask_image:
            assert mask_image.mode == "P" and mask_image.getpalette()[:768] == voc
        mask = read_mask(tiny_dataset / item.mask)
        values = set(np.unique(mask).tolist())
        assert values <= {0, 1, 2, 3, 255}, item.id
        assert values - {0, 255} == {k + 1 for k in np.flatnonzero(item.labels)}, item.id
    label_counts = np.stack(dataset.manifest["labels"].to_list()).sum(axis=0)
    assert (label_counts > 0).all()


def test_shapes_family_labels_match_masks_and_differ_from_the_animals(tiny_params: Params, tmp_path: Path) -> None:
    shapes = ["star", "heart", "crescent", "cross"]
    params = dataclasses.replace(tiny_params.embedded, family="shapes", classes=shapes, out=str(tmp_path / "shapes"))
    root = build_embedded_dataset(params, Path(params.out))
    dataset = read_dataset(root, check_files=True)
    assert dataset.classes == shapes
    for item in dataset.manifest.itertuples():
        values = set(np.unique(read_mask(root / item.mask)).tolist())
        assert values <= {0, 1, 2, 3, 4, 255}, item.id
        assert values - {0, 255} == {k + 1 for k in np.flatnonzero(item.labels)}, item.id
    assert (np.stack(dataset.manifest["labels"].to_list()).sum(axis=0) > 0).all()
    assert file_bytes(build_embedded_dataset(params, tmp_path / "again")) == file_bytes(root)  # seeded


def test_tinted_shapes_family_has_104_classes_told_apart_by_shape_and_tint(tmp_path: Path) -> None:
    """classes: [] takes the whole family; an object's pixels carry its class's tint (hue within 0.02 of it)."""
    import colorsys

    from wsss.lib.images import read_image
    from wsss.tools.embedded import TINTS

    params = dataclasses.replace(
        tiny_embedded_params(tmp_path / "tinted"), family="tinted_shapes", classes=[], train_images=60, val_images=4
    )
    root = build_embedded_dataset(params, Path(params.out))
    dataset = read_dataset(root, check_files=True)
    assert len(dataset.classes) == 104 and dataset.classes[:2] == ["star-red", "star-orange"]
    for item in dataset.manifest.itertuples():
        mask, image = read_mask(root / item.mask), read_image(root / item.image)
        assert set(np.unique(mask).tolist()) - {0, 255} == {k + 1 for k in np.flatnonzero(item.labels)}, item.id
        for k in np.flatnonzero(item.labels):
            hue, saturation = TINTS[dataset.classes[k].split("-")[1]]
            r, g, b = image[mask == k + 1].astype(float).mean(axis=0) / 255
            h, s, _ = colorsys.rgb_to_hsv(r, g, b)
            assert (s < 0.05) if saturation == 0 else min(abs(h - hue), 1 - abs(h - hue)) < 0.03, (item.id, k)


def test_ignore_band_is_one_pixel_outside_the_top_object() -> None:
    instances = np.zeros((7, 7), dtype=np.int32)
    instances[1:5, 1:5] = 1
    instances[3:6, 3:6] = 2  # painted later: occludes object 1
    band = ignore_band(instances)
    assert not band[instances == 2].any()  # the top object keeps every pixel
    assert band[0, 1:5].all() and band[1:5, 0].all()  # background ring around object 1
    assert band[2, 3] and band[3, 2] and not band[1, 1]  # object 1's pixels next to object 2 only
    assert band[6, 3:6].all() and band[3:6, 6].all() and not band[6, 6]  # 4-neighbours, not corners


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"classes": ["bird", "unicorn"]}, "embedded.classes: unknown class 'unicorn' of family animals"),
        ({"family": "shapes"}, "embedded.classes: unknown class 'bird' of family shapes .known: star, heart"),
        ({"family": "plants"}, "embedded.family: 'plants' is not one of animals, shapes, tinted_shapes"),
        ({"classes": ["bird", "bird"]}, "embedded.classes: must be a list without duplicates"),
        ({"max_object_size": 40}, "embedded.max_object_size: 40 exceeds image_size 32"),
        ({"min_object_size": 4}, "embedded.min_object_size: must be >= 12"),
    ],
)
def test_bad_recipe_is_refused_before_writing(tiny_params: Params, change: dict, message: str) -> None:
    params = dataclasses.replace(tiny_params.embedded, **change)
    with pytest.raises(WsssError, match=message):
        build_embedded_dataset(params, Path(params.out))
    assert not Path(params.out).exists()


# --- ingest stage ---------------------------------------------------------------------------------------


def test_ingest_writes_the_canonical_dataset(tiny_dataset: Path, tiny_params: Params) -> None:
    out = Path(tiny_params.ingest.out)
    summary = ingest(Path(tiny_params.ingest.source), out)
    assert sorted(p.name for p in out.iterdir()) == [
        "classes.json",
        "manifest.parquet",
        "source.json",
        "summary.json",
    ]
    source = json.loads((out / "source.json").read_text())
    assert source["root"] == str(tiny_dataset) and len(source["content"]) == 32  # the data's md5: DVC sees changes
    assert sorted(source["splits"]) == ["train", "val"] and source["splits"]["train"] != source["splits"]["val"]
    assert json.loads((out / "summary.json").read_text()) == summary
    assert summary["classes"] == ["bird", "elephant", "giraffe"]
    train = summary["splits"]["train"]
    assert train["images"] == 48 and train["with_masks"] == 48 and summary["splits"]["val"]["images"] == 16
    source = read_dataset(tiny_dataset)
    labels = np.stack(source.split("train")["labels"].to_list())
    assert list(train["label_counts"].values()) == labels.sum(axis=0).tolist()
    assert train["mean_labels_per_image"] == pytest.approx(labels.sum(axis=1).mean(), abs=1e-4)
    dataset = read_ingested(out)
    assert dataset.root == tiny_dataset and dataset.classes == source.classes
    assert dataset.manifest["id"].tolist() == source.manifest["id"].tolist()
    np.testing.assert_array_equal(
        np.stack(dataset.manifest["labels"].to_list()), np.stack(source.manifest["labels"].to_list())
    )
    assert (out / "manifest.parquet").read_bytes() == (tiny_dataset / "manifest.parquet").read_bytes()


def test_ingest_of_a_bad_set_writes_nothing(tiny_dataset: Path, tmp_path: Path) -> None:
    source = tmp_path / "source"
    shutil.copytree(tiny_dataset, source)
    Image.new("RGB", (32, 32)).save(source / "masks/val_00003.png")
    out = tmp_path / "artifacts" / "dataset"
    with pytest.raises(WsssError, match=r"masks/val_00003\.png: mask must be a palette PNG"):
        ingest(source, out)
    assert not out.exists()
    assert not out.parent.exists() or not any(out.parent.iterdir())


def test_ingest_requires_train_and_val(tiny_dataset: Path, tmp_path: Path) -> None:
    source = tmp_path / "source"
    shutil.copytree(tiny_dataset, source)
    dataset = read_dataset(source)
    write_manifest(source / "manifest.parquet", dataset.split("train"))
    with pytest.raises(WsssError, match=r"empty split 'val' \(splits: train\)"):
        ingest(source, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_read_ingested_names_a_missing_source_file(tmp_path: Path) -> None:
    with pytest.raises(WsssError, match="source.json: cannot read the data set root"):
        read_ingested(tmp_path)


def test_a_changed_pixel_changes_what_ingest_writes(tiny_dataset: Path, tmp_path: Path) -> None:
    """Only ingest lists the data root as a DVC dep: its output must change with any pixel of the data."""
    copy = tmp_path / "data"
    shutil.copytree(tiny_dataset, copy)
    ingest(copy, tmp_path / "a")
    image = copy / "images" / "train_00000.png"
    pixels = np.array(Image.open(image))
    pixels[0, 0] = 255 - pixels[0, 0]
    Image.fromarray(pixels).save(image)
    ingest(copy, tmp_path / "b")
    source = [json.loads((tmp_path / name / "source.json").read_text()) for name in "ab"]
    assert source[0]["content"] != source[1]["content"]
    # The val split's hash (what a segmenter_miou is measured on, compared by the champion rule) stays.
    assert source[0]["splits"]["train"] != source[1]["splits"]["train"]
    assert source[0]["splits"]["val"] == source[1]["splits"]["val"]
