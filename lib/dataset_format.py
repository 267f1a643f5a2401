"""The on-disk data set format every importer writes, its tables (manifest, classes, mask tables) and its
validation.

A data set root holds::

    classes.json       {"classes": ["bird", ...]}: class k (0-based) is mask value k + 1
    manifest.parquet   one row per image, schema MANIFEST_COLUMNS; paths are relative to the root
    images/...         PNG/JPEG (read as RGB), or multi-band .tif/.tiff/.npy arrays (any channel count)
    masks/...          palette PNGs (VOC colours): 0 = background, k + 1 = class k, 255 = ignore
    bands.json         only for .tif/.npy images: per-band scaling {"low": [...], "high": [...]}

Image-level ``labels`` are multi-hot int8 lists of length C; ``mask`` is null for images without one.
Every image of a data set has the same channel count; the models' ``in_chans`` follows it.

Images and masks are read by :mod:`wsss.lib.images`.

Every check lives here (:func:`validate_dataset`, :func:`check_image`, :func:`check_mask`); the importers
and ``wsss ingest`` call them, each error is one line naming the file or row and the problem.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any, NoReturn

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from wsss.lib.errors import WsssError
from wsss.lib.images import (
    BANDS_FILE,
    Bands,
    decode_mask_png,
    encode_mask_png,
    one_line,
    read_bands,
    read_image,
    read_mask,
)
from wsss.lib.io import atomic_file, write_json
from wsss.lib.metrics import IGNORE_INDEX

MIN_IMAGE_SIZE = 8
# 255 is reserved for "ignore", so mask values 1..254 can name at most 254 foreground classes.
MAX_CLASSES = 254

MANIFEST_COLUMNS = pa.schema(
    [
        pa.field("id", pa.string(), nullable=False),
        pa.field("split", pa.string(), nullable=False),
        pa.field("image", pa.string(), nullable=False),
        pa.field("mask", pa.string()),
        pa.field("labels", pa.list_(pa.int8()), nullable=False),
        pa.field("width", pa.int32(), nullable=False),
        pa.field("height", pa.int32(), nullable=False),
    ]
)
MASK_TABLE_COLUMNS = pa.schema([pa.field("id", pa.string()), pa.field("mask", pa.binary())])


def write_mask_table(path: str | Path, ids: list[str], masks: list[np.ndarray]) -> None:
    """Writes many masks as PNG bytes in one parquet file (columns ``id``, ``mask``), atomically.

    One file instead of thousands keeps DVC hashing and copying cheap.
    """
    write_encoded_mask_table(path, ids, [encode_mask_png(m) for m in masks])


def write_encoded_mask_table(path: str | Path, ids: list[str], blobs: list[bytes]) -> None:
    """:func:`write_mask_table` of masks already PNG-encoded (:func:`encode_mask_png`)."""
    if len(ids) != len(blobs):
        raise ValueError(f"{len(ids)} ids but {len(blobs)} masks")
    if len(set(ids)) != len(ids):
        raise ValueError("mask table ids must be unique")
    table = pa.table([ids, blobs], schema=MASK_TABLE_COLUMNS)
    with atomic_file(path) as handle:
        pq.write_table(table, handle)


def read_mask_table(path: str | Path, encoded: bool = False) -> dict[str, np.ndarray] | dict[str, bytes]:
    """Reads a table written by :func:`write_mask_table` into ``{id: HxW uint8 mask}`` (``encoded``:
    ``{id: PNG bytes}``, a few percent of the decoded size, for consumers that decode one mask at a time).

    Raises:
        WsssError: missing/unreadable file, missing column, or an undecodable mask (naming its id).
    """
    table = _read_parquet(Path(path))
    missing = [c for c in MASK_TABLE_COLUMNS.names if c not in table.column_names]
    if missing:
        raise WsssError(f"{path}: missing column {missing[0]!r}")
    ids = table.column("id").to_pylist()
    blobs = table.column("mask").to_pylist()
    if encoded:
        return dict(zip(ids, blobs, strict=True))
    return {i: decode_mask_png(b, f"{path} (id {i!r})") for i, b in zip(ids, blobs, strict=True)}


def _read_parquet(path: Path) -> pa.Table:
    if not path.is_file():
        raise WsssError(f"{path}: file not found")
    try:
        return pq.read_table(path)
    except (OSError, pa.ArrowException) as err:
        raise WsssError(f"{path}: cannot read parquet ({one_line(err)})") from None


def write_classes(path: str | Path, classes: list[str]) -> None:
    """Writes ``classes.json`` atomically."""
    write_json(path, {"classes": list(classes)})


def write_manifest(path: str | Path, manifest: pd.DataFrame) -> None:
    """Writes a manifest DataFrame with exactly the MANIFEST_COLUMNS schema, atomically.

    The pandas metadata is dropped so identical rows give identical bytes.
    """
    columns = manifest[MANIFEST_COLUMNS.names]
    table = pa.Table.from_pandas(columns, schema=MANIFEST_COLUMNS, preserve_index=False)
    with atomic_file(path) as handle:
        pq.write_table(table.replace_schema_metadata(None), handle)


@dataclass
class DatasetIndex:
    """A validated data set: where it lives, its classes and its manifest (no pixels loaded)."""

    root: Path
    classes: list[str]
    manifest: pd.DataFrame
    bands: Bands | None = None

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def split(self, name: str) -> pd.DataFrame:
        """Rows of one split, in manifest order.

        Raises:
            WsssError: the split has no rows.
        """
        rows = self.manifest[self.manifest["split"] == name].reset_index(drop=True)
        if rows.empty:
            known = ", ".join(sorted(self.manifest["split"].unique()))
            raise WsssError(f"{self.root}: empty split {name!r} (splits: {known})")
        return rows

    def path(self, relative: str) -> Path:
        """Resolves a manifest path against the root."""
        return self.root / relative


def read_json_file(path: Path, what: str) -> Any:
    """A JSON file's content; a missing or unreadable file is one error naming it and ``what`` it holds."""
    if not path.is_file():
        raise WsssError(f"{path}: file not found")
    try:
        return json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise WsssError(f"{path}: cannot read {what} ({one_line(err)})") from None


def read_classes(path: Path) -> list[str]:
    """Reads and checks ``classes.json``."""
    data = read_json_file(path, "classes")
    classes = data.get("classes") if isinstance(data, dict) else None
    if not isinstance(classes, list) or not classes or not all(isinstance(c, str) and c for c in classes):
        raise WsssError(f'{path}: expected {{"classes": [non-empty names, ...]}}')
    if len(set(classes)) != len(classes):
        raise WsssError(f"{path}: duplicate class names")
    if len(classes) > MAX_CLASSES:
        raise WsssError(f"{path}: {len(classes)} classes, at most {MAX_CLASSES} fit in a PNG mask")
    return classes


def read_manifest(path: Path) -> pd.DataFrame:
    """Reads ``manifest.parquet`` with its columns cast to MANIFEST_COLUMNS (rows are not checked here)."""
    table = _read_parquet(path)
    for field in MANIFEST_COLUMNS:
        if field.name not in table.column_names:
            raise WsssError(f"{path}: missing column {field.name!r}")
        try:
            column = table.column(field.name).cast(field.type)
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
            kind = table.schema.field(field.name).type
            raise WsssError(f"{path}: column {field.name!r} has type {kind}, expected {field.type}") from None
        table = table.set_column(table.column_names.index(field.name), field.name, column)
    return table.select(MANIFEST_COLUMNS.names).to_pandas()


def escapes_root(relative: str) -> bool:
    """Whether a path meant to be relative to a data set root is absolute or climbs out of it (``..``)."""
    posix = PurePosixPath(relative)
    return posix.is_absolute() or ".." in posix.parts or bool(PureWindowsPath(relative).drive)


# Splits whose images are trained on with their image-level labels: each image needs at least one.
LABELLED_SPLITS = ("train",)
# The top-level entries of a data set root as the importers and the embedded generator write it: a root
# holding anything else is never replaced by them (lib/io.check_replaceable).
DATASET_ENTRIES = ("manifest.parquet", "classes.json", "bands.json", "images", "masks")
# Splits every data set must have (``wsss ingest`` and the importers check them).
SPLITS = ("train", "val")


def check_rows(manifest: pd.DataFrame, num_classes: int, where: str | Path) -> None:
    """Checks manifest rows without opening files and without the size columns.

    Importers run this on their source rows before copying anything; ``where`` names the source.
    """

    def fail(row: int, problem: str) -> NoReturn:
        raise WsssError(f"{where} row {row} (id {manifest['id'].iloc[row]!r}): {problem}")

    if manifest.empty:
        raise WsssError(f"{where}: no rows")
    for column in ("id", "split", "image", "labels"):
        missing = manifest[column].isna().to_numpy()
        if missing.any():
            fail(int(missing.argmax()), f"{column} is null")
    duplicated = manifest["id"].duplicated().to_numpy()
    if duplicated.any():
        fail(int(duplicated.argmax()), "duplicate id")
    for column in ("id", "split", "image"):
        empty = (manifest[column] == "").to_numpy()
        if empty.any():
            fail(int(empty.argmax()), f"{column} is empty")
    for column in ("image", "mask"):
        for row, relative in enumerate(manifest[column]):
            if isinstance(relative, str) and escapes_root(relative):
                fail(row, f"{column} path {relative!r} is absolute or leaves the data set root")
    lengths = manifest["labels"].map(len).to_numpy()
    if (lengths != num_classes).any():
        row = int((lengths != num_classes).argmax())
        fail(row, f"labels has length {lengths[row]}, expected {num_classes} (one per class)")
    labels = np.stack(manifest["labels"].to_list())
    not_binary = ((labels != 0) & (labels != 1)).any(axis=1)
    if not_binary.any():
        fail(int(not_binary.argmax()), "labels must be 0/1")
    unlabelled = (manifest["split"].isin(LABELLED_SPLITS) & (labels.sum(axis=1) == 0)).to_numpy()
    if unlabelled.any():
        row = int(unlabelled.argmax())
        fail(row, f"no labels, but split {manifest['split'].iloc[row]!r} trains on image labels (needs >= 1)")


def _check_sizes(manifest: pd.DataFrame, where: str | Path) -> None:
    for column in ("width", "height"):
        missing = manifest[column].isna().to_numpy()
        if missing.any():
            row = int(missing.argmax())
            raise WsssError(f"{where} row {row} (id {manifest['id'].iloc[row]!r}): {column} is null")
    small = ((manifest["width"] < MIN_IMAGE_SIZE) | (manifest["height"] < MIN_IMAGE_SIZE)).to_numpy()
    if small.any():
        row = int(small.argmax())
        size = f"{manifest['width'].iloc[row]}x{manifest['height'].iloc[row]}"
        problem = f"image is {size}, smaller than {MIN_IMAGE_SIZE} px (one patch of the smallest model)"
        raise WsssError(f"{where} row {row} (id {manifest['id'].iloc[row]!r}): {problem}")


@dataclass(frozen=True)
class ImageInfo:
    """What :func:`check_image` learnt from decoding a file."""

    height: int
    width: int
    channels: int
    dtype: np.dtype


def check_image(path: Path, name: str, channels: int | None = None) -> ImageInfo:
    """Decodes an image fully; ``name`` (a row, a list line) prefixes every error.

    Args:
        path: the image file.
        name: how errors name the row that points at the file.
        channels: the channel count every image of the data set must have (None: not known yet).

    Raises:
        WsssError: missing file, undecodable/truncated/non-image file, or another channel count.
    """
    if not path.is_file():
        raise WsssError(f"{name}: image file {path} not found")
    image = read_image(path, name)
    info = ImageInfo(image.shape[0], image.shape[1], image.shape[2], image.dtype)
    if channels is not None and info.channels != channels:
        raise WsssError(f"{name}: image {path} has {info.channels} channels, earlier images have {channels}")
    return info


def check_mask(
    path: Path,
    name: str,
    image_size: tuple[int, int],
    num_classes: int,
    convert_rgb: bool = False,
    mask: np.ndarray | None = None,
) -> np.ndarray:
    """Reads a mask and checks it against its image; returns the HxW uint8 label map.

    Args:
        path: the mask file.
        name: how errors name the row that points at the file.
        image_size: (height, width) of its image.
        num_classes: C; values must lie in 0..C or be 255.
        convert_rgb: accept an RGB mask drawn exactly in the VOC palette (see :func:`read_mask`).
        mask: the label map of ``path`` when it was decoded elsewhere (SBD .mat, COCO polygons): only
            checked, ``path`` then just names it.

    Raises:
        WsssError: missing/unreadable file, RGB mask, size differing from the image, or a bad value.
    """
    if mask is None:
        if not path.is_file():
            raise WsssError(f"{name}: mask file {path} not found")
        mask = read_mask(path, f"{name}: {path}", convert_rgb)
    height, width = image_size
    if mask.shape != (height, width):
        raise WsssError(f"{name}: mask {path} is {mask.shape[-1]}x{mask.shape[0]}, image is {width}x{height}")
    # bincount is fast for the usual uint8 maps; decoded SBD/COCO maps may hold any integer type.
    uint8 = mask.dtype == np.uint8
    present = np.flatnonzero(np.bincount(mask.ravel(), minlength=256)) if uint8 else np.unique(mask)
    bad = present[(present < 0) | ((present > num_classes) & (present != IGNORE_INDEX))]
    if bad.size:
        raise WsssError(f"{name}: mask {path} has value {bad[0]}, allowed 0..{num_classes} and 255")
    return mask.astype(np.uint8)


def _check_files(dataset: DatasetIndex, where: Path) -> None:
    """Opens every image and mask: existence, decodability, sizes, channels, band scaling, mask values."""
    channels = None
    for row, item in enumerate(dataset.manifest.itertuples(index=False)):
        name = f"{where} row {row} (id {item.id!r})"
        image_path = dataset.path(item.image)
        info = check_image(image_path, name, channels)
        channels = info.channels
        if (info.width, info.height) != (item.width, item.height):
            size = f"{info.width}x{info.height}"
            raise WsssError(f"{name}: image {image_path} is {size}, manifest says {item.width}x{item.height}")
        if dataset.bands is None and info.dtype != np.uint8:
            raise WsssError(f"{name}: image {image_path} is {info.dtype}, which needs per-band scaling ({BANDS_FILE})")
        if dataset.bands is not None and len(dataset.bands) != info.channels:
            scaled = len(dataset.bands)
            raise WsssError(f"{name}: image {image_path} has {info.channels} channels, {BANDS_FILE} scales {scaled}")
        if isinstance(item.mask, str):
            check_mask(dataset.path(item.mask), name, (info.height, info.width), dataset.num_classes)


def validate_dataset(
    dataset: DatasetIndex, where: str | Path, check_files: bool = False, splits: tuple[str, ...] = ()
) -> None:
    """Checks manifest rows (and, with ``check_files``, the files they name); ``where`` names the manifest.

    Args:
        dataset: the data set to check.
        where: how errors name the manifest.
        check_files: also open every image and mask.
        splits: splits that must have rows (``wsss ingest`` and the importers require train and val).
    """
    check_rows(dataset.manifest, dataset.num_classes, where)
    _check_sizes(dataset.manifest, where)
    present = set(dataset.manifest["split"])
    for split in splits:
        if split not in present:
            raise WsssError(f"{where}: empty split {split!r} (splits: {', '.join(sorted(present))})")
    if check_files:
        _check_files(dataset, Path(where))


def read_dataset(root: str | Path, check_files: bool = False, splits: tuple[str, ...] = ()) -> DatasetIndex:
    """Reads and validates a data set root (the one entry point for importers and ``wsss ingest``).

    Args:
        root: data set root directory.
        check_files: also open every image and mask (sizes, decodability, mask values).
        splits: splits that must have rows.

    Raises:
        WsssError: the first problem found, naming the file or manifest row.
    """
    root = Path(root)
    if not root.is_dir():
        raise WsssError(f"{root}: data set root does not exist")
    classes = read_classes(root / "classes.json")
    manifest_path = root / "manifest.parquet"
    dataset = DatasetIndex(root, classes, read_manifest(manifest_path), read_bands(root / BANDS_FILE))
    validate_dataset(dataset, manifest_path, check_files, splits)
    return dataset


def summarize(dataset: DatasetIndex) -> dict:
    """Images, images with masks, per-class label counts and mean labels per image, for each split."""
    splits = {}
    for split, rows in dataset.manifest.groupby("split", sort=True):
        labels = np.stack(rows["labels"].to_list()).astype(np.int64)
        splits[str(split)] = {
            "images": len(rows),
            "with_masks": int(rows["mask"].notna().sum()),
            "label_counts": dict(zip(dataset.classes, labels.sum(axis=0).tolist(), strict=True)),
            "mean_labels_per_image": round(float(labels.sum(axis=1).mean()), 4),
        }
    return {"num_classes": dataset.num_classes, "classes": dataset.classes, "splits": splits}
