"""``wsss-research diagnose-maps``: in which block and which heads the class-token attention is class-specific.

For training images with at least two ground-truth classes, every block's [CLS]_c -> patch attention rows
are scored with the pseudo-mask stage's class-specificity measure (share of CLS_c's attention mass on class
c's pixels among the image's foreground pixels; equal to the area share when the map does not tell the
classes apart). Per block: the mean over open heads (what the pseudo masks use in the map block), over
all heads (do closed heads hide a signal?) and the best single head; the mean pairwise cosine similarity
of the present classes' token states entering the block (the queries are linear in them: tokens that have
become alike attend alike, whatever the masking); and the pseudo-mask mIoU that the open-head maps of each
block would give on these images (thresholds tuned per block, as the stage does).
Then one row per aggregation ``pseudo_masks.map_blocks`` can choose (``last``, ``last2``, ..., ``all``):
the open-head maps summed over those blocks, scored the same way; and the same aggregations after one step
of ``pseudo_masks.refine: affinity`` (MCTformer's patch affinity), with what the affinity does to a map:
``affinity_patches`` (how many patches a row spreads over: exp of its entropy), ``affinity_top3`` (the
mass of a row's three largest entries) and ``refined_contrast`` (std over patches of ``A m`` / of ``m``).
For a ``patch_cam`` classifier (MCTformer-V2's fusion) also each aggregation times ``ReLU(PatchCAM)`` (``fused
...``: the maps its pseudo masks use) and the PatchCAMs alone: the block rows above stay the class tokens' own
attention, so the table tells where the class specificity of the fused maps comes from.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from wsss.lib.artifacts import classifier_images
from wsss.lib.dataset_format import DatasetIndex
from wsss.lib.datasets import normalize, shape_groups
from wsss.lib.errors import WsssError
from wsss.lib.images import read_mask
from wsss.lib.mask_rule import block_candidates, class_specificity, normalized_maps, tune_thresholds
from wsss.models.token_masking_vit import TokenMaskingViT, affinity_transition, propagate_affinity


@torch.no_grad()
def block_class_rows(
    model: TokenMaskingViT, images: torch.Tensor
) -> tuple[list[torch.Tensor], list[torch.Tensor], torch.Tensor]:
    """Per block: the class-token -> patch attention ``[B, H, C, h, w]`` (gates not applied) and the class
    tokens' normalised input states ``[B, C, D]`` (what the block's queries are computed from); and the
    patch affinity ``[B, P, P]`` the refinement uses (open heads' mean patch -> patch attention, summed
    over the blocks with an open head, rows normalised over patches)."""
    model.eval()
    x, (h, w) = model._embed(normalize(images))
    Q, P = model.num_classes, h * w
    mask = model.attn_mask(Q, x.shape[1], x.device)
    rows, states, affinity = [], [], x.new_zeros(x.shape[0], P, P)
    for blk in model.blocks:
        tokens = blk.norm1(x)
        attn = blk.attn.query_attention(tokens, Q + P, mask)
        rows.append(attn[:, :, :Q, Q : Q + P].reshape(*attn.shape[:2], Q, h, w))
        states.append(tokens[:, :Q])
        heads = blk.attn.open_heads()
        if heads.any():
            affinity += attn[:, heads, Q:, Q : Q + P].mean(dim=1)
        x = blk(x, attn_mask=mask)
    return rows, states, affinity_transition(affinity)


def pairwise_cosine(states: torch.Tensor) -> float:
    """Mean cosine similarity over the distinct pairs of ``[K, D]`` token states (K >= 2)."""
    unit = F.normalize(states, dim=-1)
    gram = unit @ unit.T
    K = states.shape[0]
    return float((gram.sum() - gram.diagonal().sum()) / (K * (K - 1)))


def multi_class_train_images(dataset: DatasetIndex, limit: int) -> tuple[DatasetIndex, list[np.ndarray]]:
    """The first ``limit`` training images whose ground truth holds >= 2 classes: their index and masks.

    Raises:
        WsssError: no such image.
    """
    rows = dataset.split("train")
    positions, gts = [], []
    for position, path in enumerate(rows["mask"].tolist()):
        if isinstance(path, str):
            gt = read_mask(dataset.root / path)
            if len(np.setdiff1d(np.unique(gt), [0, 255])) >= 2:
                positions.append(position)
                gts.append(gt)
        if len(gts) == limit:
            break
    if not gts:
        raise WsssError(f"{dataset.root}: no training image with ground truth and two classes")
    return DatasetIndex(dataset.root, dataset.classes, rows.iloc[positions], dataset.bands), gts


@torch.no_grad()
def specificity_by_block(model: TokenMaskingViT, dataset: DatasetIndex, max_images: int = 300) -> pd.DataFrame:
    """One row per block: open heads, specificity of the open-head mean, the all-head mean, the best head.

    Raises:
        WsssError: the model has one shared [CLS] token, or no training image has two classes.
    """
    if not isinstance(model, TokenMaskingViT) or not model.class_token_per_class:
        raise WsssError("diagnose-maps needs a classifier with one [CLS] token per class (wsss_vit_*)")
    subset, gts = multi_class_train_images(dataset, max_images)
    data = classifier_images(model, subset, "train")
    open_heads = [blk.attn.open_heads().cpu() for blk in model.blocks]
    num_heads = model.blocks[0].attn.num_heads
    # per block: lists of (attention share, area share) for open-mean, all-mean and each head
    scores = [{key: [] for key in ("open", "all", *range(num_heads))} for _ in model.blocks]
    areas, cosines = [], [[] for _ in model.blocks]
    mask_samples = [[] for _ in model.blocks]  # (normalised maps, classes, probabilities, gt) per block
    candidates = {name: model.map_layers(count) for name, count in block_candidates(model).items()}
    fusion = model.patch_head is not None  # MCTformer-V2's PatchCAMs: scored alone and fused with each aggregation
    extra = ("patchcam", *(f"fused {n}" for n in candidates)) if fusion else ()
    agg_scores = {name: [] for name in (*candidates, *(f"refined {n}" for n in candidates), *extra)}
    agg_samples = {name: [] for name in agg_scores}
    spread, top3, contrast = [], [], {name: [] for name in candidates}
    groups = (
        group for start in range(0, len(gts), 64) for group in shape_groups(data.images[start : start + 64], start)
    )
    for indices, images in groups:  # images of one size (each at its own aspect ratio)
        batch_rows, batch_states, batch_affinity = block_class_rows(model, images)
        probs = torch.sigmoid(model(normalize(images))).numpy()
        if fusion:
            grid = tuple(batch_rows[0].shape[-2:])
            cams = F.relu(model.patch_cams(model.forward_features(normalize(images)), grid))
        for i, gt in enumerate(gts[k] for k in indices):
            classes = np.setdiff1d(np.unique(gt), [0, 255]).astype(int) - 1
            for block, attn in enumerate(batch_rows):
                cosines[block].append(pairwise_cosine(batch_states[block][i, classes]))
                heads = attn[i][:, classes]  # [H, K, h, w]
                views = {"all": heads.mean(0), **{head: heads[head] for head in range(num_heads)}}
                if open_heads[block].any():
                    views["open"] = heads[open_heads[block]].mean(0)
                    maps = normalized_maps(views["open"], gt.shape)
                    mask_samples[block].append((maps, classes, probs[i], gt))
                for key, maps in views.items():
                    shares, area = map_specificity(maps, gt, classes)
                    scores[block][key] += shares
                    if block == 0 and key == "all":
                        areas += area
            transition = batch_affinity[i]
            spread.append(float(torch.exp(-(transition * transition.clamp_min(1e-12).log()).sum(-1)).mean()))
            top3.append(float(transition.topk(3, dim=-1).values.sum(-1).mean()))
            for name, layers in candidates.items():
                summed = sum(batch_rows[b][i][open_heads[b]][:, classes].mean(0) for b in layers)
                refined = propagate_affinity(summed, transition)
                contrast[name] += (refined.flatten(1).std(1) / summed.flatten(1).std(1).clamp_min(1e-12)).tolist()
                views = [(name, summed), (f"refined {name}", refined)]
                if fusion:
                    views += [(f"fused {name}", summed * cams[i][classes])]
                    views += [("patchcam", cams[i][classes])] if name == "last" else []
                for key, maps in views:
                    agg_scores[key] += map_specificity(maps, gt, classes)[0]
                    agg_samples[key].append((normalized_maps(maps, gt.shape), classes, probs[i], gt))
    table = []
    for block, per_key in enumerate(scores):
        heads = [float(np.mean(per_key[h])) for h in range(num_heads)]
        table.append(
            {
                "block": block,
                "open_heads": int(open_heads[block].sum()),
                "open_mean": float(np.mean(per_key["open"])) if per_key["open"] else float("nan"),
                "all_heads_mean": float(np.mean(per_key["all"])),
                "best_head": int(np.argmax(heads)),
                "best_head_share": max(heads),
                "area_share": float(np.mean(areas)),
                "class_token_cosine": float(np.mean(cosines[block])),
                "tuned_miou": tune_thresholds(mask_samples[block], model.num_classes)[2]
                if mask_samples[block]
                else float("nan"),
            }
        )
    affinity = {"affinity_patches": float(np.mean(spread)), "affinity_top3": float(np.mean(top3))}
    for kind in ("", "refined ", *(("fused ",) if fusion else ())):
        for name, layers in candidates.items():
            key, refine = f"{kind}{name}", kind == "refined "
            table.append(
                {
                    "block": f"{key} {layers}",
                    "open_heads": int(sum(open_heads[b].sum() for b in layers)),
                    "open_mean": float(np.mean(agg_scores[key])),
                    "area_share": float(np.mean(areas)),
                    "tuned_miou": tune_thresholds(agg_samples[key], model.num_classes)[2],
                    **({**affinity, "refined_contrast": float(np.mean(contrast[name]))} if refine else {}),
                }
            )
    if fusion:
        table.append(
            {
                "block": "patchcam (the PatchCAM maps alone)",
                "open_mean": float(np.mean(agg_scores["patchcam"])),
                "area_share": float(np.mean(areas)),
                "tuned_miou": tune_thresholds(agg_samples["patchcam"], model.num_classes)[2],
            }
        )
    return pd.DataFrame(table)


def map_specificity(maps: torch.Tensor, gt: np.ndarray, classes: np.ndarray) -> tuple[list[float], list[float]]:
    """:func:`class_specificity` of ``[K, h, w]`` maps upsampled (bilinear) to the ground truth's size."""
    up = F.interpolate(maps[None], size=gt.shape, mode="bilinear", align_corners=False)[0]
    return class_specificity(up.numpy(), gt, classes)


def main(classifier: str | Path, dataset_dir: str | Path, max_images: int, out: str | Path | None) -> pd.DataFrame:
    """CLI entry: prints the per-block table (and writes it as CSV to ``out``)."""
    from wsss.lib.artifacts import load_classifier, read_ingested
    from wsss.lib.io import atomic_file

    model, _ = load_classifier(Path(classifier), "cpu")
    table = specificity_by_block(model, read_ingested(Path(dataset_dir)), max_images)
    print(table.to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    if out is not None:
        with atomic_file(out, "w") as handle:
            table.to_csv(handle, index=False, float_format="%.6g")
    return table
