"""``wsss predict``: palette PNG masks for new images, from the segmenter or the classifier's attention alone.

A model is an MLflow URI (``models:/wsss-segmenter@champion``, ``models:/NAME/VERSION``, ``runs:/...``;
the store is the one ``wsss register`` writes to, see :func:`wsss.lib.tracking.tracking_uri`) or a
``model.pt`` file (or the folder holding it). Each image is resized to the model's training size
(checkpoint record, the registered run's params, or ``--img-size``); the logits or attention maps are
resized back bilinearly, so every mask has its image's size. With ``--from-attention`` the classifier's
[CLS]_c attention is painted by the pseudo-mask rule of :mod:`wsss.lib.mask_rule` for the classes it
predicts: a registered classifier (URI) by the rule its pseudo-mask stage applied, registered with the version
(tuned thresholds and map blocks, views, pixel refiner: :func:`wsss.lib.inference.decided_rule`); a checkpoint
with ``pseudo_masks.fg_threshold``/``bg_threshold`` and the test-time views of ``pseudo_masks.scales``/``flip``
(scales of the image size the model is given). ``--pixel-refine par|crf`` refines either kind of mask with the
image's own pixels (:mod:`wsss.lib.pixel_refine`, peers' methods; off by default unless the registered rule has
it), ``--pixel-refine-iterations`` times (default 10).

``OUT/<image name>.png`` is the mask (VOC palette, 0 = background, k + 1 = class k); ``--overlay`` adds
``OUT/<image name>_overlay.png``. Each file is written atomically; ``--out``, the outputs and the inputs are
checked before the model is loaded. Photos are read as viewers show them (EXIF orientation applied), so
each mask lines up with its image on screen.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from wsss.lib.config import Params
from wsss.lib.errors import WsssError
from wsss.lib.images import BANDS_FILE, Bands, display_rgb, one_line, read_bands, read_image, to_uint8, write_mask_png
from wsss.lib.inference import attention_masks, in_chans, model_input_size, rule_arguments, segment_images
from wsss.lib.io import atomic_file, check_writable, writing
from wsss.lib.pixel_refine import check_pixel_refine
from wsss.lib.plotting import overlay_picture
from wsss.lib.runtime import autocast, resolve_precision, setup_runtime


def is_uri(ref: str) -> bool:
    """Whether a model reference is an MLflow URI rather than a file path."""
    return ref.startswith(("models:/", "runs:/")) or "://" in ref


def load_model(ref: str, kind: str, device: torch.device) -> tuple[torch.nn.Module, int | None, dict | None]:
    """Loads a segmenter (``kind="segmenter"``) or classifier from a URI or checkpoint.

    Returns:
        (model in eval mode, its training image size when known, the attention-mask rule registered with a
        classifier version — :func:`wsss.lib.inference.decided_rule` — or None).

    Raises:
        WsssError: the model cannot be found or loaded.
    """
    if is_uri(ref):
        import tempfile

        import mlflow
        from mlflow.exceptions import MlflowException

        from wsss.lib import tracking

        uri = tracking.tracking_uri()
        # Reading must not create a store: MLflow would make an empty sqlite file and then not find the model.
        if uri.startswith("sqlite:///") and not Path(uri.removeprefix("sqlite:///")).is_file():
            raise WsssError(
                f"{ref}: no MLflow store at {uri} (run from the repo that registered the model, or set "
                "MLFLOW_TRACKING_URI)"
            )
        tracking.get_client()  # points mlflow at the project's store
        try:
            # Loaded from a copy: loading in place writes registered_model_meta into the store's own folder.
            with tempfile.TemporaryDirectory() as tmp:
                local = mlflow.artifacts.download_artifacts(artifact_uri=ref, dst_path=tmp)
                served = mlflow.pyfunc.load_model(local).unwrap_python_model()
        except (MlflowException, OSError) as err:
            raise WsssError(f"{ref}: cannot load model from the store {uri} ({one_line(err)})") from None
        model = served.model
        if not hasattr(model, "grid_size" if kind == "classifier" else "size_multiple"):
            raise WsssError(f"{ref}: is a {type(model).__name__}, not a {kind} (use the other option)")
        return model.to(device).eval(), getattr(served, "size", None), getattr(served, "rule", None)
    path = Path(ref)
    if path.is_dir():
        path = path / "model.pt"
    if kind == "segmenter":
        from wsss.lib.artifacts import load_segmenter

        model, record = load_segmenter(path, device)
        return model, int(record["img_size"]), None
    from wsss.lib.artifacts import load_classifier

    model, _ = load_classifier(path, device)
    return model, None, None


def _check_out_folder(out: Path) -> None:
    """``--out`` must be a folder, or not exist yet below one this process can write to.

    Raises:
        WsssError: ``out`` is a file, or it (or its nearest existing parent) cannot be written.
    """
    if out.exists() and not out.is_dir():
        raise WsssError(f"{out}: exists and is not a folder (--out names the folder the masks are written to)")
    check_writable(out)


def _check_outputs(files: list[Path], images: list[Path], overwrite: bool) -> None:
    """Masks go into ``--out`` beside whatever is there; nothing but a mask of an earlier run is replaced.

    Raises:
        WsssError: an output would replace an input image, or (without ``overwrite``) an existing file.
    """
    inputs = {path.resolve() for path in images}
    for target in files:
        if target.resolve() in inputs:
            raise WsssError(f"{target}: is an input image, its mask would replace it; name another --out")
    existing = [target for target in files if target.exists()]
    if existing and not overwrite:
        more = f" (and {len(existing) - 1} more)" if len(existing) > 1 else ""
        raise WsssError(f"{existing[0]}: exists{more}; pass --overwrite to replace it or name another --out")


def predict(
    images: list[Path],
    model_ref: str,
    out: Path,
    device: torch.device,
    from_attention: bool = False,
    overlay: bool = False,
    img_size: int | None = None,
    bands: Bands | None = None,
    thresholds: tuple[float, float] = (0.5, 0.2),
    batch_size: int = 16,
    scales: Sequence[float] = (1.0,),
    flip: bool = False,
    map_blocks: int | None = None,
    refine: int = 0,
    overwrite: bool = False,
    precision: str = "fp32",
    pixel_refine: tuple[str, int] | None = None,
) -> list[Path]:
    """Writes one palette PNG mask per image into ``out`` (see module docstring); returns the mask paths.

    ``out`` is created when missing; files already in it are left alone (``overwrite``: existing masks of
    the same names are replaced). Each mask is written atomically.

    ``thresholds``, ``scales``, ``flip``, ``map_blocks``, ``refine``: the attention-mask rule for a checkpoint; a
    registered classifier's own rule replaces them. ``pixel_refine`` (refiner, iterations): None for the model's own
    (a registered classifier's rule, else none).

    Raises:
        WsssError: unreadable image, two images with the same name, an image whose channel count the model
            does not take, a model that cannot be loaded, or an output that would replace an input image or
            (without ``overwrite``) an existing file; a ``pixel_refine`` method that is not one of
            ``PIXEL_REFINERS`` or an iteration count that is not an integer > 0.
    """
    if pixel_refine is not None:
        pixel_refine = check_pixel_refine(*pixel_refine)
    names = [path.stem for path in images]
    if len(set(names)) != len(names):
        duplicate = next(n for n in names if names.count(n) > 1)
        raise WsssError(f"two input images are named {duplicate!r}: their masks would overwrite each other")
    # Everything a user can get wrong is checked before the model is loaded and run: outputs, then inputs.
    _check_out_folder(out)
    files = {name: [out / f"{name}.png"] + ([out / f"{name}_overlay.png"] if overlay else []) for name in names}
    _check_outputs([f for group in files.values() for f in group], images, overwrite)
    pixels = []
    for path in images:
        image = read_image(path)
        try:
            pixels.append(to_uint8(image, bands))
        except WsssError as err:
            raise WsssError(f"{path}: {err}; pass --bands DATA_SET/{BANDS_FILE}") from None
    kind = "classifier" if from_attention else "segmenter"
    model, trained_size, rule = load_model(model_ref, kind, device)
    size = img_size or model_input_size(model, from_attention, trained_size)
    if size is None:
        raise WsssError(f"{model_ref}: training image size unknown (not in the run's params); pass --img-size")
    channels = in_chans(model)
    for path, image in zip(images, pixels, strict=True):
        if image.shape[-1] != channels:
            raise WsssError(f"{path}: image has {image.shape[-1]} channels, the model takes {channels}")
    with autocast(precision, device):
        if from_attention:
            # A registered classifier brings the rule its pseudo masks were made with; a checkpoint takes the caller's.
            views = dict(thresholds=thresholds, scales=scales, flip=flip, map_blocks=map_blocks, refine=refine)
            arguments = views | rule_arguments(rule or {}) | ({"pixel_refine": pixel_refine} if pixel_refine else {})
            found, _ = attention_masks(model, pixels, device, batch_size=batch_size, size=size, **arguments)
        else:
            found = segment_images(model, pixels, size, device, batch_size, pixel_refine or ("none", 0))
    masks = dict(zip(names, found, strict=True))
    # The overlay's legend names the classes the masks hold, when the model knows them (a wsss checkpoint
    # or a model registered by `wsss register`); otherwise it shows their values.
    classes = getattr(model, "class_names", None)
    names_by_value = ["background", *classes] if overlay and classes else None
    with writing(out):
        out.mkdir(parents=True, exist_ok=True)
    written = []
    for name, image in zip(names, pixels, strict=True):
        with atomic_file(files[name][0]) as handle:
            write_mask_png(handle, masks[name])
        written.append(files[name][0])
        if overlay:
            picture = overlay_picture(display_rgb(image), masks[name], names_by_value)
            with atomic_file(files[name][1]) as handle:
                picture.save(handle, format="PNG")
    return written


def main(
    params: Params,
    images: list[str],
    model: str,
    out: str,
    from_attention: bool = False,
    overlay: bool = False,
    img_size: int | None = None,
    bands: str | None = None,
    overwrite: bool = False,
    pixel_refine: tuple[str, int] | None = None,
) -> list[Path]:
    """CLI entry (``wsss predict``): device/threads from params, a checkpoint's thresholds, views and map blocks from
    ``pseudo_masks`` (``map_blocks: auto`` is the paper's ``all`` here: new images have no ground truth)."""
    from wsss.lib.config import map_block_count

    device = setup_runtime(params.seed, params.num_threads, params.device)
    scaling = None
    if bands is not None:
        scaling = read_bands(Path(bands))
        if scaling is None:
            raise WsssError(f"{bands}: file not found")
    settings = params.pseudo_masks
    written = predict(
        [Path(i) for i in images],
        model,
        Path(out),
        device,
        from_attention,
        overlay,
        img_size,
        scaling,
        (settings.fg_threshold, settings.bg_threshold),
        scales=settings.scales,
        flip=settings.flip,
        map_blocks=map_block_count(settings.map_blocks),
        refine=settings.refine_iterations if settings.refine == "affinity" else 0,
        overwrite=overwrite,
        precision=resolve_precision(params.trainer.precision, device),
        pixel_refine=pixel_refine,
    )
    print(f"{len(written)} mask{'' if len(written) == 1 else 's'} written to {out}")
    return written
