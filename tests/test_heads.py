"""The read-outs of the class tokens (`classifier.head`): oracles for `shared` (one w for every class, per-class bias)
and `mean` (MCTformer-V1: channel mean of the pre-norm output), beside the reference's `linear` and `per_class`."""

import copy

import pytest
import timm
import torch

from tests.conftest import TINY_CLASSIFIER
from wsss.lib.config import ClassifierParams
from wsss.lib.errors import WsssError
from wsss.models.token_masking_vit import HEADS, TokenMaskingViT
from wsss.tasks.train_classifier import build_classifier
from wsss.tools.export import export_onnx

C = 5


def small(head: str, **kwargs) -> TokenMaskingViT:
    torch.manual_seed(0)
    return TokenMaskingViT(
        img_size=32, patch_size=8, num_classes=C, embed_dim=32, depth=2, num_heads=2, head=head, **kwargs
    ).eval()


def _same_class_tokens(model: TokenMaskingViT) -> TokenMaskingViT:
    with torch.no_grad():
        model.class_tokens.copy_(model.class_tokens[:, :1].expand_as(model.class_tokens))
    return model


@pytest.mark.parametrize("head", ["shared", "mean"])
def test_identical_class_tokens_give_identical_logits(head):
    """The symmetry the read-out must not break: with one token per class and identical tokens, only the bias tells
    the classes apart (shared) or nothing does (mean), so BCE itself has to make the tokens differ."""
    model = _same_class_tokens(small(head))
    if head == "shared":
        with torch.no_grad():
            model.head_bias.normal_()
    logits = model(torch.randn(3, 3, 32, 32))
    centred = logits - (model.head_bias if head == "shared" else 0)
    torch.testing.assert_close(centred, centred[:, :1].expand_as(centred), rtol=0, atol=1e-6)


@pytest.mark.parametrize("head", ["per_class", "linear"])
def test_the_references_read_outs_tell_identical_tokens_apart(head):
    """Why the issue exists: these carry the class identity in their own weights."""
    logits = _same_class_tokens(small(head))(torch.randn(3, 3, 32, 32))
    assert (logits - logits[:, :1]).abs().max() > 1e-3


@pytest.mark.parametrize("head", ["shared", "mean"])
def test_a_masked_token_reads_as_its_bias(head):
    """Masking zeroes an absent class's output: its logit is its bias (shared), 0 (mean: no parameters)."""
    model = small(head, mask_ratio=0.5).train()
    if head == "shared":
        with torch.no_grad():
            model.head_bias.normal_()
    labels = torch.zeros(4, C)
    labels[:, 0] = 1
    logits = model(torch.randn(4, 3, 32, 32), labels, mask_noise=torch.zeros(4, C))  # every absent token masked
    expected = model.head_bias[1:].expand(4, -1) if head == "shared" else torch.zeros(4, C - 1)
    torch.testing.assert_close(logits[:, 1:], expected, rtol=0, atol=0)


def test_the_mean_head_reads_the_tokens_before_the_final_norm():
    model = small("mean", reg_token=True)
    images = torch.randn(2, 3, 32, 32)
    x, _ = model._embed(images)
    for blk in model.blocks:
        x = blk(x)
    torch.testing.assert_close(model(images), x[:, :C].mean(-1), rtol=1e-5, atol=1e-6)
    tokens = model.forward_features(images)  # the patch tokens (PatchCAM, maps) stay normed
    torch.testing.assert_close(tokens[:, C:], model.norm(x[:, C:]), rtol=1e-5, atol=1e-6)
    assert not any(name.startswith("head") for name, _ in model.named_parameters())


@pytest.mark.parametrize("head", HEADS)
def test_maps_logits_and_pruning_agree_for_every_read_out(head):
    """class_attention_maps' logits are forward's; a pruned model (closed heads removed) gives the gated model's
    maps and logits; read_only class tokens with a subset of classes give the full sequence's kept logits."""
    model = small(head, gates=True, patch_cam=True)
    with torch.no_grad():
        model.blocks[1].attn.head_gate.log_alpha[0] = -10.0  # one closed head
    images = torch.randn(3, 3, 32, 32)
    maps, logits = model.class_attention_maps(images)
    torch.testing.assert_close(logits, model(images), rtol=1e-5, atol=1e-5)
    pruned_maps, pruned_logits = copy.deepcopy(model).prune_heads().class_attention_maps(images)
    torch.testing.assert_close(pruned_maps, maps, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(pruned_logits, logits, rtol=1e-5, atol=1e-5)

    read_only = small(head, class_tokens="read_only")
    classes = torch.tensor([[0, 3], [1, 2], [4, 0]])
    sub_maps, sub_logits = read_only.class_attention_maps(images, classes)
    full_maps, full_logits = read_only.class_attention_maps(images)
    torch.testing.assert_close(sub_logits, full_logits.gather(1, classes), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(sub_maps, full_maps.gather(1, classes[..., None, None].expand(-1, -1, 4, 4)))


@pytest.mark.parametrize("head", ["shared", "mean"])
def test_onnx_export_of_the_new_read_outs_matches_torch(head, tmp_path):
    model = small(head, gates=True)
    parity = export_onnx(model, tmp_path / "classifier.onnx", 32)
    assert parity["max_abs_diff"] < 1e-4 and (tmp_path / "classifier.onnx").is_file()


def test_the_read_outs_through_the_config_and_the_cam_baseline_refuses_them():
    for head in HEADS:
        model = build_classifier(ClassifierParams(**{**TINY_CLASSIFIER, "head": head}), C)
        assert model.head_type == head
    with pytest.raises(WsssError, match="need one class token per class"):
        params = {**TINY_CLASSIFIER, "model": "wsss_cam_vit_tiny_patch8", "mask_ratio": 0.0, "head": "shared"}
        build_classifier(ClassifierParams(**params), C)
    assert timm.create_model("wsss_vit_tiny_patch8", num_classes=C, head="mean").head_type == "mean"
