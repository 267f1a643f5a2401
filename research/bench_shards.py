"""Pseudo masks serial vs sharded over a Dask LocalCluster, side by side in one run (not a test).

    python -m wsss.research.bench_shards [--params params.yaml] [--shards 2] [--workers 2] [--repeats 2]

Needs the ingested data set and the trained classifier of ``params.yaml`` (``dvc repro train_classifier``).
The serial path runs in this process with ``num_threads`` torch threads; the sharded path is the Prefect
flow ``pseudo-masks-sharded`` on a fresh ``LocalCluster`` of ``--workers`` processes with
``num_threads // workers`` threads each, cluster start-up included (the Prefect server is started once
before the timings). Both write to a temporary folder; their files are compared byte for byte.
Writes ``reports/shards.json`` and a table beside it (``.md``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from wsss.lib.config import DaskParams, Params, load_params


def _serial(params: Params) -> dict[str, float]:
    """The stage's serial path, timed by step (model and data loading count as part of the first)."""
    import torch

    from wsss.lib.artifacts import MODEL_FILE, load_classifier, read_ingested
    from wsss.lib.mask_rule import decide_rule
    from wsss.lib.runtime import setup_runtime
    from wsss.tasks.pseudo_masks import gather, pseudo_mask_shard, write_pseudo_masks

    began = time.perf_counter()
    device = setup_runtime(params.seed, params.num_threads, params.device)
    dataset = read_ingested(Path(params.ingest.out))
    model, _ = load_classifier(Path(params.classifier.out) / MODEL_FILE, device)
    settings = params.pseudo_masks
    rule = decide_rule(model, dataset, settings, device)
    rule_s = time.perf_counter() - began
    whole = pseudo_mask_shard(model, dataset, settings, rule, 0, len(dataset.split(settings.split)), device)
    masks_s = time.perf_counter() - began - rule_s
    write_pseudo_masks(settings, *gather([whole], settings, rule))
    total = time.perf_counter() - began
    return {"wall": total, "rule": rule_s, "masks": masks_s, "gather_write": total - rule_s - masks_s,
            "torch_threads": torch.get_num_threads()}  # fmt: skip


def _sharded(params: Params) -> dict[str, Any]:
    from wsss.pipelines.pseudo_masks import run_sharded, torch_threads

    began = time.perf_counter()
    seconds = run_sharded(params)["seconds"]
    wall = time.perf_counter() - began
    return {
        "wall": wall,
        "rule": seconds["rule"],
        "masks": seconds["shards_wall"],
        "gather_write": seconds["gather_write"],
        "cluster_and_flow_overhead": wall - seconds["rule"] - seconds["shards_wall"] - seconds["gather_write"],
        "shard_tasks": seconds["shard_tasks"],
        "torch_threads": torch_threads(params),
    }


def _start_prefect_server() -> float:
    """Runs an empty flow so that Prefect's temporary server (when no API is configured) is up before timing."""
    from prefect import flow

    @flow(name="benchmark-warm-up")
    def warm_up() -> None:
        return None

    began = time.perf_counter()
    warm_up()
    return time.perf_counter() - began


def run(params: Params, shards: int, workers: int, repeats: int, out: Path) -> dict[str, Any]:
    """Times both paths ``repeats`` times (alternating), checks identical outputs, writes the report."""
    prefect_s = _start_prefect_server()
    runs: dict[str, list[dict]] = {"serial": [], "sharded": []}
    identical = True
    with tempfile.TemporaryDirectory(prefix="bench-shards-") as scratch:
        dirs = {name: Path(scratch) / name for name in runs}
        serial = dataclasses.replace(
            params, pseudo_masks=dataclasses.replace(params.pseudo_masks, out=str(dirs["serial"]))
        )
        sharded = dataclasses.replace(
            params,
            pseudo_masks=dataclasses.replace(params.pseudo_masks, out=str(dirs["sharded"])),
            dask=DaskParams(shards=shards, workers=workers, scheduler=None),
        )
        for _ in range(repeats):
            runs["serial"].append(_serial(serial))
            runs["sharded"].append(_sharded(sharded))
            for name in (f"{params.pseudo_masks.split}.parquet", "stats.json"):
                identical &= (dirs["serial"] / name).read_bytes() == (dirs["sharded"] / name).read_bytes()
        images = json.loads((dirs["serial"] / "stats.json").read_text())["images"]
    best = {name: min(results, key=lambda r: r["wall"]) for name, results in runs.items()}
    record = {
        "images": images,
        "shards": shards,
        "workers": workers,
        "num_threads": params.num_threads,
        "repeats": repeats,
        "cpu_count": os.cpu_count(),
        "load_average_after": os.getloadavg(),
        "machine": platform.processor() or platform.machine(),
        "prefect_server_start_s_excluded": prefect_s,
        "outputs_identical": identical,
        "speedup_best_wall": best["serial"]["wall"] / best["sharded"]["wall"],
        "speedup_median_wall": statistics.median(r["wall"] for r in runs["serial"])
        / statistics.median(r["wall"] for r in runs["sharded"]),
        "speedup_masks_step": best["serial"]["masks"] / best["sharded"]["masks"],
        "runs": runs,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=2) + "\n")
    out.with_suffix(".md").write_text(_table(record, best))
    return record


def _table(record: dict[str, Any], best: dict[str, dict]) -> str:
    rows = [
        "| path | torch threads | wall s | mask rule s (serial step) | masks s | gather + write s "
        "| cluster/flow overhead s |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, label in (
        ("serial", "serial (stage process)"),
        ("sharded", f"{record['shards']} shards, {record['workers']} workers"),
    ):
        r = best[name]
        threads = r["torch_threads"] if name == "serial" else f"{r['torch_threads']} per worker"
        overhead = f"{r['cluster_and_flow_overhead']:.1f}" if name == "sharded" else "-"
        steps = " | ".join(f"{r[key]:.1f}" for key in ("wall", "rule", "masks", "gather_write"))
        rows.append(f"| {label} | {threads} | {steps} | {overhead} |")
    return (
        f"Pseudo masks of {record['images']} images, best of {record['repeats']} runs each "
        f"({record['cpu_count']} CPUs, load average after {record['load_average_after'][0]:.2f}).\n\n"
        + "\n".join(rows)
        + f"\n\nspeed-up (wall, best): {record['speedup_best_wall']:.2f}x; masks step alone: "
        f"{record['speedup_masks_step']:.2f}x; outputs identical: {record['outputs_identical']}; Prefect "
        f"server start-up ({record['prefect_server_start_s_excluded']:.1f} s) excluded.\n"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m wsss.research.bench_shards", description=__doc__.splitlines()[0])
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--shards", type=int, default=2)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--out", default="reports/shards.json")
    args = parser.parse_args(argv)
    record = run(load_params(args.params), args.shards, args.workers, args.repeats, Path(args.out))
    print(Path(args.out).with_suffix(".md").read_text(), end="")
    return 0 if record["outputs_identical"] else 1


if __name__ == "__main__":
    sys.exit(main())
