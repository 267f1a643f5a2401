"""The on-disk data set format every importer writes, its validation, and in-memory loading for training.

A data set root holds::

    classes.json       {"classes": ["bird", ...]}: class k (0-based) is mask value k + 1
    manifest.parquet   one row per image, schema MANIFEST_COLUMNS; paths are relative to the root
    images/...         RGB PNG/JPEG files
    masks/...          palette PNGs (VOC colours): 0 = background, k + 1 = class k, 255 = ignore

Image-level ``labels`` are multi-hot int8 lists of length C; ``mask`` is null for images without one.
"""

from __future__ import annotations

import functools
import io
import json
import math
from dataclasses import dataclass
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import BinaryIO, NoReturn

import imgviz
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import torch
import torch.nn.functional as F
from PIL import Image
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

from tasks.errors import WsssError
from tasks.io import atomic_file, write_json

IGNORE_INDEX = 255
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


def read_mask(path: str | Path | BinaryIO, name: str | None = None) -> np.ndarray:
    """Reads the index values of a palette (or greyscale) PNG mask as an HxW uint8 array.

    Args:
        path: file path or binary buffer.
        name: how error messages name the source (defaults to ``path``).

    Raises:
        WsssError: unreadable file, or an RGB/other mode whose pixels are colours rather than class ids.
    """
    name = name or str(path)
    try:
        with Image.open(path) as image:
            if image.mode not in ("P", "L"):
                raise WsssError(f"{name}: mask must be a palette PNG (mode P or L), got mode {image.mode}")
            return np.array(image, dtype=np.uint8)
    except WsssError:
        raise
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        raise WsssError(f"{name}: cannot read mask ({one_line(err)})") from None


def decode_mask_png(data: bytes, name: str = "<mask bytes>") -> np.ndarray:
    """Decodes PNG bytes written by :func:`encode_mask_png`."""
    return read_mask(io.BytesIO(data), name)


def _decode(path: str | Path, convert: bool) -> tuple[int, int, np.ndarray | None]:
    try:
        with Image.open(path) as image:
            image.load()  # decode fully so truncated files fail here, not inside a training loop
            return image.height, image.width, np.array(image.convert("RGB")) if convert else None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        raise WsssError(f"{path}: cannot read image ({one_line(err)})") from None


def read_image(path: str | Path) -> np.ndarray:
    """Reads an image file as an HxWx3 uint8 RGB array.

    Raises:
        WsssError: missing, corrupt, truncated or non-image file.
    """
    return _decode(path, convert=True)[2]


def write_mask_table(path: str | Path, ids: list[str], masks: list[np.ndarray]) -> None:
    """Writes many masks as PNG bytes in one parquet file (columns ``id``, ``mask``), atomically.

    One file instead of thousands keeps DVC hashing and copying cheap.
    """
    if len(ids) != len(masks):
        raise ValueError(f"{len(ids)} ids but {len(masks)} masks")
    if len(set(ids)) != len(ids):
        raise ValueError("mask table ids must be unique")
    table = pa.table([ids, [encode_mask_png(m) for m in masks]], schema=MASK_TABLE_COLUMNS)
    with atomic_file(path) as handle:
        pq.write_table(table, handle)


def read_mask_table(path: str | Path) -> dict[str, np.ndarray]:
    """Reads a table written by :func:`write_mask_table` into ``{id: HxW uint8 mask}``.

    Raises:
        WsssError: missing/unreadable file, missing column, or an undecodable mask (naming its id).
    """
    table = _read_parquet(Path(path))
    missing = [c for c in MASK_TABLE_COLUMNS.names if c not in table.column_names]
    if missing:
        raise WsssError(f"{path}: missing column {missing[0]!r}")
    ids = table.column("id").to_pylist()
    blobs = table.column("mask").to_pylist()
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


def read_classes(path: Path) -> list[str]:
    """Reads and checks ``classes.json``."""
    if not path.is_file():
        raise WsssError(f"{path}: file not found")
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise WsssError(f"{path}: cannot read classes ({one_line(err)})") from None
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


def _escapes_root(relative: str) -> bool:
    posix = PurePosixPath(relative)
    return posix.is_absolute() or ".." in posix.parts or bool(PureWindowsPath(relative).drive)


def _check_rows(manifest: pd.DataFrame, num_classes: int, where: Path) -> None:
    """Checks every manifest row without opening image files."""

    def fail(row: int, problem: str) -> NoReturn:
        raise WsssError(f"{where} row {row} (id {manifest['id'].iloc[row]!r}): {problem}")

    if manifest.empty:
        raise WsssError(f"{where}: no rows")
    for column in ("id", "split", "image", "width", "height", "labels"):
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
            if isinstance(relative, str) and _escapes_root(relative):
                fail(row, f"{column} path {relative!r} is absolute or leaves the data set root")
    lengths = manifest["labels"].map(len).to_numpy()
    if (lengths != num_classes).any():
        row = int((lengths != num_classes).argmax())
        fail(row, f"labels has length {lengths[row]}, expected {num_classes} (one per class)")
    labels = np.stack(manifest["labels"].to_list())
    not_binary = ((labels != 0) & (labels != 1)).any(axis=1)
    if not_binary.any():
        fail(int(not_binary.argmax()), "labels must be 0/1")
    small = ((manifest["width"] < MIN_IMAGE_SIZE) | (manifest["height"] < MIN_IMAGE_SIZE)).to_numpy()
    if small.any():
        fail(int(small.argmax()), f"image smaller than {MIN_IMAGE_SIZE} px")


def _check_files(dataset: DatasetIndex, where: Path) -> None:
    """Opens every image and mask: existence, decodability, sizes and mask values."""
    allowed = np.zeros(256, dtype=bool)
    allowed[: dataset.num_classes + 1] = True
    allowed[IGNORE_INDEX] = True
    for row, item in enumerate(dataset.manifest.itertuples(index=False)):
        name = f"{where} row {row} (id {item.id!r})"
        image_path = dataset.path(item.image)
        if not image_path.is_file():
            raise WsssError(f"{name}: image file {image_path} not found")
        height, width, _ = _decode(image_path, convert=False)
        if (width, height) != (item.width, item.height):
            raise WsssError(f"{name}: image {image_path} is {width}x{height}, manifest says {item.width}x{item.height}")
        if not isinstance(item.mask, str):
            continue
        mask_path = dataset.path(item.mask)
        if not mask_path.is_file():
            raise WsssError(f"{name}: mask file {mask_path} not found")
        mask = read_mask(mask_path)
        if mask.shape != (height, width):
            raise WsssError(f"{name}: mask {mask_path} is {mask.shape[1]}x{mask.shape[0]}, image is {width}x{height}")
        present = np.flatnonzero(np.bincount(mask.ravel(), minlength=256))
        bad = present[~allowed[present]]
        if bad.size:
            raise WsssError(f"{name}: mask {mask_path} has value {bad[0]}, allowed 0..{dataset.num_classes} and 255")


def validate_dataset(dataset: DatasetIndex, where: Path, check_files: bool = False) -> None:
    """Checks manifest rows (and, with ``check_files``, the files they name); ``where`` names the manifest."""
    _check_rows(dataset.manifest, dataset.num_classes, where)
    if check_files:
        _check_files(dataset, where)


def read_dataset(root: str | Path, check_files: bool = False) -> DatasetIndex:
    """Reads and validates a data set root (the one entry point for importers and ``wsss ingest``).

    Args:
        root: data set root directory.
        check_files: also open every image and mask (sizes, decodability, mask values).

    Raises:
        WsssError: the first problem found, naming the file or manifest row.
    """
    root = Path(root)
    if not root.is_dir():
        raise WsssError(f"{root}: data set root does not exist")
    classes = read_classes(root / "classes.json")
    manifest_path = root / "manifest.parquet"
    dataset = DatasetIndex(root, classes, read_manifest(manifest_path))
    validate_dataset(dataset, manifest_path, check_files)
    return dataset


@dataclass
class SplitData:
    """One split in memory, resized to ``size`` x ``size``."""

    ids: list[str]
    images: torch.Tensor  # uint8 [N, 3, S, S]
    labels: torch.Tensor  # float32 [N, C]
    masks: torch.Tensor | None  # uint8 [N, S, S]; 255 = ignore
    original_sizes: list[tuple[int, int]]  # (H, W) before resizing

    def __len__(self) -> int:
        return len(self.ids)


def _resize(x: torch.Tensor, size: int, is_mask: bool) -> torch.Tensor:
    """Resizes a [..., H, W] tensor to size x size: bilinear with antialiasing, nearest for label maps."""
    if x.shape[-2:] == (size, size):
        return x
    batch = x.reshape(-1, 1 if is_mask else x.shape[-3], *x.shape[-2:]).float()
    if is_mask:
        out = F.interpolate(batch, size=(size, size), mode="nearest-exact")
    else:
        out = F.interpolate(batch, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    if not x.dtype.is_floating_point:
        out = out.round_().clamp_(0, 255)
    return out.to(x.dtype).reshape(*x.shape[:-2], size, size)


def load_split(dataset: DatasetIndex, split: str, size: int, with_masks: bool) -> SplitData:
    """Loads every image (and mask) of a split into memory, resized to ``size`` x ``size``.

    Images without a mask get an all-ignore (255) mask, so metrics skip them.

    Raises:
        WsssError: empty split, unreadable file, or ``with_masks`` on a split with no masks at all.
    """
    rows = dataset.split(split)
    if with_masks and rows["mask"].isna().all():
        raise WsssError(f"{dataset.root}: split {split!r} has no masks")
    images, masks, sizes = [], [], []
    for item in rows.itertuples(index=False):
        image = torch.from_numpy(read_image(dataset.path(item.image))).permute(2, 0, 1)
        sizes.append((image.shape[1], image.shape[2]))
        images.append(_resize(image, size, is_mask=False))
        if with_masks:
            if isinstance(item.mask, str):
                mask = torch.from_numpy(read_mask(dataset.path(item.mask)))
                masks.append(_resize(mask, size, is_mask=True))
            else:
                masks.append(torch.full((size, size), IGNORE_INDEX, dtype=torch.uint8))
    return SplitData(
        ids=rows["id"].tolist(),
        images=torch.stack(images),
        labels=torch.from_numpy(np.stack(rows["labels"].to_list()).astype(np.float32)),
        masks=torch.stack(masks) if with_masks else None,
        original_sizes=sizes,
    )


_MEAN = torch.tensor(IMAGENET_DEFAULT_MEAN).view(3, 1, 1) * 255
_STD = torch.tensor(IMAGENET_DEFAULT_STD).view(3, 1, 1) * 255


def normalize(images_uint8: torch.Tensor) -> torch.Tensor:
    """ImageNet mean/std normalisation of [..., 3, H, W] images in 0..255 (for pretrained timm weights)."""
    return (images_uint8.float() - _MEAN.to(images_uint8.device)) / _STD.to(images_uint8.device)


class AugmentedSplit(torch.utils.data.Dataset):
    """Serves (normalised image, labels, mask) from a SplitData, with train-time crop + flip.

    The randomness of item ``i`` depends only on ``(seed, epoch, i)``, so results do not depend on the
    sampler order or on DataLoader workers; call :meth:`set_epoch` each epoch for fresh augmentations.

    Args:
        data: the split in memory.
        train: apply random-resized crop (area in [crop_scale_min, 1], aspect 3/4..4/3) and h-flip.
        crop_scale_min: smallest crop area as a fraction of the image.
        seed: augmentation seed.
    """

    def __init__(self, data: SplitData, train: bool, crop_scale_min: float = 0.6, seed: int = 0) -> None:
        self.data = data
        self.train = train
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
        return 0, 0, height, width

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        image = self.data.images[index]
        mask = self.data.masks[index] if self.data.masks is not None else None
        if self.train:
            state = np.random.SeedSequence([self.seed, self.epoch, index]).generate_state(1)[0]
            generator = torch.Generator().manual_seed(int(state))
            size = image.shape[-1]
            top, left, h, w = self._crop_box(generator, *image.shape[-2:])
            # Resize in float: the result is normalised anyway, so rounding to uint8 would only lose detail.
            image = _resize(image[:, top : top + h, left : left + w].float(), size, is_mask=False)
            if mask is not None:
                mask = _resize(mask[top : top + h, left : left + w], size, is_mask=True)
            if torch.rand(1, generator=generator).item() < 0.5:
                image = image.flip(-1)
                mask = mask.flip(-1) if mask is not None else None
        mask = mask.long() if mask is not None else torch.empty(0, dtype=torch.long)
        return normalize(image), self.data.labels[index], mask
