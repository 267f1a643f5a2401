"""Prefect flow ``pseudo-masks-sharded``: the pseudo-mask stage cut into shards on a Dask cluster.

``wsss pseudo-masks`` (the DVC stage's command) runs this flow instead of the stage when ``dask.shards``
> 1. The steps are the ones of the serial stage (tasks/pseudo_masks.py), which owns all the logic:

1. task ``mask rule``: the thresholds (tuned on a training sample) and the map layer, once, in the flow's
   own process with all ``num_threads`` threads: the workers have nothing to do until it is decided;
2. one task ``shard k`` per run of images (:func:`wsss.tasks.pseudo_masks.shard_ranges`), all submitted to
   the Dask cluster at once (:func:`wsss.tasks.pseudo_masks.pseudo_mask_shard`);
3. in the flow: :func:`wsss.tasks.pseudo_masks.gather` in split order and the same artifact as the serial path
   (``<out>/<split>.parquet`` + ``stats.json``, identical bit for bit).

The task runner is prefect-dask's ``DaskTaskRunner``: a ``distributed.LocalCluster`` of ``dask.workers``
processes (one task at a time each) by default, or the cluster at ``dask.scheduler``. Each task sets its
own torch thread count (``num_threads // workers``) so the workers do not oversubscribe the cores. Every
worker loads the ingested manifest and the classifier (closed heads pruned, as in the serial stage) from
the paths in params, so a remote cluster needs the wsss package installed and the repo's files at the same
paths (a shared file system).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE

from wsss.lib.config import Params
from wsss.lib.errors import WsssError
from wsss.lib.mask_rule import MaskRule
from wsss.tasks.pseudo_masks import ShardResult

FLOW_NAME = "pseudo-masks-sharded"


def torch_threads(params: Params) -> int:
    """Torch threads per shard task: the thread budget split across the workers that run side by side."""
    from wsss.lib.runtime import resolve_threads

    return max(1, resolve_threads(params.num_threads, announce=False) // params.dask.workers)


def _load(params: Params, threads: int):
    """(device, pruned model, data set) in this process, with its torch thread count set first."""
    from wsss.lib.artifacts import MODEL_FILE, load_map_model, read_ingested
    from wsss.lib.runtime import setup_runtime

    device = setup_runtime(params.seed, threads, params.device)
    dataset = read_ingested(Path(params.ingest.out))
    return device, load_map_model(Path(params.classifier.out) / MODEL_FILE, device), dataset


@task(name="mask rule", cache_policy=NO_CACHE)
def mask_rule(params: Params) -> MaskRule:
    """Thresholds (tuned on the training sample when asked) and the map layer: one step before the shards."""
    from wsss.lib.mask_rule import decide_rule
    from wsss.lib.runtime import resolve_precision

    device, model, dataset = _load(params, params.num_threads)
    return decide_rule(model, dataset, params.pseudo_masks, device, resolve_precision(params.trainer.precision, device))


@task(name="pseudo-mask shard", task_run_name="shard {index}: images {start}-{stop}", cache_policy=NO_CACHE)
def mask_shard(params: Params, rule: MaskRule, index: int, start: int, stop: int) -> tuple[ShardResult, float]:
    """One shard's masks and statistics, and the seconds it took in the worker."""
    from wsss.tasks.pseudo_masks import pseudo_mask_shard

    began = time.perf_counter()
    device, model, dataset = _load(params, torch_threads(params))
    result = pseudo_mask_shard(model, dataset, params.pseudo_masks, rule, start, stop, device)
    return result, time.perf_counter() - began


@flow(name=FLOW_NAME, log_prints=True)
def sharded_pseudo_masks(params: Params) -> dict[str, Any]:
    """Rule, shards, gather, write; returns ``{"stats": stats.json content, "seconds": timings}``."""
    from wsss.lib.artifacts import read_ingested
    from wsss.lib.runtime import resolve_device, write_runtime
    from wsss.tasks.pseudo_masks import gather, shard_ranges, write_pseudo_masks

    logger = get_run_logger()
    settings = params.pseudo_masks
    num_images = len(read_ingested(Path(params.ingest.out)).split(settings.split))
    ranges = shard_ranges(num_images, params.dask.shards, settings.batch_size)
    began = time.perf_counter()
    rule = mask_rule(params)  # called, not submitted: runs here, before any shard
    rule_s = time.perf_counter() - began
    logger.info("mask rule in %.1f s: %s; %d shards of %s", rule_s, rule, len(ranges), settings.split)
    futures = [mask_shard.submit(params, rule, k, start, stop) for k, (start, stop) in enumerate(ranges)]
    done = [future.result() for future in futures]  # split order, whatever order they finished in
    shards_s = time.perf_counter() - began - rule_s
    ids, masks, stats = gather([result for result, _ in done], settings, rule)
    write_pseudo_masks(settings, ids, masks, stats)
    write_runtime(settings.out, params.trainer.precision, resolve_device(params.device))  # the rule's process
    seconds = {
        "rule": rule_s,
        "shards_wall": shards_s,
        "shard_tasks": [task_s for _, task_s in done],
        "gather_write": time.perf_counter() - began - rule_s - shards_s,
    }
    logger.info("%d shards in %.1f s (tasks: %s s)", len(done), shards_s, [round(s, 1) for s in seconds["shard_tasks"]])
    return {"stats": stats, "seconds": seconds}


def task_runner(params: Params):
    """prefect-dask's runner on the cluster at ``dask.scheduler``, else on a fresh local cluster."""
    from prefect_dask import DaskTaskRunner

    if params.dask.scheduler:
        return DaskTaskRunner(address=params.dask.scheduler)
    return DaskTaskRunner(
        cluster_class="distributed.LocalCluster",
        cluster_kwargs={
            "n_workers": params.dask.workers,
            "threads_per_worker": 1,  # one shard at a time per worker; its torch threads are set per task
            "processes": True,
            "host": "127.0.0.1",
            "dashboard_address": None,
        },
    )


def run_sharded(params: Params) -> dict[str, Any]:
    """Runs the flow with the Dask task runner of ``params``; see :func:`sharded_pseudo_masks`.

    Raises:
        WsssError: the scheduler at ``dask.scheduler`` cannot be reached.
    """
    runner = task_runner(params)
    # distributed (imported by now: its import sets the level) logs every worker and client (dis)connection
    # at INFO: noise in the stage's log.
    logging.getLogger("distributed").setLevel(logging.WARNING)
    try:
        return sharded_pseudo_masks.with_options(task_runner=runner)(params)
    except OSError as err:
        if not params.dask.scheduler:
            raise
        raise WsssError(f"dask.scheduler {params.dask.scheduler}: {err}") from None


def main(argv: list[str] | None = None) -> int:
    """``python -m wsss.pipelines.pseudo_masks [--params FILE] [-S key=value ...]``: what ``wsss pseudo-masks``
    starts when ``dask.shards`` > 1 (as it starts torchrun for ``trainer.nproc`` > 1): the CLI does not import
    the flows. Errors end with the stage's one line and exit code 1."""
    import argparse
    import sys

    from wsss.lib.config import load_params

    parser = argparse.ArgumentParser(prog="python -m wsss.pipelines.pseudo_masks")
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("-S", "--set", dest="overrides", action="append", default=[])
    args = parser.parse_args(argv)
    try:
        run_sharded(load_params(args.params, args.overrides))
    except WsssError as err:
        print(f"wsss pseudo-masks: error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
