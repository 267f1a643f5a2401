"""Digests of every output of the tiny test pipeline (tests/conftest.py's tiny config, one thread), for checking
that a refactor changes no behaviour: run it on the old tree and the new one and diff the two listings.

    git worktree add /tmp/old <commit> && mkdir -p /tmp/oldpkg && ln -s /tmp/old /tmp/oldpkg/wsss
    PYTHONPATH=/tmp/oldpkg .venv/bin/python scripts/tiny_digests.py /tmp/old /tmp/d-old > old.txt
    .venv/bin/python scripts/tiny_digests.py . /tmp/d-new > new.txt && diff old.txt new.txt

Weights are hashed tensor by tensor, JSON and history tables without their wall-time fields; everything else byte
for byte. TREE is the checkout whose tests/conftest.py defines the tiny config.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

STAGES = ("ingest", "train-classifier", "pseudo-masks", "train-segmenter", "evaluate")


def tensor_digest(path: Path) -> str:
    import torch

    digest = hashlib.md5()

    def walk(prefix: str, value: object) -> None:
        if torch.is_tensor(value):
            digest.update(prefix.encode())
            digest.update(value.float().numpy().tobytes())
        elif isinstance(value, dict):
            for key in sorted(value, key=str):
                walk(f"{prefix}.{key}", value[key])
        elif hasattr(value, "state_dict"):
            walk(prefix, value.state_dict())

    walk("", torch.load(path, map_location="cpu", weights_only=False))  # our own fresh outputs
    return digest.hexdigest()


def digest(path: Path) -> str:
    if path.suffix == ".pt":
        return "tensors " + tensor_digest(path)
    if path.name == "history.csv":
        import pandas as pd

        table = pd.read_csv(path)
        return hashlib.md5(table.drop(columns=[c for c in table if "second" in c]).to_csv().encode()).hexdigest()
    if path.suffix == ".json":
        data = json.loads(path.read_text())
        if isinstance(data, dict):
            data = {k: v for k, v in data.items() if "second" not in k}
        return hashlib.md5(json.dumps(data, sort_keys=True).encode()).hexdigest()
    return hashlib.md5(path.read_bytes()).hexdigest()


def main(tree: Path, out: Path) -> None:
    sys.path.insert(0, str(tree / "tests"))
    import conftest as c
    import yaml

    out.mkdir(parents=True, exist_ok=True)
    root = out / "data" / "embedded"
    c.build_embedded_dataset(c.tiny_embedded_params(root), root)
    tiny = c.Params(
        seed=0,
        classifier=c.ClassifierParams(**c.TINY_CLASSIFIER),
        pseudo_masks=c.PseudoMaskParams(tune_images=16),
        segmenter=c.SegmenterParams(**c.TINY_SEGMENTER),
        trainer=c.TINY_TRAINER,
    )
    (out / "params.yaml").write_text(yaml.safe_dump(c.pipeline_params(tiny)))
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{out}/mlflow.db"}
    for stage in STAGES:
        subprocess.run([sys.executable, "-m", "wsss.tools.cli", stage], cwd=out, env=env, check=True, stdout=sys.stderr)
    for path in sorted(p for p in out.rglob("*") if p.is_file()):
        rel = path.relative_to(out).as_posix()
        if not rel.startswith(("data/", "mlflow", "mlruns")) and not (path.suffix == ".png" and "plots" in path.parts):
            print(rel, digest(path))


if __name__ == "__main__":
    main(Path(sys.argv[1]).resolve(), Path(sys.argv[2]).resolve())
