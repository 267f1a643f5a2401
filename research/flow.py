"""Prefect deployment ``wsss/ablations``: the ablation grid of ``ablations.yaml``, in parallel where it fits.

The flow is named ``wsss`` like the pipeline's (pipelines/wsss.py) so that its deployment reads
``wsss/ablations``. Steps:
1. plan the cells (tasks/ablations.py) and ingest the data set once;
2. one task per classifier: a ``wsss ablations --variant V [--variant W] --seed S --no-report`` process
   runs the cells that share it (e.g. ``full`` and ``multiscale_flip``) in order; at most ``jobs`` tasks
   at once (default: the cores divided by ``num_threads``: 1 on this 2-core machine);
3. ``wsss-research report``'s function on every finished run of the scale: table, charts, grid, MLflow run.

Cells that finished earlier (same params) are not rerun, so a failed or cancelled grid continues.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.futures import wait

from wsss.pipelines.commands import StageError, run_logged, stage_failure
from wsss.research.ablations import ABLATIONS_FILE, DEFAULT_ROOT, REPORT_ROOT

POLL_S = 5.0


@task(name="plan and ingest", cache_policy=NO_CACHE)
def plan_grid(
    scale: str | None, variants: list[str], seeds: list[int], overrides: list[str]
) -> tuple[str, list[tuple[list[str], list[str]]]]:
    """Per classifier group (its cells run in order): the cells' names and the ``wsss-research ablations`` command
    that runs them (wsss.research.ablations.cell_command, as ``--jobs`` does); ingests the data set once."""
    from wsss.lib.errors import WsssError
    from wsss.research import ablations

    try:
        cells = ablations.plan(
            ablations.read_config(ABLATIONS_FILE), "params.yaml", DEFAULT_ROOT, scale, variants, seeds, overrides
        )
        ablations.prepare(cells)
    except WsssError as err:
        raise StageError(f"wsss-research ablations: error: {err}") from None
    overrides_args = [f"-S{o}" for o in overrides]
    groups = [
        ([cell.name for cell in group], ablations.cell_command(group, overrides_args))
        for group in ablations.classifier_groups(cells)
    ]
    return cells[0].scale, groups


@task(name="ablation runs", task_run_name="{label}", cache_policy=NO_CACHE)
def run_group(names: list[str], cmd: list[str], label: str) -> list[str]:
    """Runs the cells of one classifier in one ``wsss-research ablations`` process (own threads, own memory)."""
    returncode, lines = run_logged(cmd, Path.cwd(), get_run_logger(), label)
    if returncode != 0:
        raise stage_failure(label, returncode, lines)
    return names


@task(name="report", cache_policy=NO_CACHE)
def report(scale: str) -> str:
    from wsss.research.ablations import read_config
    from wsss.research.report import markdown_table, write_report

    summary = write_report(read_config(ABLATIONS_FILE), scale, DEFAULT_ROOT, REPORT_ROOT)
    table = markdown_table(summary)
    get_run_logger().info("ablations (%s), %s/%s:\n%s", scale, REPORT_ROOT, scale, table)
    return table


def default_jobs(num_threads: int | str) -> int:
    """Concurrent runs that fit the cores, each using ``num_threads`` of them (``auto``: all of them, so one)."""
    from wsss.lib.runtime import available_cores

    return 1 if num_threads == "auto" else max(1, available_cores()[0] // max(1, int(num_threads)))


@flow(name="wsss", log_prints=True)
def ablations(
    scale: str | None = None,
    variants: list[str] = [],  # noqa: B006 - Prefect parameters (shown in the UI as given)
    seeds: list[int] = [],  # noqa: B006
    jobs: int = 0,
    overrides: list[str] = [],  # noqa: B006
) -> dict[str, Any]:
    """The ablation grid: ``variants``/``seeds`` empty = the scale's of ablations.yaml; ``jobs`` 0 = auto.

    Args:
        scale: run length from ablations.yaml (default: its first, ``default``).
        variants: names from ablations.yaml (default: the scale's ``scale_variants``, else all).
        seeds: seeds (default: ablations.yaml's).
        jobs: concurrent classifier groups (0: cores // num_threads).
        overrides: params overrides applied to every cell, e.g. ``["ingest.source=data/voc"]``.
    """
    from wsss.lib.config import load_params

    scale_name, groups = plan_grid(scale, variants, seeds, overrides)
    jobs = jobs or default_jobs(load_params("params.yaml", overrides).num_threads)
    queue, running, finished = list(groups), [], []
    while queue or running:
        while queue and len(running) < jobs:
            names, cmd = queue.pop(0)
            running.append(run_group.submit(names, cmd, " + ".join(names)))
        done = wait(running, timeout=POLL_S).done
        for future in done:
            finished += future.result()  # raises: a failed run fails the flow (finished cells stay done)
        running = [f for f in running if f not in done]
    table = report(scale_name)
    return {"scale": scale_name, "runs": finished, "table": table}
