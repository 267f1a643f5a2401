"""The Prefect flow end to end on the tiny config: a real (test-harness) Prefect server, a real git + DVC
repo in tmp, real sqlite MLflow."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest
import torch
import yaml

from wsss.lib import tracking
from wsss.pipelines.wsss import STAGES, wsss


def _logs(state) -> str:
    """Every log line of the flow run (its tasks' included) as stored by the Prefect server."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId
    from prefect.logging.handlers import APILogHandler

    APILogHandler().flush()
    flow_run_id = state.state_details.flow_run_id
    with get_client(sync_client=True) as client:
        logs = client.read_logs(LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id])))
    return "\n".join(log.message for log in logs)


def _dvc(repo: Path, *args: str) -> str:
    result = subprocess.run([sys.executable, "-m", "dvc", *args], cwd=repo, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


def test_flow_runs_the_dvc_stages_registers_and_then_skips(pipeline_repo: Path, prefect_server):
    state = wsss(dataset="embedded", overrides=["evaluate.grid_images=4"], return_state=True)
    assert state.is_completed(), _logs(state)
    result = state.result()
    assert [r["stage"] for r in result["stages"]] == list(STAGES)
    assert {r["stage"] for r in result["stages"] if r["status"] == "ran"} == set(STAGES) - {"data.dvc"}
    for key in ("pseudo_mask_miou", "segmenter_miou"):
        assert 0.0 <= result["metrics"][key] <= 1.0
    logs = _logs(state)
    assert "stage 3/7 train_classifier: ran" in logs and "final metrics" in logs and "segmenter_miou" in logs
    assert "[train_classifier] epoch   2" in logs  # the stage's own progress lines
    assert "progress: stage 4/7, " in logs and "left if every remaining stage runs" in logs

    # Same artifacts and dvc.lock as `dvc repro`: DVC sees nothing to do, the override is in params.yaml.
    assert yaml.safe_load((pipeline_repo / "params.yaml").read_text())["evaluate"]["grid_images"] == 4
    lock = yaml.safe_load((pipeline_repo / "dvc.lock").read_text())
    assert set(lock["stages"]) == set(STAGES) - {"data.dvc"}
    assert "Running stage" not in _dvc(pipeline_repo, "repro", "--dry")
    for path in ("artifacts/classifier/model.pt", "artifacts/segmenter/model.pt", "plots/grid.png"):
        assert (pipeline_repo / path).is_file()

    # MLflow: one run, both models registered, alias champion on them, and the champion predicts.
    client = tracking.get_client(pipeline_repo)
    runs = client.search_runs([client.get_experiment_by_name(tracking.EXPERIMENT).experiment_id])
    assert len(runs) == 1
    run = runs[0]
    data_md5 = yaml.safe_load((pipeline_repo / "data.dvc").read_text())["outs"][0]["md5"]
    assert run.data.tags["dvc.data.md5"] == data_md5 and run.data.tags["git.commit"] != "none"
    assert "dvc.lock.train_classifier" in run.data.tags
    assert len(client.get_metric_history(run.info.run_id, "classifier/loss")) == 2  # one per epoch
    assert run.data.metrics["segmenter_miou"] == pytest.approx(result["metrics"]["segmenter_miou"])
    pictures = [a.path for a in client.list_artifacts(run.info.run_id, "plots")]
    assert {"plots/grid.png", "plots/per_class_iou.png"} <= set(pictures)
    experiment = client.get_experiment(run.info.experiment_id)
    assert experiment.tags[tracking.EXPERIMENT_KIND_TAG] == "custom_model_development"  # UI opens on the runs
    assert run.info.run_name.startswith("embedded-") and run.info.run_name.endswith(
        run.data.tags[tracking.INPUTS_TAG][:8]
    )
    # The Prefect UI shows the outcome: a markdown artifact with the metrics and the MLflow run.
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    with get_client(sync_client=True) as prefect:
        (artifact,) = prefect.read_artifacts(
            artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["wsss-pipeline"]))
        )
    assert "| segmenter_miou |" in artifact.data and run.info.run_id in artifact.data
    for name in (tracking.CLASSIFIER_MODEL, tracking.SEGMENTER_MODEL):
        assert str(client.get_model_version_by_alias(name, tracking.CHAMPION).version) == "1"
    model = mlflow.pyfunc.load_model(f"models:/{tracking.SEGMENTER_MODEL}@{tracking.CHAMPION}")
    assert model.unwrap_python_model().model(torch.rand(1, 3, 32, 32)).shape == (1, 4, 32, 32)

    # Second run, nothing changed: every stage is skipped and nothing new is registered.
    again = wsss(dataset="embedded", overrides=["evaluate.grid_images=4"], return_state=True)
    assert again.is_completed(), _logs(again)
    assert {r["status"] for r in again.result()["stages"]} == {"skipped"}
    assert "everything was up to date" in _logs(again)
    assert len(client.search_model_versions(f"name='{tracking.SEGMENTER_MODEL}'")) == 1
    assert len(client.search_runs([run.info.experiment_id])) == 1


def test_flow_on_a_missing_or_malformed_data_set_fails_clearly_and_registers_nothing(
    pipeline_repo: Path, prefect_server
):
    params_before = (pipeline_repo / "params.yaml").read_text()

    missing = wsss(dataset="data/nope", return_state=True)
    assert missing.is_failed()
    assert "wsss ingest: error: data/nope: data set root does not exist" in _logs(missing)

    bad = pipeline_repo / "data" / "bad"
    shutil.copytree(pipeline_repo / "data" / "embedded", bad)
    (bad / "images" / "train_00003.png").unlink()
    malformed = wsss(dataset="data/bad", return_state=True)
    assert malformed.is_failed()
    logs = _logs(malformed)
    error = "wsss ingest: error: data/bad/manifest.parquet row 3 (id 'train_00003'): image file"
    assert error in logs and "not found" in logs
    assert "stage 3/8" not in logs  # failed fast: nothing after ingest ran
    assert error in str(malformed.message)

    assert (pipeline_repo / "params.yaml").read_text() == params_before  # no stage ran: restored
    assert not (pipeline_repo / "artifacts" / "registry.json").exists()
    if (pipeline_repo / "mlflow.db").exists():
        client = tracking.get_client(pipeline_repo)
        assert client.search_registered_models() == []
    assert not (pipeline_repo / "dvc.lock").exists()  # nothing was built


def test_only_transient_stage_failures_are_retried():
    from prefect.states import Failed

    from wsss.pipelines.commands import StageError, TransientStageError, is_transient, stage_failure

    locked = stage_failure(
        "train_classifier", 1, ["ERROR: Unable to acquire lock. Most likely another DVC process is running"]
    )
    assert isinstance(locked, TransientStageError)
    bad = stage_failure(
        "ingest", 1, ["> wsss ingest", "wsss ingest: error: data/x: data set root does not exist", "ERROR: x"]
    )
    assert isinstance(bad, StageError) and str(bad) == "wsss ingest: error: data/x: data set root does not exist"
    assert is_transient(None, None, Failed(data=locked)) is True
    assert is_transient(None, None, Failed(data=bad)) is False
