"""MLflow registration against a real sqlite store in tmp: the champion alias rule, reuse, a loadable champion."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
import torch

from tests.test_layout import user_project
from wsss.lib import tracking
from wsss.lib.artifacts import segmenter_dir
from wsss.lib.config import Params
from wsss.lib.errors import WsssError
from wsss.lib.runtime import decide_precision, write_runtime
from wsss.models.segmenter import Segmenter
from wsss.tasks.register import register
from wsss.tasks.train_classifier import build_classifier, model_kwargs

CLASSES = ["bird", "elephant", "giraffe"]


@pytest.fixture
def store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A repo root in tmp whose MLflow store is the default sqlite file there."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("MLFLOW_DISABLE_TELEMETRY", "true")
    monkeypatch.chdir(tmp_path)
    torch.set_num_threads(1)
    return tmp_path


def _history(path: Path, columns: dict[str, list[float]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["epoch", *columns])
        for epoch, values in enumerate(zip(*columns.values(), strict=True), start=1):
            writer.writerow([epoch, *values])


def _finished_pipeline(params: Params, miou: float | None, seed: int, val_data: str = "a" * 32) -> None:
    """What the stages leave behind, in their formats, with a chosen segmenter_miou (new weights per seed), measured
    on the val split whose hash is ``val_data``."""
    torch.manual_seed(seed)
    ingested = Path(params.ingest.out)
    ingested.mkdir(parents=True, exist_ok=True)
    splits = {"train": "t" * 32, "val": val_data}
    (ingested / "source.json").write_text(json.dumps({"root": "data", "content": "c" * 32, "splits": splits}))
    classifier = build_classifier(params.classifier, len(CLASSES))
    record = {
        "model_name": params.classifier.model,
        "model_kwargs": model_kwargs(params.classifier, len(CLASSES), 3),
        "state_dict": classifier.state_dict(),
        "classes": CLASSES,
    }
    out = Path(params.classifier.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.save(record, out / "model.pt")
    _history(out / "history.csv", {"loss": [0.7, 0.6], "val_map": [0.5, 0.6]})
    write_runtime(out, "auto", torch.device("cpu"))  # how the classifier "ran": this machine's choice
    kwargs = {"encoder_name": "resnet18", "num_classes": len(CLASSES) + 1, "decoder_channels": 8, "in_chans": 3}
    segmenter = Segmenter(**kwargs)
    folder = segmenter_dir(params, "pseudo")
    folder.mkdir(parents=True, exist_ok=True)
    state = {"model_kwargs": kwargs, "state_dict": segmenter.state_dict(), "classes": CLASSES, "img_size": 32}
    torch.save(state, folder / "model.pt")
    _history(folder / "history.csv", {"loss": [1.2], "val_miou": [miou]})
    metrics = Path(params.evaluate.metrics_dir)
    metrics.mkdir(parents=True, exist_ok=True)
    (metrics / "metrics.json").write_text(
        json.dumps({"pseudo_mask_miou": 0.3, "segmenter_miou": miou, "classifier": {"val_map": 0.6}})
    )
    (metrics / "per_class_iou.json").write_text(json.dumps({"bird": {"segmenter": miou, "pseudo_mask": None}}))
    write_stage_rule(params)


# What the pseudo-mask stage writes of the rule it applied (stats.json), tuned: not params' own.
STAGE_RULE = {"fg_threshold": 0.375, "bg_threshold": 0.075, "map_blocks": "last2", "refine": "none",
              "refine_iterations": 0, "pixel_refine": "par", "pixel_refine_iterations": 80}  # fmt: skip


def write_stage_rule(params: Params) -> None:
    """The pseudo-mask stage's stats.json with :data:`STAGE_RULE`: what register reads the classifier's rule from."""
    pseudo = Path(params.pseudo_masks.out)
    pseudo.mkdir(parents=True, exist_ok=True)
    (pseudo / "stats.json").write_text(json.dumps(STAGE_RULE))


def test_champion_moves_only_when_the_new_miou_is_better(store: Path, tiny_params: Params):
    versions = []
    for seed, miou in enumerate((0.30, 0.20, 0.30, 0.45)):
        _finished_pipeline(tiny_params, miou, seed)
        versions.append(register(tiny_params, store, out=store / "registry.json"))
    assert [v["champion"] for v in versions] == [True, False, False, True]  # first, worse, tie, better
    assert [v["champion_why"] for v in versions] == [
        "first version", "v1 scores 0.3000, this run 0.2000", "v1 scores 0.3000, this run 0.3000",
        "beats v1 (0.4500 > 0.3000)",
    ]  # fmt: skip
    assert [v["segmenter_version"] for v in versions] == ["1", "2", "3", "4"]
    assert json.loads((store / "registry.json").read_text())["segmenter_version"] == "4"

    client = tracking.get_client(store)
    for name in (tracking.CLASSIFIER_MODEL, tracking.SEGMENTER_MODEL):
        champion = client.get_model_version_by_alias(name, tracking.CHAMPION)
        assert str(champion.version) == "4" and champion.run_id == versions[-1]["run_id"]
    assert client.get_model_version(tracking.SEGMENTER_MODEL, "4").tags[tracking.SCORE_KEY] == "0.45"

    # Same inputs again (e.g. a retried task): the finished run is reused, nothing new is registered.
    again = register(tiny_params, store, out=None)
    assert again["reused"] and again["run_id"] == versions[-1]["run_id"]
    assert len(client.search_model_versions(f"name='{tracking.SEGMENTER_MODEL}'")) == 4

    run = client.get_run(versions[-1]["run_id"])
    assert run.data.params["classifier.epochs"] == str(tiny_params.classifier.epochs)
    assert run.data.metrics[tracking.SCORE_KEY] == pytest.approx(0.45)
    assert [m.step for m in client.get_metric_history(run.info.run_id, "classifier/val_map")] == [1, 2]
    assert {"git.commit", tracking.INPUTS_TAG, "wsss.registered"} <= set(run.data.tags)
    # how the stages ran, so runs from different machines can be told apart
    choice, reason = decide_precision("auto", torch.device("cpu"))
    assert run.data.tags["wsss.runtime.train_classifier"].startswith(f"{choice} ({reason}), 1 thread (")
    assert run.data.tags["wsss.cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    assert "wsss.runtime.pseudo_masks" not in run.data.tags  # no runtime.json there: nothing made up

    model = mlflow.pyfunc.load_model(f"models:/{tracking.SEGMENTER_MODEL}@{tracking.CHAMPION}")
    assert model.model_config == {"precision": tiny_params.trainer.precision}  # served at the run's
    answer = model.predict(pd.DataFrame({"image": [np.zeros((32, 48, 3), np.uint8)] * 2}))
    assert list(answer["height"]) == [32, 32] and list(answer["width"]) == [48, 48]
    version = client.get_model_version(tracking.SEGMENTER_MODEL, versions[-1]["segmenter_version"])
    assert (
        version.description.startswith("# segmenter — wsss")
        and "| segmenter mIoU | val | 0.450 |" in version.description
    )
    assert client.get_registered_model(tracking.SEGMENTER_MODEL).description.startswith("Semantic segmentation")


def test_a_score_on_another_val_split_never_takes_the_champion(store: Path, tiny_params: Params):
    """Another data set's mIoU (other images, other classes) does not compare with the champion's, however high."""
    _finished_pipeline(tiny_params, 0.30, 0, val_data="a" * 32)
    assert register(tiny_params, store, out=None)["champion"] is True
    _finished_pipeline(tiny_params, 0.90, 1, val_data="b" * 32)
    record = register(tiny_params, store, out=None)
    assert record["champion"] is False and record["champion_why"].startswith("v1 was scored on another val split")
    client = tracking.get_client(store)
    assert tracking.champion_score(client) == ("1", 0.30)
    assert client.get_model_version(tracking.SEGMENTER_MODEL, "2").tags[tracking.VAL_DATA_TAG] == "b" * 32
    _finished_pipeline(tiny_params, 0.35, 2, val_data="a" * 32)  # back on the champion's split: compared again
    assert register(tiny_params, store, out=None)["champion"] is True


def test_register_names_an_ingest_output_without_split_hashes(store: Path, tiny_params: Params):
    _finished_pipeline(tiny_params, 0.30, 0)
    (Path(tiny_params.ingest.out) / "source.json").write_text(json.dumps({"root": "data", "content": "c" * 32}))
    with pytest.raises(WsssError, match=r"source.json: no hash of the val split .*run `wsss ingest` again"):
        register(tiny_params, store, out=None)
    assert not (store / "mlflow.db").exists() or tracking.champion_score(tracking.get_client(store)) == (None, None)


def test_the_classifier_is_registered_with_the_rule_its_pseudo_masks_were_made_with(store: Path, tiny_params: Params):
    _finished_pipeline(tiny_params, 0.30, 0)
    register(tiny_params, store, out=None)
    served = mlflow.pyfunc.load_model(f"models:/{tracking.CLASSIFIER_MODEL}/1")
    rule = {"fg_threshold": 0.375, "bg_threshold": 0.075, "map_blocks": 2, "scales": [1.0], "flip": False, "refine": 0,
            "pixel_refine": "par", "pixel_refine_iterations": 80}  # fmt: skip
    assert served.model_config == rule | {"precision": tiny_params.trainer.precision}
    # without the stage's stats nothing is registered: one line naming the file
    (Path(tiny_params.pseudo_masks.out) / "stats.json").unlink()
    with pytest.raises(WsssError, match=r"stats.json: not found \(run `wsss pseudo-masks` first\)"):
        register(tiny_params, store, out=None)
    assert len(tracking.get_client(store).search_model_versions(f"name='{tracking.CLASSIFIER_MODEL}'")) == 1


def test_a_run_without_a_score_never_becomes_champion(store: Path, tiny_params: Params):
    _finished_pipeline(tiny_params, None, 0)  # evaluate writes null for an undefined mIoU
    record = register(tiny_params, store, out=None)
    assert record["champion"] is False and record["segmenter_miou"] is None
    client = tracking.get_client(store)
    assert tracking.champion_score(client) == (None, None)


def test_tracking_uri_from_environment_wins(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert tracking.tracking_uri(tmp_path) == f"sqlite:///{tmp_path.resolve()}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")
    assert tracking.tracking_uri(tmp_path) == "http://127.0.0.1:5000"


def test_registered_models_load_beside_a_users_own_models_and_tasks_packages(store: Path, tiny_params: Params):
    """Pickled with module paths ``wsss.*``: a user's own top-level ``models``/``tasks`` cannot shadow them."""
    _finished_pipeline(tiny_params, 0.3, seed=0)
    register(tiny_params, store, out=None)
    project = user_project(store / "user")
    script = textwrap.dedent(
        """
        import sys
        sys.path.insert(0, sys.argv[1])
        import models, tasks
        assert models.USERS_OWN and tasks.USERS_OWN
        import json, mlflow, numpy as np, pandas as pd
        mlflow.set_tracking_uri(sys.argv[2])
        request = pd.DataFrame({"image": [np.zeros((20, 30, 3), np.uint8)]})
        for name in ("wsss-segmenter", "wsss-classifier"):
            served = mlflow.pyfunc.load_model(f"models:/{name}@champion")
            model = served.unwrap_python_model().model
            assert type(model).__module__.startswith("wsss.models."), type(model).__module__
            assert served.metadata.signature is not None
            answer = served.predict(request)
        print(sorted(json.loads(answer["probabilities"][0])))
        """
    )
    uri = tracking.tracking_uri(store)
    env = {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true"}
    result = subprocess.run(
        [sys.executable, "-c", script, str(project), uri], cwd=project, capture_output=True, text=True, env=env
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == str(sorted(CLASSES))


def test_git_tags_name_dirty_paths_whole_and_leave_out_dvc_lock(tmp_path: Path):
    """`git status --porcelain` lines start with a status blank: a stripped listing lost the first path's letter."""
    identity = ["-c", "user.name=t", "-c", "user.email=t@t.invalid", "-c", "commit.gpgsign=false"]

    def git(*args: str) -> None:
        subprocess.run(["git", *identity, *args], cwd=tmp_path, check=True, capture_output=True)

    git("init", "-q")
    for name in ("dvc.lock", "params.yaml"):
        (tmp_path / name).write_text("a\n")
    git("add", "-A")
    git("commit", "-qm", "clean")
    assert tracking.git_tags(tmp_path)["git.dirty"] == "false"
    (tmp_path / "dvc.lock").write_text("rewritten by the pipeline\n")  # the running pipeline's own file
    assert tracking.git_tags(tmp_path)["git.dirty"] == "false"
    (tmp_path / "params.yaml").write_text("b\n")
    tags = tracking.git_tags(tmp_path)
    assert tags["git.dirty"] == "true" and tags["git.dirty_paths"] == "params.yaml"
