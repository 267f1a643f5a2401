"""The data path on VOC-like photos, side by side in one run (not a test).

    python -m wsss.research.bench_data [--images 2000 20000] [--out reports/data.json] [--workers 0 1 2]

1. A VOC-like set: the embedded generator's scenes (objects on textures) rendered at 500 x 375 (a quarter
   portrait, 375 x 500), saved as JPEG photos with palette PNG masks, ``max(--images)`` training images
   (+ 100 val); each smaller size is the first images of it (one manifest per size).
2. Peak RSS (the kernel's ``ru_maxrss`` of the command's process tree) of ``wsss train-classifier``
   (1 epoch, the default tiny model at 64 px) and of ``wsss pseudo-masks`` for each size: the streamed data
   path holds no split in memory, so the peak should not grow with the number of images (goal <= 1.2x).
3. Loader throughput (images/s of decode + random crop + flip + normalise, the training items) at 224 and
   448 px with 0, 1 and 2 DataLoader workers, beside the model's training step (ViT-Ti/16 fwd + bwd) at the
   same sizes on this device.
Writes ``--out`` (JSON) and a table beside it (``.md``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import yaml
from PIL import Image

VOC_SIZE = (500, 375)  # width, height of most VOC photos
VAL_IMAGES = 100


def build_voc_like(root: Path, train_images: int) -> Path:
    """``root/full``: the embedded generator's scenes upscaled to 500 x 375 JPEGs (+ masks), train and val."""
    from wsss.lib.config import EmbeddedParams
    from wsss.lib.dataset_format import read_dataset, write_classes, write_manifest
    from wsss.lib.images import read_mask, write_mask_png
    from wsss.tools.embedded import build_embedded_dataset

    scenes = build_embedded_dataset(
        EmbeddedParams(out=str(root / "scenes"), image_size=96, train_images=train_images, val_images=VAL_IMAGES,
                       min_object_size=30, max_object_size=64),
        root / "scenes",
    )  # fmt: skip
    source = read_dataset(scenes)
    out = root / "full"
    (out / "images").mkdir(parents=True)
    (out / "masks").mkdir()
    rows = []
    for index, row in enumerate(source.manifest.itertuples(index=False)):
        size = VOC_SIZE if index % 4 else VOC_SIZE[::-1]  # a quarter portrait, as in VOC
        image = Image.open(scenes / row.image).convert("RGB").resize(size, Image.BILINEAR)
        image.save(out / "images" / f"{row.id}.jpg", quality=90)
        mask = Image.fromarray(read_mask(scenes / row.mask)).resize(size, Image.NEAREST)
        write_mask_png(out / "masks" / f"{row.id}.png", np.asarray(mask))
        rows.append({**row._asdict(), "image": f"images/{row.id}.jpg", "mask": f"masks/{row.id}.png",
                     "width": size[0], "height": size[1]})  # fmt: skip
    write_classes(out / "classes.json", source.classes)
    write_manifest(out / "manifest.parquet", pd.DataFrame(rows))
    return out


def subset(full: Path, root: Path, train_images: int) -> Path:
    """A data set root holding the first ``train_images`` training images of ``full`` (and all val)."""
    from wsss.lib.dataset_format import read_dataset, write_classes, write_manifest

    dataset = read_dataset(full)
    manifest = dataset.manifest
    train = manifest[manifest["split"] == "train"].head(train_images)
    out = root / f"n{train_images}"
    out.mkdir()
    for name in ("images", "masks"):
        (out / name).symlink_to(full / name)
    write_classes(out / "classes.json", dataset.classes)
    write_manifest(out / "manifest.parquet", pd.concat([train, manifest[manifest["split"] == "val"]]))
    return out


def peak_rss_mb(cmd: list[str], cwd: Path) -> tuple[float, float]:
    """(peak RSS in MiB of ``cmd`` and its children, seconds), measured in a fresh process of its own."""
    probe = (
        "import resource, subprocess, sys, time; t = time.perf_counter(); "
        "r = subprocess.run(sys.argv[1:]); "
        "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, time.perf_counter() - t, r.returncode)"
    )
    result = subprocess.run([sys.executable, "-c", probe, *cmd], cwd=cwd, capture_output=True, text=True)
    kib, seconds, code = result.stdout.split()[-3:]
    if code != "0":
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{result.stdout[-2000:]}")
    return int(kib) / 1024, float(seconds)


def write_params(path: Path, source: Path, work: Path) -> Path:
    from wsss.lib.config import Params

    tree = Params().to_dict()
    tree["num_threads"] = 2
    tree["ingest"].update(source=str(source), out=str(work / "dataset"))
    tree["classifier"].update(epochs=1, out=str(work / "classifier"))
    tree["pseudo_masks"].update(out=str(work / "pseudo_masks"), tune_images=100)
    path.write_text(yaml.safe_dump(tree, sort_keys=False))
    return path


def memory(sizes: list[int], root: Path) -> list[dict[str, Any]]:
    full = build_voc_like(root, max(sizes))
    wsss = str(Path(sys.executable).parent / "wsss")
    rows = []
    for n in sorted(sizes):
        source = subset(full, root, n)
        work = root / f"work{n}"
        work.mkdir()
        params = str(write_params(work / "params.yaml", source, work))
        subprocess.run([wsss, "ingest", "--params", params], check=True, capture_output=True)
        row = {"train_images": n}
        for stage in ("train-classifier", "pseudo-masks"):
            rss, seconds = peak_rss_mb([wsss, stage, "--params", params], work)
            row[f"{stage}_peak_rss_mib"], row[f"{stage}_seconds"] = round(rss, 1), round(seconds, 1)
        rows.append(row)
        print(row, flush=True)
    return rows


def throughput(root: Path, workers: list[int], items: int = 256) -> list[dict[str, Any]]:
    """Loader items/s and model training images/s at 224 and 448 px."""
    import timm
    import torch

    import wsss.models  # noqa: F401  (registers wsss_vit_*)
    from wsss.lib.dataset_format import read_dataset
    from wsss.lib.datasets import AugmentedSplit, StreamedSplit
    from wsss.lib.distributed import World, shard_loader

    torch.set_num_threads(2)
    dataset = read_dataset(root / "full")
    rows = []
    for size in (224, 448):
        data = StreamedSplit(dataset, "train")  # original-size JPEGs; the training crops are cut from them
        for count in workers:
            augmented = AugmentedSplit(data, train=True, size=size, seed=0)
            loader = shard_loader(augmented, 32, 0, World(), num_workers=count)
            loader.sampler.set_epoch(0)
            began, seen = time.perf_counter(), 0
            for images, _, _ in loader:
                seen += len(images)
                if seen >= items:
                    break
            rows.append(
                {"size": size, "what": f"loader, {count} workers", "images_per_s": seen / (time.perf_counter() - began)}
            )
        model = timm.create_model("wsss_vit_tiny_patch16", num_classes=20, img_size=size)
        optimizer = torch.optim.AdamW(model.parameters())
        images, labels = torch.randn(16, 3, size, size), torch.randint(0, 2, (16, 20)).float()
        for _ in range(2):  # warm-up, then timed
            began = time.perf_counter()
            loss = torch.nn.functional.binary_cross_entropy_with_logits(model(images, labels), labels)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        rows.append({"size": size, "what": "ViT-Ti/16 train step (CPU, batch 16)",
                     "images_per_s": 16 / (time.perf_counter() - began)})  # fmt: skip
        print(rows[-1], flush=True)
    return rows


def markdown(record: dict[str, Any]) -> str:
    lines = ["| training images | train-classifier peak RSS MiB (s) | pseudo-masks peak RSS MiB (s) |", "|---|---|---|"]
    for row in record["memory"]:
        lines.append(
            f"| {row['train_images']} | {row['train-classifier_peak_rss_mib']} ({row['train-classifier_seconds']}) "
            f"| {row['pseudo-masks_peak_rss_mib']} ({row['pseudo-masks_seconds']}) |"
        )
    first, last = record["memory"][0], record["memory"][-1]
    for stage in ("train-classifier", "pseudo-masks"):
        ratio = last[f"{stage}_peak_rss_mib"] / first[f"{stage}_peak_rss_mib"]
        lines.append(f"\n{stage}: peak RSS x{ratio:.2f} from {first['train_images']} to {last['train_images']} images")
    lines += ["", "| px | what | images/s |", "|---|---|---|"]
    lines += [f"| {r['size']} | {r['what']} | {r['images_per_s']:.1f} |" for r in record["throughput"]]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m wsss.research.bench_data", description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, nargs="+", default=[2000, 20000], help="training images per run")
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2], help="DataLoader workers to time")
    parser.add_argument("--out", default="reports/data.json")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="wsss-data-bench-") as tmp:
        root = Path(tmp)
        record = {
            "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
            "memory": memory(args.images, root),
            "throughput": throughput(root, args.workers),
        }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=2) + "\n")
    out.with_suffix(".md").write_text(markdown(record))
    print(markdown(record), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
