"""Atomic outputs: every artifact is written to a temporary sibling and renamed into place."""

from __future__ import annotations

import contextlib
import csv
import errno
import json
import math
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from wsss.lib.errors import WsssError

_UMASK = os.umask(0)
os.umask(_UMASK)


def os_error_line(err: OSError, path: str | Path | None = None) -> str:
    """``<path>: <what> (<errno name>)`` for an OSError, e.g. ``out/model.pt: File too large (EFBIG)``."""
    path = path if path is not None else err.filename
    what = err.strerror or os.strerror(err.errno or 0) or type(err).__name__
    name = f" ({errno.errorcode[err.errno]})" if err.errno in errno.errorcode else ""
    return f"{path}: {what}{name}" if path is not None else f"{what}{name}"


# (temporary folder, the folder it becomes) of every atomic_dir being written: an error names the real path.
_STAGED: list[tuple[Path, Path]] = []


@contextlib.contextmanager
def writing(target: str | Path) -> Iterator[None]:
    """Turns an OSError raised while writing ``target`` (disk full, file too large, no permission, read-only
    file system) into the one-line :class:`WsssError` naming ``target`` (inside an :func:`atomic_dir`: the path
    it will have, not the temporary one)."""
    try:
        yield
    except OSError as err:
        path = Path(target)
        for tmp, final in reversed(_STAGED):
            if path.is_relative_to(tmp):
                path = final / path.relative_to(tmp)
                break
        raise WsssError(f"cannot write {os_error_line(err, path)}") from None


def check_writable(folder: str | Path) -> None:
    """Checks before expensive work that ``folder`` (or, when it does not exist yet, the nearest existing folder
    above it, where it would be made) can be written; creates nothing.

    Raises:
        WsssError: the one line naming ``folder`` and why (read-only file system, no permission, not a folder).
    """
    folder = Path(folder)
    existing = next(p for p in (folder, *folder.absolute().parents) if p.exists())
    if not existing.is_dir():
        raise WsssError(f"cannot write {folder}: {existing} is not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        readonly = bool(os.statvfs(existing).f_flag & os.ST_RDONLY)
        code = errno.EROFS if readonly else errno.EACCES
        raise WsssError(f"cannot write {folder}: {os.strerror(code)} ({errno.errorcode[code]})")


@contextlib.contextmanager
def atomic_dir(target: str | Path) -> Iterator[Path]:
    """Yields a fresh temporary directory that replaces ``target`` only if the block succeeds.

    For folders the pipeline owns whole (stage outputs). A folder a user names goes through
    :func:`check_replaceable` first: replacing it must not delete a file the command did not write.
    An OSError while writing becomes one :class:`WsssError` line; the old ``target`` stays as it was.
    """
    target = Path(target).resolve()  # "." and "out/" have a name to put the temporary sibling beside
    with writing(target):
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    _STAGED.append((tmp, target))
    try:
        with writing(target):
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
        _STAGED.remove((tmp, target))
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
    """Opens a temporary sibling of ``target`` for writing; renames it over ``target`` on success.

    An OSError while writing (disk full, file too large, no permission, read-only file system) becomes one
    :class:`WsssError` line naming ``target``; the old ``target`` stays and no temporary file is left.
    """
    target = Path(target)
    with writing(target):
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", dir=target.parent)
    try:
        with writing(target):
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


def _rounded(value: float) -> float:
    """`value` to 6 decimal places, but never fewer than 6 significant digits.

    Six places alone would write a learning rate of 6.25e-5 as 6.3e-05 and one of 4e-7 as 0.
    """
    if value == 0 or not math.isfinite(value):
        return value
    return round(value, max(6, 5 - math.floor(math.log10(abs(value)))))


def write_csv(target: str | Path, rows: list[dict[str, Any]]) -> None:
    """Writes dict rows (floats rounded by `_rounded`) as CSV atomically; the first row's keys are the header."""
    with atomic_file(target, "w") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows({k: _rounded(v) if isinstance(v, float) else v for k, v in row.items()} for row in rows)
