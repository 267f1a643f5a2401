"""Running ``wsss``/``dvc`` commands from a flow: their output streamed into the flow run's log, and their
failures told apart (bad input fails at once, a transient failure is retried). Shared by the flows."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

PROGRESS_EVERY_S = 15.0
WSSS_ERROR = re.compile(r"^wsss [\w -]+: error: .*$")
TRANSIENT = re.compile(
    r"Unable to acquire lock|database is locked|Connection refused|Connection reset|Temporary failure"
    r"|timed out|Max retries exceeded|Resource temporarily unavailable"
)
# DVC's advice after each stage ("git add dvc.lock", autostage, push): debug level, not the run's story.
DVC_HINTS = re.compile(
    r"^\s*(To track the changes with git|git add |To enable auto staging|dvc config core\.autostage"
    r"|Use `dvc push`)"
)


class StageError(RuntimeError):
    """A stage failed on its input; the message is the stage's own one-line error."""


class TransientStageError(RuntimeError):
    """A stage failed for a reason that may go away (lock, busy store, network): retried."""


def is_transient(task, task_run, state) -> bool:
    """Prefect ``retry_condition_fn``: retry TransientStageError only."""
    try:
        exc = state.result(raise_on_failure=False)
    except Exception:  # noqa: BLE001 - an unreadable state is not worth a retry
        return False
    return isinstance(exc, TransientStageError)


def tool_env() -> dict[str, str]:
    """This interpreter's bin dir first on PATH, so `dvc` and the stages' `wsss` are this venv's."""
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["PYTHONUNBUFFERED"] = "1"
    return env


def dvc_command() -> list[str]:
    return [sys.executable, "-m", "dvc"]


def run_logged(cmd: list[str], root: Path, logger, label: str) -> tuple[int, list[str]]:
    """Runs ``cmd`` in ``root``, logging each output line (tqdm bars at most every PROGRESS_EVERY_S)."""
    process = subprocess.Popen(
        cmd, cwd=root, env=tool_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, bufsize=0
    )
    lines: list[str] = []
    last_progress = 0.0
    buffer = b""
    assert process.stdout is not None
    while chunk := process.stdout.read(65536):  # unbuffered: returns what is there
        buffer += chunk
        while True:
            cut = min((i for i in (buffer.find(b"\n"), buffer.find(b"\r")) if i >= 0), default=-1)
            if cut < 0:
                break
            raw, sep, buffer = buffer[:cut], buffer[cut : cut + 1], buffer[cut + 1 :]
            line = raw.decode(errors="replace").rstrip()
            if not line.strip():
                continue
            if sep == b"\r":  # a progress bar redraw
                if time.monotonic() - last_progress >= PROGRESS_EVERY_S:
                    last_progress = time.monotonic()
                    logger.info("[%s] %s", label, line.strip())
                continue
            lines.append(line)
            if WSSS_ERROR.match(line.strip()) or line.startswith("ERROR"):
                logger.error("[%s] %s", label, line)
            elif DVC_HINTS.match(line):
                logger.debug("[%s] %s", label, line)
            else:
                logger.info("[%s] %s", label, line)
    if buffer.strip():
        lines.append(buffer.decode(errors="replace").rstrip())
        logger.info("[%s] %s", label, lines[-1])
    return process.wait(), lines


def stage_failure(stage: str, returncode: int, lines: list[str]) -> Exception:
    """The exception a failed command's output calls for: its ``wsss`` error line, or a (transient) DVC error."""
    wsss_errors = [line.strip() for line in lines if WSSS_ERROR.match(line.strip())]
    if wsss_errors:
        return StageError(wsss_errors[-1])
    text = "\n".join(lines)
    dvc_errors = [line.strip() for line in lines if line.startswith("ERROR")]
    message = dvc_errors[-1] if dvc_errors else f"dvc repro {stage} exited with {returncode}"
    if TRANSIENT.search(text):
        return TransientStageError(f"stage {stage}: {message} (transient, retrying)")
    return StageError(f"stage {stage}: {message}")
