"""classifier.class_sample: training sequences that carry the present classes' tokens and a sample of absent ones."""

import pytest
import torch

from tests.conftest import TINY_CLASSIFIER
from wsss.lib.config import ClassifierParams
from wsss.lib.errors import WsssError
from wsss.models.token_masking_vit import HEADS, TokenMaskingViT
from wsss.tasks.train_classifier import build_classifier

C = 12


def small(**kwargs) -> TokenMaskingViT:
    torch.manual_seed(0)
    return TokenMaskingViT(img_size=32, patch_size=8, num_classes=C, embed_dim=32, depth=2, num_heads=2, gates=False,
                           **kwargs)  # fmt: skip


def batch(n: int = 6) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    labels = torch.zeros(n, C)
    for row in labels:  # 1-3 present classes, as a real data set has
        row[torch.randperm(C, generator=g)[: 1 + int(torch.randint(3, (1,), generator=g))]] = 1
    return torch.randn(n, 3, 32, 32, generator=g), labels


@pytest.mark.parametrize("head", HEADS)
@pytest.mark.parametrize("class_tokens", ["joint", "read_only"])
def test_a_sample_of_every_class_is_the_joint_sequence(head, class_tokens):
    """K >= C keeps every token: the logits and their gradients are the joint sequence's, bit for bit."""
    images, labels = batch()
    noise, sample_noise = torch.rand(6, C), torch.rand(6, C)
    grads = []
    for sample in (0, C):
        model = small(head=head, class_tokens=class_tokens, class_sample=sample).train()
        logits = model(images, labels, mask_noise=noise, sample_noise=sample_noise)
        logits.square().sum().backward()
        grads.append((logits.detach(), model.class_tokens.grad.clone(), model.blocks[0].attn.qkv.weight.grad.clone()))
    for joint, sampled in zip(*grads, strict=True):
        assert torch.equal(joint, sampled)


def test_the_sample_holds_every_present_class_and_k_absent_ones_at_least():
    _, labels = batch(200)
    model = small(class_sample=4)
    classes = model.sample_classes(labels, torch.rand(200, C))
    most = int(labels.sum(1).max())
    assert classes.shape == (200, most + 4)
    assert bool((classes[:, 1:] > classes[:, :-1]).all())  # class order, no repeats
    kept = torch.zeros_like(labels).scatter(1, classes, 1.0)
    assert bool((kept >= labels).all())


def test_read_only_kept_tokens_equal_their_outputs_in_the_full_sequence():
    """Oracle: read_only class tokens never influence other tokens, so a sampled sequence gives the kept classes
    exactly the logits the full sequence gives them (per-class head, no masking); left-out classes get their bias."""
    images, labels = batch()
    model = small(head="per_class", class_tokens="read_only", mask_ratio=0.0, class_sample=3).train()
    with torch.no_grad():
        model.head_bias.normal_()
    sample_noise = torch.rand(6, C)
    classes = model.sample_classes(labels, sample_noise)
    sampled = model(images, labels, sample_noise=sample_noise)
    full = model.forward_head(model.forward_features(images))
    kept = torch.zeros_like(labels, dtype=torch.bool).scatter(1, classes, True)
    torch.testing.assert_close(sampled[kept], full[kept], rtol=1e-5, atol=1e-6)
    assert torch.equal(sampled[~kept], model.head_bias.expand(6, -1)[~kept])


def test_an_absent_class_reaches_the_head_as_often_as_under_the_papers_masking():
    """Left-out tokens count as masked and the kept absent ones are masked at the rate that makes up the rest: each
    absent class's output reaches the head with probability 1 - mask_ratio, as without sampling."""
    torch.manual_seed(0)
    model = small(mask_ratio=0.5, class_sample=6)
    labels = torch.zeros(20000, C)
    labels[:, 0] = 1
    labels[::2, 1] = 1  # 1 or 2 present: 11 absent classes, 6 or 7 of them kept
    classes = model.sample_classes(labels, torch.rand(labels.shape))
    ratio = model.sampled_mask_ratio(labels, classes.shape[1])
    out = model.mask_class_tokens(torch.ones(*classes.shape, 1), labels.gather(1, classes), ratio=ratio)[..., 0]
    reached = torch.zeros_like(labels).scatter(1, classes, out)
    assert bool((reached[labels > 0] == 1).all())
    assert abs(reached[labels == 0].mean().item() - 0.5) < 0.01


def test_class_sample_errors():
    with pytest.raises(ValueError, match="class_sample must be >= 0"):
        small(class_sample=-1)
    cam = ClassifierParams(**{**TINY_CLASSIFIER, "model": "wsss_cam_vit_tiny_patch8"}, mask_ratio=0, reg_token=False,
                           gates=False, class_sample=2)  # fmt: skip
    with pytest.raises(WsssError, match="class_sample leaves class tokens out of the sequence"):
        build_classifier(cam, C)
    with pytest.raises(WsssError, match="classifier.diversity: the loss reads every class token's map"):
        build_classifier(ClassifierParams(**TINY_CLASSIFIER, class_sample=2, diversity=0.1), C)
    with pytest.raises(ValueError, match="class_attention needs every class token"):
        small(class_sample=2).train()(*batch(), class_attention=True)
