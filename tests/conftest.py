"""Shared fixtures: one tiny embedded data set per session, and small Params pointing at it."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from wsss.lib.config import (
    ClassifierParams,
    EmbeddedParams,
    EvaluateParams,
    IngestParams,
    Params,
    PseudoMaskParams,
    SegmenterParams,
    TrainerParams,
)
from wsss.tools.embedded import build_embedded_dataset


def tiny_embedded_params(out: Path) -> EmbeddedParams:
    """32 px, 3 classes, 48 train + 16 val images: builds in well under a second."""
    return EmbeddedParams(
        out=str(out),
        seed=0,
        image_size=32,
        train_images=48,
        val_images=16,
        classes=["bird", "elephant", "giraffe"],
        max_objects=3,
        min_object_size=14,
        max_object_size=24,
    )


# The from-scratch tiny settings the tests train with (params.yaml's defaults are the pretrained DINOv2-S/14, which
# the tests load where they test it): one place, so a default that changes does not change what the tests run.
TINY_CLASSIFIER = dict(
    model="wsss_vit_tiny_patch8", img_size=32, epochs=2, batch_size=16, pretrained=None, backbone_lr=None,
    patch_cam=False, warmup_epochs=1.0,
)  # fmt: skip
TINY_SEGMENTER = dict(encoder="resnet18", pretrained=None, img_size=32, epochs=1, batch_size=16)
TINY_TRAINER = TrainerParams(precision="fp32")  # not auto: the suite must not depend on the CPU kind it runs on


@pytest.fixture(autouse=True)
def _mlflow_store_of_the_test_alone():
    """`mlflow.set_tracking_uri` (which lib/tracking calls) also exports MLFLOW_TRACKING_URI, so a test that
    tracks in process would point every later test's subprocesses at its store: put both back after each test."""
    before = os.environ.get("MLFLOW_TRACKING_URI")
    yield
    if os.environ.get("MLFLOW_TRACKING_URI") != before:
        import mlflow

        mlflow.set_tracking_uri(before)


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Root of the session's tiny embedded data set. Read-only: copy it before modifying."""
    root = tmp_path_factory.mktemp("tiny") / "embedded"
    return build_embedded_dataset(tiny_embedded_params(root), root)


@pytest.fixture
def tiny_params(tmp_path: Path, tiny_dataset: Path) -> Params:
    """Params for quick end-to-end runs on the tiny set; every output lies under ``tmp_path``."""
    return Params(
        seed=0,
        num_threads=2,
        embedded=tiny_embedded_params(tmp_path / "embedded"),
        ingest=IngestParams(source=str(tiny_dataset), out=str(tmp_path / "dataset")),
        classifier=ClassifierParams(**TINY_CLASSIFIER, out=str(tmp_path / "classifier")),
        pseudo_masks=PseudoMaskParams(tune_images=16, out=str(tmp_path / "pseudo_masks")),
        segmenter=SegmenterParams(**TINY_SEGMENTER, out=str(tmp_path / "segmenter")),
        trainer=TINY_TRAINER,
        evaluate=EvaluateParams(metrics_dir=str(tmp_path / "metrics"), plots_dir=str(tmp_path / "plots")),
    )


@pytest.fixture(scope="session")
def prefect_server():
    """One temporary Prefect server (sqlite) for the whole session; it needs 12-19 s to start here."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=180):
        yield


# --- Pipeline repos (tests/test_dvc.py, tests/test_pipeline.py): a temp copy of this repo that is its own
# --- git + DVC repo, with the tiny data set as data/embedded and the tiny params in its params.yaml.

REPO_ROOT = Path(__file__).resolve().parents[1]
PIPELINE_FILES = (
    "__init__.py",
    "dvc.yaml",
    "params.yaml",
    "prefect.yaml",
    ".dvcignore",
    ".gitignore",
    "pyproject.toml",
)
PIPELINE_DIRS = ("models", "lib", "tasks", "tools", "pipelines")


def _git(repo: Path, *args: str) -> None:
    identity = ("-c", "user.name=wsss tests", "-c", "user.email=tests@wsss.invalid", "-c", "commit.gpgsign=false")
    subprocess.run(["git", *identity, *args], cwd=repo, check=True, capture_output=True)


def pipeline_params(tiny: Params) -> dict:
    """The tiny training settings with the default (repo-relative) paths of params.yaml, on one thread
    (two torch threads on two cores that other jobs also use spin-wait: ~10x slower here)."""
    defaults = Params()
    tree = tiny.to_dict()
    tree["num_threads"] = 1
    tree["embedded"]["out"] = defaults.embedded.out
    for section in ("ingest", "classifier", "pseudo_masks", "segmenter", "evaluate"):
        for key in ("source", "out", "metrics_dir", "plots_dir"):
            if key in tree[section]:
                tree[section][key] = getattr(getattr(defaults, section), key)
    return tree


def make_pipeline_repo(dest: Path, dataset: Path, params: dict) -> Path:
    """Copies the pipeline definition and code to ``dest``, the data set to data/embedded, writes params,
    then ``git init`` + ``dvc init`` + ``dvc add data`` + one commit (``dvc exp run`` needs a commit)."""
    dest.mkdir(parents=True)
    for name in PIPELINE_FILES:
        shutil.copy2(REPO_ROOT / name, dest / name)
    for name in PIPELINE_DIRS:
        ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
        shutil.copytree(REPO_ROOT / name, dest / name, ignore=ignore)
    shutil.copytree(dataset, dest / "data" / "embedded")
    (dest / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    dvc = [sys.executable, "-m", "dvc"]
    _git(dest, "init", "-q", "-b", "main")
    subprocess.run([*dvc, "init", "-q"], cwd=dest, check=True, capture_output=True)
    shutil.copy2(REPO_ROOT / ".dvc" / "config", dest / ".dvc" / "config")
    shutil.copytree(REPO_ROOT / ".dvc" / "plots", dest / ".dvc" / "plots")
    subprocess.run([*dvc, "add", "-q", "data"], cwd=dest, check=True, capture_output=True)
    _git(dest, "add", "-A")
    _git(dest, "commit", "-q", "-m", "pipeline test repo")
    return dest


@pytest.fixture
def pipeline_repo(tmp_path: Path, tiny_dataset: Path, tiny_params: Params, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fresh pipeline repo on the tiny config; cwd is set to it, `wsss`/`dvc` of this venv come first on
    PATH and MLflow uses the repo's own sqlite store."""
    repo = make_pipeline_repo(tmp_path / "repo", tiny_dataset, pipeline_params(tiny_params))
    monkeypatch.chdir(repo)
    monkeypatch.setenv("PATH", f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("MLFLOW_DISABLE_TELEMETRY", "true")
    return repo
