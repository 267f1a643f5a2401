"""CAM baseline (single-[CLS] ViT): registration, shapes, the CAM formula and the stages on it."""

import dataclasses
import json
from pathlib import Path

import pytest
import timm
import torch
import torch.nn.functional as F

import wsss.models  # noqa: F401  (registers wsss_cam_vit_*)
from tests.test_token_masking_vit import close_heads
from wsss.lib.config import Params
from wsss.lib.errors import WsssError
from wsss.models.cam_vit import CamViT

C = 5


def tiny_cam(**kwargs) -> CamViT:
    torch.manual_seed(0)
    return timm.create_model("wsss_cam_vit_tiny_patch8", num_classes=C, img_size=32, **kwargs)


def test_registered_names_create_models_of_the_token_masking_sizes():
    names = {f"wsss_cam_vit_{size}" for size in ("tiny_patch8", "tiny_patch16", "small_patch16", "base_patch16")}
    assert names <= set(timm.list_models("wsss_cam_vit_*"))
    base = timm.create_model("wsss_cam_vit_base_patch16", num_classes=20)
    twin = timm.create_model("wsss_vit_base_patch16", num_classes=20)
    assert isinstance(base, CamViT) and base.class_tokens.shape == (1, 1, 768)
    assert base.head.weight.shape == (20, 768) and len(base.blocks) == len(twin.blocks) == 12
    assert base.map_layer() == 11


def test_forward_shapes_and_no_masking():
    model = tiny_cam(reg_token=False, gates=False).train()
    images = torch.randn(2, 3, 32, 32)
    assert model.forward_features(images).shape == (2, 1 + 16, 128)
    labels = torch.zeros(2, C)
    logits = model(images, labels, mask_noise=torch.zeros(2, C))
    assert logits.shape == (2, C)
    assert tiny_cam(gates=False).forward_features(images).shape == (2, 1 + 16 + 1, 128)  # with [REG]


@pytest.mark.parametrize("reg_token", [False, True])
def test_cam_equals_class_weight_dot_last_patch_features(reg_token):
    model = tiny_cam(reg_token=reg_token, gates=False).eval()
    images = torch.randn(2, 3, 32, 32)
    tokens = model.forward_features(images)
    patches = tokens[:, 1:17]  # [B, h*w, D]
    expected = F.relu(patches @ model.head.weight.T).transpose(1, 2).reshape(2, C, 4, 4)
    maps, logits = model.class_attention_maps(images)
    assert torch.allclose(maps, expected, atol=1e-6)
    assert torch.allclose(logits, model(images), atol=1e-6)
    shared, per_image = torch.tensor([3, 0]), torch.tensor([[1, 4], [2, 2]])
    m, lg = model.class_attention_maps(images, shared)
    assert torch.allclose(m, expected[:, shared], atol=1e-6) and torch.allclose(lg, logits[:, shared])
    m, lg = model.class_attention_maps(images, per_image)
    assert torch.allclose(m, expected.gather(1, per_image[..., None, None].expand(-1, -1, 4, 4)), atol=1e-6)
    assert torch.allclose(lg, logits.gather(1, per_image))


def test_prune_heads_is_harmless():
    model = tiny_cam().eval()
    close_heads(model, 3, [0, 2])
    images = torch.randn(2, 3, 32, 32)
    maps, logits = model.class_attention_maps(images)
    model.prune_heads()
    assert model.map_layer() == 3
    pruned_maps, pruned_logits = model.class_attention_maps(images)
    assert torch.allclose(pruned_maps, maps, atol=1e-5) and torch.allclose(pruned_logits, logits, atol=1e-5)


def test_masking_and_read_only_class_tokens_are_refused():
    with pytest.raises(ValueError, match="mask_ratio must be 0"):
        tiny_cam(mask_ratio=0.5)
    with pytest.raises(ValueError, match="class_tokens must be 'joint'"):
        tiny_cam(class_tokens="read_only")


def test_train_classifier_and_pseudo_masks_on_the_cam_baseline(tiny_params: Params, tmp_path: Path):
    from wsss.lib.artifacts import MODEL_FILE, load_classifier, read_ingested
    from wsss.lib.images import decode_mask_png
    from wsss.tasks import train_classifier
    from wsss.tasks.ingest import ingest
    from wsss.tasks.pseudo_masks import generate_pseudo_masks

    ingest(Path(tiny_params.ingest.source), Path(tiny_params.ingest.out))
    cam = dataclasses.replace(
        tiny_params.classifier, model="wsss_cam_vit_tiny_patch8", reg_token=False, gates=False, mask_ratio=0.0, epochs=1
    )
    with pytest.raises(WsssError, match="mask_ratio must be 0"):
        train_classifier.build_classifier(dataclasses.replace(cam, mask_ratio=0.5), 3)
    result = train_classifier.main(dataclasses.replace(tiny_params, classifier=cam))
    assert result["closed_heads"] == 0 and result["map_layer"] == 3
    assert json.loads((Path(cam.out) / "gates.json").read_text())["log_alpha"] == []

    model, record = load_classifier(Path(cam.out) / MODEL_FILE)
    assert isinstance(model, CamViT) and record["model_name"] == "wsss_cam_vit_tiny_patch8"
    dataset = read_ingested(Path(tiny_params.ingest.out))
    ids, blobs, stats = generate_pseudo_masks(model, dataset, tiny_params.pseudo_masks, torch.device("cpu"))
    masks = [decode_mask_png(blob) for blob in blobs]
    train = dataset.split("train")
    assert len(ids) == len(masks) == len(train) == stats["images"] == 48
    assert all(mask.shape == (32, 32) and mask.max() <= dataset.num_classes for mask in masks)
    assert stats["map_layer"] == 3 and stats["grid"] == [4, 4]
