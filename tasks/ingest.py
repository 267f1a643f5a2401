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
    (``{"root": source, "content": <md5>, "splits": {split: <md5>}}``: the root against which later stages resolve
    image paths; a hash of each split's ids, labels and image and mask bytes, so this output changes whenever a
    pixel does and a val score names the exact images it was measured on; ``content`` hashes them all) and
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
        splits = split_hashes(dataset)
        content = hashlib.md5("".join(splits.values()).encode()).hexdigest()
        write_json(tmp / "source.json", {"root": str(source), "content": content, "splits": splits})
        write_json(tmp / "summary.json", summary)
    return summary


def split_hashes(dataset: DatasetIndex) -> dict[str, str]:
    """``{split: md5}`` over each row's id and labels and the bytes of the image and mask it names, in manifest
    order."""
    hashes = {}
    for split, rows in dataset.manifest.groupby("split", sort=False):
        digest = hashlib.md5()
        for row in rows.itertuples(index=False):
            digest.update(f"{row.id}\0{[int(v) for v in row.labels]}\0".encode())
            for relative in (row.image, row.mask):
                if isinstance(relative, str):
                    digest.update(relative.encode())
                    digest.update(dataset.path(relative).read_bytes())
        hashes[str(split)] = digest.hexdigest()
    return hashes


def main(params: Params) -> dict:
    """CLI entry: ingests ``ingest.source`` into ``ingest.out``."""
    summary = ingest(Path(params.ingest.source), Path(params.ingest.out))
    sizes = ", ".join(f"{name} {split['images']}" for name, split in summary["splits"].items())
    print(f"ingested {params.ingest.source}: {summary['num_classes']} classes, images: {sizes}")
    return summary
