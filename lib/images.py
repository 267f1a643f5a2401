"""Image and mask files: reading images (EXIF orientation applied) and palette PNG masks, band scaling of
multi-band arrays to uint8, the VOC palette.

Pixels reach the models as uint8: PNG/JPEG as they are; array images are stretched per band, linearly
from ``low`` (-> 0) to ``high`` (-> 255) and clipped (``wsss import folder`` stores the train split's 1st
and 99th percentiles). :func:`wsss.lib.datasets.normalize` then applies the ImageNet mean/std to 3-channel
images and ``(x / 255 - 0.5) / 0.25`` to any other channel count.
"""

from __future__ import annotations

import functools
import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import imgviz
import numpy as np
import tifffile
from PIL import Image, ImageOps

from wsss.lib.errors import WsssError
from wsss.lib.io import atomic_file, write_json


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
