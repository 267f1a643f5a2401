"""Where a pixel refiner acts (issue 33): on the decided mask, as the product does, or on the class maps before the
rule, measured on one ablation cell's classifier with training images only (never val).

The first ``tune`` training images with ground truth decide the rule as the pseudo-mask stage does (map blocks and
thresholds, :func:`wsss.lib.mask_rule.decide_rule`, unrefined); the next ``images - tune`` are scored:

- on the mask: the rule paints at those thresholds and the refiner replaces the nearest-pixel fill
  (:func:`wsss.lib.pixel_refine.refine_masks`, the product's path);
- on the maps: the refiner acts on per-pixel scores over background (1 - the highest class map) and the present
  classes' normalised maps, and the rule then runs on the refined class maps (normalised again) with thresholds
  searched again on the refined maps of the tuning images.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from wsss.lib.artifacts import MODEL_FILE, load_map_model, read_ingested
from wsss.lib.images import read_mask
from wsss.lib.io import atomic_file, write_json
from wsss.lib.mask_rule import (
    ThresholdSearch,
    decide_rule,
    fill_unassigned,
    gt_positions,
    image_maps,
    merge_maps,
    normalized_maps,
    paint,
    split_maps,
)
from wsss.lib.metrics import mean_iou
from wsss.lib.pixel_refine import refine_masks, refine_scores

Sample = tuple[torch.Tensor, np.ndarray, np.ndarray, np.ndarray]  # normalised maps, classes, probs, ground truth


def map_scores(maps: torch.Tensor) -> torch.Tensor:
    """Scores ``[1 + K, H, W]`` summing to 1 per pixel from normalised class maps ``[K, H, W]``: background
    ``1 - max`` beside the maps (all background where no class is present)."""
    if len(maps) == 0:
        return torch.ones(1, *maps.shape[1:])
    scores = torch.cat([1.0 - maps.amax(0, keepdim=True), maps]).clamp_min(1e-6)
    return scores / scores.sum(0, keepdim=True)


def refined_samples(samples: Sequence[Sample], images: Sequence[torch.Tensor], refiner: str,
                    iterations: Sequence[int]) -> dict[int, list[Sample]]:  # fmt: skip
    """``samples`` whose class maps are ``refiner``'s output after each of ``iterations`` (min-max normalised
    again, as the rule's step 2 leaves them)."""
    refined = refine_scores(images, [map_scores(maps) for maps, *_ in samples], refiner, iterations)
    return {
        n: [
            (normalized_maps(s[1:], tuple(s.shape[-2:])) if len(s) > 1 else s[1:], classes, probs, gt)
            for s, (_, classes, probs, gt) in zip(scores, samples, strict=True)
        ]
        for n, scores in refined.items()
    }


def placement_scores(
    tune: Sequence[Sample],
    scored: Sequence[Sample],
    tune_images: Sequence[torch.Tensor],
    images: Sequence[torch.Tensor],
    thresholds: tuple[float, float],
    num_classes: int,
    refiners: Sequence[str] = ("par", "crf"),
    iterations: Sequence[int] = (10, 20, 40, 80),
) -> dict[str, Any]:
    """mIoU on the ``scored`` samples of the rule unrefined and of each refiner on the mask and on the maps after
    each of ``iterations`` (``thresholds``: the rule's (fg, bg), found unrefined on ``tune``; the maps' path searches
    its own there)."""
    fg, bg = thresholds
    gts = [gt for *_, gt in scored]
    painted = [paint(maps, classes, probs, fg, bg) for maps, classes, probs, _ in scored]
    unrefined = mean_iou(zip(gts, [fill_unassigned(m.numpy()) for m in painted], strict=True), num_classes + 1)
    rows = []
    for refiner in refiners:
        on_mask = refine_masks(images, painted, [s[1] for s in scored], refiner, iterations)
        for n in iterations:
            miou = mean_iou(zip(gts, [m.numpy() for m in on_mask[n]], strict=True), num_classes + 1)
            rows.append({"refiner": refiner, "acts_on": "mask", "iterations": n, "miou": miou, "fg": fg, "bg": bg})
        tuned = refined_samples(tune, tune_images, refiner, iterations)
        held = refined_samples(scored, images, refiner, iterations)
        for n in iterations:
            f, b, _ = ThresholdSearch(tuned[n], num_classes).refine()
            masks = [merge_maps(maps, classes, probs, f, b) for maps, classes, probs, _ in held[n]]
            miou = mean_iou(zip(gts, masks, strict=True), num_classes + 1)
            rows.append({"refiner": refiner, "acts_on": "maps", "iterations": n, "miou": miou, "fg": f, "bg": b})
    return {"unrefined": unrefined, "rows": rows}


def measure(cell: Any, images: int = 600, tune: int = 200, refiners: Sequence[str] = ("par", "crf")) -> dict[str, Any]:
    """:func:`placement_scores` on the first ``images`` training images with ground truth of ``cell``'s data set,
    the first ``tune`` of them deciding the rule, with the cell's classifier (trained first when it is missing)."""
    from wsss.lib.runtime import resolve_precision, setup_runtime
    from wsss.research.curves import classifier_done
    from wsss.tasks import train_classifier

    params = cell.params
    if not classifier_done(cell):
        train_classifier.main(params)
    device = setup_runtime(params.seed, params.num_threads, params.device)
    dataset = read_ingested(Path(params.ingest.out))
    model = load_map_model(Path(params.classifier.out) / MODEL_FILE, device)
    precision = resolve_precision(params.trainer.precision, device)
    rule_params = dataclasses.replace(params.pseudo_masks, tune_images=tune, pixel_refine="none", split="train")
    rule = decide_rule(model, dataset, rule_params, device, precision)
    with_gt = gt_positions(dataset, "train")[:images]
    blocks = len(rule.map_layers) if rule.map_blocks != "all" else None
    found = split_maps(model, dataset, rule_params, device, with_gt, blocks, precision=precision)
    samples, pixels = [], []
    for i in range(len(with_gt)):
        maps, classes, probs = image_maps(found, i, True)
        samples.append((maps.cpu(), classes, probs, read_mask(dataset.root / found.gt_paths[i])))
        pixels.append(found.image(i))
    iterations = tuple(params.pseudo_masks.pixel_refine_iterations)
    thresholds = (rule.fg_threshold, rule.bg_threshold)
    result = placement_scores(
        samples[:tune], samples[tune:], pixels[:tune], pixels[tune:], thresholds, dataset.num_classes, refiners,
        iterations,
    )  # fmt: skip
    return {
        "cell": cell.name,
        "classifier": params.classifier.out,
        "tune_images": tune,
        "scored_images": len(samples) - tune,
        "map_blocks": rule.map_blocks,
        **result,
    }


def table(result: dict[str, Any]) -> str:
    """The result as a markdown table: one row per refiner and place, a column per iteration count."""
    counts = sorted({row["iterations"] for row in result["rows"]})
    lines = [
        f"{result['cell']}: rule decided on {result['tune_images']} training images (maps {result['map_blocks']}), "
        f"scored on the next {result['scored_images']}; unrefined mIoU {result['unrefined']:.3f}",
        "",
        "| refiner | acts on | " + " | ".join(f"{n} iterations" for n in counts) + " |",
        "|---|---|" + "---|" * len(counts),
    ]
    places: dict[tuple[str, str], dict[int, float]] = {}
    for row in result["rows"]:
        places.setdefault((row["refiner"], row["acts_on"]), {})[row["iterations"]] = row["miou"]
    for (refiner, acts_on), scores in places.items():
        lines.append(f"| {refiner} | {acts_on} | " + " | ".join(f"{scores[n]:.3f}" for n in counts) + " |")
    return "\n".join(lines) + "\n"


def write(result: dict[str, Any], out: Path) -> Path:
    """``<out>/placement_<variant>_seed<seed>.json`` and its ``.md`` table (``cell`` is scale/variant/seedK)."""
    _, variant, seed = result["cell"].split("/")
    path = out / f"placement_{variant}_{seed}.json"
    write_json(path, result)
    with atomic_file(path.with_suffix(".md"), "w") as handle:
        handle.write(table(result))
    return path
