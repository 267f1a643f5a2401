"""The on-disk data set format every importer writes, its validation, and in-memory loading for training.

A data set root holds::

    classes.json       {"classes": ["bird", ...]}: class k (0-based) is mask value k + 1
    manifest.parquet   one row per image, schema MANIFEST_COLUMNS; paths are relative to the root
    images/...         PNG/JPEG (read as RGB), or multi-band .tif/.tiff/.npy arrays (any channel count)
    masks/...          palette PNGs (VOC colours): 0 = background, k + 1 = class k, 255 = ignore
    bands.json         only for .tif/.npy images: per-band scaling {"low": [...], "high": [...]}

Image-level ``labels`` are multi-hot int8 lists of length C; ``mask`` is null for images without one.
Every image of a data set has the same channel count; the models' ``in_chans`` follows it.

Pixels reach the models as uint8: PNG/JPEG as they are; array images are stretched per band, linearly
from ``low`` (-> 0) to ``high`` (-> 255) and clipped (``wsss import folder`` stores the train split's 1st
and 99th percentiles). :func:`normalize` then applies the ImageNet mean/std to 3-channel images and
``(x / 255 - 0.5) / 0.25`` to any other channel count.

Every check lives here (:func:`validate_dataset`, :func:`check_image`, :func:`check_mask`); the importers
and ``wsss ingest`` call them, each error is one line naming the file or row and the problem.
"""

from __future__ import annotations

import functools
import hashlib
import io
import json
import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any, BinaryIO, NoReturn

import imgviz
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import tifffile
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

from wsss.lib.errors import WsssError
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


def one_line(err: BaseException) -> str:
    """One-line form of a library error message, for WsssError messages."""
    return " ".join(str(err).split()) or type(err).__name__


@functools.cache
def _palette() -> tuple[int, ...]:
    return tuple(imgviz.label_colormap().flatten().tolist())


def palette() -> list[int]:
    """VOC colour palette as the flat list of 768 ints that ``PIL.Image.putpalette`` takes."""
    return list(_palette())


def encode_mask_png(mask: np.ndarray) -> bytes:
    """Encodes an HxW uint8 label map as a VOC-palette PNG."""
    buffer = io.BytesIO()
    write_mask_png(buffer, mask)
    return buffer.getvalue()


def write_mask_png(path_or_buffer: str | Path | BinaryIO, mask: np.ndarray) -> None:
    """Writes an HxW uint8 label map as a VOC-palette PNG (atomically when given a path)."""
    if mask.dtype != np.uint8 or mask.ndim != 2:
        raise ValueError(f"mask must be a 2-D uint8 array, got {mask.dtype} {mask.shape}")
    image = Image.fromarray(mask)
    image.putpalette(palette())  # turns the "L" image into "P" without touching the indices
    if isinstance(path_or_buffer, str | Path):
        with atomic_file(path_or_buffer) as handle:
            image.save(handle, format="PNG")
    else:
        image.save(path_or_buffer, format="PNG")


def read_mask(path: str | Path | BinaryIO, name: str | None = None, convert_rgb: bool = False) -> np.ndarray:
    """Reads the index values of a palette (or greyscale) PNG mask as an HxW uint8 array.

    Args:
        path: file path or binary buffer.
        name: how error messages name the source (defaults to ``path``).
        convert_rgb: turn an RGB(A) mask into indices when every pixel is exactly a VOC palette colour
            (importers do; ``wsss ingest`` never rewrites a data set, so it refuses RGB masks).

    Raises:
        WsssError: unreadable file, or an RGB/other mode whose pixels are colours rather than class ids.
    """
    name = name or str(path)
    try:
        with Image.open(path) as image:
            if image.mode in ("P", "L"):
                return np.array(image, dtype=np.uint8)
            if convert_rgb and image.mode in ("RGB", "RGBA"):
                return _palette_indices(np.array(image.convert("RGB")), name)
            hint = " (`wsss import folder` converts RGB masks drawn in the VOC palette)" if image.mode == "RGB" else ""
            raise WsssError(f"{name}: mask must be a palette PNG (mode P or L), got mode {image.mode}{hint}")
    except WsssError:
        raise
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        raise WsssError(f"{name}: cannot read mask ({one_line(err)})") from None


def _palette_indices(rgb: np.ndarray, name: str) -> np.ndarray:
    """Maps an HxWx3 colour mask to palette indices; every pixel must be exactly a palette colour."""
    codes = (rgb[..., 0].astype(np.int64) << 16) | (rgb[..., 1].astype(np.int64) << 8) | rgb[..., 2]
    colours = np.array(_palette(), dtype=np.int64).reshape(256, 3)
    palette_codes = (colours[:, 0] << 16) | (colours[:, 1] << 8) | colours[:, 2]
    order = np.argsort(palette_codes)  # the 256 VOC colours are distinct
    found = np.clip(np.searchsorted(palette_codes[order], codes), 0, 255)
    matches = palette_codes[order][found] == codes
    if not matches.all():
        y, x = np.argwhere(~matches)[0]
        colour = tuple(int(v) for v in rgb[y, x])
        raise WsssError(f"{name}: RGB mask pixel (x={x}, y={y}) has colour {colour}, not a VOC palette colour")
    return order[found].astype(np.uint8)


def decode_mask_png(data: bytes, name: str = "<mask bytes>") -> np.ndarray:
    """Decodes PNG bytes written by :func:`encode_mask_png`."""
    return read_mask(io.BytesIO(data), name)


def _read_array(path: Path) -> np.ndarray:
    """Decodes an image file fully (truncated files fail here) as HxWxC; see :func:`read_image`."""
    suffix = path.suffix.lower()
    if suffix == ".npy":
        array = np.load(path, allow_pickle=False)
    elif suffix in (".tif", ".tiff"):
        with tifffile.TiffFile(path) as tif:
            array = tif.series[0].asarray()
    else:
        with Image.open(path) as image:
            image.load()
            # The pixels as every viewer shows them: a phone photo stores them as the sensor read them and an
            # EXIF orientation tag saying how to turn them. Masks drawn on such a photo (annotation tools apply
            # the tag too) and masks predicted for it must line up with what a person sees.
            array = np.array(ImageOps.exif_transpose(image).convert("RGB"))
    if array.ndim == 2:
        array = array[..., None]
    if array.ndim != 3 or array.dtype.kind not in "uif":
        raise ValueError(f"expected an HxW or HxWxC array of numbers, got {array.dtype} {array.shape}")
    if array.shape[0] < array.shape[-1]:  # channels first (C, H, W): bands are the short axis
        array = np.moveaxis(array, 0, -1)
    return array


def read_image(path: str | Path, name: str | None = None) -> np.ndarray:
    """Reads an image file as an HxWxC array.

    PNG/JPEG/... (Pillow) come back as RGB uint8, turned by their EXIF orientation tag as viewers show them
    (the one place images are read: data sets, importers, predict); ``.tif``/``.tiff`` (tifffile) and ``.npy``
    arrays keep their dtype and channel count, channels last (a (C, H, W) array with C < W is transposed).

    Raises:
        WsssError: missing, corrupt, truncated or non-image file (the message starts with ``name``).
    """
    prefix = f"{name}: " if name else ""
    try:
        return _read_array(Path(path))
    except (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError) as err:
        raise WsssError(f"{prefix}{path}: cannot read image ({one_line(err)})") from None


@dataclass(frozen=True)
class Bands:
    """Per-band linear scaling of array images to uint8: ``low`` -> 0, ``high`` -> 255 (clipped)."""

    low: tuple[float, ...]
    high: tuple[float, ...]

    def __len__(self) -> int:
        return len(self.low)


BANDS_FILE = "bands.json"
BAND_PERCENTILES = (1.0, 99.0)
BAND_SAMPLE_PIXELS = 20_000


def compute_bands(images: list[np.ndarray], seed: int = 0) -> Bands:
    """The 1st/99th percentile of each band over (a random sample of) the pixels of ``images`` (HxWxC)."""
    rng = np.random.default_rng(seed)
    samples = []
    for image in images:
        pixels = image.reshape(-1, image.shape[-1])
        take = min(len(pixels), BAND_SAMPLE_PIXELS)
        samples.append(pixels[rng.choice(len(pixels), take, replace=False)].astype(np.float64))
    low, high = np.percentile(np.concatenate(samples), BAND_PERCENTILES, axis=0)
    high = np.maximum(high, low + 1e-6)  # a constant band maps to 0 instead of dividing by zero
    return Bands(tuple(low.tolist()), tuple(high.tolist()))


def write_bands(path: str | Path, bands: Bands) -> None:
    """Writes ``bands.json`` atomically."""
    write_json(path, {"low": list(bands.low), "high": list(bands.high)})


def read_bands(path: Path) -> Bands | None:
    """Reads ``bands.json``; None when the file does not exist (PNG/JPEG data sets have none)."""
    if not path.exists():
        return None
    try:
        data = json.loads(path.read_text())
        bands = Bands(tuple(map(float, data["low"])), tuple(map(float, data["high"])))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, ValueError) as err:
        raise WsssError(f"{path}: cannot read band scaling ({one_line(err)})") from None
    pairs = zip(bands.low, bands.high, strict=False)
    if not len(bands) or len(bands.low) != len(bands.high) or any(high <= low for low, high in pairs):
        raise WsssError(f'{path}: expected {{"low": [...], "high": [...]}}, one pair per band with high > low')
    return bands


def to_uint8(image: np.ndarray, bands: Bands | None) -> np.ndarray:
    """HxWxC image -> uint8 for the models: stretched per band with ``bands``, else it must be uint8."""
    if bands is None:
        if image.dtype != np.uint8:
            raise WsssError(f"a {image.dtype} image needs per-band scaling ({BANDS_FILE} in the data set)")
        return image
    low, high = np.array(bands.low), np.array(bands.high)
    return np.clip((image - low) / (high - low) * 255 + 0.5, 0, 255).astype(np.uint8)


def display_rgb(image_uint8: np.ndarray) -> np.ndarray:
    """An HxWx3 view of a uint8 HxWxC image for pictures: the first three bands, or the first band as grey."""
    if image_uint8.shape[-1] >= 3:
        return np.ascontiguousarray(image_uint8[..., :3])
    return np.repeat(image_uint8[..., :1], 3, axis=-1)


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


def aspect_size(height: int, width: int, size: int, multiple: int = 1) -> tuple[int, int]:
    """The ``(h, w)`` an image of ``height x width`` is resized to for the models: its longer side ``size``,
    the shorter one at the image's own aspect ratio, both rounded to a multiple of ``multiple`` (the ViT's
    patch, the segmenter's output stride; at least one multiple). A square image gets ``size x size``."""
    scale = size / max(height, width)
    return tuple(max(multiple, round(side * scale / multiple) * multiple) for side in (height, width))


@dataclass
class SplitData:
    """Some images of a split in memory, each resized to its :func:`aspect_size` (or as they are)."""

    ids: list[str]
    images: list[torch.Tensor]  # uint8 [channels, h, w] each
    labels: torch.Tensor  # float32 [N, C]
    masks: list[torch.Tensor] | None  # uint8 [h, w] each; 255 = ignore
    original_sizes: list[tuple[int, int]]  # (H, W) before resizing

    def __len__(self) -> int:
        return len(self.ids)

    def image(self, index: int) -> torch.Tensor:
        """uint8 ``[channels, h, w]`` of item ``index``."""
        return self.images[index]

    def mask(self, index: int) -> torch.Tensor | None:
        """uint8 ``[h, w]`` of item ``index`` (None without masks)."""
        return self.masks[index] if self.masks is not None else None


class StreamedSplit:
    """One split read from its files item by item (the pixels :func:`load_split` would hold): only the
    manifest's rows live in memory, so DataLoader workers decode the images where they are used.

    Args:
        dataset: the data set.
        split: its split.
        size: items are resized to :func:`aspect_size` ``(H, W, size, multiple)`` (images bilinear,
            antialiased; masks nearest-exact); None: served at their original size (training crops
            are cut from those, :class:`AugmentedSplit`).
        multiple: see :func:`aspect_size`.
        with_masks: serve the ground-truth masks (all-ignore where an image has none).
        masks: serve these original-size masks ``{id: HxW array or PNG bytes}`` instead (e.g. the
            pseudo-mask table, kept encoded: one mask is decoded per item).
    """

    def __init__(
        self,
        dataset: DatasetIndex,
        split: str,
        size: int | None = None,
        multiple: int = 1,
        with_masks: bool = False,
        masks: dict[str, np.ndarray | bytes] | None = None,
    ) -> None:
        rows = dataset.split(split)
        if with_masks and rows["mask"].isna().all():
            raise WsssError(f"{dataset.root}: split {split!r} has no masks")
        self.dataset, self.size, self.multiple = dataset, size, multiple
        self.ids = rows["id"].tolist()
        self.image_paths = rows["image"].tolist()
        self.mask_paths = rows["mask"].tolist() if with_masks else None
        self.given_masks = masks
        self.labels = torch.from_numpy(np.stack(rows["labels"].to_list()).astype(np.float32))
        self.original_sizes = list(zip(rows["height"].tolist(), rows["width"].tolist(), strict=True))

    def __len__(self) -> int:
        return len(self.ids)

    def _target(self, index: int) -> tuple[int, int] | None:
        return None if self.size is None else aspect_size(*self.original_sizes[index], self.size, self.multiple)

    def image(self, index: int) -> torch.Tensor:
        image = to_uint8(read_image(self.dataset.path(self.image_paths[index])), self.dataset.bands)
        return image_tensor(image, self._target(index))

    def original_mask(self, index: int) -> np.ndarray | None:
        """The item's mask at its original size (all-ignore when the image has none; None without masks)."""
        if self.given_masks is not None:
            mask = self.given_masks[self.ids[index]]
            if isinstance(mask, bytes):
                return decode_mask_png(mask, f"mask of {self.ids[index]!r}")
            return np.asarray(mask).astype(np.uint8)
        if self.mask_paths is None:
            return None
        if isinstance(self.mask_paths[index], str):
            return read_mask(self.dataset.path(self.mask_paths[index]))
        return np.full(self.original_sizes[index], IGNORE_INDEX, dtype=np.uint8)

    def mask(self, index: int) -> torch.Tensor | None:
        mask = self.original_mask(index)
        if mask is None:
            return None
        target = self._target(index)
        return _resize(torch.from_numpy(mask), target, is_mask=True) if target else torch.from_numpy(mask)


def masks_digest(data: StreamedSplit) -> str:
    """sha256 of every served mask's bytes and shape in order (the training masks' identity)."""
    digest = hashlib.sha256()
    for index in range(len(data)):
        mask = data.mask(index).contiguous()
        digest.update(np.asarray(mask.shape, np.int64).tobytes() + mask.numpy().tobytes())
    return digest.hexdigest()


class _Images(torch.utils.data.Dataset):
    """The uint8 images of a split, for a DataLoader (see :func:`image_batches`)."""

    def __init__(self, data: SplitData | StreamedSplit) -> None:
        self.data = data

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, index: int) -> torch.Tensor:
        return self.data.image(index)


def _as_list(items: list[torch.Tensor]) -> list[torch.Tensor]:
    return items  # a DataLoader's collate_fn: images of several sizes stay apart


def shape_groups(images: list[torch.Tensor], offset: int = 0) -> Iterator[tuple[list[int], torch.Tensor]]:
    """Stacks the images of one size together: ``(positions + offset, [n, channels, h, w])`` per size, in
    order of first appearance (images of one size: a single group, in order)."""
    groups: dict[tuple[int, ...], list[int]] = {}
    for position, image in enumerate(images):
        groups.setdefault(tuple(image.shape), []).append(position)
    for positions in groups.values():
        yield [offset + p for p in positions], torch.stack([images[p] for p in positions])


def image_batches(
    data: SplitData | StreamedSplit, batch_size: int, num_workers: int = 0
) -> Iterator[tuple[list[int], torch.Tensor]]:
    """The split's uint8 images as model batches ``(indices, [n, channels, h, w])``: runs of ``batch_size``
    consecutive images, each cut into groups of one size (:func:`shape_groups`); a streamed split is
    decoded by ``num_workers`` DataLoader processes. A split of one image size gives the batches
    ``images[k * batch_size : (k + 1) * batch_size]`` in order."""
    if isinstance(data, SplitData):
        runs = (data.images[start : start + batch_size] for start in range(0, len(data), batch_size))
    else:
        runs = torch.utils.data.DataLoader(
            _Images(data), batch_size=batch_size, num_workers=num_workers, collate_fn=_as_list
        )
    offset = 0
    for run in runs:
        yield from shape_groups(list(run), offset)
        offset += len(run)


def _resize(x: torch.Tensor, size: int | tuple[int, int], is_mask: bool) -> torch.Tensor:
    """Resizes a [..., H, W] tensor to ``size`` (``(h, w)``, or an int for a square): bilinear with
    antialiasing, nearest-exact for label maps."""
    size = (size, size) if isinstance(size, int) else tuple(size)
    if tuple(x.shape[-2:]) == size:
        return x
    batch = x.reshape(-1, 1 if is_mask else x.shape[-3], *x.shape[-2:]).float()
    if is_mask:
        out = F.interpolate(batch, size=size, mode="nearest-exact")
    else:
        out = F.interpolate(batch, size=size, mode="bilinear", align_corners=False, antialias=True)
    if not x.dtype.is_floating_point:
        out = out.round_().clamp_(0, 255)
    return out.to(x.dtype).reshape(*x.shape[:-2], *size)


def resize_mask(mask: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """A uint8 label mask ``[H, W]`` at ``size`` (nearest-exact, as items are resized; the same array when
    it has that size already)."""
    return mask if tuple(mask.shape) == tuple(size) else _resize(torch.from_numpy(mask), size, is_mask=True).numpy()


def image_tensor(image_uint8: np.ndarray, size: tuple[int, int] | None = None) -> torch.Tensor:
    """HxWxC uint8 image -> uint8 [C, h, w] tensor resized to ``size`` (bilinear, antialiased; None: as is)."""
    tensor = torch.from_numpy(np.ascontiguousarray(image_uint8)).permute(2, 0, 1)
    return tensor if size is None else _resize(tensor, size, is_mask=False)


def load_split(dataset: DatasetIndex, split: str, size: int, with_masks: bool, multiple: int = 1) -> SplitData:
    """Loads the images (and masks) of a split into memory, each resized to its :func:`aspect_size`
    ``(H, W, size, multiple)``: for inference on a few images (a streamed split serves the rest).

    Images without a mask get an all-ignore (255) mask, so metrics skip them.

    Raises:
        WsssError: empty split, unreadable file, or ``with_masks`` on a split with no masks at all.
    """
    data = StreamedSplit(dataset, split, size, multiple, with_masks=with_masks)
    return SplitData(
        ids=data.ids,
        images=[data.image(i) for i in range(len(data))],
        labels=data.labels,
        masks=[data.mask(i) for i in range(len(data))] if with_masks else None,
        original_sizes=data.original_sizes,
    )


_MEAN = torch.tensor(IMAGENET_DEFAULT_MEAN).view(3, 1, 1) * 255
_STD = torch.tensor(IMAGENET_DEFAULT_STD).view(3, 1, 1) * 255
# Other channel counts: the bands are stretched to 0..255 (see the module docstring), so about uniform.
_BAND_MEAN, _BAND_STD = 0.5 * 255, 0.25 * 255


def normalize(images_uint8: torch.Tensor) -> torch.Tensor:
    """Normalises [..., C, H, W] images in 0..255: ImageNet mean/std when C = 3 (pretrained timm weights),
    ``(x / 255 - 0.5) / 0.25`` for any other channel count."""
    if images_uint8.shape[-3] != 3:
        return (images_uint8.float() - _BAND_MEAN) / _BAND_STD
    return (images_uint8.float() - _MEAN.to(images_uint8.device)) / _STD.to(images_uint8.device)


class AugmentedSplit(torch.utils.data.Dataset):
    """Serves (normalised image, labels, mask) from a split, with train-time crop + flip.

    Training crops are cut from the image at its original size, as torchvision's (and MCTformer's)
    RandomResizedCrop cuts them: a box of area ``[crop_scale_min, 1]`` of the image and aspect ratio
    3/4..4/3, resized to ``size x size``, then a horizontal flip with probability 1/2; the mask gets the
    same box (nearest-exact). A photo is thus never squashed by more than 4/3, and an image that is
    already ``size x size`` is cropped exactly as before this path existed.

    The randomness of item ``i`` depends only on ``(seed, epoch, i)``, so results do not depend on the
    sampler order or on DataLoader workers; call :meth:`set_epoch` each epoch for fresh augmentations.

    Args:
        data: the split (in memory or streamed); original-size items for training.
        train: apply the crop and flip (else items are served as they are).
        size: the side of the training crops.
        crop_scale_min: smallest crop area as a fraction of the image.
        seed: augmentation seed.
    """

    def __init__(
        self,
        data: SplitData | StreamedSplit,
        train: bool,
        size: int | None = None,
        crop_scale_min: float = 0.6,
        seed: int = 0,
    ) -> None:
        if train and size is None:
            raise ValueError("AugmentedSplit(train=True) needs the crop size")
        self.data = data
        self.train = train
        self.size = size
        self.crop_scale_min = crop_scale_min
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.data)

    def _crop_box(self, generator: torch.Generator, height: int, width: int) -> tuple[int, int, int, int]:
        """Samples (top, left, h, w) like torchvision's RandomResizedCrop, falling back to the full image."""
        log_lo, log_hi = math.log(3 / 4), math.log(4 / 3)
        for _ in range(10):
            u_area, u_ratio, u_top, u_left = torch.rand(4, generator=generator).tolist()
            area = height * width * (self.crop_scale_min + (1 - self.crop_scale_min) * u_area)
            ratio = math.exp(log_lo + (log_hi - log_lo) * u_ratio)
            w, h = round(math.sqrt(area * ratio)), round(math.sqrt(area / ratio))
            if 0 < w <= width and 0 < h <= height:
                return int(u_top * (height - h + 1)), int(u_left * (width - w + 1)), h, w
        # torchvision's fallback: a centre crop at the nearest allowed aspect ratio
        ratio = min(max(width / height, 3 / 4), 4 / 3)
        w, h = (width, round(width / ratio)) if width / height < ratio else (round(height * ratio), height)
        return (height - h) // 2, (width - w) // 2, h, w

    def __getitem__(self, key: int | tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        # (epoch, index) from an EpochSampler: persistent DataLoader workers keep their own copy of this
        # object, so the epoch travels with the index instead of through set_epoch.
        epoch, index = key if isinstance(key, tuple) else (self.epoch, key)
        image = self.data.image(index)
        mask = self.data.mask(index)
        if self.train:
            state = np.random.SeedSequence([self.seed, epoch, index]).generate_state(1)[0]
            generator = torch.Generator().manual_seed(int(state))
            top, left, h, w = self._crop_box(generator, *image.shape[-2:])
            # Resize in float: the result is normalised anyway, so rounding to uint8 would only lose detail.
            image = _resize(image[:, top : top + h, left : left + w].float(), self.size, is_mask=False)
            if mask is not None:
                mask = _resize(mask[top : top + h, left : left + w], self.size, is_mask=True)
            if torch.rand(1, generator=generator).item() < 0.5:
                image = image.flip(-1)
                mask = mask.flip(-1) if mask is not None else None
        mask = mask.long() if mask is not None else torch.empty(0, dtype=torch.long)
        return normalize(image), self.data.labels[index], mask


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
