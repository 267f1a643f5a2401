"""``wsss-research report``: the ablation comparison from the grid's ``result.json`` rows (tasks/ablations.py).

Writes to ``reports/ablations/<scale>/``: ``table.md`` / ``table.csv`` / ``table.parquet`` (per variant,
mean ± std over seeds), ``paired.md`` / ``paired.csv`` (each variant minus ``full``, or minus its
``paired`` reference, on the same seed), ``runs.parquet`` (one row per run), ``bars.png`` (pseudo-mask and
segmenter mIoU per variant), ``per_class.md`` / ``per_class.csv`` (pseudo-mask IoU of each class, per variant
and per run), ``mask_ratio.csv`` + ``mask_ratio.png`` (the mask-ratio sweep) and
``grid.png`` (training images x variants' pseudo masks, then the per-class attention maps of ``full`` and
``no_masking`` side by side); logs all of it to the MLflow experiment ``wsss-ablations``.
"""

from __future__ import annotations

import io
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from wsss.lib.errors import WsssError
from wsss.lib.io import atomic_file
from wsss.research.ablations import DEFAULT_ROOT, REPORT_ROOT, RESULT_FILE, AblationConfig

EXPERIMENT = "wsss-ablations"
# result column -> table heading
METRICS = {
    "pseudo_miou": "pseudo-mask mIoU (train)",
    "pseudo_ceiling_miou": "its grid ceiling",  # ground truth reduced to the maps' token grid and blown up
    "segmenter_miou": "segmenter mIoU (val)",
    "val_map": "val mAP",
    "class_specificity": "class specificity",
    "area_share": "area share",  # what the specificity is when the maps do not tell classes apart
    "closed_heads": "closed heads",
    "train_minutes": "training min",
    "pseudo_seconds_per_1000": "pseudo masks s / 1,000 img",
}
MAP_VARIANTS = ("full", "no_masking")  # whose per-class attention maps the grid shows
PAIRED_REFERENCE = "full"  # what the paired table subtracts unless ablations.yaml `paired` names another
PAIRED_METRICS = ("pseudo_miou", "segmenter_miou", "class_specificity")
MAPS_PER_IMAGE = 2


def collect(root: str | Path, scale: str) -> pd.DataFrame:
    """Every finished run of ``scale`` under ``root``, one row each.

    Raises:
        WsssError: no finished run.
    """
    paths = sorted(Path(root, scale).glob(f"*/seed*/{RESULT_FILE}"))
    if not paths:
        raise WsssError(f"{Path(root, scale)}: no finished ablation runs (run `wsss-research ablations` first)")
    runs = pd.DataFrame([json.loads(path.read_text()) for path in paths])
    runs["train_minutes"] = (runs["classifier_seconds"] + runs["segmenter_seconds"]) / 60.0
    return runs


def _in_order(variants: Sequence[str], order: Sequence[str]) -> list[str]:
    """``variants`` with those named in ``order`` first, in that order (the grid's), then the rest as given."""
    return [v for v in order if v in variants] + [v for v in variants if v not in order]


def summarize(runs: pd.DataFrame, order: Sequence[str] = ()) -> pd.DataFrame:
    """Per variant: ``<metric>_mean`` and ``<metric>_std`` (over seeds, ddof 1; NaN for one seed) and ``seeds``."""
    grouped = runs.groupby("variant", sort=False)
    table = pd.DataFrame({"seeds": grouped["seed"].nunique()})
    for column in METRICS:  # a column runs from before it existed lack: NaN ("–" in the table)
        found = runs[column] if column in runs else pd.Series(np.nan, index=runs.index)
        values = pd.to_numeric(found, errors="coerce").groupby(runs["variant"], sort=False)
        table[f"{column}_mean"] = values.mean()
        table[f"{column}_std"] = values.std(ddof=1)
    return table.loc[_in_order(list(table.index), order)].reset_index()


def markdown_table(summary: pd.DataFrame) -> str:
    """One row per variant, ``mean ± std`` cells (± omitted for one seed)."""

    def cell(row: pd.Series, column: str) -> str:
        mean, std = row[f"{column}_mean"], row[f"{column}_std"]
        if pd.isna(mean):
            return "–"
        digits = 1 if column in ("closed_heads", "train_minutes") else 3
        return f"{mean:.{digits}f}" + ("" if pd.isna(std) else f" ± {std:.{digits}f}")

    lines = [
        "| variant | seeds | " + " | ".join(METRICS.values()) + " |",
        "|---|---|" + "---|" * len(METRICS),
    ]
    for _, row in summary.iterrows():
        lines.append(f"| {row['variant']} | {row['seeds']} | " + " | ".join(cell(row, c) for c in METRICS) + " |")
    return "\n".join(lines) + "\n"


def paired_differences(
    runs: pd.DataFrame, references: Mapping[str, Sequence[str]] | None = None, order: Sequence[str] = ()
) -> pd.DataFrame:
    """Per variant and reference: its metric minus the reference's on the same seed, mean ± std over the seeds
    both have, and on how many of them the variant is higher.

    Runs of one seed share initial weights (same architecture), batch order and augmentations, so the
    per-seed difference is free of most of the seed-to-seed spread of the plain table.

    Args:
        runs: one row per run (:func:`collect`).
        references: variant -> the variants it is compared with, a row each (default for any other: ``full``).
        order: variants first in this order (the grid's), then the rest.
    """
    references = references or {}
    values = runs.set_index(["variant", "seed"])[list(PAIRED_METRICS)].apply(pd.to_numeric, errors="coerce")
    present = list(dict.fromkeys(runs["variant"]))
    rows = []
    pairs = [(v, r) for v in _in_order(present, order) for r in references.get(v, [PAIRED_REFERENCE])]
    for variant, reference in pairs:
        if variant == reference or reference not in present:
            continue
        diff = (values.loc[variant] - values.loc[reference]).dropna(how="all")  # aligned on seed: seeds both ran
        if diff.empty:  # e.g. every head closed: no maps to compare
            continue
        row: dict[str, Any] = {"variant": variant, "reference": reference, "seeds": len(diff)}
        for column in PAIRED_METRICS:
            row[f"{column}_diff_mean"] = diff[column].mean()
            row[f"{column}_diff_std"] = diff[column].std(ddof=1)
            row[f"{column}_higher"] = int((diff[column] > 0).sum())
        rows.append(row)
    return pd.DataFrame(rows)


def paired_markdown(paired: pd.DataFrame) -> str:
    """``+0.051 ± 0.016 (3/3)``: mean ± std of the per-seed difference, seeds where the variant is higher."""
    headings = " | ".join(f"Δ {METRICS[c]}" for c in PAIRED_METRICS)
    lines = [f"| variant | minus | seeds | {headings} |", "|---|---|---|" + "---|" * len(PAIRED_METRICS)]
    for _, row in paired.iterrows():
        cells = []
        for column in PAIRED_METRICS:
            mean, std = row[f"{column}_diff_mean"], row[f"{column}_diff_std"]
            if pd.isna(mean):
                cells.append("–")
                continue
            spread = "" if pd.isna(std) else f" ± {std:.3f}"
            cells.append(f"{mean:+.3f}{spread} ({row[f'{column}_higher']}/{row['seeds']})")
        lines.append(f"| {row['variant']} | {row['reference']} | {row['seeds']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def per_class_iou(runs: pd.DataFrame, root: str | Path) -> pd.DataFrame:
    """Pseudo-mask IoU of each class on the training split (the stage's convention), one row per run with masks:
    where a variant's mIoU gap comes from (a class token that never became specific shows as one low class)."""
    from wsss.lib.artifacts import read_ingested
    from wsss.lib.dataset_format import read_mask_table
    from wsss.tasks.evaluate import evaluate_masks

    rows = []
    for variant, run in runs[runs["pseudo_miou"].notna()].set_index("variant").iterrows():
        table = _mask_table(root, run)
        dataset = read_ingested(Path(run["dataset"]))
        try:  # PNG bytes, decoded one at a time: a large split's masks stay on disk
            scores = evaluate_masks(dataset, "train", read_mask_table(table, encoded=True))
        except (WsssError, ValueError) as err:  # a mask missing, or another data set's (shapes, class ids)
            raise WsssError(f"{table}: {err}") from None
        rows.append({"variant": variant, "seed": run["seed"], **scores["iou"]})
    return pd.DataFrame(rows)


def per_class_markdown(per_class: pd.DataFrame, order: Sequence[str] = ()) -> str:
    """One row per variant: each class's IoU, mean over its seeds."""
    classes = [c for c in per_class.columns if c not in ("variant", "seed")]
    means = per_class.groupby("variant", sort=False)[classes].mean()
    seeds = per_class.groupby("variant", sort=False)["seed"].nunique()
    lines = ["| variant | seeds | " + " | ".join(classes) + " |", "|---|---|" + "---|" * len(classes)]
    for variant in _in_order(list(means.index), order):
        cells = " | ".join("–" if pd.isna(v) else f"{v:.3f}" for v in means.loc[variant])
        lines.append(f"| {variant} | {seeds[variant]} | {cells} |")
    return "\n".join(lines) + "\n"


def _save_figure(fig: Any, path: Path) -> None:
    import matplotlib.pyplot as plt

    with atomic_file(path) as handle:
        fig.savefig(handle, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)


def bar_chart(summary: pd.DataFrame, path: Path) -> None:
    """Pseudo-mask (train) and segmenter (val) mIoU per variant, std over seeds as error bars."""
    import matplotlib.pyplot as plt

    x = np.arange(len(summary))
    fig, ax = plt.subplots(figsize=(max(6.0, 0.8 * len(summary)), 3.6))
    for offset, column in ((-0.2, "pseudo_miou"), (0.2, "segmenter_miou")):
        ax.bar(
            x + offset, summary[f"{column}_mean"], 0.4, yerr=summary[f"{column}_std"].fillna(0), capsize=3,
            label=METRICS[column],
        )  # fmt: skip
    ax.set_xticks(x, summary["variant"], rotation=30, ha="right")
    ax.set_ylabel("mIoU")
    ax.legend(loc="lower right")
    ax.grid(axis="y", alpha=0.3)
    _save_figure(fig, path)


def mask_ratio_table(runs: pd.DataFrame, sweep: Sequence[str]) -> pd.DataFrame:
    """Mean and std of both mIoUs per mask ratio over the sweep's variants."""
    picked = runs[runs["variant"].isin(sweep)]
    table = picked.groupby("mask_ratio")[["pseudo_miou", "segmenter_miou"]].agg(["mean", "std"])
    table.columns = [f"{metric}_{stat}" for metric, stat in table.columns]
    return table.reset_index()


def mask_ratio_curve(table: pd.DataFrame, path: Path) -> None:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.0, 3.4))
    for column in ("pseudo_miou", "segmenter_miou"):
        ax.errorbar(
            table["mask_ratio"], table[f"{column}_mean"], yerr=table[f"{column}_std"].fillna(0), marker="o",
            capsize=3, label=METRICS[column],
        )  # fmt: skip
    # a ratio whose classifiers closed every head has no maps: marked on the axis instead of left out
    for ratio in table.loc[table["pseudo_miou_mean"].isna(), "mask_ratio"]:
        ax.axvline(ratio, color="grey", linestyle=":")
        ax.annotate("no maps\n(every head\nclosed)", (ratio, 0.5), xycoords=("data", "axes fraction"), ha="right")
    ax.set_xlabel("mask ratio (P(zeroing an absent class's [CLS] output))")
    ax.set_ylabel("mIoU")
    ax.grid(alpha=0.3)
    ax.legend()
    _save_figure(fig, path)


def _run_dir(root: str | Path, row: pd.Series) -> Path:
    """A finished cell's folder (``<root>/<scale>/<variant>/seed<k>``) from its row (indexed by variant)."""
    return Path(root, row["scale"], row.name, f"seed{row['seed']}")


def _mask_table(root: str | Path, row: pd.Series) -> Path:
    """A finished cell's pseudo-mask table of the training split (the pseudo-mask stage's output)."""
    return _run_dir(root, row) / "pseudo_masks" / "train.parquet"


def qualitative_grid(
    runs: pd.DataFrame, root: Path, num_images: int, device: torch.device, order: Sequence[str] = ()
) -> Any:
    """Training images with >= 2 classes: image, ground truth, every variant's pseudo mask (lowest seed), then
    the attention maps of the image's first classes for ``full`` and ``no_masking`` (class named in the cell)."""

    from wsss.lib.artifacts import MODEL_FILE, classifier_images, load_classifier, read_ingested
    from wsss.lib.config import map_block_count
    from wsss.lib.dataset_format import read_mask_table
    from wsss.lib.images import decode_mask_png, display_rgb, read_image, to_uint8
    from wsss.lib.mask_rule import attention_maps, normalized_maps
    from wsss.lib.plotting import class_legend, colorize, heatmap, image_grid
    from wsss.research.diagnose_maps import multi_class_train_images

    dataset = read_ingested(Path(runs["dataset"].iloc[0]))  # the grid's copy of the data set the runs trained on
    with_masks = runs[runs["pseudo_miou"].notna()]  # a variant that closed every head has no masks
    first = with_masks.sort_values("seed").groupby("variant", sort=False).head(1).set_index("variant")
    first = first.loc[_in_order(list(first.index), order)]
    subset, gts = multi_class_train_images(dataset, num_images)
    picked = list(subset.manifest.itertuples(index=False))
    images = [display_rgb(to_uint8(read_image(dataset.path(row.image)), dataset.bands)) for row in picked]
    columns: dict[str, list[np.ndarray]] = {"image": images, "ground truth": [colorize(gt) for gt in gts]}
    for variant, row in first.iterrows():
        table = read_mask_table(_mask_table(root, row), encoded=True)
        columns[variant] = [colorize(decode_mask_png(table[p.id], f"pseudo mask of {p.id!r}")) for p in picked]
    captions: dict[str, list[str]] = {}  # the class of each map cell
    for variant in (v for v in MAP_VARIANTS if v in first.index):
        model, record = load_classifier(Path(first.loc[variant, "classifier_dir"]) / MODEL_FILE, device)
        # the model's own input (all bands, its size), as the pseudo-mask stage feeds it
        data = classifier_images(model, subset, "train")
        # the blocks the run's pseudo masks were made from (map_blocks: auto resolved by the stage)
        stats = json.loads((_run_dir(root, first.loc[variant]) / "pseudo_masks" / "stats.json").read_text())
        blocks = map_block_count(stats.get("map_blocks", "last"))
        refine = stats.get("refine_iterations", 0)
        maps, _ = attention_maps(model, data.images, device, blocks=blocks, refine=refine)
        for k in range(MAPS_PER_IMAGE):
            cells, names = [], []
            for i, gt in enumerate(gts):
                classes = np.setdiff1d(np.unique(gt), [0, 255]).astype(int) - 1
                cls = classes[min(k, len(classes) - 1)]
                cells.append(heatmap(normalized_maps(maps[i][[cls]], gt.shape)[0].numpy()))
                names.append(record["classes"][cls])
            columns[f"{variant} map {k + 1}"], captions[f"{variant} map {k + 1}"] = cells, names
    title = f"train split, {len(picked)} images with two or more classes: pseudo masks (lowest seed) and maps"
    return image_grid(columns, title, class_legend(dataset.classes), captions)


def log_to_mlflow(scale: str, summary: pd.DataFrame, files: Sequence[Path], root: str | Path = ".") -> str:
    """One run in the experiment ``wsss-ablations``: per-variant means/stds as metrics, the files as artifacts."""
    from wsss.lib.tracking import ensure_experiment, get_client, metric_key

    client = get_client(root)
    run = client.create_run(ensure_experiment(client, root, EXPERIMENT), run_name=f"ablations-{scale}")
    run_id = run.info.run_id
    client.log_param(run_id, "scale", scale)
    client.log_param(run_id, "variants", ",".join(summary["variant"]))
    for _, row in summary.iterrows():
        for column in METRICS:
            for stat in ("mean", "std"):
                value = row[f"{column}_{stat}"]
                if not pd.isna(value):
                    client.log_metric(run_id, metric_key(f"{row['variant']}.{column}_{stat}"), float(value))
    for path in files:
        client.log_artifact(run_id, str(path))
    client.set_terminated(run_id)
    return run_id


def write_report(
    config: AblationConfig,
    scale: str,
    root: str | Path = DEFAULT_ROOT,
    out: str | Path = REPORT_ROOT,
    grid_images: int = 6,
    device: torch.device | str = "cpu",
    mlflow: bool = True,
) -> pd.DataFrame:
    """Builds every report file of ``scale`` from the finished runs; returns the summary table."""
    import matplotlib

    matplotlib.use("Agg")
    root, out = Path(root), Path(out) / scale
    runs = collect(root, scale)
    summary = summarize(runs, list(config.variants))
    out.mkdir(parents=True, exist_ok=True)
    files = []

    def write(name: str, data: bytes | str) -> None:
        with atomic_file(out / name, "w" if isinstance(data, str) else "wb") as handle:
            handle.write(data)
        files.append(out / name)

    write("table.md", markdown_table(summary))
    write("table.csv", summary.to_csv(index=False, float_format="%.6g"))
    for name, frame in (("table.parquet", summary), ("runs.parquet", runs.drop(columns="overrides"))):
        buffer = io.BytesIO()
        frame.to_parquet(buffer, index=False)
        write(name, buffer.getvalue())
    paired = paired_differences(runs, config.paired, list(config.variants))
    if not paired.empty:
        write("paired.md", paired_markdown(paired))
        write("paired.csv", paired.to_csv(index=False, float_format="%.6g"))
    per_class = per_class_iou(runs, root)
    if not per_class.empty:
        write("per_class.md", per_class_markdown(per_class, list(summary["variant"])))
        write("per_class.csv", per_class.to_csv(index=False, float_format="%.6g"))
    bar_chart(summary, out / "bars.png")
    files.append(out / "bars.png")
    sweep = mask_ratio_table(runs, config.mask_ratio_sweep)
    if len(sweep) >= 2:
        # Only ratios with maps: a plotter reads a blank as 0 (DVC's chart drew 0.00 at 1.0); the PNG marks them.
        with_maps = sweep.dropna(subset=["pseudo_miou_mean"])
        write("mask_ratio.csv", with_maps.to_csv(index=False, float_format="%.6g"))
        mask_ratio_curve(sweep, out / "mask_ratio.png")
        files.append(out / "mask_ratio.png")
    if grid_images > 0:
        grid = qualitative_grid(runs, root, grid_images, torch.device(device), list(summary["variant"]))
        buffer = io.BytesIO()
        grid.save(buffer, format="PNG")
        write("grid.png", buffer.getvalue())
    if mlflow:
        log_to_mlflow(scale, summary, files)
    return summary
