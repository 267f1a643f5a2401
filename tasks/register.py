"""Stage ``register``: one MLflow run per pipeline execution, both models registered, ``champion`` moved if better.

The run (experiment ``wsss``) holds the flattened params, the per-epoch history of the classifier and both
segmenters (step = epoch), the final metrics of ``metrics/metrics.json`` and the per-class IoU, the
pictures and JSON metrics as artifacts, and tags with the git commit/dirty flag and the DVC hashes of the
data (data.dvc) and of every stage in dvc.lock. The classifier and the segmenter are logged with
``mlflow.pytorch`` (pickle format) and registered as ``wsss-classifier`` / ``wsss-segmenter``; see
:mod:`wsss.lib.tracking` for the champion rule.

Idempotent: DVC skips the stage when its inputs did not change, and a rerun on inputs that an earlier
finished run already registered (same model files, metrics and params; e.g. after a retried task or a
``dvc repro --force``) reuses that run instead of registering new versions.
"""

from __future__ import annotations

import importlib.metadata
import json
import logging
import os
import time
from pathlib import Path
from typing import Any

from wsss.lib import storage, tracking
from wsss.lib.artifacts import HISTORY_FILE, MODEL_FILE, load_classifier, load_segmenter, segmenter_dir
from wsss.lib.config import Params, flatten
from wsss.lib.errors import WsssError
from wsss.lib.io import write_json

REGISTRY_FILE = Path("artifacts") / "registry.json"
REQUIREMENTS = ("torch", "timm", "numpy")


class _QuietPickleWarning(logging.Filter):
    """Pickle is chosen on purpose (the default pt2 export is slow and fixes the batch size)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "Pickle or CloudPickle" not in record.getMessage()


def _pip_requirements() -> list[str]:
    """Pinned runtime requirements of the pickled models (the classes themselves come from this package)."""
    return [f"{name}=={importlib.metadata.version(name)}" for name in REQUIREMENTS]


def _require(path: Path, hint: str) -> Path:
    if not path.is_file():
        raise WsssError(f"{path}: not found (run `{hint}` first)")
    return path


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise WsssError(f"{path}: cannot read JSON ({err})") from None


def _reuse(client, experiment_id: str, inputs_hash: str) -> dict[str, Any] | None:
    """The record of a finished run that already registered exactly these inputs, if any."""
    runs = client.search_runs(
        [experiment_id],
        filter_string=f"tags.`{tracking.INPUTS_TAG}` = '{inputs_hash}' and attributes.status = 'FINISHED'",
        max_results=1,
    )
    if not runs or "wsss.registered" not in runs[0].data.tags:
        return None
    return json.loads(runs[0].data.tags["wsss.registered"]) | {"reused": True}


def register(params: Params, root: str | Path = ".", out: str | Path | None = REGISTRY_FILE) -> dict[str, Any]:
    """Logs the finished pipeline in ``root`` (a repo with params.yaml, dvc.lock) to MLflow; see module doc.

    Returns (and writes to ``out`` unless None) ``{"run_id", "experiment_id", "classifier_version",
    "segmenter_version", "segmenter_miou", "champion", "reused", "tracking_uri"}``.

    Raises:
        WsssError: a model or metrics file of the earlier stages is missing or unreadable.
    """
    root = Path(root)
    classifier_dir = Path(params.classifier.out)
    metrics_dir = Path(params.evaluate.metrics_dir)
    classifier_file = _require(classifier_dir / MODEL_FILE, "wsss train-classifier")
    segmenter_file = _require(segmenter_dir(params, "pseudo") / MODEL_FILE, "wsss train-segmenter")
    metrics_file = _require(metrics_dir / "metrics.json", "wsss evaluate")
    metrics = _read_json(metrics_file)
    score = metrics.get(tracking.SCORE_KEY)
    score = float(score) if isinstance(score, int | float) else None
    flat_params = flatten(params.to_dict())

    client = tracking.get_client(root)
    store = storage.store_from_env()
    if store is not None:
        storage.check_store(store)  # fail before a run exists when the artifact store is not usable
    experiment_id = tracking.ensure_experiment(client, root)
    inputs_hash = tracking.files_hash([classifier_file, segmenter_file, metrics_file], extra=flat_params)
    record = _reuse(client, experiment_id, inputs_hash)
    if record is None:
        run = _Run(client, experiment_id, root, params, inputs_hash)
        try:
            record = run.log(flat_params, metrics, score, classifier_file, segmenter_file)
        except Exception as err:
            # The store failed mid-run (the run is marked FAILED, nothing is registered as complete).
            if store is None or not storage.is_store_failure(err):
                raise
            raise storage.StorageError(
                f"MLflow artifacts to {store.mlflow_url}: {storage.explain(storage.root_cause(err), store)}"
            ) from None
    record["tracking_uri"] = tracking.tracking_uri(root)
    if out is not None:
        write_json(out, record)
    return record


class _Run:
    """One new MLflow run of this pipeline state."""

    def __init__(self, client, experiment_id: str, root: Path, params: Params, inputs_hash: str) -> None:
        self.client, self.experiment_id, self.root = client, experiment_id, root
        self.params, self.inputs_hash = params, inputs_hash
        self.metrics_dir = Path(params.evaluate.metrics_dir)
        self.plots_dir = Path(params.evaluate.plots_dir)

    def log(
        self,
        flat_params: dict[str, Any],
        metrics: dict,
        score: float | None,
        classifier_file: Path,
        segmenter_file: Path,
    ) -> dict[str, Any]:
        import mlflow

        client = self.client
        logging.getLogger("mlflow.pytorch").addFilter(_QuietPickleWarning())
        git = tracking.git_tags(self.root)
        # e.g. "embedded-1a2b3c4-5f3e9d0c": data set, code commit, digest of the models, metrics and params
        name = f"{Path(self.params.ingest.source).name}-{git['git.commit'][:7]}-{self.inputs_hash[:8]}"
        # The run covers the pipeline: it starts when the data set was ingested, not when this stage began.
        ingested = Path(self.params.ingest.out) / "summary.json"
        start = int(ingested.stat().st_mtime * 1000) if ingested.is_file() else None
        created = client.create_run(
            self.experiment_id, start_time=start, run_name=os.environ.get("DVC_EXP_NAME") or name
        )
        with mlflow.start_run(run_id=created.info.run_id) as run:
            run_id = run.info.run_id
            mlflow.set_tags({tracking.INPUTS_TAG: self.inputs_hash, **git, **tracking.dvc_tags(self.root)})
            mlflow.log_params({k: str(v) for k, v in flat_params.items()})
            self._log_metrics(run_id, metrics)
            self._log_files()
            versions = {}
            for name, artifact, (model, _) in (
                (tracking.CLASSIFIER_MODEL, "classifier", load_classifier(classifier_file)),
                (tracking.SEGMENTER_MODEL, "segmenter", load_segmenter(segmenter_file)),
            ):
                info = mlflow.pytorch.log_model(
                    model,
                    name=artifact,
                    serialization_format="pickle",  # the default pt2 export is slow and fixes the batch size
                    pip_requirements=_pip_requirements(),
                    registered_model_name=name,
                )
                versions[name] = str(info.registered_model_version)
                tags = {"run_id": run_id, tracking.SCORE_KEY: score, tracking.INPUTS_TAG: self.inputs_hash}
                for key, value in tags.items():
                    client.set_model_version_tag(name, versions[name], key, "none" if value is None else str(value))
            champion = tracking.promote_if_better(client, versions, score)
            record = {
                "run_id": run_id,
                "experiment_id": self.experiment_id,
                "classifier_version": versions[tracking.CLASSIFIER_MODEL],
                "segmenter_version": versions[tracking.SEGMENTER_MODEL],
                tracking.SCORE_KEY: score,
                "champion": champion,
                "reused": False,
            }
            # Last: a run carrying this tag is complete, so a later rerun on the same inputs may reuse it.
            mlflow.set_tags({"champion": str(champion).lower(), "wsss.registered": json.dumps(record)})
        return record

    def _log_metrics(self, run_id: str, metrics: dict) -> None:
        """Per-epoch history (step = epoch) of all three trainings, then the final and per-class metrics."""
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        history = []
        for prefix, folder in (
            ("classifier", Path(self.params.classifier.out)),
            ("segmenter", segmenter_dir(self.params, "pseudo")),
            ("segmenter_gt", segmenter_dir(self.params, "gt")),
        ):
            if (folder / HISTORY_FILE).is_file():
                history += tracking.history_metrics(folder / HISTORY_FILE, prefix)
        final = tracking.numeric_metrics(metrics)
        per_class_file = self.metrics_dir / "per_class_iou.json"
        if per_class_file.is_file():
            final |= tracking.numeric_metrics({"iou": _read_json(per_class_file)})
        batch = [Metric(key, value, now, step) for key, value, step in history]
        batch += [Metric(key, value, now, 0) for key, value in final.items()]
        for start in range(0, len(batch), 1000):
            self.client.log_batch(run_id, metrics=batch[start : start + 1000])

    def _log_files(self) -> None:
        import mlflow

        for picture in sorted(self.plots_dir.glob("*.png")):
            mlflow.log_artifact(str(picture), "plots")
        for name in ("metrics.json", "per_class_iou.json"):
            if (self.metrics_dir / name).is_file():
                mlflow.log_artifact(str(self.metrics_dir / name), "metrics")
        for name in ("params.yaml", "dvc.lock", "data.dvc"):
            if (self.root / name).is_file():
                mlflow.log_artifact(str(self.root / name), "dvc")


def main(params: Params) -> dict[str, Any]:
    """CLI entry (``wsss register``), run by DVC in the repo root after ``evaluate``."""
    record = register(params, Path.cwd())
    verdict = "new champion" if record["champion"] else "champion unchanged"
    if record["reused"]:
        verdict = "already registered by this run"
    print(
        f"MLflow run {record['run_id']}: wsss-classifier v{record['classifier_version']}, "
        f"wsss-segmenter v{record['segmenter_version']} (segmenter_miou {record['segmenter_miou']}) -> "
        f"{verdict}; store {record['tracking_uri']}"
    )
    return record
