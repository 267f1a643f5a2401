"""Test-time views of the pseudo-mask maps (scales, flip) and the pruned model in the pseudo-mask stage."""

import copy
import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from tests.test_token_masking_vit import C, close_heads, tiny_model
from wsss.lib.config import DEFAULT_PARAMS, ConfigError, Params, load_params
from wsss.lib.datasets import normalize
from wsss.lib.mask_rule import attention_maps, multi_view_maps
from wsss.tasks.pseudo_masks import generate_pseudo_masks

CPU = torch.device("cpu")


def images(n: int = 5) -> torch.Tensor:
    torch.manual_seed(1)
    return torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8)


def test_one_scale_without_flip_is_the_plain_pass_bit_for_bit():
    model, x = tiny_model().eval(), images()
    close_heads(model, 3, [1])
    maps, probs = attention_maps(model, x, CPU, batch_size=2)
    maps = torch.stack(maps)  # one [C, h, w] per image
    expected = [model.class_attention_maps(normalize(x[i : i + 2])) for i in range(0, len(x), 2)]
    assert torch.equal(maps, torch.cat([m for m, _ in expected]))
    assert torch.equal(probs, torch.cat([torch.sigmoid(lg) for _, lg in expected]))  # per batch, as the stage
    # The general path reduces to the same numbers: no resize at scale 1, a mean over one view.
    m, p = multi_view_maps(model, normalize(x[:2]), [1.0], flip=False)
    assert torch.equal(m, maps[:2]) and torch.equal(p, probs[:2])


def test_flipped_image_gives_the_mirrored_maps_with_flip():
    model, x = tiny_model().eval(), images()
    maps, probs = attention_maps(model, x, CPU, batch_size=8, flip=True)
    mirrored_maps, mirrored_probs = attention_maps(model, x.flip(-1), CPU, batch_size=8, flip=True)
    maps, mirrored_maps = torch.stack(maps), torch.stack(mirrored_maps)
    # Views {x, mirror x} and {mirror x, x}: the same two terms, added in the other order (exact in IEEE).
    assert torch.equal(mirrored_maps, maps.flip(-1)) and torch.equal(mirrored_probs, probs)
    plain, _ = attention_maps(model, x, CPU, batch_size=8)
    assert not torch.allclose(maps, torch.stack(plain))  # the model is not mirror-symmetric: the flip view counts


def test_scales_average_views_resized_to_the_finest_grid():
    model, x = tiny_model().eval(), images()
    maps, probs = attention_maps(model, x, CPU, batch_size=8, scales=[0.5, 1.0, 1.3], flip=True)
    # 1.3 x 32 px = 41.6 -> 40 px, five patches: the finest view's 5 x 5 grid
    assert [m.shape for m in maps] == [(C, 5, 5)] * 5 and probs.shape == (5, C)
    # One view by hand: the 16 px image (0.5 x 32, two patches), its 2 x 2 maps upsampled to the 4 x 4 of scale 1.
    batch = normalize(x)
    half, logits = model.class_attention_maps(F.interpolate(batch, size=(16, 16), mode="bilinear", align_corners=False))
    assert half.shape[-2:] == (2, 2)
    m, p = multi_view_maps(model, batch, [0.5, 1.0], flip=False)
    full, full_logits = model.class_attention_maps(batch)
    expected = (F.interpolate(half, size=(4, 4), mode="bilinear", align_corners=False) + full) / 2
    torch.testing.assert_close(m, expected)
    torch.testing.assert_close(p, (torch.sigmoid(logits) + torch.sigmoid(full_logits)) / 2)
    double, _ = multi_view_maps(model, batch, [2.0], flip=False)  # a grid twice as fine, the view's own maps
    torch.testing.assert_close(double, model.class_attention_maps(F.interpolate(batch, size=(64, 64), mode="bilinear",
                                                                                  align_corners=False))[0])  # fmt: skip
    tiny, _ = multi_view_maps(model, batch, [0.01], flip=False)  # at least one patch
    assert tiny.shape == (5, C, 1, 1)


def test_images_of_several_sizes_get_maps_on_their_own_grids():
    # A landscape and a portrait image in one run: each goes through the model with the images of its
    # size and gets the maps (and probabilities) it gets alone.
    model = tiny_model().eval()
    torch.manual_seed(2)
    wide, tall = (
        torch.randint(0, 256, (3, 16, 32), dtype=torch.uint8),
        torch.randint(0, 256, (3, 32, 16), dtype=torch.uint8),
    )
    maps, probs = attention_maps(model, [wide, tall, wide.flip(-1)], CPU, batch_size=8)
    assert [tuple(m.shape[-2:]) for m in maps] == [(2, 4), (4, 2), (2, 4)]
    for image, m, p in zip([wide, tall], maps, probs, strict=False):
        alone, logits = model.class_attention_maps(normalize(image[None]))
        torch.testing.assert_close(m, alone[0])
        torch.testing.assert_close(p, torch.sigmoid(logits[0]))


def test_views_params_default_and_validation():
    params = load_params(DEFAULT_PARAMS)
    assert params.pseudo_masks.scales == [1.0] and params.pseudo_masks.flip is False
    assert load_params(None, ["pseudo_masks.scales=[0.5, 1, 1.5]"]).pseudo_masks.scales == [0.5, 1.0, 1.5]
    for bad in ("[]", "[1.0, 0]", "[-0.5]"):
        with pytest.raises(ConfigError, match=r"^pseudo_masks\.scales: expected a non-empty list of scales > 0"):
            load_params(None, [f"pseudo_masks.scales={bad}"])
    with pytest.raises(ConfigError, match=r"pseudo_masks\.scales: expected a list"):
        load_params(None, ["pseudo_masks.scales=1.0"])
    with pytest.raises(ConfigError, match=r"pseudo_masks\.flip: expected bool"):
        load_params(None, ["pseudo_masks.flip=sometimes"])


def test_pruned_model_gives_the_gated_models_masks_and_stats(tiny_params: Params):
    from wsss.lib.artifacts import read_ingested
    from wsss.tasks.ingest import ingest
    from wsss.tasks.train_classifier import build_classifier

    ingest(Path(tiny_params.ingest.source), Path(tiny_params.ingest.out))
    dataset = read_ingested(Path(tiny_params.ingest.out))
    torch.manual_seed(0)
    gated = build_classifier(tiny_params.classifier, dataset.num_classes).eval()
    close_heads(gated, 1, [0, 1, 2, 3])  # a block with no head left after pruning
    close_heads(gated, 3, [0, 2])
    pruned = copy.deepcopy(gated).prune_heads()
    assert [blk.attn.num_heads for blk in pruned.blocks] == [4, 0, 4, 2]
    assert pruned.map_layer() == gated.map_layer() == 3
    settings = dataclasses.replace(tiny_params.pseudo_masks, batch_size=16)
    ids, masks, stats = generate_pseudo_masks(gated, dataset, settings, CPU)
    pruned_ids, pruned_masks, pruned_stats = generate_pseudo_masks(pruned, dataset, settings, CPU)
    assert pruned_ids == ids
    assert pruned_masks == masks  # PNG bytes: equal masks
    # The maps differ by float rounding only (the pruned matmuls sum fewer zero terms), so the thresholds
    # and every mask-derived number are equal; class specificity sums the raw maps themselves.
    floats = {"class_specificity"}
    assert {k: v for k, v in pruned_stats.items() if k not in floats} == {
        k: v for k, v in stats.items() if k not in floats
    }
    assert pruned_stats["class_specificity"] == pytest.approx(stats["class_specificity"], rel=1e-6)


def test_pseudo_masks_at_bf16_run_on_cpu_and_record_their_precision(tiny_params: Params):
    from wsss.lib.artifacts import read_ingested
    from wsss.lib.images import decode_mask_png
    from wsss.tasks.ingest import ingest
    from wsss.tasks.train_classifier import build_classifier

    ingest(Path(tiny_params.ingest.source), Path(tiny_params.ingest.out))
    dataset = read_ingested(Path(tiny_params.ingest.out))
    torch.manual_seed(0)
    model = build_classifier(tiny_params.classifier, dataset.num_classes).eval()
    settings = dataclasses.replace(tiny_params.pseudo_masks, tune_thresholds=False, map_blocks="all")
    _, masks, stats = generate_pseudo_masks(model, dataset, settings, CPU)
    _, half, half_stats = generate_pseudo_masks(model, dataset, settings, CPU, precision="bf16")
    assert stats["precision"] == "fp32" and half_stats["precision"] == "bf16"
    agree = [(decode_mask_png(a) == decode_mask_png(b)).mean() for a, b in zip(masks, half, strict=True)]
    # an untrained model's near-flat maps: bf16 rounding (kernels differ per CPU) moves many pixels across a
    # threshold, not most
    assert 0.5 < float(np.mean(agree)) < 1.0


def naive_block_maps(model, x: torch.Tensor) -> list[torch.Tensor]:
    """Oracle: every block's [CLS]_c -> patch rows from an explicit softmax(q k^T / sqrt(d)) over the whole
    sequence, open heads averaged; blocks run as timm runs them."""
    with torch.no_grad():
        tokens, (h, w) = model._embed(normalize(x))
        Q, maps = model.num_classes, []
        for blk in model.blocks:
            attn = blk.attn
            B, N, _ = tokens.shape
            qkv = attn.qkv(blk.norm1(tokens)).reshape(B, N, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
            q, k = qkv[0], qkv[1]
            full = (q @ k.transpose(-2, -1) / attn.head_dim**0.5).softmax(-1)  # [B, H, N, N]
            rows = full[:, attn.open_heads(), :Q, Q : Q + h * w].mean(1)
            maps.append(rows.reshape(B, Q, h, w) if attn.open_heads().any() else None)
            tokens = blk(tokens)
    return maps


@pytest.mark.parametrize("blocks", [1, 2, None])
def test_aggregated_maps_equal_the_naive_sum_over_open_blocks_and_the_pruned_model(blocks):
    model, x = tiny_model().eval(), images()
    close_heads(model, 3, [0, 1, 2, 3])  # block 3 fully pruned: never a map block
    close_heads(model, 1, [2])
    assert model.map_layers(blocks) == {1: [2], 2: [1, 2], None: [0, 1, 2]}[blocks]
    naive = naive_block_maps(model, x)
    expected = sum(naive[i] for i in model.map_layers(blocks))
    maps, _ = model.class_attention_maps(normalize(x), blocks=blocks)
    torch.testing.assert_close(maps, expected, rtol=1e-5, atol=1e-6)
    per_block, _ = model.class_attention_maps(normalize(x), blocks=blocks, per_block=True)
    assert per_block.shape[1] == len(model.map_layers(blocks))
    torch.testing.assert_close(per_block.sum(1), maps)
    pruned = copy.deepcopy(model).prune_heads()
    pruned_maps, _ = pruned.class_attention_maps(normalize(x), blocks=blocks)
    torch.testing.assert_close(pruned_maps, maps, rtol=1e-5, atol=1e-6)


def test_map_blocks_param_values():
    from wsss.lib.config import map_block_count

    assert load_params(DEFAULT_PARAMS).pseudo_masks.map_blocks == "auto"
    assert [map_block_count(s) for s in ("last", "last3", "all", "auto")] == [1, 3, None, None]
    for bad in ("last0", "first", "2"):
        with pytest.raises(ConfigError, match="pseudo_masks.map_blocks"):
            load_params(DEFAULT_PARAMS, [f"pseudo_masks.map_blocks={bad}"])


def naive_affinity(model, x: torch.Tensor) -> torch.Tensor:
    """Oracle: the open heads' mean patch -> patch attention (explicit softmax over every key), summed over
    the blocks with an open head, rows normalised over the patches."""
    with torch.no_grad():
        tokens, (h, w) = model._embed(normalize(x))
        Q, P, total = model.num_classes, h * w, 0.0
        for blk in model.blocks:
            attn = blk.attn
            B, N, _ = tokens.shape
            qkv = attn.qkv(blk.norm1(tokens)).reshape(B, N, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
            full = (qkv[0] @ qkv[1].transpose(-2, -1) / attn.head_dim**0.5).softmax(-1)
            if attn.open_heads().any():
                total = total + full[:, attn.open_heads(), Q : Q + P, Q : Q + P].mean(1)
            tokens = blk(tokens)
    return total / total.sum(-1, keepdim=True)


@pytest.mark.parametrize("steps", [1, 2])
def test_affinity_refinement_applies_the_normalised_patch_affinity(steps):
    model, x = tiny_model().eval(), images()
    close_heads(model, 3, [0, 1, 2, 3])  # a fully pruned block adds no affinity
    close_heads(model, 1, [2])
    plain, logits = model.class_attention_maps(normalize(x), blocks=None)
    refined, refined_logits = model.class_attention_maps(normalize(x), blocks=None, refine=steps)
    transition = naive_affinity(model, x)
    expected = plain.flatten(2)
    for _ in range(steps):
        expected = torch.einsum("bpq,bkq->bkp", transition, expected)  # m'(p) = sum_q A[p, q] m(q)
    torch.testing.assert_close(refined, expected.reshape(plain.shape), rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(refined_logits, logits)  # the logits are not refined
    pruned = copy.deepcopy(model).prune_heads()
    per_block, _ = pruned.class_attention_maps(normalize(x), blocks=None, per_block=True, refine=steps)
    torch.testing.assert_close(per_block.sum(1), refined, rtol=1e-4, atol=1e-6)  # linear: per block = summed
