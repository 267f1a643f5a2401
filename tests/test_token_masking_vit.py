import pytest
import timm
import torch

import wsss.models  # noqa: F401  (registers wsss_vit_*)
from tests.conftest import TINY_CLASSIFIER
from wsss.lib.config import ClassifierParams
from wsss.lib.errors import WsssError
from wsss.models.token_masking_vit import TokenMaskingViT, class_map_diversity, load_timm_vit_weights
from wsss.tasks.train_classifier import build_classifier

C = 5


def tiny_model(**kwargs) -> TokenMaskingViT:
    """The per-class head unless told otherwise (these tests read head_weight; the registry's default is linear)."""
    torch.manual_seed(0)
    return timm.create_model("wsss_vit_tiny_patch8", num_classes=C, img_size=32, **{"head": "per_class", **kwargs})


def naive_class_attention(model: TokenMaskingViT, images: torch.Tensor) -> torch.Tensor:
    """Full N x N attention of the map layer, class rows, patch columns, mean over open heads."""
    layer = model.map_layer()
    x, (h, w) = model._embed(images)
    for blk in model.blocks[:layer]:
        x = blk(x)
    attn = model.blocks[layer].attn
    q, k, _ = attn._qkv(model.blocks[layer].norm1(x))
    full = ((q * attn.scale) @ k.transpose(-2, -1)).softmax(-1)  # [B, H, N, N]
    open_heads = attn.open_heads()
    return full[:, open_heads, :C, C : C + h * w].mean(1).reshape(len(images), C, h, w)


def close_heads(model: TokenMaskingViT, layer: int, heads: list[int]) -> None:
    with torch.no_grad():
        model.blocks[layer].attn.head_gate.log_alpha[heads] = -4.0


def test_registered_names_create_models():
    assert {"wsss_vit_tiny_patch8", "wsss_vit_base_patch16"} <= set(timm.list_models("wsss_vit_*"))
    base = timm.create_model("wsss_vit_base_patch16", num_classes=20)
    assert base.class_tokens.shape == (1, 20, 768) and len(base.blocks) == 12
    assert base.open_heads().shape == (12, 12)


def test_token_layout_and_logits_shape():
    model = tiny_model().eval()
    tokens = model.forward_features(torch.randn(2, 3, 32, 32))
    assert tokens.shape == (2, C + 16 + 1, 128)
    assert model.forward_head(tokens).shape == (2, C)
    no_reg = tiny_model(reg_token=False)
    assert no_reg.forward_features(torch.randn(1, 3, 32, 32)).shape[1] == C + 16


def test_masking_never_hits_label_tokens_and_hits_mask_ratio_of_others():
    model = tiny_model(mask_ratio=0.5)
    torch.manual_seed(1)
    labels = (torch.rand(4000, C) < 0.3).float()
    masked = model.mask_class_tokens(torch.ones(4000, C, 3), labels)[..., 0] == 0
    assert not masked[labels > 0].any()
    assert abs(masked[labels == 0].float().mean().item() - 0.5) < 0.02


def test_no_masking_at_eval_and_labels_do_not_change_eval_logits():
    model = tiny_model(mask_ratio=1.0).eval()
    images = torch.randn(3, 3, 32, 32)
    assert torch.equal(model(images, torch.zeros(3, C)), model(images))


@pytest.mark.parametrize("closed", [[], [1, 3]])
def test_class_attention_maps_equal_rows_of_naive_full_attention(closed):
    model = tiny_model().eval()
    close_heads(model, 3, closed)
    images = torch.randn(2, 3, 32, 32)
    maps, logits = model.class_attention_maps(images)
    assert maps.shape == (2, C, 4, 4)
    assert torch.allclose(maps, naive_class_attention(model, images), atol=1e-6)
    assert torch.allclose(logits, model(images), atol=1e-5)


@pytest.mark.parametrize("class_tokens", ["joint", "read_only"])
def test_training_maps_are_the_naive_attention_summed_over_every_block(class_tokens):
    model = tiny_model(class_tokens=class_tokens).eval()
    images = torch.randn(2, 3, 32, 32)
    x, (h, w) = model._embed(images)
    mask = model.attn_mask(C, x.shape[1], x.device)
    naive = 0
    for blk in model.blocks:  # full N x N attention, every head (gates are not applied to the training maps)
        q, k, _ = blk.attn._qkv(blk.norm1(x))
        logits = (q * blk.attn.scale) @ k.transpose(-2, -1)
        full = (logits if mask is None else logits.masked_fill(~mask, float("-inf"))).softmax(-1)
        naive = naive + full[:, :, :C, C : C + h * w].mean(1)
        x = blk(x, attn_mask=mask)
    logits, maps = model(images, class_attention=True)
    assert maps.shape == (2, C, h * w)
    assert torch.allclose(maps, naive, atol=1e-6)
    assert torch.allclose(logits, model(images), atol=1e-5)
    # every head is open at initialisation: the stage's maps over all blocks are the same sums
    assert torch.allclose(maps.reshape(2, C, h, w), model.class_attention_maps(images, blocks=None)[0], atol=1e-6)


def test_diversity_loss_is_the_gram_distance_from_identity_and_trains_the_attention():
    torch.manual_seed(0)
    maps = torch.rand(3, C, 16)
    naive = []
    for image in maps:
        unit = [row / row.norm() for row in image]
        naive.append(sum((unit[i] @ unit[j] - float(i == j)) ** 2 for i in range(C) for j in range(C)) ** 0.5)
    assert torch.isclose(class_map_diversity(maps), torch.stack(naive).mean(), atol=1e-6)
    assert torch.isclose(class_map_diversity(torch.ones(2, C, 16)), torch.tensor((C * C - C) ** 0.5), atol=1e-5)
    assert float(class_map_diversity(torch.eye(16)[:C].expand(2, -1, -1))) < 1e-4  # disjoint maps
    model = tiny_model().train()
    class_map_diversity(model(torch.randn(2, 3, 32, 32), class_attention=True)[1]).backward()
    assert model.class_tokens.grad.abs().sum() > 0 and model.blocks[0].attn.qkv.weight.grad.abs().sum() > 0


def test_diversity_needs_a_class_token_per_class():
    params = ClassifierParams(
        **{**TINY_CLASSIFIER, "model": "wsss_cam_vit_tiny_patch8"}, mask_ratio=0, reg_token=False, gates=False
    )
    build_classifier(params, C)
    with pytest.raises(WsssError, match="classifier.diversity: wsss_cam_vit_tiny_patch8 has one .CLS. token"):
        build_classifier(ClassifierParams(**{**vars(params), "diversity": 0.1}), C)


def test_closed_heads_change_nothing_when_their_weights_change():
    model = tiny_model().eval()
    close_heads(model, 2, [0, 2])
    images = torch.randn(2, 3, 32, 32)
    before = model(images)
    attn, d = model.blocks[2].attn, model.blocks[2].attn.head_dim
    with torch.no_grad():
        for head in (0, 2):
            for part in range(3):  # q, k and v rows of the closed heads
                rows = slice(part * attn.attn_dim + head * d, part * attn.attn_dim + (head + 1) * d)
                attn.qkv.weight[rows] = torch.randn_like(attn.qkv.weight[rows])
    assert torch.allclose(model(images), before, atol=1e-5)
    assert model.num_closed_heads() == 2


def test_maps_skip_a_fully_closed_last_block():
    model = tiny_model().eval()
    close_heads(model, 3, [0, 1, 2, 3])
    assert model.map_layer() == 2
    images = torch.randn(1, 3, 32, 32)
    assert torch.allclose(model.class_attention_maps(images)[0], naive_class_attention(model, images), atol=1e-6)


def test_penalty_normalisations_and_warmup():
    model = tiny_model()
    total = model.gate_penalty("sum")
    assert torch.isclose(model.gate_penalty("layer_mean"), total / 4)
    assert torch.isclose(model.gate_penalty("mean"), total / 16)
    model.set_gates_active(False)
    assert float(model.gate_penalty()) == 0.0
    assert not tiny_model(gates=False).gate_modules()


def test_gate_penalty_and_bce_give_gradients_to_log_alpha():
    model = tiny_model().train()
    labels = torch.zeros(2, C)
    labels[:, 0] = 1
    loss = torch.nn.functional.binary_cross_entropy_with_logits(model(torch.randn(2, 3, 32, 32), labels), labels)
    (loss + 0.01 * model.gate_penalty()).backward()
    assert all(g.log_alpha.grad is not None and g.log_alpha.grad.abs().sum() > 0 for g in model.gate_modules())


def test_load_timm_vit_weights_copies_blocks_and_seeds_class_tokens(tmp_path):
    torch.manual_seed(0)
    vit = timm.create_model("vit_tiny_patch16_224", num_classes=0)
    path = tmp_path / "vit_tiny.pth"
    torch.save(vit.state_dict(), path)
    model = timm.create_model("wsss_vit_tiny_patch16", num_classes=C, img_size=112)
    missing = load_timm_vit_weights(model, path)
    assert torch.equal(model.blocks[5].attn.qkv.weight, vit.blocks[5].attn.qkv.weight)
    assert torch.equal(model.patch_embed.proj.weight, vit.patch_embed.proj.weight)
    expected_cls = (vit.cls_token + vit.pos_embed[:, :1])[0, 0]
    assert all(torch.equal(model.class_tokens[0, c], expected_cls) for c in range(C))
    assert model.pos_embed.shape == (1, 49, 192)
    assert all(k.endswith("log_alpha") or k.startswith(("head", "reg_token")) for k in missing)


def test_load_timm_vit_weights_errors(tmp_path):
    model = timm.create_model("wsss_vit_tiny_patch16", num_classes=C)
    with pytest.raises(FileNotFoundError, match="missing.pth"):
        load_timm_vit_weights(model, tmp_path / "missing.pth")
    small = timm.create_model("vit_small_patch16_224", num_classes=0)
    torch.save(small.state_dict(), tmp_path / "small.pth")
    with pytest.raises(ValueError, match="shape"):
        load_timm_vit_weights(model, tmp_path / "small.pth")


def test_pretrained_true_points_to_local_weights():
    with pytest.raises(ValueError, match="classifier.pretrained"):
        timm.create_model("wsss_vit_tiny_patch8", pretrained=True)


def test_present_class_separation_looks_at_the_present_classes_only():
    from wsss.models.token_masking_vit import present_class_separation

    same, other = torch.tensor([1.0, 1.0, 0.0, 0.0]), torch.tensor([0.0, 0.0, 1.0, 1.0])
    maps = torch.stack([same, same, other])[None]  # [1, 3, 4]: classes 0 and 1 coincide, class 2 is apart
    assert present_class_separation(maps, torch.tensor([[1, 1, 0]])) == pytest.approx(1.0)
    assert present_class_separation(maps, torch.tensor([[1, 0, 1]])) == pytest.approx(0.0)
    assert present_class_separation(maps, torch.tensor([[1, 0, 0]])) == 0.0  # one label: nothing to separate
    maps.requires_grad_(True)
    present_class_separation(maps, torch.tensor([[1, 1, 1]])).backward()
    assert maps.grad.abs().sum() > 0


def test_the_timm_entry_points_default_to_what_the_pipeline_ships():
    from wsss.lib.config import ClassifierParams

    for name in ("wsss_vit_tiny_patch8", "wsss_vit_small_patch14"):
        assert timm.create_model(name, num_classes=C).head_type == ClassifierParams().head
