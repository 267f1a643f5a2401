"""``wsss-research curve``: does the class tokens' own attention become class-specific with training steps?

Trains the classifier of one ablation cell (scale x variant x seed of ``ablations.yaml``) for ``--epochs`` epochs with
the product's trainer and, after every epoch, probes it on the first ``--images`` training images whose ground truth
holds two or more classes (:func:`attention_probe`): class specificity of the last block's [CLS]_c attention (mean over
its open heads; the class tokens' own attention, never the PatchCAM-fused maps), the area share it is measured against,
how often the argmax over the present classes' maps names a foreground pixel's class (against always naming the
image's largest class), and the mean pairwise cosine of the present classes' tokens entering the last block. The rows
go into the classifier's ``history.csv`` beside loss and val mAP; the curve (steps, images seen, seconds) is copied to
``reports/curves/<scale>/<variant>_seed<seed>.csv`` when the run ends, and ``--report-only`` draws a scale's curves
(one line per variant, labelled with its read-out) with a table of their last rows. A killed run resumes from its last
epoch's checkpoint.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from wsss.lib.artifacts import classifier_images
from wsss.lib.dataset_format import DatasetIndex
from wsss.lib.datasets import shape_groups
from wsss.lib.errors import WsssError
from wsss.lib.io import write_csv
from wsss.models.token_masking_vit import TokenMaskingViT
from wsss.research.diagnose_maps import block_class_rows, map_specificity, multi_class_train_images, pairwise_cosine

CURVE_ROOT = Path("reports/curves")
PROBE_KEYS = ("specificity", "area_share", "assignment", "assignment_chance", "token_cosine")


@torch.no_grad()
def attention_probe(model: TokenMaskingViT, subset: DatasetIndex, gts: Sequence[np.ndarray]) -> dict[str, float]:
    """The last block's class-token attention on ``subset`` (training images with >= 2 classes, ground truth
    ``gts``): the means over the images' classes of specificity and area share, the argmax assignment and its
    majority-class chance over their foreground pixels, the mean pairwise cosine of the present tokens."""
    was_training = model.training
    model.eval()
    data = classifier_images(model, subset, "train")
    last = len(model.blocks) - 1
    heads = model.blocks[last].attn.open_heads()
    if not heads.any():
        heads = torch.ones_like(heads)  # every head closed: the probe still reads them all
    shares, areas, cosines, hits, majority, pixels = [], [], [], 0, 0, 0
    groups = (
        group for start in range(0, len(gts), 64) for group in shape_groups(data.images[start : start + 64], start)
    )
    for indices, images in groups:  # images of one size, 64 at most
        rows, states, _ = block_class_rows(model, images)
        for j, gt in enumerate(gts[k] for k in indices):
            classes = np.setdiff1d(np.unique(gt), [0, 255]).astype(int) - 1
            maps = rows[last][j][heads][:, classes].mean(0)  # [K, h, w]
            share, area = map_specificity(maps, gt, classes)
            shares += share
            areas += area
            cosines.append(pairwise_cosine(states[last][j, classes]))
            up = torch.nn.functional.interpolate(maps[None], size=gt.shape, mode="bilinear", align_corners=False)[0]
            foreground = (gt != 0) & (gt != 255)
            truth = gt[foreground].astype(int) - 1
            picked = classes[up.argmax(0).numpy()[foreground]]
            hits += int((picked == truth).sum())
            majority += int(np.bincount(truth).max())
            pixels += int(foreground.sum())
    model.train(was_training)
    return {
        "specificity": float(np.mean(shares)),
        "area_share": float(np.mean(areas)),
        "assignment": hits / max(pixels, 1),
        "assignment_chance": majority / max(pixels, 1),
        "token_cosine": float(np.mean(cosines)),
    }


def epoch_probe(dataset: DatasetIndex, images: int) -> Callable[[TokenMaskingViT], dict[str, float]]:
    """The trainer's per-epoch hook: :func:`attention_probe` on the first ``images`` multi-class training images."""
    subset, gts = multi_class_train_images(dataset, images)
    return lambda model: attention_probe(model, subset, gts)


def run_curve(cell: Any, epochs: int, images: int, out_root: Path = CURVE_ROOT) -> Path:
    """Trains ``cell``'s classifier ``epochs`` epochs with the probe after each; returns the curve CSV."""
    from wsss.lib.artifacts import read_ingested
    from wsss.lib.distributed import process_group, steps_per_epoch
    from wsss.tasks.train_classifier import train_classifier

    params = cell.params
    if params.trainer.nproc != 1:
        raise WsssError("curve: trainer.nproc must be 1 (the probe runs in the training process)")
    settings = dataclasses.replace(params.classifier, epochs=epochs)
    out = Path(params.classifier.out)
    began = time.perf_counter()
    with process_group(params) as (device, world):
        dataset = read_ingested(Path(params.ingest.out))
        probe = epoch_probe(dataset, images)
        result = train_classifier(dataset, settings, out, params.seed, device, world, params.trainer, epoch_end=probe)
    history = pd.read_csv(out / "history.csv")
    steps = steps_per_epoch(len(dataset.split("train")), settings.batch_size)
    history.insert(1, "steps", history["epoch"] * steps)
    history.insert(2, "images_seen", history["steps"] * settings.batch_size)
    curve = out_root / cell.scale / f"{cell.variant}_seed{cell.seed}.csv"
    rows = history.to_dict("records")
    backbone_lr = settings.lr if settings.backbone_group_lr is None else settings.backbone_group_lr  # as trained
    for row in rows:
        row.update(backbone_lr=backbone_lr, lr=settings.lr, precision=result.get("precision"))
    write_csv(curve, rows)
    print(f"curve {cell.name}: {len(rows)} epochs, {rows[-1]['steps']} steps in {time.perf_counter() - began:.0f}s "
          f"-> {curve}")  # fmt: skip
    return curve


def plan_curve(config: Any, params_file: str, root: str, scale: str | None, variant: str, seed: int, epochs: int,
               overrides: Sequence[str] = ()) -> Any:  # fmt: skip
    """The ablation cell of (scale, variant, seed) with ``epochs`` classifier epochs (an override over the scale's,
    so the cell's override list says so), its classifier in a folder of its own (keyed by those epochs: never the
    grid's one-epoch classifier)."""
    from wsss.research import ablations

    (cell,) = ablations.plan(
        config, params_file, root, scale, [variant], [seed], [*overrides, f"classifier.epochs={epochs}"]
    )
    return cell


def classifier_done(cell: Any) -> bool:
    """Whether the cell's classifier has finished training (its metrics.json is written last)."""
    return (Path(cell.params.classifier.out) / "metrics.json").is_file()


def curve_cell(cell: Any, epochs: int, out_root: Path = CURVE_ROOT) -> dict[str, Any]:
    """The cell's pseudo masks and segmenter on its ``epochs``-epoch classifier
    (:func:`wsss.research.ablations.run_cell`, in a run folder of its own, never the grid's one-epoch cell); the
    result row is also written to
    ``<out_root>/<scale>/<variant>_seed<seed>_cell.json``."""
    from wsss.lib.io import write_json
    from wsss.research import ablations

    run_dir = Path(cell.run_dir).parent.parent / "curves" / f"{cell.variant}_e{epochs}" / f"seed{cell.seed}"
    params = dataclasses.replace(
        cell.params,
        pseudo_masks=dataclasses.replace(cell.params.pseudo_masks, out=str(run_dir / "pseudo_masks")),
        segmenter=dataclasses.replace(cell.params.segmenter, out=str(run_dir / "segmenter")),
    )
    row = ablations.run_cell(dataclasses.replace(cell, params=params, run_dir=run_dir))
    row = {**row, "classifier_epochs": epochs}
    write_json(out_root / cell.scale / f"{cell.variant}_seed{cell.seed}_cell.json", row)
    print(f"cell {cell.name} at {epochs} epochs: pseudo-mask mIoU {row['pseudo_miou']:.3f} (ceiling "
          f"{row['pseudo_ceiling_miou']:.3f}), segmenter {row['segmenter_miou']:.3f}, specificity "
          f"{row['class_specificity']:.3f} vs {row['area_share']:.3f}")  # fmt: skip
    return row


def curve_files(scale: str, out_root: Path = CURVE_ROOT) -> list[Path]:
    """The scale's curve CSVs, ``<variant>_seed<seed>.csv``, by name."""
    return sorted((out_root / scale).glob("*_seed*.csv"))


def read_outs(config: Any, params_file: str, root: str, scale: str, files: Sequence[Path]) -> dict[str, str]:
    """Each curve's classifier read-out (``classifier.head`` of its cell): a variant's name alone hides it
    (``full`` is the linear read-out at one scale, the shared one at another)."""
    heads = {}
    for path in files:
        variant, seed = path.stem.rsplit("_seed", 1)
        cell = plan_curve(config, params_file, root, scale, variant, int(seed), 1)
        heads[path.stem] = cell.params.classifier.head
    return heads


def curve_report(scale: str, out_root: Path = CURVE_ROOT, heads: Mapping[str, str] | None = None) -> pd.DataFrame:
    """``<out_root>/<scale>/curves.png`` (specificity minus area share, and val mAP, against optimizer steps; one
    line per curve file, labelled with its read-out from ``heads`` when given) and ``table.md`` (each curve's last
    row); returns that table.

    Raises:
        WsssError: no curve of ``scale`` has been written.
    """
    import matplotlib.pyplot as plt

    folder = out_root / scale
    files = curve_files(scale, out_root)
    if not files:
        raise WsssError(f"{folder}: no curve yet (run `wsss-research curve --scale {scale} --variant ...` first)")
    panel_inches, legend_columns = 4, 3
    legend_inches = 0.2 * -(-len(files) // legend_columns) + 0.1  # 0.2 in a legend row
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, panel_inches + legend_inches))
    last = []
    for path in files:
        curve = pd.read_csv(path)
        head = (heads or {}).get(path.stem)
        label = f"{path.stem} ({head} read-out)" if head else path.stem
        left.plot(curve["steps"], curve["specificity"] - curve["area_share"], marker="o", label=label)
        right.plot(curve["steps"], curve["val_map"], marker="o", label=label)
        curve["train_minutes"] = curve["seconds"].cumsum() / 60  # history's seconds are each epoch's own
        read_out = {"read_out": head} if heads is not None else {}
        last.append({"curve": path.stem, **read_out, **curve.iloc[-1][["epoch", "steps", "images_seen",
                                                                      "backbone_lr", "lr", "train_minutes",
                                                                      "val_map", *PROBE_KEYS]].to_dict()})  # fmt: skip
    left.axhline(0.05, color="grey", linestyle=":", linewidth=1)
    left.set(xlabel="optimizer steps", ylabel="class specificity - area share", title="[CLS]_c attention, last block")
    right.set(xlabel="optimizer steps", ylabel="val mAP", title="classification")
    # Below both panels, not inside one: with more than a few curves an inner legend hides the lines.
    fig.legend(*left.get_legend_handles_labels(), loc="lower center", ncol=legend_columns, fontsize=7, frameon=False)
    fig.tight_layout(rect=(0, legend_inches / (panel_inches + legend_inches), 1, 1))
    fig.savefig(folder / "curves.png", dpi=110)
    plt.close(fig)
    table = pd.DataFrame(last)
    rates = ("backbone_lr", "lr")  # peak rates as set, not rounded to 0.000 by the others' 3 decimals
    formats = ["g" if column in rates else ".3f" for column in table.columns]
    (folder / "table.md").write_text(table.to_markdown(index=False, floatfmt=formats) + "\n")
    return table
