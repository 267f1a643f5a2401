""":data:`STAGES`, the one table of the pipeline's stages: the CLI's stage commands and the Prefect flow's task
list are made from it, and ``tests/test_layout.py`` holds ``dvc.yaml`` to it. A new stage is its module, its row
here and its dvc.yaml entry (docs/extending.md). No stage imports this file, so editing it reruns nothing."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Stage:
    """One pipeline stage.

    Attributes:
        name: the dvc.yaml stage (and the Prefect task's run name).
        command: its ``wsss`` subcommand; dvc.yaml runs ``wsss <command> <options>``.
        module: ``wsss.tasks.<module>``, whose ``main(params, ...)`` the command runs.
        help: one line for ``wsss --help``.
        params: the params.yaml keys or sections dvc.yaml lists as the stage's params.
        share: its usual share of a full run's time (the flow's estimate of the time left).
        options: command-line options dvc.yaml passes (a second stage of the same command).
    """

    name: str
    command: str
    module: str
    help: str
    params: tuple[str, ...]
    share: float
    options: tuple[str, ...] = ()


STAGES: tuple[Stage, ...] = (
    Stage("ingest", "ingest", "ingest", "validate the data set, write the canonical manifest", ("ingest",), 0.02),
    Stage(
        "train_classifier", "train-classifier", "train_classifier", "train the token-masking ViT classifier",
        ("seed", "device", "classifier", "trainer"), 0.46,
    ),
    Stage(
        "pseudo_masks", "pseudo-masks", "pseudo_masks", "pseudo masks from the class-token attention",
        ("seed", "device", "pseudo_masks", "trainer.precision"), 0.26,
    ),
    Stage(
        "train_segmenter", "train-segmenter", "train_segmenter", "train the segmenter on the pseudo masks",
        ("seed", "device", "segmenter", "trainer"), 0.15,
    ),
    Stage(
        "evaluate", "evaluate", "evaluate", "score pseudo masks and segmenter (mIoU), write metrics and plots",
        ("seed", "device", "evaluate", "trainer.precision"), 0.05,
    ),
    Stage(
        "register", "register", "register",
        "log the pipeline run to MLflow, register both models, move alias champion if better", (), 0.06,
    ),
)  # fmt: skip
