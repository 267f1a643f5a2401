"""nn.Modules only: the token-masking ViT (registered with timm), its gates and the segmenter."""

from models.gates import HardConcreteGate
from models.segmenter import Segmenter
from models.token_masking_vit import GatedAttention, TokenMaskingViT, load_timm_vit_weights

__all__ = ["GatedAttention", "HardConcreteGate", "Segmenter", "TokenMaskingViT", "load_timm_vit_weights"]
