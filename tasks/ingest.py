"""Stage ``ingest``: validates the data set root and writes the canonical manifest the other stages read."""

from __future__ import annotations

import hashlib
from pathlib import Path

from wsss.lib.config import Params
from wsss.lib.dataset_format import SPLITS, DatasetIndex, read_dataset, summarize, write_classes, write_manifest
from wsss.lib.images import BANDS_FILE, write_bands
from wsss.lib.io import atomic_dir, write_json


def ingest(source: Path, out: Path) -> dict:
    """The ingest stage: fully validates the data set at ``source`` and writes the canonical ``out/``.

    ``out/`` holds manifest.parquet, classes.json, bands.json (array images only), source.json
    (``{"root": source, "content": <md5>}``: the root against which later stages resolve image paths, and a hash
    of the bytes of every file the manifest names, so this output changes whenever a pixel does) and
    summary.json. Nothing is written when validation fails.

    Raises:
        WsssError: the first problem in the data set, or a missing train/val split.
    """
    dataset = read_dataset(source, check_files=True, splits=SPLITS)
    summary = summarize(dataset)
    with atomic_dir(out) as tmp:
        write_manifest(tmp / "manifest.parquet", dataset.manifest)
        write_classes(tmp / "classes.json", dataset.classes)
        if dataset.bands is not None:
            write_bands(tmp / BANDS_FILE, dataset.bands)
        write_json(tmp / "source.json", {"root": str(source), "content": content_hash(dataset)})
        write_json(tmp / "summary.json", summary)
    return summary


def content_hash(dataset: DatasetIndex) -> str:
    """md5 over the bytes of every image and mask the manifest names, in manifest order."""
    digest = hashlib.md5()
    for column in ("image", "mask"):
        for relative in dataset.manifest[column].tolist():
            if isinstance(relative, str):
                digest.update(relative.encode())
                digest.update(dataset.path(relative).read_bytes())
    return digest.hexdigest()


def main(params: Params) -> dict:
    """CLI entry: ingests ``ingest.source`` into ``ingest.out``."""
    summary = ingest(Path(params.ingest.source), Path(params.ingest.out))
    sizes = ", ".join(f"{name} {split['images']}" for name, split in summary["splits"].items())
    print(f"ingested {params.ingest.source}: {summary['num_classes']} classes, images: {sizes}")
    return summary
