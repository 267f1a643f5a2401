"""The embedded data sets (``wsss import embedded``), built offline, deterministically from a seed.

Two families of a different kind, so that a default is not chosen on one set's artefacts:

- ``animals`` (the default): animal-mnist silhouettes pasted on toned-down scikit-image textures; train and
  val draw from disjoint silhouette pools.
- ``shapes``: procedural filled shapes (star, heart, crescent, ...; random rotation, aspect and size, a
  shading gradient) on procedural backgrounds (coloured gratings over smooth noise, no photo); train and val
  draw their shapes' random geometry from separate streams.
- ``tinted_shapes``: the shapes in 13 tints (12 hues and grey), one class per shape and tint: 104 classes, for
  runs with many classes (``classifier.class_sample``).

In the first two, classes differ only by shape (each object gets a random colour); in all, the image labels
are derived from the final mask, so the two always agree. ``classes: []`` takes every class of the family.
"""

from __future__ import annotations

import colorsys
import gzip
import pickle
from collections.abc import Sequence
from importlib import resources
from pathlib import Path

import numpy as np
import pandas as pd
import skimage.data
from PIL import Image, ImageDraw
from scipy import ndimage

from wsss.lib.config import EmbeddedParams
from wsss.lib.dataset_format import (
    DATASET_ENTRIES,
    LABELLED_SPLITS,
    SPLITS,
    read_dataset,
    write_classes,
    write_manifest,
)
from wsss.lib.errors import WsssError
from wsss.lib.images import write_mask_png
from wsss.lib.io import atomic_dir, check_replaceable
from wsss.lib.metrics import IGNORE_INDEX

ANIMAL_CLASSES = ("bear", "bird", "cat", "cow", "dog", "elephant", "giraffe", "horse", "sheep", "zebra")
SHAPE_CLASSES = ("star", "heart", "crescent", "cross", "arrow", "triangle", "ring", "hexagon")
# Hue (HSV, 0..1) and saturation of each tint of tinted_shapes: 12 hues 30 degrees apart, and grey.
TINTS = {
    **{name: (i / 12, 0.85) for i, name in enumerate(("red", "orange", "yellow", "chartreuse", "green", "spring",
                                                        "cyan", "azure", "blue", "violet", "magenta", "rose"))},
    "grey": (0.0, 0.0),
}  # fmt: skip
FAMILIES = {
    "animals": ANIMAL_CLASSES,
    "shapes": SHAPE_CLASSES,
    "tinted_shapes": tuple(f"{shape}-{tint}" for shape in SHAPE_CLASSES for tint in TINTS),
}
SHAPE_SUPERSAMPLE = 4  # shapes are drawn this many times larger, then reduced (smooth edges, as the silhouettes')
# CC0 images bundled with scikit-image (no download). chelsea/cat and horse are left out: they show animals.
TEXTURES = ("brick", "grass", "gravel", "moon", "coffee", "rocket", "astronaut", "immunohistochemistry")
SILHOUETTE_THRESHOLD = 100
# A class is labelled only if this many of its pixels stay visible after occlusion (else they become 255).
MIN_VISIBLE_PIXELS = 20
# Below this a silhouette often has fewer than MIN_VISIBLE_PIXELS pixels and would never be labelled.
MIN_OBJECT_SIZE = 12
TRAIN_POOL_FRACTION = 0.8


def load_silhouettes() -> tuple[np.ndarray, np.ndarray]:
    """Animal-MNIST v3: uint8 [10000, 28, 28] grey silhouettes and int labels indexing ANIMAL_CLASSES."""
    folder = resources.files("animal_mnist") / "data" / "Animal_MNIST"
    arrays = []
    for name in ("animal_data_version_3.gz", "animal_label_version_3.gz"):
        with resources.as_file(folder / name) as path, gzip.open(path, "rb") as handle:
            arrays.append(np.asarray(pickle.load(handle)))
    return arrays[0].astype(np.uint8), arrays[1].astype(np.int64)


def split_pools(
    labels: np.ndarray, class_ids: Sequence[int], train_fraction: float = TRAIN_POOL_FRACTION
) -> dict[str, list[np.ndarray]]:
    """Disjoint silhouette pools: per split, one index array per requested class.

    The first ``train_fraction`` of each class's silhouettes (in file order) go to train, the rest to val,
    so no val object was ever seen in training.
    """
    pools: dict[str, list[np.ndarray]] = {split: [] for split in SPLITS}
    for k in class_ids:
        indices = np.flatnonzero(labels == k)
        cut = round(len(indices) * train_fraction)
        pools["train"].append(indices[:cut])
        pools["val"].append(indices[cut:])
    return pools


def _load_textures() -> list[np.ndarray]:
    """The background images as float32 RGB in [0, 1]."""
    textures = []
    for name in TEXTURES:
        image = np.asarray(getattr(skimage.data, name)(), dtype=np.float32)[..., :3] / 255
        textures.append(np.repeat(image[..., None], 3, axis=-1) if image.ndim == 2 else image)
    return textures


def _background(rng: np.random.Generator, textures: list[np.ndarray], size: int) -> np.ndarray:
    """A random crop (random scale, flip) of a texture, desaturated and low-contrast so objects stand out."""
    texture = textures[rng.integers(len(textures))]
    side = rng.integers(min(texture.shape[:2]) // 6, min(texture.shape[:2]) // 2 + 1)
    top = rng.integers(texture.shape[0] - side + 1)
    left = rng.integers(texture.shape[1] - side + 1)
    crop = (texture[top : top + side, left : left + side] * 255).astype(np.uint8)
    image = np.asarray(Image.fromarray(crop).resize((size, size), Image.BILINEAR), dtype=np.float32) / 255
    if rng.random() < 0.5:
        image = image[:, ::-1]
    grey = image.mean(axis=-1, keepdims=True)
    image = grey + rng.uniform(0.1, 0.4) * (image - grey)
    image = rng.uniform(0.25, 0.5) + rng.uniform(0.3, 0.6) * (image - image.mean())
    return np.clip(image, 0, 1)


def _silhouette(grey: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Resizes a silhouette so its longer side is ``size``; returns (grey float32, filled object mask)."""
    ys, xs = np.nonzero(grey > SILHOUETTE_THRESHOLD)
    crop = grey[ys.min() : ys.max() + 1, xs.min() : xs.max() + 1]
    scale = size / max(crop.shape)
    h, w = max(1, round(crop.shape[0] * scale)), max(1, round(crop.shape[1] * scale))
    resized = np.asarray(Image.fromarray(crop).resize((w, h), Image.BILINEAR), dtype=np.float32)
    # Fill enclosed dark stripes (zebra) so the object is one region; the shading still shows them.
    return resized, ndimage.binary_fill_holes(resized > SILHOUETTE_THRESHOLD)


def ignore_band(instances: np.ndarray) -> np.ndarray:
    """1-px VOC-style boundary: pixels with a 4-neighbour belonging to an object painted later (on top).

    The band lies outside each visible object, on the background or occluded-object side.
    """
    padded = np.pad(instances, 1)
    centre = padded[1:-1, 1:-1]
    band = np.zeros(instances.shape, dtype=bool)
    for dy, dx in ((-1, 0), (1, 0), (0, -1), (0, 1)):
        band |= padded[1 + dy : padded.shape[0] - 1 + dy, 1 + dx : padded.shape[1] - 1 + dx] > centre
    return band


def _shape_outline(kind: str, rng: np.random.Generator) -> list[np.ndarray]:
    """Polygons (unit square coordinates, [K, 2] x/y) whose even-odd fill is one shape of ``kind``."""
    t = np.linspace(0, 2 * np.pi, 64, endpoint=False)
    circle = np.stack([np.cos(t), np.sin(t)], axis=1)
    if kind == "star":
        points = 5 + int(rng.integers(0, 2))
        angles = np.arange(2 * points) * np.pi / points
        radii = np.where(np.arange(2 * points) % 2 == 0, 1.0, rng.uniform(0.38, 0.5))
        polygons = [np.stack([radii * np.cos(angles), radii * np.sin(angles)], axis=1)]
    elif kind == "heart":
        x = 16 * np.sin(t) ** 3
        y = 13 * np.cos(t) - 5 * np.cos(2 * t) - 2 * np.cos(3 * t) - np.cos(4 * t)
        polygons = [np.stack([x, -y], axis=1) / 17]
    elif kind == "crescent":
        shift = rng.uniform(0.35, 0.6)
        polygons = [circle, circle * rng.uniform(0.8, 0.95) + [shift, 0]]
    elif kind == "cross":
        a = rng.uniform(0.25, 0.4)
        polygons = [np.array([[-a, -1], [a, -1], [a, -a], [1, -a], [1, a], [a, a], [a, 1], [-a, 1], [-a, a],
                              [-1, a], [-1, -a], [-a, -a]])]  # fmt: skip
    elif kind == "arrow":
        shaft = rng.uniform(0.18, 0.3)
        polygons = [np.array([[-1, -shaft], [0.1, -shaft], [0.1, -0.7], [1, 0], [0.1, 0.7], [0.1, shaft], [-1, shaft]])]
    elif kind == "triangle":
        polygons = [np.array([[0, -1], [0.95, 0.75], [-0.95, 0.75]])]
    elif kind == "ring":
        polygons = [circle, circle * rng.uniform(0.45, 0.6)]
    elif kind == "hexagon":
        angles = np.arange(6) * np.pi / 3
        polygons = [np.stack([np.cos(angles), np.sin(angles)], axis=1)]
    else:
        raise ValueError(f"unknown shape {kind!r}")
    rotation = rng.uniform(0, 2 * np.pi)
    turn = np.array([[np.cos(rotation), -np.sin(rotation)], [np.sin(rotation), np.cos(rotation)]])
    stretch = np.array([1.0, rng.uniform(0.7, 1.0)])
    return [(p * stretch) @ turn.T for p in polygons]


def _draw_shape(kind: str, rng: np.random.Generator, size: int) -> tuple[np.ndarray, np.ndarray]:
    """One shape whose longer side is ``size``: (grey float32 shading in 0..255, filled object mask)."""
    polygons = _shape_outline(kind, rng)
    corners = np.concatenate(polygons)
    low, high = corners.min(axis=0), corners.max(axis=0)
    scale = (size * SHAPE_SUPERSAMPLE - 1) / (high - low).max()
    w, h = (np.ceil((high - low) * scale).astype(int) + 1).tolist()
    canvas = Image.new("L", (w, h), 0)
    draw = ImageDraw.Draw(canvas)
    for i, polygon in enumerate(polygons):  # the first is the outline, later ones cut holes (even-odd)
        draw.polygon([tuple(p) for p in ((polygon - low) * scale).tolist()], fill=255 if i == 0 else 0)
    small = (max(1, round(w / SHAPE_SUPERSAMPLE)), max(1, round(h / SHAPE_SUPERSAMPLE)))
    coverage = np.asarray(canvas.resize(small, Image.BOX), dtype=np.float32)
    shape = coverage > 127
    # A linear shading gradient in a random direction, in the silhouettes' grey range (above the threshold).
    ys, xs = np.mgrid[0 : shape.shape[0], 0 : shape.shape[1]]
    angle = rng.uniform(0, 2 * np.pi)
    ramp = np.cos(angle) * xs + np.sin(angle) * ys
    ramp = (ramp - ramp.min()) / max(float(np.ptp(ramp)), 1.0)
    return (150 + 105 * ramp).astype(np.float32), shape


def _procedural_background(rng: np.random.Generator, size: int) -> np.ndarray:
    """Float RGB [S, S, 3] in [0, 1]: two coloured gratings over smooth colour noise, toned down as the
    textures are (no photo: the shapes family shares nothing with the animals' backgrounds)."""
    ys, xs = np.mgrid[0:size, 0:size].astype(np.float32) / size
    image = np.zeros((size, size, 3), dtype=np.float32)
    for _ in range(2):
        angle, frequency, phase = rng.uniform(0, np.pi), rng.uniform(2, 9), rng.uniform(0, 2 * np.pi)
        wave = 0.5 + 0.5 * np.sin(2 * np.pi * frequency * (np.cos(angle) * xs + np.sin(angle) * ys) + phase)
        image += wave[..., None] * rng.uniform(0, 1, size=3)
    coarse = rng.uniform(0, 1, size=(4, 4, 3)).astype(np.float32)
    noise = np.stack(
        [np.asarray(Image.fromarray(c).resize((size, size), Image.BICUBIC)) for c in coarse.transpose(2, 0, 1)], -1
    )
    image = image / 2 + noise
    grey = image.mean(axis=-1, keepdims=True)
    image = grey + rng.uniform(0.2, 0.5) * (image - grey)
    image = rng.uniform(0.25, 0.5) + rng.uniform(0.3, 0.6) * (image - image.mean()) / max(float(image.std()) * 3, 1e-6)
    return np.clip(image, 0, 1)


class _Objects:
    """What a family pastes: ``draw(rng, class index, size)`` -> (grey shading 0..255, filled mask)."""

    def __init__(self, params: EmbeddedParams) -> None:
        self.family = params.family
        self.classes = list(params.classes) or list(FAMILIES[self.family])
        if self.family == "animals":
            self.silhouettes, animal_labels = load_silhouettes()
            self.pools = split_pools(animal_labels, [ANIMAL_CLASSES.index(c) for c in self.classes])
            self.textures = _load_textures()

    def background(self, rng: np.random.Generator, size: int) -> np.ndarray:
        if self.family == "animals":
            return _background(rng, self.textures, size)
        return _procedural_background(rng, size)

    def draw(
        self, rng: np.random.Generator, split: str, k: int, sizes: tuple[int, int]
    ) -> tuple[np.ndarray, np.ndarray]:
        """Object of class ``k`` with a longer side drawn from ``sizes`` (inclusive); the silhouette is drawn
        before the size, the order the animals family has always used (its files stay byte for byte)."""
        if self.family == "animals":
            grey = self.silhouettes[rng.choice(self.pools[split][k])]
            return _silhouette(grey, rng.integers(sizes[0], sizes[1] + 1))
        return _draw_shape(self.classes[k].split("-")[0], rng, rng.integers(sizes[0], sizes[1] + 1))

    def colour(self, rng: np.random.Generator, k: int) -> np.ndarray:
        """RGB in 0..1 of one object of class ``k``: its tint in tinted_shapes (hue within 0.02), else a random
        bright colour (classes must be told apart by shape)."""
        if self.family == "tinted_shapes":
            hue, saturation = TINTS[self.classes[k].split("-")[1]]
            value = rng.uniform(0.85, 1.0)
            return np.array(colorsys.hsv_to_rgb((hue + rng.uniform(-0.02, 0.02)) % 1.0, saturation, value))
        return np.array(colorsys.hsv_to_rgb(rng.random(), rng.uniform(0.6, 1.0), rng.uniform(0.85, 1.0)))


def _compose(
    rng: np.random.Generator, params: EmbeddedParams, objects: _Objects, split: str
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One image: returns (RGB uint8 [S, S, 3], mask uint8 [S, S], labels int8 [C])."""
    size, num_classes = params.image_size, len(objects.classes)
    image = objects.background(rng, size)
    classes = np.zeros((size, size), dtype=np.uint8)
    instances = np.zeros((size, size), dtype=np.int32)
    for instance in range(1, rng.integers(1, params.max_objects + 1) + 1):
        k = rng.integers(num_classes)
        grey, shape = objects.draw(rng, split, k, (params.min_object_size, params.max_object_size))
        h, w = shape.shape
        top, left = rng.integers(size - h + 1), rng.integers(size - w + 1)
        colour = objects.colour(rng, k)
        shading = 0.3 + 0.7 * np.clip(grey[shape] / 255, 0, 1)
        image[top : top + h, left : left + w][shape] = shading[:, None] * colour
        classes[top : top + h, left : left + w][shape] = k + 1
        instances[top : top + h, left : left + w][shape] = instance
    mask = np.where(ignore_band(instances), np.uint8(IGNORE_INDEX), classes)
    counts = np.bincount(mask.ravel(), minlength=256)[1 : num_classes + 1]
    labels = (counts >= MIN_VISIBLE_PIXELS).astype(np.int8)
    # Barely visible objects are unlabelled, so their pixels must not count as background either.
    mask[np.isin(mask, np.flatnonzero(counts < MIN_VISIBLE_PIXELS) + 1)] = IGNORE_INDEX
    return (image * 255).round().astype(np.uint8), mask, labels


def _check_recipe(params: EmbeddedParams) -> None:
    if params.family not in FAMILIES:
        raise WsssError(f"embedded.family: {params.family!r} is not one of {', '.join(FAMILIES)}")
    unknown = [c for c in params.classes if c not in FAMILIES[params.family]]
    if unknown:
        known = ", ".join(FAMILIES[params.family])
        raise WsssError(f"embedded.classes: unknown class {unknown[0]!r} of family {params.family} (known: {known})")
    if len(set(params.classes)) != len(params.classes):
        raise WsssError("embedded.classes: must be a list without duplicates ([]: every class of the family)")
    if params.min_object_size < MIN_OBJECT_SIZE:
        size = params.min_object_size
        raise WsssError(f"embedded.min_object_size: must be >= {MIN_OBJECT_SIZE}, got {size}")
    if params.max_object_size > params.image_size:
        raise WsssError(f"embedded.max_object_size: {params.max_object_size} exceeds image_size {params.image_size}")


def build_embedded_dataset(params: EmbeddedParams, out: Path) -> Path:
    """Generates the embedded data set into ``out`` (atomically), deterministically from ``params.seed``.

    Same params give byte-identical files. Returns ``out``.

    Raises:
        WsssError: a recipe that cannot be built (unknown class, object larger than the image, ...).
    """
    _check_recipe(params)
    objects = _Objects(params)
    rows = []
    check_replaceable(out, DATASET_ENTRIES, "data set")
    with atomic_dir(out) as tmp:
        (tmp / "images").mkdir()
        (tmp / "masks").mkdir()
        counts = (params.train_images, params.val_images)
        for split_index, (split, count) in enumerate(zip(SPLITS, counts, strict=True)):
            # One stream per split: changing val_images leaves the train images unchanged.
            rng = np.random.default_rng([params.seed, split_index])
            for i in range(count):
                image, mask, labels = _compose(rng, params, objects, split)
                # Occlusion can hide every object; a training image without labels is invalid, so redraw.
                while split in LABELLED_SPLITS and not labels.any():
                    image, mask, labels = _compose(rng, params, objects, split)
                image_id = f"{split}_{i:05d}"
                Image.fromarray(image).save(tmp / "images" / f"{image_id}.png")
                write_mask_png(tmp / "masks" / f"{image_id}.png", mask)
                rows.append(
                    {
                        "id": image_id,
                        "split": split,
                        "image": f"images/{image_id}.png",
                        "mask": f"masks/{image_id}.png",
                        "labels": labels,
                        "width": params.image_size,
                        "height": params.image_size,
                    }
                )
        write_classes(tmp / "classes.json", objects.classes)
        write_manifest(tmp / "manifest.parquet", pd.DataFrame(rows))
        read_dataset(tmp)  # the generator must honour the contract it shares with every importer
    return out
