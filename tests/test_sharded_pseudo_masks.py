"""Sharded pseudo masks (Prefect flow on a 2-worker Dask LocalCluster) against the serial stage."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from wsss.lib.config import DaskParams, Params
from wsss.tasks.pseudo_masks import shard_ranges


def test_shard_edges_fall_on_whole_batches_and_cover_the_split():
    assert shard_ranges(4000, 2, 128) == [(0, 2048), (2048, 4000)]
    assert shard_ranges(48, 3, 8) == [(0, 16), (16, 32), (32, 48)]
    assert shard_ranges(10, 4, 8) == [(0, 8), (8, 10)]  # no more shards than batches
    assert shard_ranges(5, 3, 128) == [(0, 5)]


def test_sharded_masks_equal_the_serial_ones_bit_for_bit_on_local_and_given_clusters(
    tiny_params: Params, tmp_path: Path, prefect_server
):
    from wsss.pipelines.pseudo_masks import run_sharded, torch_threads
    from wsss.tasks import pseudo_masks, train_classifier
    from wsss.tasks.ingest import ingest

    ingest(Path(tiny_params.ingest.source), Path(tiny_params.ingest.out))
    tiny_params.classifier.epochs = 1
    train_classifier.main(tiny_params)
    # Batches of 8: the 48 training images make 6 batches, so 3 shards of 2 batches each; masks refined by PAR (its
    # iterations tuned with the thresholds), which each shard applies to its own batches.
    settings = dataclasses.replace(
        tiny_params.pseudo_masks, batch_size=8, tune_images=16, pixel_refine="par", pixel_refine_iterations=[2, 4]
    )
    serial = dataclasses.replace(tiny_params, pseudo_masks=dataclasses.replace(settings, out=str(tmp_path / "serial")))
    sharded = dataclasses.replace(
        tiny_params,
        pseudo_masks=dataclasses.replace(settings, out=str(tmp_path / "sharded")),
        dask=DaskParams(shards=3, workers=2),
    )
    assert torch_threads(sharded) == 1  # 2 threads of budget over 2 workers

    serial_stats = pseudo_masks.main(serial)
    run = run_sharded(sharded)

    assert len(run["seconds"]["shard_tasks"]) == 3
    assert run["stats"] == serial_stats
    assert serial_stats["images"] == 48 and serial_stats["thresholds_tuned"]
    tuning = serial_stats["pixel_refine_tuning"]
    assert set(tuning) == {"2", "4"} and tuning[str(serial_stats["pixel_refine_iterations"])] == max(tuning.values())
    for name in ("train.parquet", "stats.json"):
        assert (tmp_path / "sharded" / name).read_bytes() == (tmp_path / "serial" / name).read_bytes(), name

    # A cluster the user already runs, reached through dask.scheduler.
    from distributed import LocalCluster

    with LocalCluster(n_workers=2, threads_per_worker=1, host="127.0.0.1", dashboard_address=None) as cluster:
        remote = dataclasses.replace(
            sharded,
            pseudo_masks=dataclasses.replace(settings, out=str(tmp_path / "remote")),
            dask=DaskParams(shards=2, workers=2, scheduler=cluster.scheduler_address),
        )
        run_sharded(remote)
    for name in ("train.parquet", "stats.json"):
        assert (tmp_path / "remote" / name).read_bytes() == (tmp_path / "serial" / name).read_bytes(), name
