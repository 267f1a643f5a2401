"""Prefect flow ``wsss``: the DVC pipeline of dvc.yaml, one Prefect task per DVC stage.

The stage logic lives only in the ``wsss`` commands that dvc.yaml runs; each task here runs
``dvc repro --single-item <stage>`` in the repo and streams its output into the flow run's log. So a
Prefect run leaves the same artifacts, dvc.lock and MLflow records as ``dvc repro`` and skips the stages
whose inputs did not change (DVC decides).

Parameters:
    dataset: ``embedded`` (the embedded set at ``embedded.out``, generated when missing) or the path of
        a data set root in the wsss on-disk format (relative to the repo root, e.g. ``data/voc``).
    overrides: params overrides ``section.key=value`` (value parsed as YAML), like ``dvc exp run -S``.

Params are applied the way ``dvc exp run -S`` applies them: written into params.yaml (comments kept,
atomically, only after they validate) before the stages run, so params.yaml, dvc.lock and the outputs
always agree and a later plain ``dvc repro`` is a no-op. ``dataset`` sets ``ingest.source``. When the
flow fails before any dvc.yaml stage ran, params.yaml is restored (nothing was built from the new values).

Retries: only transient failures are retried (DVC's repo lock held by another process, a locked
sqlite store, an unreachable tracking server). Bad input (a ``wsss <command>: error: ...`` line, an
invalid override, a missing data set) fails at once with that line in the flow run's log.
"""

from __future__ import annotations

import io
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE

from wsss.pipelines.commands import StageError, dvc_command, is_transient, run_logged, stage_failure
from wsss.tasks.stages import STAGES as PIPELINE

# data.dvc first: `dvc repro` also verifies (and, if changed, re-adds) the raw data it tracks; then the stages
# in the order of their table.
STAGES = ("data.dvc", *(stage.name for stage in PIPELINE))
PARAMS_FILE = "params.yaml"
EMBEDDED = "embedded"
SUMMARY_KEYS = ("pseudo_mask_miou", "segmenter_miou", "classifier_val_map")
# Share of a full run's time each stage takes: what the progress line's estimate for the whole run weighs by.
STAGE_SHARE = {"data.dvc": 0.01, **{stage.name: stage.share for stage in PIPELINE}}


def mlflow_ui() -> str:
    """Where `make mlflow-ui` serves the store: its MLFLOW_PORT (default 5000), as the Makefile reads it."""
    return f"http://127.0.0.1:{os.environ.get('MLFLOW_PORT') or 5000}"


# --- params.yaml -------------------------------------------------------------------------------------


def _yaml():
    from ruamel.yaml import YAML

    yaml = YAML()  # round trip: keeps comments and key order, like `dvc exp run -S`
    yaml.preserve_quotes = True
    yaml.width = 4096
    return yaml


def _apply(text: str, overrides: list[str]) -> str:
    """params.yaml text with ``section.key=value`` overrides applied (values parsed as YAML)."""
    from wsss.lib.config import apply_override

    rt = _yaml()
    doc = rt.load(text) or {}
    for override in overrides:
        apply_override(doc, override)
    out = io.StringIO()
    rt.dump(doc, out)
    return out.getvalue()


def _write_atomic(path: Path, text: str) -> None:
    from wsss.lib.io import atomic_file

    with atomic_file(path, "w") as handle:
        handle.write(text)


@task(name="prepare params and data set", cache_policy=NO_CACHE)
def prepare(root: Path, dataset: str, overrides: list[str]) -> dict[str, Any]:
    """Validates overrides and data set, generates the embedded set if missing, writes params.yaml.

    Raises:
        StageError: an invalid override or params file, or a missing/unreadable data set.
    """
    from wsss.lib.config import load_params
    from wsss.lib.dataset_format import read_dataset
    from wsss.lib.errors import WsssError

    logger = get_run_logger()
    params_path = root / PARAMS_FILE
    original = params_path.read_text()
    text = _apply(original, list(overrides))
    fd, name = tempfile.mkstemp(prefix=".params.", suffix=".yaml", dir=root)
    os.close(fd)
    candidate = Path(name)
    try:
        candidate.write_text(text)
        try:
            params = load_params(candidate)
            source = params.embedded.out if dataset == EMBEDDED else dataset
            if source != params.ingest.source:
                text = _apply(text, [f"ingest.source={json.dumps(source)}"])
                candidate.write_text(text)
                params = load_params(candidate)
        except WsssError as err:
            raise StageError(f"wsss: error: {err}") from None
        if dataset == EMBEDDED and not (root / source / "manifest.parquet").is_file():
            logger.info("embedded data set missing at %s: generating it (wsss import embedded)", source)
            cmd = ["wsss", "import", "embedded", "--params", candidate.name]
            returncode, lines = run_logged(cmd, root, logger, "import embedded")
            if returncode != 0:
                raise stage_failure("import embedded", returncode, lines)
        try:
            read_dataset(source)  # manifest + classes only; the ingest stage checks every file
        except WsssError as err:
            raise StageError(f"wsss ingest: error: {err}") from None
    finally:
        candidate.unlink(missing_ok=True)
    import yaml

    changed = yaml.safe_load(text) != yaml.safe_load(original)
    if changed:
        _write_atomic(params_path, text)
        logger.info("params.yaml updated: ingest.source=%s %s", source, " ".join(overrides))
    return {"source": source, "original_params": original, "changed": changed}


# --- stages ------------------------------------------------------------------------------------------


@task(
    name="dvc stage",
    task_run_name="{stage}",
    cache_policy=NO_CACHE,
    retries=2,
    retry_delay_seconds=[10, 30],
    retry_condition_fn=is_transient,
)
def run_stage(root: Path, stage: str, index: int, total: int) -> dict[str, Any]:
    """``dvc repro --single-item <stage>``: runs the stage if its deps/params/code changed, else skips."""
    logger = get_run_logger()
    logger.info("stage %d/%d %s: dvc repro --single-item %s", index, total, stage, stage)
    start = time.perf_counter()
    returncode, lines = run_logged([*dvc_command(), "repro", "--single-item", stage], root, logger, stage)
    seconds = time.perf_counter() - start
    if returncode != 0:
        raise stage_failure(stage, returncode, lines)
    ran = any(line.startswith(("Running stage", "Verifying data sources")) for line in lines) and not any(
        "didn't change, skipping" in line for line in lines
    )
    status = "ran" if ran else "skipped (unchanged)"
    logger.info("stage %d/%d %s: %s in %.1f s", index, total, stage, status, seconds)
    return {"stage": stage, "status": "ran" if ran else "skipped", "seconds": round(seconds, 1)}


# --- results -----------------------------------------------------------------------------------------


def _summary(root: Path) -> dict[str, Any]:
    """The headline numbers: the three mIoUs, classifier mAP, and what the register stage did."""
    from wsss.lib.config import load_params

    params = load_params(root / PARAMS_FILE)
    metrics_file = root / params.evaluate.metrics_dir / "metrics.json"
    metrics = json.loads(metrics_file.read_text()) if metrics_file.is_file() else {}
    summary = {key: metrics.get(key) for key in SUMMARY_KEYS}
    registry_file = root / "artifacts" / "registry.json"
    if registry_file.is_file():
        registry = json.loads(registry_file.read_text())
        summary["wsss-classifier_version"] = registry.get("classifier_version")
        summary["wsss-segmenter_version"] = registry.get("segmenter_version")
        summary["champion"] = registry.get("champion")
    return summary


def _format_summary(summary: dict[str, Any]) -> str:
    width = max(len(k) for k in summary)
    return "\n".join(
        f"{k:<{width}}  {v:.4f}" if isinstance(v, float) else f"{k:<{width}}  {v}" for k, v in summary.items()
    )


@flow(name="wsss", log_prints=True)
def wsss(dataset: str = EMBEDDED, overrides: list[str] = []) -> dict[str, Any]:  # noqa: B006 - Prefect param
    """The whole pipeline on ``dataset`` with params overrides; returns the stage statuses and metrics."""
    logger = get_run_logger()
    root = Path.cwd()
    if not (root / "dvc.yaml").is_file() or not (root / PARAMS_FILE).is_file():
        raise StageError(f"{root}: no dvc.yaml/params.yaml here; run the flow from the wsss repo root")
    logger.info("wsss pipeline in %s: dataset=%s overrides=%s", root, dataset, list(overrides))
    prepared = prepare(root, dataset, list(overrides))
    results: list[dict[str, Any]] = []
    began = time.perf_counter()
    try:
        for index, stage in enumerate(STAGES, start=1):
            logger.info("progress: %s", _progress(results, index, time.perf_counter() - began))
            results.append(run_stage(root, stage, index, len(STAGES)))
    except Exception:
        # data.dvc only re-records the raw data; no dvc.yaml stage used the new params yet.
        if prepared["changed"] and not any(r["status"] == "ran" and r["stage"] != "data.dvc" for r in results):
            _write_atomic(root / PARAMS_FILE, prepared["original_params"])
            logger.info("no stage ran: params.yaml restored")
        raise
    summary = _summary(root)
    ran = [r["stage"] for r in results if r["status"] == "ran"]
    logger.info("stages run: %s", ", ".join(ran) or "none (everything was up to date)")
    logger.info("final metrics:\n%s", _format_summary(summary))
    _publish(root, results, summary)
    return {"stages": results, "metrics": summary}


def _progress(done: list[dict[str, Any]], index: int, elapsed: float) -> str:
    """``stage 4/8, 6 min 10 s elapsed, about 2 min left``: the estimate weighs the stages that ran by their
    usual share of a run (STAGE_SHARE); skipped stages take no time."""
    text = f"stage {index}/{len(STAGES)}, {_duration(elapsed)} elapsed"
    ran_share = sum(STAGE_SHARE[r["stage"]] for r in done if r["status"] == "ran")
    if ran_share >= 0.05:
        left = elapsed / ran_share * sum(STAGE_SHARE[s] for s in STAGES[index - 1 :])
        text += f", about {_duration(left)} left if every remaining stage runs"
    return text


def _duration(seconds: float) -> str:
    minutes, secs = divmod(round(seconds), 60)
    return f"{minutes} min {secs} s" if minutes else f"{secs} s"


def _publish(root: Path, results: list[dict[str, Any]], summary: dict[str, Any]) -> None:
    """The outcome in the Prefect UI: a markdown artifact (metrics, stages, where the MLflow run is)."""
    from prefect.artifacts import create_markdown_artifact

    lines = ["# wsss pipeline", "", "| metric | value |", "|---|---|"]
    lines += [f"| {k} | {v:.4f} |" if isinstance(v, float) else f"| {k} | {v} |" for k, v in summary.items()]
    lines += ["", "| stage | status | seconds |", "|---|---|---|"]
    lines += [f"| {r['stage']} | {r['status']} | {r['seconds']} |" for r in results]
    registry_file = root / "artifacts" / "registry.json"
    if registry_file.is_file():
        registry = json.loads(registry_file.read_text())
        from wsss.lib.tracking import experiment_link

        link = f"{mlflow_ui()}/{experiment_link(registry['experiment_id'], registry['run_id'])}"
        lines += [
            "",
            f"MLflow run [{registry['run_id']}]({link}) (store `{registry.get('tracking_uri')}`; "
            f"`make mlflow-ui MLFLOW_PORT={os.environ.get('MLFLOW_PORT') or 5000}` serves it)",
        ]
    create_markdown_artifact(
        key="wsss-pipeline", markdown="\n".join(lines), description="metrics, stages and the MLflow run"
    )


if __name__ == "__main__":
    wsss()
