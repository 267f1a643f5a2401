"""Inference on images a user has (arrays in memory, any size): what ``wsss predict`` and the served models run.

Each image is resized as the pipeline's stages resize it (longer side the model's input size, its own aspect
ratio, in multiples of the classifier's patch or the segmenter's stride); masks come back at each image's size.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from wsss.lib.config import PseudoMaskParams, map_block_count
from wsss.lib.datasets import SplitData, aspect_size, image_tensor
from wsss.lib.errors import WsssError


def decided_rule(settings: PseudoMaskParams, stats: Mapping[str, Any]) -> dict[str, Any]:
    """The attention-mask rule the pseudo-mask stage applied (its ``stats.json``: thresholds and map blocks as tuned,
    the pixel refiner with its picked iterations; the views of ``settings``), as a registered classifier carries it
    (``model_config``) so that its masks of new images are made as its pseudo masks were.

    Raises:
        WsssError: ``stats`` lacks a key of the rule (written by an older stage: run ``wsss pseudo-masks`` again).
    """
    try:
        refiner = str(stats["pixel_refine"])
        return {
            "fg_threshold": float(stats["fg_threshold"]),
            "bg_threshold": float(stats["bg_threshold"]),
            "map_blocks": map_block_count(str(stats["map_blocks"])),
            "scales": [float(scale) for scale in settings.scales],
            "flip": bool(settings.flip),
            "refine": int(stats["refine_iterations"]) if stats["refine"] == "affinity" else 0,
            "pixel_refine": refiner,
            "pixel_refine_iterations": int(stats["pixel_refine_iterations"]) if refiner != "none" else 0,
        }
    except KeyError as missing:
        raise WsssError(
            f"pseudo-mask stats: no {missing} (an older stage wrote them: run `wsss pseudo-masks`)"
        ) from None


def rule_arguments(config: Mapping[str, Any]) -> dict[str, Any]:
    """:func:`attention_masks`' keyword arguments from a registered classifier's rule (:func:`decided_rule`); a key
    that a version registered before it existed lacks keeps the argument's default."""
    arguments: dict[str, Any] = {}
    if "fg_threshold" in config:
        arguments["thresholds"] = (float(config["fg_threshold"]), float(config["bg_threshold"]))
    for key in ("map_blocks", "scales", "flip", "refine"):
        if key in config:
            arguments[key] = config[key]
    if config.get("pixel_refine", "none") != "none":
        arguments["pixel_refine"] = (str(config["pixel_refine"]), int(config["pixel_refine_iterations"]))
    return arguments


def model_input_size(model: torch.nn.Module, from_attention: bool, trained_size: int | None) -> int | None:
    """The longer side images are resized to: a classifier's trained input (its grid times its patch), a
    segmenter's training size when known."""
    return model.grid_size[0] * model.patch_size if from_attention else trained_size


def in_chans(model: torch.nn.Module) -> int:
    """Input channels of a model: those of its first convolution."""
    return next(m for m in model.modules() if isinstance(m, torch.nn.Conv2d)).in_channels


def _model_batch(model: torch.nn.Module, pixels: Sequence[np.ndarray], size: int, from_attention: bool) -> SplitData:
    """uint8 HxWxC images, each at its own aspect ratio with the longer side ``size`` in multiples of the model's
    patch (classifier) or stride (segmenter), as the pipeline's stages resize them."""
    multiple = model.patch_size if from_attention else model.size_multiple
    return SplitData(
        ids=[str(i) for i in range(len(pixels))],
        images=[image_tensor(image, aspect_size(*image.shape[:2], size, multiple)) for image in pixels],
        labels=torch.zeros(len(pixels), 0),
        masks=None,
        original_sizes=[image.shape[:2] for image in pixels],
    )


def segment_images(
    model: torch.nn.Module,
    pixels: Sequence[np.ndarray],
    size: int,
    device: torch.device,
    batch_size: int = 16,
    pixel_refine: tuple[str, int] = ("none", 0),
) -> list[np.ndarray]:
    """The segmenter's HxW uint8 mask of each uint8 HxWxC image, at the image's own size; ``pixel_refine``
    (``par``/``crf``, iterations): refined with the image's pixels (:func:`wsss.lib.pixel_refine.refine_predicted`)."""
    from wsss.lib.artifacts import predict_images
    from wsss.lib.pixel_refine import refine_predicted

    masks = predict_images(model, _model_batch(model, pixels, size, False), device, batch_size)
    found = [masks[str(i)] for i in range(len(pixels))]
    return found if pixel_refine[0] == "none" else refine_predicted(pixels, found, *pixel_refine)


@torch.no_grad()
def attention_masks(
    model: torch.nn.Module,
    pixels: Sequence[np.ndarray],
    device: torch.device,
    thresholds: tuple[float, float] = (0.5, 0.2),
    batch_size: int = 16,
    scales: Sequence[float] = (1.0,),
    flip: bool = False,
    map_blocks: int | None = None,
    refine: int = 0,
    size: int | None = None,
    pixel_refine: tuple[str, int] = ("none", 0),
) -> tuple[list[np.ndarray], torch.Tensor]:
    """Masks painted from the [CLS]_c attention of the classes the classifier predicts (the pseudo-mask rule),
    one per uint8 HxWxC image at its own size, and the class probabilities ``[N, C]``; ``size``: the longer side
    the images are resized to (default: the classifier's trained input); ``pixel_refine``: the rule's pixel
    refiner and its iterations."""
    from wsss.lib.mask_rule import attention_maps, finish_masks, normalized_maps, paint, present_classes

    data = _model_batch(model, pixels, size or model_input_size(model, True, None), True)
    # As in the pseudo-mask stage: closed heads removed, same maps and logits at less cost.
    maps, probs = attention_maps(
        model.prune_heads(), data.images, device, batch_size, scales, flip, map_blocks, refine=refine
    )
    painted, present = [], []
    for i in range(len(pixels)):
        p = probs[i].numpy()
        present.append(present_classes(None, p))
        painted.append(
            paint(normalized_maps(maps[i][present[-1]], data.original_sizes[i]), present[-1], p, *thresholds)
        )
    images = [image_tensor(image) for image in pixels] if pixel_refine[0] != "none" else None
    return finish_masks(painted, present, images, *pixel_refine), probs
