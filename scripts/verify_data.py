"""Compares what lies in the path that data.dvc tracks with the md5 data.dvc records (hash only, no cache), skipping
what .dvcignore names, as DVC does (the research grid's generated sets live under data/ too).

`dvc status data.dvc` cannot do this on a fresh clone: with an empty cache it reports "not in cache" even
when the regenerated files are exactly the recorded ones. Exit 0 = match, 1 = differs or missing.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import yaml
from dvc.ignore import DvcIgnoreFilter
from dvc_data.hashfile.build import build
from dvc_data.hashfile.db.local import LocalHashFileDB
from dvc_objects.fs.local import LocalFileSystem


def dvc_md5(path: Path, root: Path) -> str:
    """The md5 DVC records for a file or directory (``<md5>.dir`` for directories) of the repository at ``root``."""
    fs = LocalFileSystem()
    ignore = DvcIgnoreFilter(fs, str(root.resolve()))
    with tempfile.TemporaryDirectory() as tmp:
        _, _, obj = build(LocalHashFileDB(fs, tmp), str(path.resolve()), fs, "md5", dry_run=True, ignore=ignore)
    return obj.hash_info.value


def main(dvc_file: str = "data.dvc") -> int:
    record = yaml.safe_load(Path(dvc_file).read_text())["outs"][0]
    path = Path(dvc_file).parent / record["path"]
    if not path.exists():
        print(f"{path}: missing (data.dvc records md5 {record['md5']})")
        return 1
    actual = dvc_md5(path, Path(dvc_file).parent)
    if actual != record["md5"]:
        print(f"{path}: md5 {actual} differs from {dvc_file} ({record['md5']}); the next run records the new version")
        return 1
    print(f"{path}/ matches {dvc_file} (md5 {actual})")
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))
