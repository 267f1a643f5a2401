"""The registered models as MLflow pyfunc models: images in (what a client has), masks out (what it wants).

Input: a DataFrame (or ``{"inputs": {"image": [...]}}`` over HTTP) with one column ``image``, one row per
image, each either a base64-encoded PNG/JPEG (the signature's type: what crosses HTTP) or a uint8 HxWx3 array
(numpy, or nested lists of integers 0..255 from JSON). Any size and aspect: each image is resized as the pipeline
resizes it (longer side the model's training size, own aspect ratio, ImageNet normalisation); photos are turned
by their EXIF orientation first.

Output, one row per image:

- segmenter (``wsss-segmenter``): ``mask`` (base64 palette PNG at the image's own size, pixel value = class index,
  0 background, k + 1 the k-th class), ``height``, ``width``, ``labels`` (JSON list of the class names in the mask)
  and ``class_names`` (JSON list, index k + 1 -> name) — the masks of ``wsss predict``, pixel for pixel; the params
  ``pixel_refine`` (``par``/``crf``, default ``none``) and ``pixel_refine_iterations`` (10) refine them with the
  image's pixels as ``wsss predict --pixel-refine`` does.
- classifier (``wsss-classifier``): ``probabilities`` (JSON object class -> sigmoid probability) and, with the
  param ``attention_masks=true``, ``mask``/``height``/``width``/``labels`` from the [CLS] attention painted by the
  rule its pseudo-mask stage applied (tuned thresholds and map blocks, views, pixel refiner; registered with the
  version: ``wsss predict --from-attention models:/...``), else empty strings.

A bad payload (not an image, floats or values outside 0..255, no rows) is refused with an
``INVALID_PARAMETER_VALUE`` MlflowException, which ``mlflow models serve`` answers with HTTP 400 and the reason.
"""

from __future__ import annotations

import base64
import binascii
import functools
import io
import json
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pandas as pd
import torch
from mlflow.exceptions import MlflowException
from mlflow.models import ModelSignature
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE
from mlflow.types.schema import ColSpec, ParamSchema, ParamSpec, Schema
from PIL import Image, ImageOps, UnidentifiedImageError

from wsss.lib.config import PREDICT_PIXEL_ITERATIONS
from wsss.lib.errors import WsssError
from wsss.lib.images import encode_mask_png
from wsss.lib.runtime import autocast, resolve_precision

IMAGE_COLUMN = "image"
MODEL_ARTIFACT = "model"  # the stage's model.pt inside the logged model
SEGMENTER_OUTPUTS = ("mask", "height", "width", "labels", "class_names")
CLASSIFIER_OUTPUTS = ("probabilities", "mask", "height", "width", "labels")
BATCH_SIZE = 16
MAX_SIDE = 8192  # larger images are refused (a decompression bomb guard for a network service)


class PayloadError(MlflowException):
    """A request the model cannot take; ``mlflow models serve`` answers it with HTTP 400 and this message."""

    def __init__(self, message: str) -> None:
        super().__init__(message, error_code=INVALID_PARAMETER_VALUE)


def encode_image(image: np.ndarray) -> str:
    """A uint8 HxWx3 array as the base64 PNG the signature takes (for clients that hold arrays)."""
    buffer = io.BytesIO()
    Image.fromarray(np.asarray(image, dtype=np.uint8)).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def decode_mask(encoded: str) -> np.ndarray:
    """A ``mask`` of the output as the HxW uint8 class-index array."""
    with Image.open(io.BytesIO(base64.b64decode(encoded))) as image:
        return np.array(image, dtype=np.uint8)


def decode_image(value: Any, index: int) -> np.ndarray:
    """One ``image`` cell -> uint8 HxWx3 (see the module docstring).

    Raises:
        PayloadError: not a base64 PNG/JPEG, not an HxWx3 (or HxW) array of integers in 0..255, or too large.
    """
    where = f"image {index}"
    if isinstance(value, bytes | str):
        try:
            data = base64.b64decode(value, validate=True)
            with Image.open(io.BytesIO(data)) as image:
                image.load()
                if max(image.size) > MAX_SIDE:
                    raise PayloadError(f"{where}: {image.size[0]}x{image.size[1]} exceeds {MAX_SIDE} px a side")
                return np.array(ImageOps.exif_transpose(image).convert("RGB"))
        except (binascii.Error, ValueError):
            raise PayloadError(f"{where}: not base64 (expected a base64-encoded PNG or JPEG)") from None
        except (UnidentifiedImageError, OSError, Image.DecompressionBombError):
            raise PayloadError(f"{where}: the base64 data is not a PNG or JPEG image") from None
    try:
        array = np.asarray(value)
        if array.dtype.kind in "USO":  # JSON numbers that MLflow's schema enforcement turned into strings
            array = array.astype(np.float64)
    except (ValueError, TypeError):
        raise PayloadError(f"{where}: not an array of numbers of equal-length rows (expected HxWx3)") from None
    if array.dtype.kind == "f" and array.size and np.isfinite(array).all() and (array == np.round(array)).all():
        array = array.astype(np.int64)  # whole numbers are pixel values, whatever JSON made of them
    if array.dtype.kind not in "ui" or array.size == 0:
        kind = "floats" if array.dtype.kind == "f" else f"{array.dtype} values"
        raise PayloadError(f"{where}: {kind}; expected uint8 pixels (integers 0..255) or a base64 PNG/JPEG")
    if array.ndim == 2:
        array = np.repeat(array[..., None], 3, axis=-1)
    if array.ndim != 3 or array.shape[-1] != 3:
        raise PayloadError(f"{where}: shape {array.shape}, expected HxWx3 (RGB) or HxW (grey)")
    if array.min() < 0 or array.max() > 255:
        raise PayloadError(f"{where}: values {array.min()}..{array.max()} outside 0..255")
    if max(array.shape[:2]) > MAX_SIDE:
        raise PayloadError(f"{where}: {array.shape[1]}x{array.shape[0]} exceeds {MAX_SIDE} px a side")
    return array.astype(np.uint8)


def read_images(model_input: Any) -> list[np.ndarray]:
    """The images of a request: a DataFrame (or mapping) with an ``image`` column, or a list of images."""
    if isinstance(model_input, dict):
        model_input = model_input.get(IMAGE_COLUMN)
        values = [] if model_input is None else list(model_input)
    elif isinstance(model_input, pd.DataFrame):
        if IMAGE_COLUMN not in model_input.columns:
            raise PayloadError(f"no {IMAGE_COLUMN!r} column (columns: {', '.join(map(str, model_input.columns))})")
        values = model_input[IMAGE_COLUMN].tolist()
    elif isinstance(model_input, np.ndarray) and model_input.dtype.kind in "ui":
        values = [model_input] if model_input.ndim in (2, 3) else list(model_input)
    else:
        values = list(model_input) if isinstance(model_input, list | tuple) else [model_input]
    if not values:
        raise PayloadError("no images (send at least one row in the 'image' column)")
    return [decode_image(value, i) for i, value in enumerate(values)]


def _mask_columns(masks: Sequence[np.ndarray], class_names: Sequence[str]) -> dict[str, list]:
    names = ["background", *class_names]
    return {
        "mask": [base64.b64encode(encode_mask_png(mask)).decode("ascii") for mask in masks],
        "height": [int(mask.shape[0]) for mask in masks],
        "width": [int(mask.shape[1]) for mask in masks],
        "labels": [json.dumps([names[v] for v in np.unique(mask) if 0 < v < len(names)]) for mask in masks],
    }


CPU = torch.device("cpu")


def serving_precision(model_config: dict[str, Any] | None) -> str:
    """The precision a served model runs at: its registering run's ``trainer.precision`` (``auto``: decided on
    the serving machine, :func:`wsss.lib.runtime.decide_precision`); fp32 for a version registered without one."""
    return resolve_precision(str((model_config or {}).get("precision", "fp32")), CPU, announce=False)


def pixel_refine_param(params: dict[str, Any]) -> tuple[str, int]:
    """The segmenter's ``pixel_refine``/``pixel_refine_iterations`` params (off by default), checked."""
    from wsss.lib.pixel_refine import check_pixel_refine

    try:
        return check_pixel_refine(str(params.get("pixel_refine", "none")),
                                  params.get("pixel_refine_iterations", PREDICT_PIXEL_ITERATIONS))  # fmt: skip
    except WsssError as error:
        raise MlflowException(str(error), INVALID_PARAMETER_VALUE) from None


class SegmenterModel(mlflow.pyfunc.PythonModel):
    """``wsss-segmenter``: images -> masks at each image's own size (``wsss predict --model``)."""

    _skip_type_hint_validation = True  # the schema is the explicit signature (:func:`signature`), not type hints

    def load_context(self, context) -> None:
        from wsss.lib.artifacts import load_segmenter

        self.model, record = load_segmenter(context.artifacts[MODEL_ARTIFACT])
        self.size = int(record["img_size"])
        self.class_names = list(record.get("classes", []))
        self.precision = serving_precision(context.model_config)

    def predict(self, context, model_input, params: dict[str, Any] | None = None) -> pd.DataFrame:
        from wsss.lib.inference import segment_images

        images = read_images(model_input)
        refiner = pixel_refine_param(params or {})
        with torch.no_grad(), autocast(self.precision, CPU):
            masks = segment_images(self.model, images, self.size, CPU, BATCH_SIZE, refiner)
        return pd.DataFrame(
            {**_mask_columns(masks, self.class_names), "class_names": [json.dumps(self.class_names)] * len(masks)}
        )


class ClassifierModel(mlflow.pyfunc.PythonModel):
    """``wsss-classifier``: images -> class probabilities, and the attention masks on request."""

    _skip_type_hint_validation = True

    def load_context(self, context) -> None:
        from wsss.lib.artifacts import load_classifier

        self.model, record = load_classifier(context.artifacts[MODEL_ARTIFACT])
        self.class_names = list(record.get("classes", []))
        self.rule = dict(context.model_config or {})  # the pseudo-mask stage's rule (inference.decided_rule)
        self.precision = serving_precision(context.model_config)

    def predict(self, context, model_input, params: dict[str, Any] | None = None) -> pd.DataFrame:
        images = read_images(model_input)
        with autocast(self.precision, CPU):
            return self._predict(images, params or {})

    def _predict(self, images: list[np.ndarray], params: dict[str, Any]) -> pd.DataFrame:
        from wsss.lib.datasets import aspect_size, image_tensor, normalize
        from wsss.lib.inference import attention_masks, rule_arguments

        if params.get("attention_masks"):
            masks, probs = attention_masks(self.model, images, CPU, batch_size=BATCH_SIZE, **rule_arguments(self.rule))
            columns = _mask_columns(masks, self.class_names)
        else:
            size, patch = self.model.grid_size[0] * self.model.patch_size, self.model.patch_size
            with torch.no_grad():
                probs = torch.cat(
                    [
                        torch.sigmoid(
                            self.model(normalize(image_tensor(x, aspect_size(*x.shape[:2], size, patch)))[None])
                        )
                        for x in images
                    ]
                ).float()
            columns = {"mask": [""] * len(images), "height": [0] * len(images), "width": [0] * len(images)}
            columns["labels"] = ["[]"] * len(images)
        probabilities = [json.dumps(dict(zip(self.class_names, map(float, row), strict=True))) for row in probs]
        return pd.DataFrame({"probabilities": probabilities, **columns})


def signature(kind: str) -> ModelSignature:
    """Input: one ``image`` column (base64 PNG/JPEG); output: the columns of the module docstring."""
    inputs = Schema([ColSpec("string", IMAGE_COLUMN)])
    if kind == "segmenter":
        outputs = Schema(
            [
                ColSpec(t, n)
                for n, t in zip(SEGMENTER_OUTPUTS, ("string", "long", "long", "string", "string"), strict=True)
            ]
        )
        refiner = [
            ParamSpec("pixel_refine", "string", "none"),
            ParamSpec("pixel_refine_iterations", "long", PREDICT_PIXEL_ITERATIONS),
        ]
        return ModelSignature(inputs, outputs, ParamSchema(refiner))
    outputs = Schema(
        [ColSpec(t, n) for n, t in zip(CLASSIFIER_OUTPUTS, ("string", "string", "long", "long", "string"), strict=True)]
    )
    return ModelSignature(inputs, outputs, ParamSchema([ParamSpec("attention_masks", "boolean", False)]))


def input_example(size: int = 48) -> pd.DataFrame:
    """A small real-looking request: one base64 PNG (a colour gradient with a disc)."""
    ys, xs = np.mgrid[0:size, 0:size]
    image = np.stack([xs * 255 // size, ys * 255 // size, np.full_like(xs, 96)], axis=-1).astype(np.uint8)
    image[(ys - size / 2) ** 2 + (xs - size / 3) ** 2 < (size / 4) ** 2] = (230, 40, 40)
    return pd.DataFrame({IMAGE_COLUMN: [encode_image(image)]})


def stage_code(dest: Path) -> Path:
    """A copy of the ``wsss`` package's Python files that serving imports (models, lib) under ``dest/wsss``:
    logged as the model's ``code_paths``, so a fresh environment needs only the requirements."""
    source = Path(__file__).resolve().parents[1]  # the package root (its __init__.py, models/, lib/)
    package = dest / "wsss"
    package.mkdir(parents=True)
    shutil.copy2(source / "__init__.py", package / "__init__.py")
    for sub in ("models", "lib"):
        shutil.copytree(source / sub, package / sub, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    return package


@functools.cache
def _serving_imports() -> frozenset[str]:
    """Top-level names of every module that importing the serving path loads, in a fresh interpreter (once per
    process: the code does not change under a running process)."""
    probe = (
        "import sys, wsss.lib.serving, wsss.lib.inference, wsss.lib.artifacts, wsss.lib.mask_rule; "
        "print('\\n'.join(sorted({m.split('.')[0] for m in sys.modules})))"
    )
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    return frozenset(result.stdout.split())


def requirements(package: Path) -> list[str]:
    """Pinned distributions of the third-party modules the staged ``package``'s files import at module level
    and that loading the serving path really imports (measured in a fresh interpreter, so neither a lazy import
    of the pipeline (dvc, boto3) nor anything the caller imported sneaks in); pip resolves what they need."""
    import ast
    import importlib.metadata

    direct = set()
    for file in package.rglob("*.py"):
        for node in ast.parse(file.read_text()).body:
            if isinstance(node, ast.Import):
                direct |= {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                direct.add(node.module.split(".")[0])
    loaded = _serving_imports()
    owners = importlib.metadata.packages_distributions()
    dists = set()
    for name in direct & set(loaded):
        found = owners.get(name, [])
        # a module several distributions fill (mlflow, mlflow-skinny, ...): the one named after it
        same = [d for d in found if d.lower().replace("-", "_") == name.lower()]
        dists |= {d for d in same or found if d.lower() != "wsss"}
    return sorted(f"{dist}=={importlib.metadata.version(dist)}" for dist in dists)


def log_pyfunc(
    kind: str,
    model_file: Path,
    registered_name: str | None,
    model_config: dict[str, Any] | None = None,
    card: str | None = None,
) -> Any:
    """Logs ``model_file`` (a stage's model.pt) as the pyfunc of ``kind`` in the active run; returns MLflow's
    ModelInfo. The code travels with the model (``code_paths``), its environment is :func:`requirements`;
    ``model_config``: the classifier's attention-mask rule (:func:`wsss.lib.inference.decided_rule`);
    ``card``: Markdown stored as ``MODEL_CARD.md`` among the model's artifacts."""
    python_model = SegmenterModel() if kind == "segmenter" else ClassifierModel()
    with tempfile.TemporaryDirectory() as tmp:
        package = stage_code(Path(tmp))
        artifacts = {MODEL_ARTIFACT: str(model_file)}
        if card is not None:
            (Path(tmp) / "MODEL_CARD.md").write_text(card)
            artifacts["model_card"] = str(Path(tmp) / "MODEL_CARD.md")
        return mlflow.pyfunc.log_model(
            name=kind,
            python_model=python_model,
            artifacts=artifacts,
            code_paths=[str(package)],
            pip_requirements=requirements(package),
            signature=signature(kind),
            input_example=input_example(),
            model_config=model_config,
            registered_model_name=registered_name,
        )
