"""nn.Modules only: the token-masking ViT and its CAM baseline (registered with timm), gates, segmenter."""

from models.cam_vit import CamViT
from models.gates import HardConcreteGate
from models.segmenter import Segmenter
from models.token_masking_vit import GatedAttention, TokenMaskingViT, load_timm_vit_weights

__all__ = ["CamViT", "GatedAttention", "HardConcreteGate", "Segmenter", "TokenMaskingViT", "load_timm_vit_weights"]
