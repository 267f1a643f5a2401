"""Fast paths (pruned heads, class-rows-only maps, read-only class tokens) give the plain paths' results."""

import pytest
import torch

from tests.test_token_masking_vit import C, close_heads, tiny_model
from wsss.lib.config import DEFAULT_PARAMS, ConfigError, load_params
from wsss.models.token_masking_vit import TokenMaskingViT
from wsss.tasks.train_classifier import model_kwargs


def naive_masked_class_attention(model: TokenMaskingViT, images: torch.Tensor) -> torch.Tensor:
    """Full N x N attention of the map layer with the model's mask applied, class rows, patch columns."""
    layer = model.map_layer()
    x, (h, w) = model._embed(images)
    mask = model.attn_mask(C, x.shape[1], x.device)
    for blk in model.blocks[:layer]:
        x = blk(x, attn_mask=mask)
    attn = model.blocks[layer].attn
    q, k, _ = attn._qkv(model.blocks[layer].norm1(x))
    scores = (q * attn.scale) @ k.transpose(-2, -1)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    full = scores.softmax(-1)  # [B, H, N, N]
    return full[:, attn.open_heads(), :C, C : C + h * w].mean(1).reshape(len(images), C, h, w)


def num_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("class_tokens", ["joint", "read_only"])
@pytest.mark.parametrize("last_closed", [[0, 2], [0, 1, 2, 3]])
def test_pruned_model_equals_gated_model(class_tokens, last_closed):
    model = tiny_model(class_tokens=class_tokens).eval()
    close_heads(model, 1, [0, 1, 2, 3])  # a fully closed block
    close_heads(model, 2, [1])
    close_heads(model, 3, last_closed)
    images = torch.randn(2, 3, 32, 32)
    maps, logits = model.class_attention_maps(images)
    layer, before = model.map_layer(), num_params(model)
    model.prune_heads()
    assert [blk.attn.num_heads for blk in model.blocks] == [4, 0, 3, 4 - len(last_closed)]
    assert model.map_layer() == layer and not model.gate_modules()
    assert num_params(model) < before
    pruned_maps, pruned_logits = model.class_attention_maps(images)
    assert torch.allclose(pruned_maps, maps, atol=1e-6)
    assert torch.allclose(pruned_logits, logits, atol=1e-5)
    assert torch.allclose(model(images), logits, atol=1e-5)


@pytest.mark.parametrize("class_tokens", ["joint", "read_only"])
def test_requested_class_rows_equal_full_rows(class_tokens):
    model = tiny_model(class_tokens=class_tokens).eval()
    close_heads(model, 3, [1])
    images = torch.randn(2, 3, 32, 32)
    maps, logits = model.class_attention_maps(images)
    shared = torch.tensor([3, 0])
    m, lg = model.class_attention_maps(images, shared)
    assert m.shape == (2, 2, 4, 4)
    assert torch.allclose(m, maps[:, shared], atol=1e-6) and torch.allclose(lg, logits[:, shared], atol=1e-5)
    per_image = torch.tensor([[1, 4], [2, 2]])
    m, lg = model.class_attention_maps(images, per_image)
    assert torch.allclose(m, maps.gather(1, per_image[..., None, None].expand(-1, -1, 4, 4)), atol=1e-6)
    assert torch.allclose(lg, logits.gather(1, per_image), atol=1e-5)


def test_read_only_class_tokens_only_read_the_image():
    model = tiny_model(class_tokens="read_only").eval()
    images = torch.randn(2, 3, 32, 32)
    tokens, logits = model.forward_features(images), model(images)
    with torch.no_grad():
        model.class_tokens[0, 2] += torch.randn(128)
    changed_tokens, changed_logits = model.forward_features(images), model(images)
    assert torch.allclose(changed_tokens[:, C:], tokens[:, C:], atol=1e-5)  # patches and [REG]
    others = [c for c in range(C) if c != 2]
    assert torch.allclose(changed_logits[:, others], logits[:, others], atol=1e-5)
    assert not torch.allclose(changed_logits[:, 2], logits[:, 2], atol=1e-5)


@pytest.mark.parametrize("class_tokens", ["joint", "read_only"])
def test_maps_equal_naive_masked_full_attention(class_tokens):
    model = tiny_model(class_tokens=class_tokens).eval()
    close_heads(model, 3, [0, 3])
    images = torch.randn(2, 3, 32, 32)
    maps, logits = model.class_attention_maps(images)
    assert torch.allclose(maps, naive_masked_class_attention(model, images), atol=1e-6)
    assert torch.allclose(logits, model(images), atol=1e-5)


def test_read_only_mask_layout_and_bad_mode():
    mask = tiny_model(class_tokens="read_only").attn_mask(2, 5, torch.device("cpu"))
    expected = torch.tensor([[1, 0, 1, 1, 1], [0, 1, 1, 1, 1]] + [[0, 0, 1, 1, 1]] * 3, dtype=torch.bool)
    assert torch.equal(mask, expected)
    assert tiny_model().attn_mask(2, 5, torch.device("cpu")) is None
    with pytest.raises(ValueError, match="class_tokens"):
        tiny_model(class_tokens="causal")


def test_class_tokens_param_reaches_the_model():
    params = load_params(DEFAULT_PARAMS, ["classifier.class_tokens=read_only"])
    assert model_kwargs(params.classifier, 3, 3)["class_tokens"] == "read_only"
    assert load_params(DEFAULT_PARAMS, []).classifier.class_tokens == "joint"
    with pytest.raises(ConfigError, match="class_tokens"):
        load_params(DEFAULT_PARAMS, ["classifier.class_tokens=causal"])
