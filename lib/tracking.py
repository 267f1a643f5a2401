"""MLflow for the pipeline: where the store is, what a run records, and the registry's ``champion`` rule.

Store: ``MLFLOW_TRACKING_URI`` from the environment when set (a tracking server, or any URI MLflow
takes); otherwise ``sqlite:///<repo>/mlflow.db`` with run artifacts in ``<repo>/mlruns`` (both
gitignored). ``mlflow ui --backend-store-uri sqlite:///mlflow.db`` shows it (``make mlflow-ui``).

Artifacts on S3: with ``WSSS_S3_BUCKET`` set (see tasks/storage.py) the experiment is created with its
artifact location at ``s3://<bucket>/<prefix>/mlflow/<experiment>``; runs and registered models then live in the bucket,
the tracking store (sqlite or server) keeps the metadata. An existing experiment keeping its artifacts
elsewhere is an error, not a silent local copy.

Champion rule: a registered version of ``wsss-segmenter`` carries its validation mIoU as the version
tag ``segmenter_miou`` (also a metric of its run) and the hash of the val split it was measured on
(``wsss.val_data``, from the ingest stage); the alias ``champion`` moves to the new versions of both models only
when the new mIoU is strictly greater than the current champion's *on the same val split*: scores on other
images (another data set, other classes) do not compare, so a run on another data set never takes the alias.
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import json
import math
import os
import re
import subprocess
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from wsss.lib.config import flatten

EXPERIMENT = "wsss"
CLASSIFIER_MODEL = "wsss-classifier"
SEGMENTER_MODEL = "wsss-segmenter"
CHAMPION = "champion"
SCORE_KEY = "segmenter_miou"
INPUTS_TAG = "wsss.inputs_hash"
VAL_DATA_TAG = "wsss.val_data"
# MLflow 3's UI opens an experiment on its GenAI overview (traces) unless it is marked as model development,
# then on its runs.
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
EXPERIMENT_KIND = "custom_model_development"
# The runs table a person wants first: the headline metrics as columns, best segmenter on top. Stored the way
# the UI stores a shared view (an experiment tag, opened by ?viewStateShareKey=...), since its own default shows
# no metric at all.
HEADLINE_VIEW = "headline"
HEADLINE_METRICS = (
    "pseudo_mask_miou", "segmenter_miou", "classifier_val_map", "class_specificity", "area_share",
)  # fmt: skip
HEADLINE_PARAMS = ("classifier.model", "classifier.pretrained", "classifier.epochs")


def headline_view() -> str:
    """JSON of the shared view :data:`HEADLINE_VIEW`: the UI's default columns plus the headline metrics and params."""
    columns = [f"attributes.`{name}`" for name in ("Source", "Models", "Dataset")]
    columns += [f"metrics.`{name}`" for name in HEADLINE_METRICS] + [f"params.`{name}`" for name in HEADLINE_PARAMS]
    return json.dumps({"selectedColumns": columns, "orderByKey": "metrics.`segmenter_miou`", "orderByAsc": False})


def tracking_uri(root: str | Path = ".") -> str:
    """``MLFLOW_TRACKING_URI`` if set, else the repo's sqlite file (absolute, so any cwd finds it)."""
    env = os.environ.get("MLFLOW_TRACKING_URI")
    if env:
        return env
    return f"sqlite:///{(Path(root) / 'mlflow.db').resolve()}"


def store_error_line(err: BaseException) -> str | None:
    """One line for an error raised by the MLflow store (its SQL database, its server), naming the store;
    None for any other exception (a bug, whose traceback stays)."""
    package = type(err).__module__.split(".")[0]
    if package not in ("mlflow", "sqlalchemy", "sqlite3", "alembic"):
        return None
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    first = lines[0] if lines else type(err).__name__
    return f"MLflow store {tracking_uri()}: {first[:300]} ({type(err).__name__})"


def get_client(root: str | Path = "."):
    """An MlflowClient on :func:`tracking_uri`; the fluent API (``mlflow.start_run``) is pointed there too."""
    import mlflow
    from mlflow.tracking import MlflowClient

    from wsss.lib import storage

    store = storage.store_from_env()
    if store is not None:
        storage.use_store_environment(store)  # MLflow's boto3 clients: endpoint and retries
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # one bar per file on stderr otherwise
    uri = tracking_uri(root)
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def ensure_experiment(client, root: str | Path = ".", name: str = EXPERIMENT) -> str:
    """Id of experiment ``name``; created on first use with artifacts in the S3 store when one is set, else
    in ``<root>/mlruns`` (local store) or where the tracking server puts them.

    Raises:
        WsssError: an S3 store is set but the existing experiment keeps its artifacts elsewhere.
    """
    from mlflow.exceptions import MlflowException

    from wsss.lib import storage
    from wsss.lib.errors import WsssError

    store = storage.store_from_env()
    experiment = client.get_experiment_by_name(name)
    view_tag = f"mlflow.sharedViewState.{HEADLINE_VIEW}"
    if experiment is not None:
        for key, value in ((EXPERIMENT_KIND_TAG, EXPERIMENT_KIND), (view_tag, headline_view())):
            if experiment.tags.get(key) != value:
                client.set_experiment_tag(experiment.experiment_id, key, value)
        if store is not None and not experiment.artifact_location.startswith(store.mlflow_url):
            raise WsssError(
                f"MLflow experiment {name!r} keeps its artifacts at {experiment.artifact_location}, not in "
                f"{store.mlflow_url}: use a tracking store for the S3 runs (MLFLOW_TRACKING_URI, e.g. "
                "sqlite:///.s3demo/mlflow.db as make run-s3 does)"
            )
        return experiment.experiment_id
    location = None
    if store is not None:
        location = f"{store.mlflow_url}/{name}"
    elif not os.environ.get("MLFLOW_TRACKING_URI"):
        location = (Path(root) / "mlruns").resolve().as_uri()
    try:
        tags = {EXPERIMENT_KIND_TAG: EXPERIMENT_KIND, view_tag: headline_view()}
        return client.create_experiment(name, artifact_location=location, tags=tags)
    except MlflowException:  # created meanwhile by a concurrent run
        experiment = client.get_experiment_by_name(name)
        if experiment is None:
            raise
        return experiment.experiment_id


def experiment_link(experiment_id: str, run_id: str | None = None) -> str:
    """The MLflow UI path (after its address) of an experiment's runs (or one run), in the model-training view
    (MLflow 3's UI otherwise opens an experiment on its GenAI overview, one tab away from the runs); the runs
    table opens on the headline view (:func:`headline_view`)."""
    if run_id:
        return f"#/experiments/{experiment_id}/runs/{run_id}?workflowType=machine_learning"
    return f"#/experiments/{experiment_id}/runs?viewStateShareKey={HEADLINE_VIEW}&workflowType=machine_learning"


def metric_key(name: str) -> str:
    """MLflow accepts letters, digits, ``_ - . / `` and spaces in metric names."""
    return re.sub(r"[^\w\-. /]", "_", name)


def numeric_metrics(tree: Mapping[str, Any], prefix: str = "") -> dict[str, float]:
    """The finite numbers among the leaves of a (nested) metrics dict; lists and strings are skipped."""
    out = {}
    for key, value in flatten(tree, prefix).items():
        if isinstance(value, bool) or not isinstance(value, int | float):
            continue
        if math.isfinite(value):
            out[metric_key(key)] = float(value)
    return out


def history_metrics(path: str | Path, prefix: str) -> list[tuple[str, float, int]]:
    """``(key, value, step)`` per numeric column and row of a history.csv; step = the ``epoch`` column."""
    rows = []
    with open(path, newline="") as handle:
        for row in csv.DictReader(handle):
            step = int(float(row["epoch"]))
            for column, raw in row.items():
                if column == "epoch" or raw in (None, ""):
                    continue
                try:
                    value = float(raw)
                except ValueError:
                    continue
                if math.isfinite(value):
                    rows.append((metric_key(f"{prefix}/{column}"), value, step))
    return rows


def _git(root: Path, *args: str, strip: bool = True) -> str | None:
    try:
        result = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    if result.returncode != 0:
        return None
    return result.stdout.strip() if strip else result.stdout


def git_tags(root: str | Path = ".") -> dict[str, str]:
    """Commit, branch and dirty flag of the code. ``dvc.lock`` is left out of the dirty check: the
    running pipeline itself rewrites it; the DVC tags record exactly what it holds."""
    root = Path(root)
    commit = _git(root, "rev-parse", "HEAD")
    if commit is None:
        return {"git.commit": "none"}
    # -z: entries "XY path" separated by NUL, paths verbatim (a stripped listing would lose the first entry's
    # leading status blank and with it a letter of its path); a rename's source path follows as its own entry.
    status = _git(root, "status", "--porcelain", "-z", "--untracked-files=normal", strip=False) or ""
    entries = status.split("\0")
    paths, i = [], 0
    while i < len(entries):
        entry = entries[i]
        if len(entry) > 3:
            paths.append(entry[3:])
            i += 1 if entry[0] not in "RC" else 2
        else:
            i += 1
    dirty = sorted(path for path in paths if path != "dvc.lock")
    return {
        "git.commit": commit,
        "mlflow.source.git.commit": commit,
        "git.branch": _git(root, "rev-parse", "--abbrev-ref", "HEAD") or "",
        "git.dirty": str(bool(dirty)).lower(),
        "git.dirty_paths": " ".join(dirty)[:4000],
    }


def dvc_tags(root: str | Path = ".") -> dict[str, str]:
    """``dvc.data.md5``: what data.dvc records for the raw data; ``dvc.lock.<stage>``: md5 of each stage's
    lock entry (its deps, params and outs hashes), i.e. the exact versions this run is made of."""
    import yaml

    root = Path(root)
    tags: dict[str, str] = {}
    with contextlib.suppress(OSError, yaml.YAMLError, KeyError, IndexError, TypeError):
        data = yaml.safe_load((root / "data.dvc").read_text())
        tags["dvc.data.md5"] = str(data["outs"][0]["md5"])
        tags["dvc.data.path"] = str(data["outs"][0]["path"])
    with contextlib.suppress(OSError, yaml.YAMLError, AttributeError, TypeError):
        lock = yaml.safe_load((root / "dvc.lock").read_text()) or {}
        for stage, entry in (lock.get("stages") or {}).items():
            canonical = json.dumps(entry, sort_keys=True).encode()
            tags[f"dvc.lock.{stage}"] = hashlib.md5(canonical).hexdigest()
    if os.environ.get("DVC_EXP_NAME"):
        tags["dvc.exp_name"] = os.environ["DVC_EXP_NAME"]
    return tags


def files_hash(paths: Iterable[str | Path], extra: Any = None) -> str:
    """sha256 over the named files' bytes (and a JSON-able ``extra``): the identity of a registration."""
    digest = hashlib.sha256()
    for path in paths:
        digest.update(str(path).encode())
        with open(path, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    digest.update(json.dumps(extra, sort_keys=True, default=str).encode())
    return digest.hexdigest()


def champion_score(client, name: str = SEGMENTER_MODEL) -> tuple[str | None, float | None]:
    """(version, score) of the version holding alias ``champion``; (None, None) when there is none.

    The score is the version tag ``segmenter_miou``, else the metric of the run that logged it.
    """
    champion = _champion(client, name)
    return (None, None) if champion is None else (str(champion.version), _score(client, champion))


def _champion(client, name: str):
    """The ModelVersion holding alias ``champion`` (with its tags), or None."""
    from mlflow.exceptions import MlflowException

    try:
        return client.get_model_version_by_alias(name, CHAMPION)
    except MlflowException:
        return None


def _score(client, version) -> float | None:
    from mlflow.exceptions import MlflowException

    raw = version.tags.get(SCORE_KEY)
    if raw is None and version.run_id:
        with contextlib.suppress(MlflowException):
            raw = client.get_run(version.run_id).data.metrics.get(SCORE_KEY)
    try:
        return float(raw) if raw is not None else None
    except ValueError:
        return None


def promote_if_better(client, versions: Mapping[str, str], score: float | None, val_data: str) -> tuple[bool, str]:
    """Moves alias ``champion`` of every ``{model name: version}`` when ``score`` beats the champion's.

    ``score`` belongs to the ``wsss-segmenter`` version in ``versions``, measured on the val split whose hash is
    ``val_data``. No score (or NaN) never wins; a champion measured on another val split is never compared (it
    keeps the alias); a missing champion (or one without a score) is always beaten; a tie keeps the old champion.
    A champion registered before versions carried ``wsss.val_data`` is compared by score alone.

    Returns:
        (moved, why): whether the alias moved, and the reason in a few words.
    """
    if score is None or not math.isfinite(score):
        return False, "no score"
    champion = _champion(client, SEGMENTER_MODEL)
    if champion is not None:
        version, current = champion.version, _score(client, champion)
        theirs = champion.tags.get(VAL_DATA_TAG)
        if theirs is not None and theirs != val_data:
            return False, (
                f"v{version} was scored on another val split ({theirs[:8]}, this run {val_data[:8]}): scores "
                f"do not compare; one MLFLOW_TRACKING_URI per data set keeps a champion for each"
            )
        if current is not None and not score > current:
            return False, f"v{version} scores {current:.4f}, this run {score:.4f}"
    for name, number in versions.items():
        client.set_registered_model_alias(name, CHAMPION, str(number))
    if champion is None:
        return True, "first version"
    return True, f"v{version} has no score" if current is None else f"beats v{version} ({score:.4f} > {current:.4f})"
