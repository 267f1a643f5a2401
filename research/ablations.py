"""``wsss-research ablations``: the ablation grid of ``ablations.yaml`` run through the pipeline's own stage functions.

Each cell (scale x variant x seed) is params.yaml plus the scale's overrides, the caller's (``-S``), the
variant's and ``seed=<seed>``, in that order; it runs train-classifier, pseudo-masks and train-segmenter exactly
as the DVC stages do, into ``<root>/<scale>/<variant>/seed<seed>/``, and writes one ``result.json`` row (the
numbers the report tabulates). Classifiers are keyed by what decides them (classifier params, seed, data set),
so variants that change only the pseudo-mask stage (``multiscale_flip``) reuse the one trained for ``full``. A cell
whose ``result.json`` holds its fingerprint is not rerun; a killed cell resumes from its checkpoints.
Runs are keyed by the data set's path, not its content (the grid is an experiment beside the versioned
pipeline): after changing the data at the same path, give the grid a fresh ``--root``.
"""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from wsss.lib.config import ConfigError, Params, key_settings, load_params, read_yaml
from wsss.lib.errors import WsssError
from wsss.lib.io import write_json

ABLATIONS_FILE = Path("ablations.yaml")
DEFAULT_ROOT = Path("artifacts/ablations")
REPORT_ROOT = Path("reports/ablations")
RESULT_FILE = "result.json"
POLL_S = 2.0  # how often run_in_processes looks at its processes


@dataclass(frozen=True)
class AblationConfig:
    """The grid: seeds, run lengths (``scales``) and variants, each a list of params overrides.

    ``scale_variants``: the variants a scale runs when none are named (every variant for a scale not in it);
    ``scale_variant_overrides``: scale -> variant -> overrides applied after the variant's (a variant that
    names a model, e.g. the CAM twin, names the scale's backbone);
    ``paired``: variant -> the variants the report's paired table subtracts from it, one row each (default
    ``full``; one name or a list).
    """

    seeds: list[int]
    scales: dict[str, list[str]]
    variants: dict[str, list[str]]
    mask_ratio_sweep: list[str]
    scale_variants: dict[str, list[str]] = dataclasses.field(default_factory=dict)
    paired: dict[str, list[str]] = dataclasses.field(default_factory=dict)
    scale_variant_overrides: dict[str, dict[str, list[str]]] = dataclasses.field(default_factory=dict)


@dataclass(frozen=True)
class Cell:
    """One run of the grid: its resolved params and where it writes."""

    scale: str
    variant: str
    seed: int
    overrides: tuple[str, ...]  # scale + caller's + variant + seed, as given to load_params (no output paths)
    params: Params
    run_dir: Path

    @property
    def name(self) -> str:
        return f"{self.scale}/{self.variant}/seed{self.seed}"

    @property
    def fingerprint(self) -> str:
        """What decides the cell's numbers: every param except output folders and how it runs."""
        from wsss.lib.checkpoint import fingerprint  # imports torch: not at `wsss --help` time

        settings = key_settings(self.params)
        for section in ("classifier", "pseudo_masks", "segmenter", "ingest"):
            settings[section].pop("out")
        for how in ("dask", "trainer", "num_threads", "evaluate", "embedded"):
            settings.pop(how)
        return fingerprint(**settings)


def _string_list(value: Any, where: str) -> list[str]:
    """A list of overrides; a nested list (a YAML alias of another entry, ``- *pretrained``, itself maybe holding
    aliases) is spliced in."""
    if value is None:
        return []
    if isinstance(value, list):
        value = [v for item in value for v in (_string_list(item, where) if isinstance(item, list) else [item])]
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ConfigError(f"{where}: expected a list of section.key=value strings, got {value!r}")
    return list(value)


def read_config(path: str | Path = ABLATIONS_FILE) -> AblationConfig:
    """Reads and checks ``ablations.yaml``.

    Raises:
        ConfigError: unreadable file or a malformed entry (the message names the file and key).
    """
    path = Path(path)
    tree = read_yaml(path, "ablation grid")
    if not isinstance(tree, dict):
        raise ConfigError(f"{path}: expected a mapping with seeds, scales, variants, got {tree!r}")
    known = ("mask_ratio_sweep", "paired", "scale_variant_overrides", "scale_variants", "scales", "seeds", "variants")
    unknown = sorted(set(tree) - set(known))
    if unknown:
        raise ConfigError(f"{path}: unknown key {unknown[0]!r} (known: {', '.join(known)})")
    seeds = tree.get("seeds", [0])
    if not isinstance(seeds, list) or not seeds or not all(isinstance(s, int) and s >= 0 for s in seeds):
        raise ConfigError(f"{path}: seeds: expected a non-empty list of integers >= 0, got {seeds!r}")
    sections = {}
    for key in ("scales", "variants"):
        entries = tree.get(key)
        if not isinstance(entries, dict) or not entries:
            raise ConfigError(f"{path}: {key}: expected a non-empty mapping of name -> overrides")
        sections[key] = {str(name): _string_list(value, f"{path}: {key}.{name}") for name, value in entries.items()}
    sweep = _string_list(tree.get("mask_ratio_sweep"), f"{path}: mask_ratio_sweep")
    _check_names(sweep, sections["variants"], f"{path}: mask_ratio_sweep names unknown variant")
    scale_variants = tree.get("scale_variants") or {}
    if not isinstance(scale_variants, dict):
        raise ConfigError(f"{path}: scale_variants: expected a mapping of scale -> variants, got {scale_variants!r}")
    for scale, names in scale_variants.items():
        _check_names([scale], sections["scales"], f"{path}: scale_variants names unknown scale")
        names = _string_list(names, f"{path}: scale_variants.{scale}")
        _check_names(names, sections["variants"], f"{path}: scale_variants.{scale} names unknown variant")
        scale_variants[scale] = names
    paired = tree.get("paired") or {}
    paired = {k: [v] if isinstance(v, str) else v for k, v in paired.items()} if isinstance(paired, dict) else paired
    if not isinstance(paired, dict) or not all(
        isinstance(refs, list) and refs and all(isinstance(r, str) for r in refs) for refs in paired.values()
    ):
        raise ConfigError(f"{path}: paired: expected a mapping of variant -> reference variant(s), got {paired!r}")
    _check_names([*paired, *(r for refs in paired.values() for r in refs)], sections["variants"],
                 f"{path}: paired names unknown variant")  # fmt: skip
    extra = tree.get("scale_variant_overrides") or {}
    if not isinstance(extra, dict) or not all(isinstance(v, dict) for v in extra.values()):
        raise ConfigError(f"{path}: scale_variant_overrides: expected scale -> variant -> overrides, got {extra!r}")
    _check_names(list(extra), sections["scales"], f"{path}: scale_variant_overrides names unknown scale")
    for scale, entries in extra.items():
        _check_names(
            list(entries), sections["variants"], f"{path}: scale_variant_overrides.{scale} names unknown variant"
        )
        extra[scale] = {v: _string_list(o, f"{path}: scale_variant_overrides.{scale}.{v}") for v, o in entries.items()}
    return AblationConfig(seeds, sections["scales"], sections["variants"], sweep, scale_variants, paired, extra)


def _check_names(names: Sequence[str], known: dict[str, Any], message: str) -> None:
    missing = [name for name in names if name not in known]
    if missing:
        raise ConfigError(f"{message} {missing[0]!r}")


def _pick(requested: Sequence[str] | None, known: dict[str, Any], what: str) -> list[str]:
    if not requested:
        return list(known)
    unknown = [name for name in requested if name not in known]
    if unknown:
        raise WsssError(f"unknown {what} {unknown[0]!r} (known: {', '.join(known)})")
    return list(dict.fromkeys(requested))


def dataset_dir(params: Params, root: Path) -> Path:
    """The grid's ingested copy of the cell's data set, ``<root>/datasets/<source folder name>`` (scales may
    train on other data)."""
    return root / "datasets" / Path(params.ingest.source).name


def classifier_dir(params: Params, root: Path, scale: str) -> Path:
    """Where the classifier of ``params`` lives: keyed by its params, the seed and the data set."""
    from wsss.lib.checkpoint import fingerprint

    settings = {k: v for k, v in key_settings(params.classifier).items() if k != "out"}
    key = fingerprint(classifier=settings, seed=params.seed, source=params.ingest.source, device=params.device)
    return root / scale / "classifiers" / key[:16]


def plan(
    config: AblationConfig,
    params_file: str | Path,
    root: str | Path = DEFAULT_ROOT,
    scale: str | None = None,
    variants: Sequence[str] | None = None,
    seeds: Sequence[int] | None = None,
    base_overrides: Sequence[str] = (),
) -> list[Cell]:
    """The cells of one scale (default: the first) for the given variants and seeds (default: the scale's
    variants of ``scale_variants``, else all; every seed).

    Raises:
        WsssError: an unknown scale or variant; ConfigError: an override that does not apply.
    """
    root = Path(root)
    (scale,) = _pick([scale] if scale else [next(iter(config.scales))], config.scales, "scale")
    cells = []
    names = _pick(variants or config.scale_variants.get(scale), config.variants, "variant")
    # Seed-major: a grid stopped early holds whole seeds of every variant.
    for seed in seeds if seeds else config.seeds:
        for variant in names:
            after = config.scale_variant_overrides.get(scale, {}).get(variant, [])
            # the caller's -S over the scale's settings (else a scale that sets a key ignores it silently), under the
            # variant's own (what the variant varies stays varied)
            overrides = (*config.scales[scale], *base_overrides, *config.variants[variant], *after, f"seed={seed}")
            try:
                params = load_params(params_file, overrides)
            except ConfigError as err:
                raise ConfigError(f"ablation {scale}/{variant}: {err}") from None
            run_dir = root / scale / variant / f"seed{seed}"
            params = dataclasses.replace(
                params,
                ingest=dataclasses.replace(params.ingest, out=str(dataset_dir(params, root))),
                pseudo_masks=dataclasses.replace(params.pseudo_masks, out=str(run_dir / "pseudo_masks")),
                segmenter=dataclasses.replace(params.segmenter, out=str(run_dir / "segmenter")),
            )
            params.classifier = dataclasses.replace(params.classifier, out=str(classifier_dir(params, root, scale)))
            cells.append(Cell(scale, variant, seed, overrides, params, run_dir))
    return cells


def prepare(cells: Sequence[Cell]) -> None:
    """Ingests the data set once for all cells (and builds the embedded one when it is the source and missing)."""
    from wsss.tasks.ingest import ingest
    from wsss.tools.embedded import build_embedded_dataset

    params = cells[0].params
    source, out = Path(params.ingest.source), Path(params.ingest.out)
    if source == Path(params.embedded.out) and not (source / "manifest.parquet").is_file():
        build_embedded_dataset(params.embedded, source)
    if not (out / "manifest.parquet").is_file():
        ingest(source, out)


def read_result(cell: Cell) -> dict[str, Any] | None:
    """The cell's finished row, or None when it has not run with its current params."""
    path = cell.run_dir / RESULT_FILE
    if not path.is_file():
        return None
    try:
        row = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return row if row.get("fingerprint") == cell.fingerprint else None


def run_cell(cell: Cell) -> dict[str, Any]:
    """Runs (or resumes, or reuses) one cell and returns its result row (also written to ``result.json``)."""
    from wsss.tasks import pseudo_masks, train_classifier, train_segmenter

    done = read_result(cell)
    if done is not None:
        return done
    params = cell.params
    classifier_metrics = Path(params.classifier.out) / "metrics.json"
    if not classifier_metrics.is_file():  # written last: its presence means a finished classifier
        train_classifier.main(params)
    classifier = json.loads(classifier_metrics.read_text())
    if classifier["map_layer"] is None:  # every head closed: a result of the variant, without maps
        keys = ("miou", "ceiling_miou", "class_specificity", "area_share", "map_layer", "map_blocks")
        stats = {key: None for key in (*keys, "fg_threshold", "bg_threshold", "images", "seconds")}
        segmenter = {"val_miou": None, "seconds": 0.0}
    else:
        began = time.perf_counter()
        stats = pseudo_masks.main(params)
        stats["seconds"] = time.perf_counter() - began
        segmenter = train_segmenter.main(params, mask_source="pseudo")
        if segmenter is None or "miou" not in stats:
            split = params.pseudo_masks.split
            raise WsssError(f"ablation {cell.name}: needs trainer.nproc=1 and ground truth on {split}")
    row = {
        "scale": cell.scale,
        "variant": cell.variant,
        "seed": cell.seed,
        "model": params.classifier.model,
        "mask_ratio": params.classifier.mask_ratio,
        "pseudo_miou": stats["miou"],
        "pseudo_ceiling_miou": stats["ceiling_miou"],
        "class_specificity": stats["class_specificity"],
        "area_share": stats["area_share"],
        "segmenter_miou": segmenter["val_miou"],
        "val_map": classifier["val_map"],
        "closed_heads": classifier["closed_heads"],
        "closed_fraction": classifier["closed_fraction"],
        "map_layer": stats["map_layer"],
        "map_blocks": stats.get("map_blocks"),
        "fg_threshold": stats["fg_threshold"],
        "bg_threshold": stats["bg_threshold"],
        "pixel_refine_iterations": stats.get("pixel_refine_iterations"),
        # the pseudo-mask stage (maps, tuning, refinement, scoring) per 1,000 images, on this run's device
        "pseudo_seconds_per_1000": 1000 * stats["seconds"] / stats["images"] if stats["images"] else None,
        "classifier_seconds": classifier["train_seconds"],
        "segmenter_seconds": segmenter["seconds"],
        "classifier_dir": params.classifier.out,
        "dataset": params.ingest.out,
        "device": _device_name(params.device),
        "overrides": list(cell.overrides),
        "fingerprint": cell.fingerprint,
    }
    write_json(cell.run_dir / RESULT_FILE, row)
    return row


def _device_name(device: str) -> str:
    """The hardware the numbers come from (GPU runs are not bitwise CPU runs)."""
    import torch

    from wsss.lib.runtime import resolve_device

    resolved = resolve_device(device)
    return torch.cuda.get_device_name(resolved) if resolved.type == "cuda" else "cpu"


def run_grid(cells: Sequence[Cell], log: Callable[[str], None] = print) -> list[dict[str, Any]]:
    """Runs the cells one after the other in this process (one training job at a time)."""
    prepare(cells)
    rows = []
    for i, cell in enumerate(cells, 1):
        log(f"ablation {i}/{len(cells)}: {cell.name}")
        rows.append(run_cell(cell))
        row = rows[-1]
        if row["pseudo_miou"] is None:
            log(f"ablation {cell.name}: every head closed (val mAP {row['val_map']:.3f}), no maps")
            continue
        log(
            f"ablation {cell.name}: pseudo-mask mIoU {row['pseudo_miou']:.3f}  segmenter mIoU "
            f"{row['segmenter_miou']:.3f}  val mAP {row['val_map']:.3f}"
        )
    return rows


def classifier_groups(cells: Sequence[Cell]) -> list[list[Cell]]:
    """Cells grouped by classifier: a group must run in order (its first cell trains what the others reuse)."""
    groups: dict[str, list[Cell]] = {}
    for cell in cells:
        groups.setdefault(cell.params.classifier.out, []).append(cell)
    return list(groups.values())


def cell_command(group: Sequence[Cell], grid_args: Sequence[str] = ()) -> list[str]:
    """The ``wsss-research ablations`` command that runs one classifier group in its own process.

    ``grid_args``: the options that located the grid (``--params``, ``--config``, ``--root``, ``-S``...).
    """
    cmd = [sys.executable, "-m", "wsss.research.cli", "ablations", *grid_args, "--scale", group[0].scale, "--no-report"]
    for cell in group:
        cmd += ["--variant", cell.variant]
    return [*cmd, "--seed", str(group[0].seed)]


def run_in_processes(
    cells: Sequence[Cell], jobs: int, grid_args: Sequence[str] = (), log: Callable[[str], None] = print
) -> None:
    """Runs the cells' classifier groups as at most ``jobs`` concurrent ``wsss-research ablations`` processes
    (:func:`cell_command`; the Prefect deployment's queue without Prefect, for a GPU or many cores), in the
    cells' order. A group's output goes to ``<root>/<scale>/logs/<variants>_seed<k>.log``.

    Raises:
        WsssError: groups that failed, with their logs (the other groups still ran to the end).
    """
    prepare(cells)  # ingested once here, not raced for by the processes
    queue = list(classifier_groups(cells))
    running: list[tuple[str, Path, subprocess.Popen]] = []
    failed: list[str] = []
    try:
        while queue or running:
            while queue and len(running) < jobs:
                group = queue.pop(0)
                label = "+".join(cell.variant for cell in group) + f"_seed{group[0].seed}"
                path = group[0].run_dir.parent.parent / "logs" / f"{label}.log"
                path.parent.mkdir(parents=True, exist_ok=True)
                with path.open("w") as out:
                    process = subprocess.Popen(cell_command(group, grid_args), stdout=out, stderr=subprocess.STDOUT)
                running.append((label, path, process))
                log(f"ablations: {label} started (log {path})")
            time.sleep(POLL_S)
            for entry in [entry for entry in running if entry[2].poll() is not None]:
                running.remove(entry)
                label, path, process = entry
                if process.returncode:
                    failed.append(f"{label} ({path})")
                log(f"ablations: {label} " + (f"failed, exit {process.returncode}" if process.returncode else "done"))
    finally:  # interrupted (Ctrl-C, an error here): no run goes on without its parent; they resume next time
        for _, _, process in running:
            process.terminate()
        for _, _, process in running:
            process.wait()
    if failed:
        raise WsssError(f"{len(failed)} of the runs failed, see their logs: {', '.join(failed)}")
