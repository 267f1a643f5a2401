"""Faults of the machine and of the stores, made real where they can be: each ends in one line
``wsss <command>: error: <path>: <what> (<errno name>)``, exit code 1, the old outputs intact and no
temporary file left."""

from __future__ import annotations

import os
import pickle
import resource
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import textwrap
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

WSSS = str(Path(sys.executable).parent / "wsss")


def run(args: list[str], cwd: Path, **kwargs) -> subprocess.CompletedProcess:
    """`wsss` in `cwd`, on the store found there (never one another test exported)."""
    env = {k: v for k, v in kwargs.pop("env", os.environ).items() if k != "MLFLOW_TRACKING_URI"}
    return subprocess.run(args, cwd=cwd, capture_output=True, text=True, timeout=300, env=env, **kwargs)


def one_line(result: subprocess.CompletedProcess, command: str) -> str:
    """The error line of a failed run; asserts it is the only line, no traceback."""
    assert result.returncode == 1, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"wsss {command}: error: "), result.stderr
    print(lines[0])
    return lines[0]


def snapshot(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture
def work(tiny_dataset: Path) -> Iterator[Path]:
    """A folder with the tiny data set and params.yaml, readable by every user (pytest's tmp_path is not)."""
    root = Path(tempfile.mkdtemp(prefix="wsss-faults-"))
    shutil.copytree(tiny_dataset, root / "data")
    (root / "params.yaml").write_text("seed: 0\n")
    for path in (root, *root.rglob("*")):
        path.chmod(0o755 if path.is_dir() else 0o644)
    yield root
    shutil.rmtree(root, ignore_errors=True)


def ingest(out: str) -> list[str]:
    return [WSSS, "ingest", "-S", "ingest.source=data", "-S", f"ingest.out={out}"]


def test_file_too_large_keeps_the_old_output(work: Path):
    assert run(ingest("out/ds"), work).returncode == 0
    before = snapshot(work / "out")
    limit = lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (1500, 1500))  # noqa: E731  bytes per file
    line = one_line(run([*ingest("out/ds"), "-S", "seed=1"], work, preexec_fn=limit), "ingest")
    assert line.endswith(f"cannot write {work}/out/ds/manifest.parquet: File too large (EFBIG)")
    assert snapshot(work / "out") == before  # the old output, and no temporary folder beside it


def _mount_namespace() -> bool:
    return shutil.which("unshare") is not None and run(["unshare", "-m", "true"], Path("/")).returncode == 0


needs_mounts = pytest.mark.skipif(not _mount_namespace(), reason="needs `unshare -m` (root with CAP_SYS_ADMIN)")


@needs_mounts
def test_full_disk_keeps_the_old_output(work: Path):
    """A real full file system: a small tmpfs in a private mount namespace, filled after the first ingest."""
    (work / "disk").mkdir()
    script = textwrap.dedent(f"""\
        mount -t tmpfs -o size=256k tmpfs disk
        {" ".join(ingest("disk/ds"))} > /dev/null || exit 9
        dd if=/dev/zero of=disk/filler bs=4k 2>/dev/null
        md5sum disk/ds/* > before.md5
        {" ".join(ingest("disk/ds"))} -S seed=1 2> err.txt
        echo $? > rc.txt
        md5sum -c --quiet before.md5 > check.txt 2>&1
        ls -A disk > listing.txt
        """)
    assert run(["unshare", "-m", "sh", "-c", script], work).returncode == 0
    result = subprocess.CompletedProcess([], int((work / "rc.txt").read_text()), "", (work / "err.txt").read_text())
    assert one_line(result, "ingest").endswith("No space left on device (ENOSPC)")
    assert (work / "check.txt").read_text() == ""  # every old file unchanged
    assert (work / "listing.txt").read_text().split() == ["ds", "filler"]  # no temporary folder left


@needs_mounts
def test_read_only_file_system(work: Path):
    (work / "ro").mkdir()
    script = f"mount --bind ro ro && mount -o remount,bind,ro ro && {' '.join(ingest('ro/ds'))}"
    line = one_line(run(["unshare", "-m", "sh", "-c", script], work), "ingest")
    assert line.endswith(f"cannot write {work}/ro/ds: Read-only file system (EROFS)")


@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("setpriv"), reason="needs root to run as another user")
def test_output_folder_without_permission(work: Path):
    """A folder the user cannot write to (root ignores permissions, so the command runs as nobody)."""
    (work / "locked").mkdir(mode=0o755)
    nobody = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]
    line = one_line(run([*nobody, *ingest("locked/ds")], work, env={**os.environ, "HOME": str(work)}), "ingest")
    assert line.endswith(f"cannot write {work}/locked/ds: Permission denied (EACCES)")
    assert list((work / "locked").iterdir()) == []


def test_params_with_a_yaml_error_is_one_line_with_its_place(work: Path):
    (work / "params.yaml").write_text("seed: 0\nclassifier:\n  epochs: [1,\n  lr: 2\n")
    line = one_line(run([WSSS, "ingest"], work), "ingest")
    assert line == "wsss ingest: error: params.yaml:5:1: not valid YAML (expected ',' or ']', but got '<stream end>')"


@pytest.fixture
def photo(work: Path) -> Path:
    path = work / "photo.png"
    Image.fromarray(np.zeros((20, 30, 3), np.uint8)).save(path)
    return path


def test_junk_mlflow_store(work: Path, photo: Path):
    (work / "mlflow.db").write_text("not a database\n")
    result = run([WSSS, "predict", str(photo), "--model", "models:/wsss-segmenter@champion", "--out", "masks"], work)
    line = one_line(result, "predict")
    assert f"MLflow store sqlite:///{work}/mlflow.db: (sqlite3.DatabaseError) file is not a database" in line
    assert not (work / "masks").exists()


def test_store_held_by_another_process(work: Path, photo: Path):
    """A second process holds the sqlite store's write lock: predict gives up with one line, not a hang."""
    import mlflow
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{work}/mlflow.db"
    MlflowClient(tracking_uri=uri, registry_uri=uri).search_experiments()  # a real (empty) store
    mlflow.set_tracking_uri(None)
    holder = sqlite3.connect(work / "mlflow.db", isolation_level=None, check_same_thread=False)
    holder.execute("BEGIN EXCLUSIVE")
    try:
        result = run([WSSS, "predict", str(photo), "--model", "models:/wsss-segmenter@champion", "--out", "m"], work)
    finally:
        threading.Thread(target=holder.close).start()
    assert "database is locked" in one_line(result, "predict")


def test_predict_out_is_an_existing_file_before_the_model_loads(work: Path, photo: Path):
    (work / "taken").write_text("a file\n")
    result = run([WSSS, "predict", str(photo), "--model", "no_such_model.pt", "--out", "taken"], work)
    assert one_line(result, "predict").endswith("taken: exists and is not a folder (--out names the folder the "
                                                 "masks are written to)")  # fmt: skip


class _Payload:
    """Unpickling this runs code: it would create the file ``marker``."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_a_checkpoint_that_carries_code_is_refused_not_run(work: Path, photo: Path):
    import torch

    marker = work / "pwned"
    torch.save({"model_name": "wsss_vit_tiny_patch8", "payload": _Payload(marker)}, work / "evil.pt")
    result = run([WSSS, "predict", str(photo), "--from-attention", "evil.pt", "--out", "m"], work)
    assert one_line(result, "predict").endswith(
        "evil.pt: refused, holds code that loading would run (getattr), not only tensors and plain data"
    )
    assert not marker.exists()
    with pytest.raises(pickle.UnpicklingError):  # the same file, loaded the unsafe way, would run it
        torch.load(work / "evil.pt", weights_only=True)
