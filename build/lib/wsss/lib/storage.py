"""S3-compatible object storage for the DVC remote and MLflow's artifacts, configured by environment only.

Environment (nothing of it is written into the repo; credentials never leave the environment):
    WSSS_S3_BUCKET                     the bucket; S3 is used only when it is set
    WSSS_S3_PREFIX                     key prefix in the bucket (default ``wsss``): DVC under
                                       ``<prefix>/dvc``, MLflow artifacts under ``<prefix>/mlflow``
    AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL   a non-AWS endpoint (SeaweedFS, MinIO, Ceph, ...)
    AWS_ACCESS_KEY_ID + AWS_SECRET_ACCESS_KEY (+ AWS_SESSION_TOKEN), or AWS_PROFILE; AWS_DEFAULT_REGION
    AWS_MAX_ATTEMPTS (default 3), AWS_RETRY_MODE (default standard): retries of every S3 client here,
                                       MLflow's and DVC's (botocore and aiobotocore read both)

``wsss s3 setup`` creates the bucket when missing and points DVC at it (remote ``wsss-s3`` in
``.dvc/config.local``: URL and endpoint, no keys); ``wsss s3 push|pull`` wraps ``dvc push|pull``. MLflow
(tasks/tracking.py) creates the experiment with its artifact location in the bucket. A store that is
down, refuses the credentials or lacks the bucket ends a command with one line saying which, after the
retries; push, pull and register only read or add local files, so a failure loses nothing local.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from wsss.lib.errors import WsssError

BUCKET_VAR = "WSSS_S3_BUCKET"
PREFIX_VAR = "WSSS_S3_PREFIX"
DVC_REMOTE = "wsss-s3"
DEFAULT_ATTEMPTS = "3"
WATCH_EVERY_S = 5.0
_CREDENTIAL_CODES = {
    "InvalidAccessKeyId",
    "SignatureDoesNotMatch",
    "AccessDenied",
    "Forbidden",
    "403",
    "InvalidToken",
    "ExpiredToken",
}
_MISSING_BUCKET_CODES = {"NoSuchBucket", "404", "NotFound"}


class StorageError(WsssError):
    """The object store failed (unreachable, credentials refused, bucket missing); one line, after retries."""


@dataclass(frozen=True)
class S3Store:
    """Where the project's objects live: ``s3://<bucket>/<prefix>/...`` at ``endpoint_url`` (None: AWS)."""

    bucket: str
    prefix: str = "wsss"
    endpoint_url: str | None = None

    def url(self, *parts: str) -> str:
        return "/".join(("s3:/", self.bucket, self.prefix, *parts))

    @property
    def dvc_url(self) -> str:
        return self.url("dvc")

    @property
    def mlflow_url(self) -> str:
        return self.url("mlflow")

    @property
    def where(self) -> str:
        return f"bucket {self.bucket!r} at {self.endpoint_url or 'AWS S3'}"


def store_from_env(environ: Mapping[str, str] | None = None) -> S3Store | None:
    """The store the environment names, or None when ``WSSS_S3_BUCKET`` is unset."""
    env = os.environ if environ is None else environ
    bucket = env.get(BUCKET_VAR, "").strip()
    if not bucket:
        return None
    endpoint = env.get("AWS_ENDPOINT_URL_S3") or env.get("AWS_ENDPOINT_URL") or None
    return S3Store(bucket, env.get(PREFIX_VAR, "wsss").strip("/") or "wsss", endpoint)


def client_environment(store: S3Store, environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """``environ`` plus the defaults every S3 client here needs: retries, and MLflow's endpoint variable."""
    env = dict(os.environ if environ is None else environ)
    env.setdefault("AWS_RETRY_MODE", "standard")
    env.setdefault("AWS_MAX_ATTEMPTS", DEFAULT_ATTEMPTS)
    if store.endpoint_url:
        env.setdefault("MLFLOW_S3_ENDPOINT_URL", store.endpoint_url)
    return env


def use_store_environment(store: S3Store) -> None:
    """Applies :func:`client_environment` to this process (MLflow's boto3 clients read it from here)."""
    for key, value in client_environment(store).items():
        os.environ.setdefault(key, value)


def _attempts() -> int:
    return int(os.environ.get("AWS_MAX_ATTEMPTS", DEFAULT_ATTEMPTS))


def s3_client(store: S3Store):
    """A boto3 S3 client for ``store``: standard retry mode, ``AWS_MAX_ATTEMPTS`` attempts, short timeouts."""
    import boto3
    from botocore.config import Config

    config = Config(
        retries={"mode": os.environ.get("AWS_RETRY_MODE", "standard"), "total_max_attempts": _attempts()},
        connect_timeout=5,
        read_timeout=60,
    )
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1"
    # A new session: boto3's default one keeps the credentials it first resolved.
    session = boto3.session.Session()
    return session.client("s3", endpoint_url=store.endpoint_url, region_name=region, config=config)


def explain(err: BaseException, store: S3Store) -> str:
    """One line naming what went wrong with ``store`` for a boto3/botocore exception."""
    from botocore import exceptions as bce

    if isinstance(err, bce.NoCredentialsError | bce.PartialCredentialsError):
        return "no S3 credentials: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or AWS_PROFILE"
    if isinstance(err, bce.ProfileNotFound):
        return f"{err} (AWS_PROFILE)"
    if isinstance(err, bce.EndpointConnectionError | bce.ConnectionError | bce.HTTPClientError):
        reason = type(err).__name__
        return f"cannot reach the S3 endpoint of {store.where} after {_attempts()} attempts ({reason}): is it running?"
    if isinstance(err, bce.ClientError):
        code = str(err.response.get("Error", {}).get("Code", ""))
        if code in _CREDENTIAL_CODES:
            return (
                f"{store.where} refused the credentials ({code}): check AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY "
                "or AWS_PROFILE"
            )
        if code in _MISSING_BUCKET_CODES:
            return f"{store.where} does not exist (`wsss s3 setup` creates it)"
        return f"{store.where}: {code or type(err).__name__}: {err}"
    return f"{store.where}: {type(err).__name__}: {err}"


def is_store_failure(err: BaseException) -> bool:
    """Whether ``err`` (or an exception it was raised from) is a boto3/botocore failure."""
    from boto3.exceptions import Boto3Error
    from botocore.exceptions import BotoCoreError, ClientError

    seen = set()
    while err is not None and id(err) not in seen:
        if isinstance(err, BotoCoreError | ClientError | Boto3Error):
            return True
        seen.add(id(err))
        err = err.__cause__ or err.__context__
    return False


def root_cause(err: BaseException) -> BaseException:
    """The boto3/botocore exception behind ``err`` (``err`` itself when there is none)."""
    from boto3.exceptions import Boto3Error
    from botocore.exceptions import BotoCoreError, ClientError

    current: BaseException | None = err
    while current is not None:
        if isinstance(current, BotoCoreError | ClientError | Boto3Error):
            return current
        current = current.__cause__ or current.__context__
    return err


def check_store(store: S3Store, create_bucket: bool = False) -> bool:
    """Checks that the endpoint answers, accepts the credentials and has the bucket (after retries).

    Args:
        create_bucket: create the bucket when it is missing instead of failing.

    Returns:
        True when the bucket was created here.

    Raises:
        StorageError: one line naming the failure.
    """
    from botocore.exceptions import BotoCoreError, ClientError

    try:
        client = s3_client(store)  # an unknown AWS_PROFILE fails here already
        client.list_objects_v2(Bucket=store.bucket, MaxKeys=1)
        return False
    except ClientError as err:
        missing = str(err.response.get("Error", {}).get("Code", "")) in _MISSING_BUCKET_CODES
        if not (missing and create_bucket):
            raise StorageError(explain(err, store)) from None
    except BotoCoreError as err:
        raise StorageError(explain(err, store)) from None
    try:
        client.create_bucket(Bucket=store.bucket)
    except (BotoCoreError, ClientError) as err:
        raise StorageError(explain(err, store)) from None
    return True


def summarize(store: S3Store) -> str:
    """Objects and bytes under the DVC and the MLflow prefix, e.g. ``dvc: 812 objects, 41.3 MB; ...``."""
    from botocore.exceptions import BotoCoreError, ClientError

    parts = []
    for part in ("dvc", "mlflow"):
        count = size = 0
        try:
            pages = s3_client(store).get_paginator("list_objects_v2")
            for page in pages.paginate(Bucket=store.bucket, Prefix=f"{store.prefix}/{part}/"):
                for item in page.get("Contents", []):
                    count, size = count + 1, size + item["Size"]
        except (BotoCoreError, ClientError) as err:
            raise StorageError(explain(err, store)) from None
        parts.append(f"{part}: {count} objects, {size / 1e6:.1f} MB")
    return "; ".join(parts)


def _dvc(repo: Path, *args: str, env: Mapping[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "dvc", *args], cwd=repo, env=env, capture_output=True, text=True, check=False
    )


def configure_dvc_remote(store: S3Store, repo: str | Path = ".") -> None:
    """Makes ``wsss-s3`` (URL and endpoint only) the default DVC remote in ``.dvc/config.local``."""
    repo = Path(repo)
    steps = [("remote", "add", "--local", "--force", "--default", DVC_REMOTE, store.dvc_url)]
    if store.endpoint_url:
        steps.append(("remote", "modify", "--local", DVC_REMOTE, "endpointurl", store.endpoint_url))
    for step in steps:
        result = _dvc(repo, *step)
        if result.returncode != 0:
            raise WsssError(f"dvc {' '.join(step[:2])} failed: {_last_error(result.stderr + result.stdout)}")


def _last_error(output: str, details: int = 3) -> str:
    """DVC's last ``ERROR`` line on one line, with the first ``details`` lines it lists after a colon."""
    lines = [line.strip() for line in output.splitlines() if line.strip()]
    starts = [i for i, line in enumerate(lines) if line.startswith("ERROR")]
    if not starts:
        return lines[-1] if lines else "no output"
    error, *listed = lines[starts[-1] :]
    if error.endswith(":") and listed:
        more = ", ..." if len(listed) > details else ""
        error = f"{error} {', '.join(listed[:details])}{more}"
    return error


def dvc_transfer(
    store: S3Store, direction: str, repo: str | Path = ".", jobs: int | None = None, targets: Sequence[str] = ()
) -> str:
    """``dvc push`` or ``dvc pull`` of ``targets`` (all when empty) against remote ``wsss-s3``; returns DVC's
    summary line.

    The store is checked first (reachable, credentials, bucket). When DVC fails, the store is checked
    again, so the error says whether it went down meanwhile.

    Raises:
        StorageError: the store failed before or during the transfer (one line; local files untouched).
    """
    if direction not in ("push", "pull"):
        raise ValueError(f"direction must be push or pull, got {direction!r}")
    check_store(store)
    args = [direction, "--remote", DVC_REMOTE, *(["--jobs", str(jobs)] if jobs else []), *targets]
    process = subprocess.Popen(
        [sys.executable, "-m", "dvc", *args],
        cwd=Path(repo),
        env=client_environment(store),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    # DVC tries every remaining file, each after its own retries (~1.4 s a file here), before it reports
    # a dead store; so a watchdog checks the store meanwhile and stops DVC as soon as the store fails.
    store_failure = None
    while True:
        try:
            stdout, stderr = process.communicate(timeout=WATCH_EVERY_S)
            break
        except subprocess.TimeoutExpired:
            try:
                check_store(store)
            except StorageError as err:
                store_failure = str(err)
                stdout, stderr = _interrupt(process)
                break
    if process.returncode == 0 and store_failure is None:
        lines = [line.strip() for line in stdout.splitlines() if line.strip()]
        return lines[-1] if lines else f"dvc {direction}: done"
    if store_failure is None:
        try:
            check_store(store)
            store_failure = _last_error(stderr + stdout)
        except StorageError as err:
            store_failure = str(err)
    kept = "the local cache is unchanged" if direction == "push" else "local files keep what they had"
    raise StorageError(
        f"dvc {direction} ({store.dvc_url}) failed: {store_failure}; {kept}, rerun `wsss s3 {direction}`"
    )


def _interrupt(process: subprocess.Popen, grace_s: float = 15.0) -> tuple[str, str]:
    """Stops DVC as Ctrl-C would (it only reads the cache while pushing), KILL after ``grace_s``."""
    process.send_signal(signal.SIGINT)
    try:
        return process.communicate(timeout=grace_s)
    except subprocess.TimeoutExpired:
        process.kill()
        return process.communicate()
