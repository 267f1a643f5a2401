"""DVC: the pipeline of dvc.yaml in a real temp git + DVC repo on the tiny config, and data.dvc's hash."""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

from wsss.lib.config import load_params
from wsss.tools.embedded import build_embedded_dataset

REPO_ROOT = Path(__file__).resolve().parents[1]
STAGES = {
    "ingest",
    "train_classifier",
    "pseudo_masks",
    "train_segmenter",
    "evaluate",
    "register",
}


def dvc(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, "-m", "dvc", *args], cwd=cwd, capture_output=True, text=True)
    assert result.returncode == 0, f"dvc {' '.join(args)} failed:\n{result.stdout}\n{result.stderr}"
    return result


def ran(output: str) -> set[str]:
    return {line.split("'")[1] for line in output.splitlines() if line.startswith("Running stage '")}


def test_repro_noop_and_exp_run(pipeline_repo: Path):
    first = dvc("repro")
    assert ran(first.stdout) == STAGES
    lock = yaml.safe_load((pipeline_repo / "dvc.lock").read_text())
    assert set(lock["stages"]) == STAGES
    metrics = json.loads(dvc("metrics", "show", "--json").stdout)
    data = metrics[""]["data"]["metrics/metrics.json"]["data"]
    for key in ("pseudo_mask_miou", "segmenter_miou"):
        assert 0.0 <= data[key] <= 1.0
    registry = json.loads((pipeline_repo / "artifacts" / "registry.json").read_text())
    assert registry["champion"] is True
    # Outputs stay out of the data.dvc-tracked folder (it still matches data.dvc); the pseudo masks are
    # one table, not thousands of files.
    assert [p.name for p in (pipeline_repo / "data").iterdir()] == ["embedded"]
    assert "up to date" in dvc("status", "data.dvc").stdout
    assert sorted(p.name for p in (pipeline_repo / "artifacts" / "pseudo_masks").iterdir()) == [
        "runtime.json",  # how the stage ran (not a DVC output)
        "stats.json",
        "train.parquet",
    ]

    again = dvc("repro")  # a no-op: every stage's deps and params are where dvc.lock left them
    assert ran(again.stdout) == set(), again.stdout

    plots = dvc("plots", "show", "--json")
    assert "per_class_iou" in plots.stdout and "grid.png" in plots.stdout

    experiment = dvc("exp", "run", "-S", "classifier.mask_ratio=0.25")
    assert {"train_classifier", "pseudo_masks", "train_segmenter", "evaluate", "register"} <= ran(experiment.stdout)
    assert "ingest" not in ran(experiment.stdout)  # the data set does not move
    assert load_params(pipeline_repo / "params.yaml").classifier.mask_ratio == 0.25
    shown = json.loads(dvc("exp", "show", "--json").stdout)
    assert any(exp.get("experiments") for exp in shown), shown


def test_regenerated_embedded_set_matches_data_dvc():
    """On a fresh clone there is no DVC remote: `wsss import embedded` must rebuild exactly what data.dvc records;
    `make run`'s data check (scripts/verify_data.py) says so even beside the research grid's own sets under data/,
    which .dvcignore keeps out of data.dvc as DVC itself does."""
    import importlib.util
    import shutil

    spec = importlib.util.spec_from_file_location("verify_data", REPO_ROOT / "scripts" / "verify_data.py")
    verify_data = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(verify_data)
    record = yaml.safe_load((REPO_ROOT / "data.dvc").read_text())["outs"][0]
    assert record["path"] == "data"
    params = load_params(REPO_ROOT / "params.yaml")
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "data"
        build_embedded_dataset(params.embedded, data / Path(params.embedded.out).relative_to("data"))
        assert verify_data.dvc_md5(data, Path(tmp)) == record["md5"]
        (data / "embedded112").mkdir()
        (data / "embedded112" / "manifest.parquet").write_bytes(b"a research scale's set")
        assert verify_data.dvc_md5(data, Path(tmp)) != record["md5"]  # not ignored without the repo's .dvcignore
        shutil.copy(REPO_ROOT / ".dvcignore", tmp)
        assert verify_data.dvc_md5(data, Path(tmp)) == record["md5"]


def test_committed_dvc_lock_records_the_committed_code():
    """dvc.lock is committed with the code it was made with: every code file it records hashes as the file does
    now. A stale lock makes `make run` on a fresh clone rewrite it (a dirty tree, and a run tagged dirty) and
    describes a pipeline that is not the committed one: rerun the pipeline (`make run`) and commit dvc.lock."""
    import hashlib

    lock = yaml.safe_load((REPO_ROOT / "dvc.lock").read_text())
    stale = []
    for stage, entry in lock["stages"].items():
        for dep in entry.get("deps", []):
            path = REPO_ROOT / dep["path"]
            if dep["path"].endswith(".py") and hashlib.md5(path.read_bytes()).hexdigest() != dep.get("md5"):
                stale.append(f"{stage}: {dep['path']}")
    assert not stale, f"dvc.lock records other code than the tree holds ({len(stale)}): {stale[:5]}"
