"""What the stages hand each other: file names, where each stage writes, and how to read it back.

A stage imports this module, never another stage: the loaders here are the one way to open a stage's
output (``model.pt`` of either model, the ingested data set), so a consumer depends on this file and not
on the training code that wrote it.
"""

from __future__ import annotations

import json
import pickle
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import timm
import torch
import torch.nn.functional as F

import wsss.models  # noqa: F401  (registers the wsss_vit_* and wsss_cam_vit_* models with timm)
from wsss.lib.config import Params
from wsss.lib.dataset_format import DatasetIndex, read_classes, read_manifest, validate_dataset
from wsss.lib.datasets import SplitData, StreamedSplit, image_batches, load_split, normalize
from wsss.lib.errors import WsssError
from wsss.lib.images import BANDS_FILE, one_line, read_bands
from wsss.models.segmenter import Segmenter
from wsss.models.token_masking_vit import TokenMaskingViT

MODEL_FILE = "model.pt"
CHECKPOINT_FILE = "checkpoint.pt"
HISTORY_FILE = "history.csv"


def read_ingested(out: Path) -> DatasetIndex:
    """Reads the output of the ``ingest`` stage; image paths resolve against the recorded source root."""
    out = Path(out)
    source_file = out / "source.json"
    try:
        root = json.loads(source_file.read_text())["root"]
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as err:
        raise WsssError(f"{source_file}: cannot read the data set root ({one_line(err)})") from None
    manifest_path = out / "manifest.parquet"
    classes, manifest = read_classes(out / "classes.json"), read_manifest(manifest_path)
    dataset = DatasetIndex(Path(root), classes, manifest, read_bands(out / BANDS_FILE))
    validate_dataset(dataset, manifest_path)
    return dataset


def pseudo_mask_path(params: Params) -> Path:
    """Where the pseudo-mask stage writes the mask table of its split."""
    return Path(params.pseudo_masks.out) / f"{params.pseudo_masks.split}.parquet"


def segmenter_dir(params: Params, mask_source: str) -> Path:
    """Output folder: ``segmenter.out`` for pseudo masks, ``segmenter.out + "_gt"`` for the GT upper bound."""
    return Path(params.segmenter.out + ("_gt" if mask_source == "gt" else ""))


def refusal(path: Path, err: pickle.UnpicklingError) -> str:
    """The line for a file ``torch.load(weights_only=True)`` refused: it would run code when unpickled."""
    found = re.search(r"Unsupported global: GLOBAL (\S+)", str(err))
    called = f" ({found[1]})" if found else ""
    return f"{path}: refused, holds code that loading would run{called}, not only tensors and plain data"


def load_classifier(path: str | Path, device: torch.device | str = "cpu") -> tuple[TokenMaskingViT, dict]:
    """Rebuilds a trained classifier from ``model.pt``; returns it in eval mode with its saved record."""
    path = Path(path)
    if not path.is_file():
        raise WsssError(f"{path}: classifier checkpoint not found (run `wsss train-classifier` first)")
    try:
        # Plain data only (tensors, numbers, strings, lists, dicts): a file that carries code is refused, not run.
        record = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise WsssError(refusal(path, err)) from None
    except (RuntimeError, EOFError, ValueError, OSError) as err:
        raise WsssError(f"{path}: not a usable classifier checkpoint ({one_line(err)})") from None
    try:
        model = timm.create_model(record["model_name"], **record["model_kwargs"])
        model.load_state_dict(record["state_dict"])
    except (KeyError, TypeError, RuntimeError, ValueError) as err:
        raise WsssError(f"{path}: not a usable classifier checkpoint ({one_line(err)})") from None
    model.class_names = list(record.get("classes", []))  # travels with the module (e.g. into MLflow's pickle)
    return model.to(device).eval(), record


def load_segmenter(path: str | Path, device: torch.device | str = "cpu") -> tuple[Segmenter, dict[str, Any]]:
    """Rebuilds a trained segmenter from ``model.pt``; returns it in eval mode with its saved record."""
    path = Path(path)
    if not path.is_file():
        raise WsssError(f"{path}: segmenter model not found (run `wsss train-segmenter` first)")
    try:
        record = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise WsssError(refusal(path, err)) from None
    except (RuntimeError, EOFError, ValueError, OSError) as err:
        raise WsssError(f"{path}: not a usable segmenter model ({one_line(err)})") from None
    try:
        model = Segmenter(**record["model_kwargs"])
        model.load_state_dict(record["state_dict"])
    except (KeyError, TypeError, RuntimeError, ValueError) as err:
        raise WsssError(f"{path}: not a usable segmenter model ({one_line(err)})") from None
    model.class_names = list(record.get("classes", []))  # travels with the module (e.g. into MLflow's pickle)
    return model.to(device).eval(), record


def load_map_model(path: str | Path, device: torch.device | str = "cpu") -> TokenMaskingViT:
    """The trained classifier with its closed heads physically removed (``prune_heads``).

    The pruned model gives the gated eval model's maps and logits (same map block, same open heads) at
    less cost: closed heads never reach a map or a logit.
    """
    model, _ = load_classifier(path, device)
    return model.prune_heads()


@torch.no_grad()
def iter_predictions(
    model: Segmenter, data: SplitData | StreamedSplit, device: torch.device | str, batch_size: int, num_workers: int = 0
) -> Iterator[tuple[str, np.ndarray]]:
    """``(id, HxW uint8 mask)`` of each image of a split (in split order when its images share one size):
    logits of the image at its loaded size upsampled to its original size before the argmax. One batch at
    a time is in memory."""
    model.eval()
    for indices, images in image_batches(data, batch_size, num_workers):
        logits = model(normalize(images).to(device))
        for index, single in zip(indices, logits, strict=True):
            full = F.interpolate(
                single[None].float(), size=tuple(data.original_sizes[index]), mode="bilinear", align_corners=False
            )
            yield data.ids[index], full[0].argmax(0).to(torch.uint8).cpu().numpy()


def predict_images(
    model: Segmenter, data: SplitData | StreamedSplit, device: torch.device | str, batch_size: int, num_workers: int = 0
) -> dict[str, np.ndarray]:
    """:func:`iter_predictions` as ``{id: mask}`` (for a few images; a split is scored as it streams)."""
    return dict(iter_predictions(model, data, device, batch_size, num_workers))


def classifier_images(model: TokenMaskingViT, dataset: DatasetIndex, split: str) -> SplitData:
    """The images of ``split`` in memory as the classifier's maps see them (a model batch, the tuning
    sample, a picture's rows): longer side its trained input size, aspect kept (patch multiples)."""
    return load_split(dataset, split, model.grid_size[0] * model.patch_size, False, model.patch_size)


def segmenter_split(model: Segmenter, dataset: DatasetIndex, split: str, img_size: int) -> StreamedSplit:
    """A split as the segmenter predicts it: longer side ``img_size``, aspect kept (its stride's multiples)."""
    return StreamedSplit(dataset, split, img_size, model.size_multiple)


def predict_split(
    model: Segmenter,
    dataset: DatasetIndex,
    split: str,
    img_size: int,
    device: torch.device | str,
    batch_size: int,
) -> Iterator[tuple[str, np.ndarray]]:
    """Original-size predicted masks ``(id, HxW uint8)`` for every image of ``split``, streamed."""
    return iter_predictions(model, segmenter_split(model, dataset, split, img_size), device, batch_size)
