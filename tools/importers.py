"""Importers into the wsss data set format: Pascal VOC 2012 (+ SBD train_aug), COCO instances, any folder.

Every importer copies the images (bytes unchanged) to ``images/``, writes palette masks to ``masks/``, and
checks each file with the checks of :mod:`wsss.lib.dataset_format` as it goes (errors name the source list line,
annotation file or manifest row). The finished manifest goes through :func:`validate_dataset` with
train and val required, like ``wsss ingest``. All of it happens in a temporary directory that is renamed
to ``--out`` only at the end, so a failed import leaves nothing behind.

Training images (split ``train``) need at least one image label. VOC and COCO derive labels from the
masks/annotations and skip training images without any (the summary counts them); the folder importer
takes labels from its manifest and refuses such a row.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path, PurePath
from typing import Any

import numpy as np
import pandas as pd

from wsss.lib.dataset_format import (
    DATASET_ENTRIES,
    LABELLED_SPLITS,
    SPLITS,
    DatasetIndex,
    check_image,
    check_mask,
    check_rows,
    escapes_root,
    read_classes,
    read_json_file,
    summarize,
    validate_dataset,
    write_classes,
    write_manifest,
)
from wsss.lib.errors import WsssError
from wsss.lib.images import BANDS_FILE, Bands, compute_bands, one_line, read_image, write_bands, write_mask_png
from wsss.lib.io import atomic_dir, check_replaceable

VOC_CLASSES = (
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow", "diningtable",
    "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor",
)  # fmt: skip
# Image formats whose pixels are arrays of any dtype and channel count: they get a bands.json.
ARRAY_SUFFIXES = (".tif", ".tiff", ".npy")
FOLDER_REQUIRED = ("image", "split", "labels")
FOLDER_OPTIONAL = ("id", "mask")
# Separator of class names in a folder manifest's labels cell (CSV); parquet may also hold a list.
LABEL_SEPARATOR = ";"
SKIPPED_IDS_SHOWN = 5  # the summary names this many of the skipped images


def labels_from_mask(mask: np.ndarray, num_classes: int) -> np.ndarray:
    """Multi-hot int8 labels of the classes present in a mask (values 1..C; 0 and 255 do not count)."""
    counts = np.bincount(mask.ravel(), minlength=256)[1 : num_classes + 1]
    return (counts > 0).astype(np.int8)


@dataclass
class _Builder:
    """Collects the rows of a data set being written into the temporary root ``root``."""

    root: Path
    classes: list[str]
    rows: list[dict[str, Any]] = field(default_factory=list)
    channels: int | None = None
    skipped_unlabelled: list[str] = field(default_factory=list)  # ids of training images without labels

    def __post_init__(self) -> None:
        (self.root / "images").mkdir()
        (self.root / "masks").mkdir()

    def add(
        self,
        name: str,
        image_id: str,
        split: str,
        image: Path,
        file_stem: str,
        mask_path: Path | None = None,
        mask: np.ndarray | None = None,
        labels: np.ndarray | None = None,
    ) -> None:
        """Checks and copies one image (and its mask); labels default to the classes in the mask.

        Args:
            name: how errors name the source of this row.
            image_id: the row's id.
            split: the row's split.
            image: source image file.
            file_stem: file name (without suffix) under images/ and masks/.
            mask_path: source mask file (PNG), or the file ``mask`` was decoded from.
            mask: an already decoded label map (SBD .mat, rendered COCO annotations).
            labels: multi-hot labels; None = derived from the mask (unlabelled training images skipped).
        """
        info = check_image(image, name, self.channels)
        self.channels = info.channels
        decoded = None
        if mask_path is not None:
            size = (info.height, info.width)
            decoded = check_mask(mask_path, name, size, len(self.classes), convert_rgb=True, mask=mask)
        if labels is None:
            labels = labels_from_mask(decoded, len(self.classes))
            if split in LABELLED_SPLITS and not labels.any():
                self.skipped_unlabelled.append(image_id)
                return
        image_file = f"images/{file_stem}{image.suffix.lower()}"
        shutil.copyfile(image, self.root / image_file)
        mask_file = None
        if decoded is not None:
            mask_file = f"masks/{file_stem}.png"
            write_mask_png(self.root / mask_file, decoded)
        self.rows.append(
            {
                "id": image_id,
                "split": split,
                "image": image_file,
                "mask": mask_file,
                "labels": labels,
                "width": info.width,
                "height": info.height,
            }
        )

    def finish(self, where: str | Path, bands: Bands | None = None) -> dict[str, Any]:
        """Validates the collected rows (train and val required) and writes manifest, classes, bands."""
        if not self.rows:
            raise WsssError(f"{where}: no images to import")
        dataset = DatasetIndex(self.root, self.classes, pd.DataFrame(self.rows), bands)
        validate_dataset(dataset, where, splits=SPLITS)
        write_classes(self.root / "classes.json", self.classes)
        write_manifest(self.root / "manifest.parquet", dataset.manifest)
        if bands is not None:
            write_bands(self.root / BANDS_FILE, bands)
        skipped = {"skipped_unlabelled_train_images": len(self.skipped_unlabelled)}
        return summarize(dataset) | skipped | {"skipped_unlabelled_ids": self.skipped_unlabelled[:SKIPPED_IDS_SHOWN]}


def _read_list(path: Path) -> list[tuple[str, str]]:
    """``(name for errors, id)`` per non-empty line of an image-set list file."""
    if not path.is_file():
        raise WsssError(f"{path}: file not found")
    try:
        lines = path.read_text().splitlines()
    except (OSError, UnicodeDecodeError) as err:
        raise WsssError(f"{path}: cannot read image list ({one_line(err)})") from None
    return [(f"{path} line {n} (id {line.strip()!r})", line.strip()) for n, line in enumerate(lines, 1) if line.strip()]


def _sbd_masks(aug: Path) -> dict[str, Path]:
    """SBD masks by id: ``SegmentationClassAug/*.png`` under ``aug`` (or ``aug`` itself), else ``cls/*.mat``."""
    for folder, pattern in ((aug / "SegmentationClassAug", "*.png"), (aug, "*.png"), (aug / "cls", "*.mat")):
        found = sorted(folder.glob(pattern)) if folder.is_dir() else []
        if found:
            return {path.stem: path for path in found}
    raise WsssError(f"{aug}: no SBD masks (expected SegmentationClassAug/*.png or cls/*.mat)")


def _read_sbd_mat(path: Path, name: str) -> np.ndarray:
    """The class label map of an SBD ``cls/<id>.mat`` file (struct ``GTcls``, field ``Segmentation``)."""
    import scipy.io

    try:
        record = scipy.io.loadmat(path, squeeze_me=True, struct_as_record=False)
        return np.asarray(record["GTcls"].Segmentation)
    except (OSError, ValueError, KeyError, AttributeError, TypeError, NotImplementedError) as err:
        raise WsssError(f"{name}: cannot read SBD mask {path} ({one_line(err)})") from None


def import_voc(root: Path, out: Path, aug: Path | None = None) -> dict[str, Any]:
    """Imports ``VOCdevkit/VOC2012`` (``root`` may also be ``VOCdevkit``) into ``out``.

    Splits train/val come from ``ImageSets/Segmentation``; masks from ``SegmentationClass`` (palette PNGs;
    RGB masks in the VOC palette are converted); image labels are the classes present in each mask.
    With ``aug`` (SBD), the train split becomes train_aug: VOC train plus every image with an SBD mask,
    minus VOC val (10,582 images for the full sets); VOC's own mask wins where both exist.

    Returns:
        the summary of the imported data set (as ``wsss ingest`` writes it).
    """
    check_replaceable(out, DATASET_ENTRIES, "data set")
    if not root.is_dir():
        raise WsssError(f"{root}: VOC root does not exist (expected VOCdevkit/VOC2012 or VOCdevkit)")
    voc = root / "VOC2012" if (root / "VOC2012").is_dir() else root
    lists = voc / "ImageSets" / "Segmentation"
    entries = {split: _read_list(lists / f"{split}.txt") for split in SPLITS}
    masks = {image_id: voc / "SegmentationClass" / f"{image_id}.png" for _, image_id in entries["train"]}
    masks |= {image_id: voc / "SegmentationClass" / f"{image_id}.png" for _, image_id in entries["val"]}
    sbd = _sbd_masks(aug) if aug is not None else {}
    if sbd:
        val_ids = {image_id for _, image_id in entries["val"]}
        known = {image_id for _, image_id in entries["train"]} | val_ids
        extra = [(f"{sbd[i]} (id {i!r})", i) for i in sorted(sbd) if i not in known]
        entries["train"] = [(n, i) for n, i in entries["train"] if i not in val_ids] + extra

    with atomic_dir(out) as tmp:
        builder = _Builder(tmp, list(VOC_CLASSES))
        for split in SPLITS:
            for name, image_id in entries[split]:
                image = voc / "JPEGImages" / f"{image_id}.jpg"
                if not image.is_file() and aug is not None and (aug / "img" / f"{image_id}.jpg").is_file():
                    image = aug / "img" / f"{image_id}.jpg"
                mask_path = masks.get(image_id) or sbd[image_id]
                mask = _read_sbd_mat(mask_path, name) if mask_path.suffix == ".mat" else None
                builder.add(name, image_id, split, image, image_id, mask_path, mask)
        return builder.finish(lists)


def _coco_mask(
    annotations: list[dict], height: int, width: int, category_index: dict[int, int], name: str
) -> tuple[np.ndarray, np.ndarray]:
    """Renders one image's instance annotations: class k+1 per instance, crowd regions 255 underneath.

    Instances are painted largest first so small objects stay visible where they overlap.

    Returns:
        (HxW uint8 mask, multi-hot labels of every annotated category, crowd included).
    """
    from pycocotools import mask as mask_utils

    mask = np.zeros((height, width), dtype=np.uint8)
    labels = np.zeros(len(category_index), dtype=np.int8)
    ordered = sorted(annotations, key=lambda a: (not a.get("iscrowd", 0), -float(a.get("area", 0))))
    for ann in ordered:
        where = f"{name} annotation {ann.get('id')!r}"
        if ann.get("category_id") not in category_index:
            raise WsssError(f"{where}: unknown category id {ann.get('category_id')!r}")
        k = category_index[ann["category_id"]]
        try:
            segmentation = ann["segmentation"]
            if isinstance(segmentation, list):
                rle = mask_utils.merge(mask_utils.frPyObjects(segmentation, height, width))
            elif isinstance(segmentation.get("counts"), list):
                rle = mask_utils.frPyObjects(segmentation, height, width)
            else:
                rle = segmentation
            region = mask_utils.decode(rle).astype(bool)
        except (KeyError, TypeError, ValueError, AttributeError, IndexError) as err:
            raise WsssError(f"{where}: cannot render segmentation ({one_line(err)})") from None
        mask[region] = 255 if ann.get("iscrowd", 0) else k + 1
        labels[k] = 1
    return mask, labels


def _read_coco(path: Path) -> dict[str, Any]:
    data = read_json_file(path, "COCO annotations")
    for key in ("images", "annotations", "categories"):
        if not isinstance(data, dict) or not isinstance(data.get(key), list):
            raise WsssError(f"{path}: missing list {key!r} (not a COCO instances file)")
    return data


def _coco_images(data: dict[str, Any], images_dir: Path, path: Path) -> Iterator[tuple[str, dict, list[dict]]]:
    """``(name for errors, image record, its annotations)`` per image of a COCO file."""
    by_image: dict[Any, list[dict]] = {}
    for ann in data["annotations"]:
        by_image.setdefault(ann.get("image_id"), []).append(ann)
    for record in data["images"]:
        name = f"{path} image {record.get('id')!r}"
        file_name = record.get("file_name")
        if not isinstance(file_name, str) or not file_name or escapes_root(file_name):
            raise WsssError(f"{name}: file_name {file_name!r} is missing, absolute or leaves {images_dir}")
        yield name, record, by_image.get(record.get("id"), [])


def import_coco(annotations: Path, images_dir: Path, out: Path, val: tuple[Path, Path] | None = None) -> dict[str, Any]:
    """Imports COCO instance annotations (split train) and optionally a second file (split val).

    The categories, sorted by id, become classes 1..C (the 80 COCO ids, which have gaps, map to 1..80);
    masks are rendered with pycocotools, crowd regions are 255 (ignore) unless an instance covers them;
    image labels are every annotated category. Ids are the file names without suffix.
    """
    check_replaceable(out, DATASET_ENTRIES, "data set")
    sources = [("train", annotations, images_dir)] + ([("val", *val)] if val is not None else [])
    files = {json_path: _read_coco(json_path) for _, json_path, _ in sources}
    categories = sorted(files[annotations]["categories"], key=lambda c: c["id"])
    for json_path, data in files.items():
        if sorted(data["categories"], key=lambda c: c["id"]) != categories:
            raise WsssError(f"{json_path}: categories differ from those of {annotations}")
    category_index = {c["id"]: k for k, c in enumerate(categories)}
    with atomic_dir(out) as tmp:
        builder = _Builder(tmp, [c["name"] for c in categories])
        for split, json_path, folder in sources:
            for name, record, anns in _coco_images(files[json_path], folder, json_path):
                height, width = int(record.get("height", 0)), int(record.get("width", 0))
                mask, labels = _coco_mask(anns, height, width, category_index, name)
                if split in LABELLED_SPLITS and not labels.any():
                    builder.skipped_unlabelled.append(Path(record["file_name"]).stem)
                    continue
                stem = Path(record["file_name"]).stem
                builder.add(name, stem, split, folder / record["file_name"], stem, json_path, mask, labels)
        return builder.finish(annotations)


def read_class_names(values: list[str]) -> list[str]:
    """Class names given on the command line: the names themselves, or one .txt (a name per line) /
    .json (``{"classes": [...]}`` or a list) file."""
    if len(values) != 1 or Path(values[0]).suffix.lower() not in (".txt", ".json"):
        names = values
    else:
        path = Path(values[0])
        if path.suffix.lower() == ".json":
            return read_classes(path)
        try:
            names = [line.strip() for line in path.read_text().splitlines() if line.strip()]
        except (OSError, UnicodeDecodeError) as err:
            raise WsssError(f"{path}: cannot read classes ({one_line(err)})") from None
    if not names or len(set(names)) != len(names):
        raise WsssError(f"classes: expected distinct names, got {names!r}")
    return list(names)


def _read_folder_manifest(path: Path) -> pd.DataFrame:
    if not path.is_file():
        raise WsssError(f"{path}: file not found")
    try:
        if path.suffix.lower() == ".parquet":
            frame = pd.read_parquet(path)
        else:
            frame = pd.read_csv(path, dtype=str, keep_default_na=False)
    except (OSError, ValueError, UnicodeDecodeError, pd.errors.ParserError) as err:
        raise WsssError(f"{path}: cannot read manifest ({one_line(err)})") from None
    for column in FOLDER_REQUIRED:
        if column not in frame.columns:
            expected = f"required: {', '.join(FOLDER_REQUIRED)}; optional: {', '.join(FOLDER_OPTIONAL)}"
            raise WsssError(f"{path}: missing column {column!r} ({expected})")
    return frame


def _label_names(cell: Any) -> list[str]:
    if cell is None or (isinstance(cell, float) and np.isnan(cell)):
        return []
    names = cell.split(LABEL_SEPARATOR) if isinstance(cell, str) else list(cell)
    return [n.strip() for n in names if str(n).strip()]


def import_folder(manifest_path: Path, classes: list[str], out: Path) -> dict[str, Any]:
    """Imports any images listed in a CSV/parquet manifest (paths relative to the manifest's folder).

    Columns: ``image``, ``split``, ``labels`` (class names separated by ``;``, or a list in parquet; may be
    empty outside train), optional ``mask`` (PNG, palette or VOC-palette RGB) and ``id`` (default: the
    image file name without suffix). Images are PNG/JPEG (RGB) or .tif/.tiff/.npy arrays with any number
    of bands; for arrays the train split's per-band 1st/99th percentiles are stored in ``bands.json``.
    """
    check_replaceable(out, DATASET_ENTRIES, "data set")
    frame = _read_folder_manifest(manifest_path)
    base = manifest_path.parent
    index = {name: k for k, name in enumerate(classes)}
    source = pd.DataFrame(
        {
            "id": (frame["id"] if "id" in frame else frame["image"].map(lambda p: PurePath(p).stem)).astype(str),
            "split": frame["split"],
            "image": frame["image"],
            "mask": frame["mask"].where(frame["mask"] != "", None) if "mask" in frame else None,
        }
    )
    labels = []
    for row, cell in enumerate(frame["labels"]):
        multi_hot = np.zeros(len(classes), dtype=np.int8)
        for label in _label_names(cell):
            if label not in index:
                known = ", ".join(classes)
                raise WsssError(
                    f"{manifest_path} row {row} (id {source['id'].iloc[row]!r}): unknown class {label!r} "
                    f"(classes: {known})"
                )
            multi_hot[index[label]] = 1
        labels.append(multi_hot)
    source["labels"] = labels
    check_rows(source, len(classes), manifest_path)  # paths are checked before any file is opened

    with atomic_dir(out) as tmp:
        builder = _Builder(tmp, list(classes))
        for row, item in enumerate(source.itertuples(index=False)):
            name = f"{manifest_path} row {row} (id {item.id!r})"
            mask = base / item.mask if isinstance(item.mask, str) else None
            builder.add(name, item.id, item.split, base / item.image, f"{row:06d}", mask, labels=item.labels)
        bands = None
        if source["image"].map(lambda p: PurePath(p).suffix.lower() in ARRAY_SUFFIXES).any():
            train = [r for r in builder.rows if r["split"] in LABELLED_SPLITS]
            bands = compute_bands([read_image(tmp / r["image"]) for r in train]) if train else None
        return builder.finish(manifest_path, bands)
