"""Shared fixtures: one tiny embedded data set per session, and small Params pointing at it."""

from __future__ import annotations

from pathlib import Path

import pytest

from tasks.config import (
    ClassifierParams,
    EmbeddedParams,
    EvaluateParams,
    IngestParams,
    Params,
    PseudoMaskParams,
    SegmenterParams,
)
from tasks.ingest import build_embedded_dataset


def tiny_embedded_params(out: Path) -> EmbeddedParams:
    """32 px, 3 classes, 48 train + 16 val images: builds in well under a second."""
    return EmbeddedParams(
        out=str(out),
        seed=0,
        image_size=32,
        train_images=48,
        val_images=16,
        classes=["bird", "elephant", "giraffe"],
        max_objects=3,
        min_object_size=14,
        max_object_size=24,
    )


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Root of the session's tiny embedded data set. Read-only: copy it before modifying."""
    root = tmp_path_factory.mktemp("tiny") / "embedded"
    return build_embedded_dataset(tiny_embedded_params(root), root)


@pytest.fixture
def tiny_params(tmp_path: Path, tiny_dataset: Path) -> Params:
    """Params for quick end-to-end runs on the tiny set; every output lies under ``tmp_path``."""
    return Params(
        seed=0,
        num_threads=2,
        embedded=tiny_embedded_params(tmp_path / "embedded"),
        ingest=IngestParams(source=str(tiny_dataset), out=str(tmp_path / "dataset")),
        classifier=ClassifierParams(
            model="wsss_vit_tiny_patch8",
            img_size=32,
            epochs=2,
            batch_size=16,
            out=str(tmp_path / "classifier"),
        ),
        pseudo_masks=PseudoMaskParams(tune_images=16, out=str(tmp_path / "pseudo_masks")),
        segmenter=SegmenterParams(
            encoder="resnet18",
            img_size=32,
            epochs=1,
            batch_size=16,
            out=str(tmp_path / "segmenter"),
        ),
        evaluate=EvaluateParams(metrics_dir=str(tmp_path / "metrics"), plots_dir=str(tmp_path / "plots")),
    )
