"""nn.Modules only: the token-masking ViT and its CAM baseline (registered with timm), gates, segmenter."""

from wsss.models.cam_vit import CamViT
from wsss.models.gates import HardConcreteGate
from wsss.models.segmenter import Segmenter
from wsss.models.token_masking_vit import GatedAttention, TokenMaskingViT, load_timm_vit_weights

__all__ = ["CamViT", "GatedAttention", "HardConcreteGate", "Segmenter", "TokenMaskingViT", "load_timm_vit_weights"]
