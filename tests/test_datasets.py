"""The on-disk data set contract: PNG/parquet helpers, validation errors, loading and augmentation."""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Callable
from pathlib import Path

import imgviz
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import tifffile
import torch
from PIL import Image

from wsss.lib.dataset_format import read_dataset, read_manifest, read_mask_table, write_manifest, write_mask_table
from wsss.lib.datasets import AugmentedSplit, SplitData, aspect_size, image_batches, load_split, normalize
from wsss.lib.errors import WsssError
from wsss.lib.images import (
    compute_bands,
    decode_mask_png,
    encode_mask_png,
    palette,
    read_bands,
    read_image,
    read_mask,
    to_uint8,
    write_bands,
    write_mask_png,
)


def copy_set(source: Path, tmp_path: Path) -> Path:
    root = tmp_path / "set"
    shutil.copytree(source, root)
    return root


def edit_rows(root: Path, edit: Callable[[pd.DataFrame], None]) -> None:
    """Edits manifest rows in place, keeping the schema (for cases the schema allows)."""
    manifest = read_manifest(root / "manifest.parquet")
    edit(manifest)
    write_manifest(root / "manifest.parquet", manifest)


def edit_table(root: Path, edit: Callable[[pd.DataFrame], pd.DataFrame]) -> None:
    """Rewrites the manifest with whatever columns/types ``edit`` returns (for schema violations)."""
    manifest = pq.read_table(root / "manifest.parquet").to_pandas()
    pq.write_table(pa.Table.from_pandas(edit(manifest), preserve_index=False), root / "manifest.parquet")


# --- PNG and parquet helpers ----------------------------------------------------------------------------


def test_mask_png_round_trip_keeps_indices_and_voc_palette(tmp_path: Path) -> None:
    mask = np.array([[0, 1, 2], [3, 255, 20]], dtype=np.uint8)
    write_mask_png(tmp_path / "m.png", mask)
    with Image.open(tmp_path / "m.png") as image:
        assert image.mode == "P"
        assert image.getpalette()[:768] == imgviz.label_colormap().flatten().tolist() == palette()
    np.testing.assert_array_equal(read_mask(tmp_path / "m.png"), mask)
    np.testing.assert_array_equal(decode_mask_png(encode_mask_png(mask)), mask)
    assert [p.name for p in tmp_path.iterdir()] == ["m.png"]  # no temp file left behind


def test_read_mask_rejects_rgb_png(tmp_path: Path) -> None:
    Image.new("RGB", (8, 8), (128, 0, 0)).save(tmp_path / "rgb.png")
    with pytest.raises(WsssError, match=r"rgb\.png: mask must be a palette PNG .* got mode RGB"):
        read_mask(tmp_path / "rgb.png")


def test_read_image_rejects_truncated_and_non_image_files(tmp_path: Path) -> None:
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(tmp_path / "a.png")
    data = (tmp_path / "a.png").read_bytes()
    assert read_image(tmp_path / "a.png").shape == (64, 64, 3)
    (tmp_path / "truncated.png").write_bytes(data[: len(data) // 2])
    (tmp_path / "text.png").write_text("not an image")
    for name in ("truncated.png", "text.png", "missing.png"):
        with pytest.raises(WsssError, match=rf"{name}: cannot read image"):
            read_image(tmp_path / name)


def test_array_images_come_back_channels_last_and_scale_per_band(tmp_path: Path) -> None:
    cube = np.random.default_rng(0).integers(100, 5000, (20, 24, 13)).astype(np.uint16)
    tifffile.imwrite(tmp_path / "first.tif", np.moveaxis(cube, -1, 0))  # (C, H, W) on disk
    np.save(tmp_path / "last.npy", cube)
    for name in ("first.tif", "last.npy"):
        np.testing.assert_array_equal(read_image(tmp_path / name), cube)
    bands = compute_bands([cube])
    assert len(bands) == 13 and all(lo < hi for lo, hi in zip(bands.low, bands.high, strict=True))
    scaled = to_uint8(cube, bands)
    assert scaled.dtype == np.uint8 and scaled.min() == 0 and scaled.max() == 255
    with pytest.raises(WsssError, match="a uint16 image needs per-band scaling"):
        to_uint8(cube, None)
    assert torch.allclose(normalize(torch.full((13, 2, 2), 255, dtype=torch.uint8)), torch.full((13, 2, 2), 2.0))
    write_bands(tmp_path / "bands.json", bands)
    assert read_bands(tmp_path / "bands.json") == bands and read_bands(tmp_path / "none.json") is None
    (tmp_path / "bad.json").write_text('{"low": [1, 2], "high": [0, 3]}')
    with pytest.raises(WsssError, match="bad.json: expected .* high > low"):
        read_bands(tmp_path / "bad.json")


def test_rgb_mask_in_the_voc_palette_converts_only_when_asked(tmp_path: Path) -> None:
    mask = np.array([[0, 1, 2], [15, 255, 20]], dtype=np.uint8)
    colours = np.asarray(palette(), dtype=np.uint8).reshape(256, 3)
    Image.fromarray(colours[mask]).save(tmp_path / "rgb.png")
    np.testing.assert_array_equal(read_mask(tmp_path / "rgb.png", convert_rgb=True), mask)
    with pytest.raises(WsssError, match="got mode RGB .*wsss import folder"):
        read_mask(tmp_path / "rgb.png")
    off = colours[mask].copy()
    off[1, 2] = (1, 2, 3)
    Image.fromarray(off).save(tmp_path / "off.png")
    with pytest.raises(WsssError, match=r"off.png: RGB mask pixel \(x=2, y=1\) has colour \(1, 2, 3\)"):
        read_mask(tmp_path / "off.png", convert_rgb=True)


def test_mask_table_round_trip(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    masks = [rng.choice([0, 1, 2, 255], size=shape).astype(np.uint8) for shape in [(5, 7), (32, 32), (1, 9)]]
    write_mask_table(tmp_path / "masks.parquet", ["a", "b", "c"], masks)
    loaded = read_mask_table(tmp_path / "masks.parquet")
    assert list(loaded) == ["a", "b", "c"]
    for mask, back in zip(masks, loaded.values(), strict=True):
        np.testing.assert_array_equal(back, mask)
    assert [p.name for p in tmp_path.iterdir()] == ["masks.parquet"]


def test_mask_table_errors_name_the_file(tmp_path: Path) -> None:
    with pytest.raises(WsssError, match="nothing.parquet: file not found"):
        read_mask_table(tmp_path / "nothing.parquet")
    pq.write_table(pa.table({"id": ["a"]}), tmp_path / "no_mask.parquet")
    with pytest.raises(WsssError, match="no_mask.parquet: missing column 'mask'"):
        read_mask_table(tmp_path / "no_mask.parquet")
    pq.write_table(pa.table({"id": ["a"], "mask": [b"junk"]}), tmp_path / "junk.parquet")
    with pytest.raises(WsssError, match=r"junk.parquet \(id 'a'\): cannot read mask"):
        read_mask_table(tmp_path / "junk.parquet")


# --- read_dataset ---------------------------------------------------------------------------------------


def test_read_dataset_accepts_the_tiny_set(tiny_dataset: Path) -> None:
    dataset = read_dataset(tiny_dataset, check_files=True)
    assert dataset.classes == ["bird", "elephant", "giraffe"] and dataset.num_classes == 3
    assert len(dataset.split("train")) == 48 and len(dataset.split("val")) == 16
    assert list(dataset.manifest.columns) == ["id", "split", "image", "mask", "labels", "width", "height"]
    with pytest.raises(WsssError, match=rf"{tiny_dataset}: empty split 'test' \(splits: train, val\)"):
        dataset.split("test")


def _set_cell(column: str, row: int, value: object) -> Callable[[pd.DataFrame], None]:
    def edit(manifest: pd.DataFrame) -> None:
        manifest.at[row, column] = value

    return edit


def _write_image(name: str, array: np.ndarray) -> Callable[[Path], None]:
    return lambda root: Image.fromarray(array).save(root / name)


_ROW7 = "row 7 (id 'train_00007')"
# (case, how to break a copy of the tiny set, check_files, fragments the one-line message must contain)
BAD_SETS: list[tuple[str, Callable[[Path], None], bool, list[str]]] = [
    ("no root", lambda r: shutil.rmtree(r), False, ["{root}: data set root does not exist"]),
    ("no classes.json", lambda r: (r / "classes.json").unlink(), False, ["classes.json: file not found"]),
    (
        "classes not json",
        lambda r: (r / "classes.json").write_text("{"),
        False,
        ["classes.json: cannot read"],
    ),
    (
        "classes wrong shape",
        lambda r: (r / "classes.json").write_text('{"classes": "bird"}'),
        False,
        ["classes.json"],
    ),
    (
        "duplicate class",
        lambda r: (r / "classes.json").write_text(json.dumps({"classes": ["a", "a", "b"]})),
        False,
        ["classes.json: duplicate class names"],
    ),
    ("no manifest", lambda r: (r / "manifest.parquet").unlink(), False, ["manifest.parquet: file not found"]),
    (
        "manifest not parquet",
        lambda r: (r / "manifest.parquet").write_text("id,split"),
        False,
        ["manifest.parquet: cannot read parquet"],
    ),
    (
        "missing column",
        lambda r: edit_table(r, lambda m: m.drop(columns="labels")),
        False,
        ["manifest.parquet: missing column 'labels'"],
    ),
    (
        "wrong column type",
        lambda r: edit_table(r, lambda m: m.assign(width="wide")),
        False,
        ["manifest.parquet: column 'width' has type", "expected int32"],
    ),
    (
        "duplicate id",
        lambda r: edit_rows(r, _set_cell("id", 5, "train_00004")),
        False,
        ["row 5 (id 'train_00004'): duplicate id"],
    ),
    (
        "labels too short",
        lambda r: edit_rows(r, _set_cell("labels", 3, np.array([1, 0], dtype=np.int8))),
        False,
        ["row 3 (id 'train_00003'): labels has length 2, expected 3"],
    ),
    (
        "labels not binary",
        lambda r: edit_rows(r, _set_cell("labels", 3, np.array([1, 2, 0], dtype=np.int8))),
        False,
        ["row 3 (id 'train_00003'): labels must be 0/1"],
    ),
    (
        "unlabelled training image",
        lambda r: edit_rows(r, _set_cell("labels", 3, np.zeros(3, dtype=np.int8))),
        False,
        ["row 3 (id 'train_00003'): no labels, but split 'train' trains on image labels"],
    ),
    (
        "absolute path",
        lambda r: edit_rows(r, _set_cell("image", 2, "/etc/passwd")),
        False,
        ["row 2 (id 'train_00002'): image path '/etc/passwd' is absolute or leaves the data set root"],
    ),
    (
        "escaping path",
        lambda r: edit_rows(r, _set_cell("mask", 2, "masks/../../x.png")),
        False,
        ["row 2 (id 'train_00002'): mask path 'masks/../../x.png'"],
    ),
    (
        "tiny image",
        lambda r: edit_rows(r, _set_cell("height", 7, 6)),
        False,
        [_ROW7, "smaller than 8 px"],
    ),
    (
        "missing image file",
        lambda r: (r / "images/train_00007.png").unlink(),
        True,
        [_ROW7, "images/train_00007.png not found"],
    ),
    (
        "missing mask file",
        lambda r: (r / "masks/train_00007.png").unlink(),
        True,
        [_ROW7, "masks/train_00007.png"],
    ),
    (
        "truncated image",
        lambda r: (r / "images/train_00007.png").write_bytes((r / "images/train_00007.png").read_bytes()[:200]),
        True,
        ["images/train_00007.png: cannot read image"],
    ),
    (
        "non-image file",
        lambda r: (r / "images/train_00007.png").write_text("hello"),
        True,
        ["images/train_00007.png: cannot read image"],
    ),
    (
        "mask size",
        lambda r: write_mask_png(r / "masks/train_00007.png", np.zeros((16, 16), np.uint8)),
        True,
        [_ROW7, "masks/train_00007.png is 16x16, image is 32x32"],
    ),
    (
        "mask value",
        lambda r: write_mask_png(r / "masks/train_00007.png", np.full((32, 32), 4, np.uint8)),
        True,
        [_ROW7, "has value 4, allowed 0..3 and 255"],
    ),
    (
        "rgb mask",
        _write_image("masks/train_00007.png", np.zeros((32, 32, 3), np.uint8)),
        True,
        ["masks/train_00007.png: mask must be a palette PNG", "got mode RGB"],
    ),
    (
        "size column",
        lambda r: edit_rows(r, _set_cell("width", 7, 33)),
        True,
        [_ROW7, "is 32x32, manifest says 33x32"],
    ),
]


@pytest.mark.parametrize(
    ("mutate", "check_files", "fragments"), [c[1:] for c in BAD_SETS], ids=[c[0] for c in BAD_SETS]
)
def test_read_dataset_rejects_bad_sets(
    tiny_dataset: Path,
    tmp_path: Path,
    mutate: Callable[[Path], None],
    check_files: bool,
    fragments: list[str],
) -> None:
    root = copy_set(tiny_dataset, tmp_path)
    mutate(root)
    with pytest.raises(WsssError) as info:
        read_dataset(root, check_files=check_files)
    message = str(info.value)
    assert "\n" not in message
    for fragment in fragments:
        assert fragment.format(root=root) in message


def test_file_problems_need_check_files(tiny_dataset: Path, tmp_path: Path) -> None:
    root = copy_set(tiny_dataset, tmp_path)
    (root / "images/train_00007.png").unlink()
    read_dataset(root)  # cheap mode reads only classes.json and the manifest
    with pytest.raises(WsssError, match="train_00007.png not found"):
        read_dataset(root, check_files=True)


# --- loading --------------------------------------------------------------------------------------------


def test_load_split_shapes_and_values(tiny_dataset: Path) -> None:
    dataset = read_dataset(tiny_dataset)
    rows = dataset.split("val")
    data = load_split(dataset, "val", size=16, with_masks=True)
    assert data.ids == rows["id"].tolist() and len(data) == 16
    assert all(image.shape == (3, 16, 16) and image.dtype == torch.uint8 for image in data.images)
    assert data.labels.dtype == torch.float32
    np.testing.assert_array_equal(data.labels.numpy(), np.stack(rows["labels"].to_list()))
    assert data.masks is not None and all(m.shape == (16, 16) and m.dtype == torch.uint8 for m in data.masks)
    assert set(torch.cat([m.flatten() for m in data.masks]).unique().tolist()) <= {0, 1, 2, 3, 255}
    assert data.original_sizes == [(32, 32)] * 16
    full = load_split(dataset, "val", size=32, with_masks=True)  # native size: pixels untouched
    np.testing.assert_array_equal(full.images[0].permute(1, 2, 0).numpy(), read_image(tiny_dataset / rows["image"][0]))
    np.testing.assert_array_equal(full.masks[0].numpy(), read_mask(tiny_dataset / rows["mask"][0]))
    assert load_split(dataset, "val", size=16, with_masks=False).masks is None


def test_aspect_size_keeps_the_aspect_ratio_in_multiples() -> None:
    assert aspect_size(64, 64, 64, 8) == (64, 64)  # a square image: the square input
    assert aspect_size(375, 500, 448, 16) == (336, 448)  # VOC landscape: 28 x 21 patches
    assert aspect_size(500, 375, 448, 16) == (448, 336)
    assert aspect_size(500, 333, 448, 32) == (448, 288)  # 298.4 -> nearest multiple of 32
    assert aspect_size(10, 1000, 64, 8) == (8, 64)  # at least one multiple


def test_load_split_images_without_masks(tiny_dataset: Path, tmp_path: Path) -> None:
    root = copy_set(tiny_dataset, tmp_path)
    edit_rows(root, _set_cell("mask", 48, None))  # first val row
    data = load_split(read_dataset(root), "val", size=16, with_masks=True)
    assert (data.masks[0] == 255).all() and any((m != 255).any() for m in data.masks[1:])

    def drop_val_masks(manifest: pd.DataFrame) -> None:
        manifest.loc[manifest["split"] == "val", "mask"] = None

    edit_rows(root, drop_val_masks)
    with pytest.raises(WsssError, match="split 'val' has no masks"):
        load_split(read_dataset(root), "val", size=16, with_masks=True)


def test_normalize_uses_imagenet_statistics() -> None:
    mean = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1)
    images = (mean * 255).expand(2, 3, 4, 4)
    assert normalize(images).abs().max() < 1e-5
    assert torch.allclose(
        normalize(torch.full((3, 1, 1), 255, dtype=torch.uint8)).flatten(),
        (1 - mean.flatten()) / torch.tensor([0.229, 0.224, 0.225]),
    )


# --- augmentation ---------------------------------------------------------------------------------------

# VOC colours of classes 0..5 are at least 128 apart, so a pixel's class can be read back from its colour.
_COLOURS = torch.tensor(palette(), dtype=torch.float32).view(256, 3)[:6]


def blocky_split(n: int = 6, height: int = 32, width: int = 32) -> SplitData:
    """Random 4x4-block masks with each pixel's colour encoding its class."""
    generator = torch.Generator().manual_seed(0)
    masks = torch.randint(0, 6, (n, height // 4, width // 4), generator=generator)
    masks = masks.repeat_interleave(4, 1).repeat_interleave(4, 2).to(torch.uint8)
    images = _COLOURS[masks.long()].permute(0, 3, 1, 2).to(torch.uint8)
    labels = torch.zeros(n, 5)
    return SplitData([f"x{i}" for i in range(n)], list(images), labels, list(masks), [(height, width)] * n)


def decode_classes(image: torch.Tensor) -> torch.Tensor:
    """Inverts normalize() and maps every pixel to the class of the nearest colour."""
    mean = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)
    pixels = ((image * std + mean) * 255).permute(1, 2, 0)
    return torch.cdist(pixels.reshape(-1, 3), _COLOURS).argmin(-1).view(pixels.shape[:2])


@pytest.mark.parametrize(("height", "width"), [(32, 32), (24, 56), (56, 20)])
def test_augmentation_keeps_image_and_mask_aligned(height: int, width: int) -> None:
    # Non-square originals: the crop is cut from the image as it is (never squashed by more than 4/3)
    # and the mask gets the same box.
    data = blocky_split(height=height, width=width)
    augmented = AugmentedSplit(data, train=True, size=32, crop_scale_min=0.3, seed=0)
    changed = 0
    for epoch in range(3):
        augmented.set_epoch(epoch)
        for i in range(len(data)):
            image, _, mask = augmented[i]
            assert image.shape == (3, 32, 32) and mask.shape == (32, 32) and mask.dtype == torch.int64
            agreement = (decode_classes(image) == mask).float().mean().item()
            assert agreement > 0.9, f"epoch {epoch} item {i}: only {agreement:.2f} of pixels agree"
            changed += (height, width) != (32, 32) or not torch.equal(mask, data.masks[i].long())
    assert changed >= len(data)  # the crops/flips really moved pixels


def test_crops_of_a_wide_image_keep_its_aspect_within_four_thirds() -> None:
    # A 16 x 64 image: every 3/4..4/3 box fits only with area < 0.3 of it, so all 10 tries fail and the
    # fallback centre crop is taken, at aspect 4/3 (a squashed crop would be 4:1).
    augmented = AugmentedSplit(blocky_split(1, 16, 64), train=True, size=16, crop_scale_min=0.9)
    generator = torch.Generator().manual_seed(0)
    assert augmented._crop_box(generator, 16, 64) == (0, 21, 16, 21)
    for seed in range(20):
        top, left, h, w = AugmentedSplit(blocky_split(1), train=True, size=32, seed=seed)._crop_box(
            torch.Generator().manual_seed(seed), 48, 64
        )
        assert 3 / 4 - 0.05 <= w / h <= 4 / 3 + 0.05 and top + h <= 48 and left + w <= 64


def test_augmentation_is_deterministic_per_seed_and_epoch() -> None:
    data = blocky_split()

    def items(seed: int, epoch: int) -> list[torch.Tensor]:
        augmented = AugmentedSplit(data, train=True, size=32, seed=seed)
        augmented.set_epoch(epoch)
        return [augmented[i][0] for i in range(len(data))]

    same = items(1, 0)
    assert all(torch.equal(a, b) for a, b in zip(same, items(1, 0), strict=True))
    assert not all(torch.equal(a, b) for a, b in zip(same, items(2, 0), strict=True))
    assert not all(torch.equal(a, b) for a, b in zip(same, items(1, 1), strict=True))


def test_no_augmentation_in_eval_mode_and_empty_masks_collate() -> None:
    data = blocky_split()
    image, labels, mask = AugmentedSplit(data, train=False)[2]
    assert torch.equal(image, normalize(data.images[2])) and torch.equal(mask, data.masks[2].long())
    assert torch.equal(labels, data.labels[2])
    unmasked = SplitData(data.ids, data.images, data.labels, None, data.original_sizes)
    batch = next(iter(torch.utils.data.DataLoader(AugmentedSplit(unmasked, train=True, size=32), batch_size=4)))
    assert batch[0].shape == (4, 3, 32, 32) and batch[1].shape == (4, 5) and batch[2].shape == (4, 0)
    with pytest.raises(ValueError, match="crop size"):
        AugmentedSplit(data, train=True)


def test_image_batches_group_sizes_and_keep_every_index() -> None:
    images = [torch.full((3, h, w), k, dtype=torch.uint8) for k, (h, w) in enumerate([(8, 16), (16, 8), (8, 16)] * 3)]
    data = SplitData([str(k) for k in range(9)], images, torch.zeros(9, 1), None, [(8, 8)] * 9)
    batches = list(image_batches(data, 4))
    # runs of 4 consecutive images, each run split by size in order of first appearance
    assert [indices for indices, _ in batches] == [[0, 2, 3], [1], [4, 7], [5, 6], [8]]
    for indices, batch in batches:
        assert [int(b[0, 0, 0]) for b in batch] == indices and len({tuple(b.shape) for b in batch}) == 1


def test_streamed_and_in_memory_splits_give_the_same_batches(tiny_dataset: Path) -> None:
    """Same (seed, epoch) -> the same training batches, decoded in the process or by persistent workers."""
    from wsss.lib.datasets import AugmentedSplit, StreamedSplit, masks_digest
    from wsss.lib.distributed import World, shard_loader

    dataset = read_dataset(tiny_dataset)
    memory = load_split(dataset, "train", 24, with_masks=True)  # 32 px images resized: the resize is exercised
    streamed = StreamedSplit(dataset, "train", 24, with_masks=True)
    assert streamed.ids == memory.ids and torch.equal(streamed.labels, memory.labels)
    assert [tuple(s) for s in streamed.original_sizes] == [tuple(s) for s in memory.original_sizes]
    digest = hashlib.sha256()
    for mask in memory.masks:
        digest.update(np.asarray(mask.shape, np.int64).tobytes() + mask.numpy().tobytes())
    assert masks_digest(streamed) == digest.hexdigest()
    # Training crops are cut from the original images: in memory at their native size, or streamed.
    originals = load_split(dataset, "train", 32, with_masks=True)
    unsized = StreamedSplit(dataset, "train", with_masks=True)
    for workers in (0, 2):
        loaders = [
            shard_loader(AugmentedSplit(data, True, 24, seed=3), 16, seed=3, world=World(), num_workers=workers)
            for data in (originals, unsized)
        ]
        for epoch in (0, 1):  # persistent workers: the epoch reaches them with every index
            for loader in loaders:
                loader.sampler.set_epoch(epoch)
            for ours, theirs in zip(*loaders, strict=True):
                for a, b in zip(ours, theirs, strict=True):
                    assert torch.equal(a, b)
    batches = [list(image_batches(data, 7, num_workers=1 if data is streamed else 0)) for data in (memory, streamed)]
    runs = [list(range(k, min(k + 7, 48))) for k in range(0, 48, 7)]  # one image size: one group per run
    assert [i for i, _ in batches[0]] == [i for i, _ in batches[1]] == runs
    assert all(torch.equal(a, b) for (_, a), (_, b) in zip(*batches, strict=True))
    # Given (pseudo) masks at the original size, arrays or PNG bytes, are resized per item as load_split's.
    given = {i: read_mask(dataset.path(m)) for i, m in zip(memory.ids, dataset.split("train")["mask"], strict=True)}
    for masks in (given, {i: encode_mask_png(m) for i, m in given.items()}):
        pseudo = StreamedSplit(dataset, "train", 24, masks=masks)
        assert all(torch.equal(pseudo.mask(i), memory.masks[i]) for i in range(len(memory)))


def test_epochs_differ_in_augmentation_through_persistent_workers(tiny_dataset: Path) -> None:
    from wsss.lib.datasets import AugmentedSplit, StreamedSplit
    from wsss.lib.distributed import World, shard_loader

    data = StreamedSplit(read_dataset(tiny_dataset), "train")
    loader = shard_loader(AugmentedSplit(data, train=True, size=32, seed=0), 48, seed=0, world=World(), num_workers=1)
    images = []
    for epoch in (0, 0, 1):
        loader.sampler.set_epoch(epoch)
        (batch,) = [b[0] for b in loader]
        images.append(batch)
    assert torch.equal(images[0], images[1]) and not torch.equal(images[0], images[2])
