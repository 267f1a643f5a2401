"""Atomic outputs: every artifact is written to a temporary sibling and renamed into place."""

from __future__ import annotations

import contextlib
import csv
import json
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from wsss.lib.errors import WsssError

_UMASK = os.umask(0)
os.umask(_UMASK)


@contextlib.contextmanager
def atomic_dir(target: str | Path) -> Iterator[Path]:
    """Yields a fresh temporary directory that replaces ``target`` only if the block succeeds.

    For folders the pipeline owns whole (stage outputs). A folder a user names goes through
    :func:`check_replaceable` first: replacing it must not delete a file the command did not write.
    """
    target = Path(target).resolve()  # "." and "out/" have a name to put the temporary sibling beside
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        yield tmp
        tmp.chmod(0o777 & ~_UMASK)  # mkdtemp makes 0700; artifacts get the usual permissions
        if target.exists():
            old = target.with_name(f".{target.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            target.rename(old)
            tmp.rename(target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def check_replaceable(target: str | Path, owned: Iterable[str], what: str) -> None:
    """Refuses a ``target`` folder that holds anything but the top-level entries ``owned`` (what the command
    writes there): replacing it would delete them.

    Raises:
        WsssError: ``target`` is a file, or a folder holding another entry (named in the message).
    """
    target = Path(target)
    if not target.exists():
        return
    if not target.is_dir():
        raise WsssError(f"{target}: exists and is not a folder (the {what} is written as a folder)")
    foreign = sorted(entry.name for entry in target.iterdir() if entry.name not in set(owned))
    if foreign:
        raise WsssError(
            f"{target}: holds {foreign[0]!r}{f' and {len(foreign) - 1} more' if len(foreign) > 1 else ''}, which "
            f"is not part of a {what}: the {what} replaces its folder as a whole, so name a new or empty folder"
        )


@contextlib.contextmanager
def atomic_file(target: str | Path, mode: str = "wb") -> Iterator[Any]:
    """Opens a temporary sibling of ``target`` for writing; renames it over ``target`` on success."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", dir=target.parent)
    try:
        with os.fdopen(fd, mode) as handle:
            yield handle
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600
        os.replace(tmp, target)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


def write_json(target: str | Path, data: Any) -> None:
    """Writes pretty JSON atomically."""
    with atomic_file(target, "w") as handle:
        json.dump(data, handle, indent=2, sort_keys=False)
        handle.write("\n")


def write_csv(target: str | Path, rows: list[dict[str, Any]]) -> None:
    """Writes dict rows (floats rounded to 6 digits) as CSV atomically; the first row's keys are the header."""
    with atomic_file(target, "w") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows({k: round(v, 6) if isinstance(v, float) else v for k, v in row.items()} for row in rows)
