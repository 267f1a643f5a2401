"""Stage ``register``: one MLflow run per pipeline execution, both models registered, ``champion`` moved if better.

The run (experiment ``wsss``) holds the flattened params, the per-epoch history of the classifier and both
segmenters (step = epoch), the final metrics of ``metrics/metrics.json`` and the per-class IoU, the
pictures and JSON metrics as artifacts, and tags with the git commit/dirty flag and the DVC hashes of the
data (data.dvc) and of every stage in dvc.lock. The classifier and the segmenter are logged as pyfunc models
(:mod:`wsss.lib.serving`: images in, masks out, with a signature, an input example, their code and pinned
requirements) and registered as ``wsss-classifier`` / ``wsss-segmenter``, each version described by its model
card (also ``MODEL_CARD.md`` among the model's artifacts); see :mod:`wsss.lib.tracking` for the champion rule.

Idempotent: DVC skips the stage when its inputs did not change, and a rerun on inputs that an earlier
finished run already registered (same model files, metrics and params; e.g. after a retried task or a
``dvc repro --force``) reuses that run instead of registering new versions.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

from wsss.lib import serving, storage, tracking
from wsss.lib.artifacts import HISTORY_FILE, MODEL_FILE, segmenter_dir
from wsss.lib.config import Params, flatten
from wsss.lib.errors import WsssError
from wsss.lib.inference import decided_rule
from wsss.lib.io import write_json
from wsss.lib.runtime import RUNTIME_FILE
from wsss.models.pretrained import parse_source

REGISTRY_FILE = Path("artifacts") / "registry.json"
MODEL_SUMMARY = {
    "segmenter": (
        "Semantic segmentation trained on pseudo masks from class-token attention (weakly supervised: image "
        "labels only). Input: images (base64 PNG/JPEG or uint8 HxWx3); output: a class-index mask per image at "
        "its own size. Each version's description is its model card (data, backbone, metrics, limits)."
    ),
    "classifier": (
        "Multi-label image classifier with one [CLS] token per class (Class-specific Token Masking, ICCV 2025); "
        "the source of the pseudo masks. Input: images; output: class probabilities and, on request, masks "
        "painted from its class-token attention. Each version's description is its model card."
    ),
}


def _require(path: Path, hint: str) -> Path:
    if not path.is_file():
        raise WsssError(f"{path}: not found (run `{hint}` first)")
    return path


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise WsssError(f"{path}: cannot read JSON ({err})") from None


def _val_data(source_file: Path) -> str:
    """The ingest stage's hash of the val split: the images a segmenter_miou was measured on."""
    source = _read_json(_require(source_file, "wsss ingest"))
    splits = source.get("splits") if isinstance(source, dict) else None
    if not isinstance(splits, dict) or not isinstance(splits.get("val"), str):
        raise WsssError(f"{source_file}: no hash of the val split (an older ingest wrote it: run `wsss ingest` again)")
    return splits["val"]


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
    "segmenter_version", "segmenter_miou", "champion", "champion_why", "reused", "tracking_uri"}``.

    Raises:
        WsssError: a model or metrics file of the earlier stages (or the ingest stage's source.json, the pseudo-mask
            stage's stats.json) is missing or unreadable.
    """
    root = Path(root)
    classifier_dir = Path(params.classifier.out)
    metrics_dir = Path(params.evaluate.metrics_dir)
    classifier_file = _require(classifier_dir / MODEL_FILE, "wsss train-classifier")
    segmenter_file = _require(segmenter_dir(params, "pseudo") / MODEL_FILE, "wsss train-segmenter")
    metrics_file = _require(metrics_dir / "metrics.json", "wsss evaluate")
    stats_file = _require(Path(params.pseudo_masks.out) / "stats.json", "wsss pseudo-masks")
    # The classifier serves its masks by the rule its pseudo masks were made with (tuned, not params' own).
    attention = decided_rule(params.pseudo_masks, _read_json(stats_file))
    val_data = _val_data(Path(params.ingest.out) / "source.json")
    metrics = _read_json(metrics_file)
    score = metrics.get(tracking.SCORE_KEY)
    score = float(score) if isinstance(score, int | float) else None
    flat_params = flatten(params.to_dict())

    client = tracking.get_client(root)
    store = storage.store_from_env()
    if store is not None:
        storage.check_store(store)  # fail before a run exists when the artifact store is not usable
    experiment_id = tracking.ensure_experiment(client, root)
    inputs_hash = tracking.files_hash([classifier_file, segmenter_file, metrics_file, stats_file], extra=flat_params)
    record = _reuse(client, experiment_id, inputs_hash)
    if record is None:
        run = _Run(client, experiment_id, root, params, inputs_hash, val_data)
        try:
            record = run.log(flat_params, metrics, score, classifier_file, segmenter_file, attention)
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

    def __init__(self, client, experiment_id: str, root: Path, params: Params, inputs_hash: str, val_data: str) -> None:
        self.client, self.experiment_id, self.root = client, experiment_id, root
        self.params, self.inputs_hash, self.val_data = params, inputs_hash, val_data
        self.metrics_dir = Path(params.evaluate.metrics_dir)
        self.plots_dir = Path(params.evaluate.plots_dir)

    def log(
        self,
        flat_params: dict[str, Any],
        metrics: dict,
        score: float | None,
        classifier_file: Path,
        segmenter_file: Path,
        attention: dict[str, Any],
    ) -> dict[str, Any]:
        import mlflow

        client = self.client
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
            mlflow.set_tags(self._runtime_tags())
            mlflow.log_params({k: str(v) for k, v in flat_params.items()})
            self._log_metrics(run_id, metrics)
            self._log_files()
            versions = {}
            served = {"precision": self.params.trainer.precision}  # auto: decided where the model is served
            for name, kind, model_file, config in (
                (tracking.CLASSIFIER_MODEL, "classifier", classifier_file, attention | served),
                (tracking.SEGMENTER_MODEL, "segmenter", segmenter_file, served),
            ):
                card = model_card(kind, self.params, metrics, model_file, self.root)
                info = serving.log_pyfunc(kind, model_file, name, config, card)
                versions[name] = str(info.registered_model_version)
                tags = {"run_id": run_id, tracking.SCORE_KEY: score, tracking.INPUTS_TAG: self.inputs_hash,
                        tracking.VAL_DATA_TAG: self.val_data}  # fmt: skip
                for key, value in tags.items():
                    client.set_model_version_tag(name, versions[name], key, "none" if value is None else str(value))
                client.update_model_version(name, versions[name], description=card)
                client.update_registered_model(name, description=MODEL_SUMMARY[kind])
            champion, why = tracking.promote_if_better(client, versions, score, self.val_data)
            record = {
                "run_id": run_id,
                "experiment_id": self.experiment_id,
                "classifier_version": versions[tracking.CLASSIFIER_MODEL],
                "segmenter_version": versions[tracking.SEGMENTER_MODEL],
                tracking.SCORE_KEY: score,
                "champion": champion,
                "champion_why": why,
                "reused": False,
            }
            # Last: a run carrying this tag is complete, so a later rerun on the same inputs may reuse it.
            mlflow.set_tags({"champion": str(champion).lower(), "wsss.registered": json.dumps(record)})
        return record

    def _runtime_tags(self) -> dict[str, str]:
        """How each stage ran, from the ``runtime.json`` beside its outputs: ``wsss.runtime.<stage>`` (e.g.
        ``fp32 (CPU AVX2, no bf16 units), 2 threads``) and the machine of the first one (``wsss.cpu_model``,
        ``wsss.cpu_capability``, ``wsss.gpu``), so runs from different machines can be told apart."""
        tags: dict[str, str] = {}
        for stage, folder in (
            ("train_classifier", Path(self.params.classifier.out)),
            ("pseudo_masks", Path(self.params.pseudo_masks.out)),
            ("train_segmenter", segmenter_dir(self.params, "pseudo")),
            ("evaluate", self.metrics_dir),
        ):
            path = folder / RUNTIME_FILE
            if not path.is_file():
                continue
            run = _read_json(path)
            count = run["num_threads"]
            threads = f"{count} thread{'' if count == 1 else 's'} ({run['threads_reason']})"
            tags[f"wsss.runtime.{stage}"] = f"{run['precision']} ({run['precision_reason']}), {threads}"
            for key in ("cpu_model", "cpu_capability", "gpu"):
                tags.setdefault(f"wsss.{key}", str(run[key]))
        return tags

    def _log_metrics(self, run_id: str, metrics: dict) -> None:
        """Per-epoch history (step = epoch) of all three trainings, then the final and per-class metrics."""
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        history = []
        for prefix, folder in (
            ("classifier", Path(self.params.classifier.out)),
            ("segmenter", segmenter_dir(self.params, "pseudo")),
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


def _backbone(spec: str | None, model: str) -> str:
    if not spec:
        return f"{model}, trained from scratch on the data set below"
    return f"{model}, initialised from {parse_source(spec).label}"


def model_card(kind: str, params: Params, metrics: dict[str, Any], model_file: Path, root: Path) -> str:
    """The model card of a registered version (Markdown): what it is, its data (and the data.dvc hash), backbone
    and weight source, metrics with their splits, intended use and limits."""
    dvc = tracking.dvc_tags(root)
    record = _checkpoint_record(model_file)
    classes = ", ".join(record.get("classes", [])) or "unknown"

    def metric(key: str) -> str:
        value = metrics.get(key)
        return f"{value:.3f}" if isinstance(value, int | float) else "not measured"

    if kind == "segmenter":
        what = f"`{params.segmenter.encoder}` encoder with an FPN decoder, trained on the classifier's pseudo masks"
        backbone = _backbone(params.segmenter.pretrained, params.segmenter.encoder)
        size = params.segmenter.img_size
        rows = [
            ("segmenter mIoU", "val", metric("segmenter_miou")),
            ("pseudo masks it was trained on, mIoU", "train", metric("pseudo_mask_miou")),
        ]
    else:
        what = "ViT with one [CLS] token per class and a [REG] token, random masking of absent classes' [CLS] outputs"
        backbone = _backbone(params.classifier.pretrained, params.classifier.model)
        size = params.classifier.img_size
        rows = [
            ("classification mAP", "val", metric("classifier_val_map")),
            ("pseudo masks from its attention, mIoU", "train", metric("pseudo_mask_miou")),
            ("class specificity of the [CLS]_c attention (area share)", "train",
             f"{metric('class_specificity')} ({metric('area_share')})"),
        ]  # fmt: skip
    table = "\n".join(f"| {name} | {split} | {value} |" for name, split, value in rows)
    return f"""# {kind} — wsss (Class-specific Token Masking for WSSS)

**What it is.** {what}. Weakly supervised: trained from image-level labels only, no pixel annotation.
Input: images (base64 PNG/JPEG, or uint8 HxWx3 arrays), any size; each is resized to a longer side of {size} px at
its own aspect ratio and normalised with ImageNet statistics. Output: see the registered model's signature.

**Data.** `{params.ingest.source}` (data.dvc md5 `{dvc.get("dvc.data.md5", "unknown")}`); classes: {classes}.

**Backbone.** {backbone}.

**Metrics** (splits named; pseudo masks are scored on the training split they are made for):

| metric | split | value |
|---|---|---|
{table}

**Intended use.** Research and prototyping of weakly supervised segmentation on data like the training set.
**Limits.** Supervision is pseudo masks, not annotation: boundaries follow the token grid
({params.classifier.img_size} px input, patch-sized cells), small objects and touching objects of two classes are
where it fails first; it knows only the classes above and labels everything else background. Numbers on the
embedded synthetic sets do not transfer to photographs.
"""


def _checkpoint_record(model_file: Path) -> dict[str, Any]:
    import torch

    try:
        record = torch.load(model_file, map_location="cpu", weights_only=True)
    except Exception:  # the card is descriptive; an unreadable record is reported by the loaders elsewhere
        return {}
    return record if isinstance(record, dict) else {}


def main(params: Params) -> dict[str, Any]:
    """CLI entry (``wsss register``), run by DVC in the repo root after ``evaluate``."""
    record = register(params, Path.cwd())
    if record["reused"]:
        verdict = "already registered by this run"
    else:
        verdict = f"{'new champion' if record['champion'] else 'champion unchanged'}: {record['champion_why']}"
    print(
        f"MLflow run {record['run_id']}: wsss-classifier v{record['classifier_version']}, "
        f"wsss-segmenter v{record['segmenter_version']} (segmenter_miou {record['segmenter_miou']}) -> "
        f"{verdict}; store {record['tracking_uri']}"
    )
    return record
