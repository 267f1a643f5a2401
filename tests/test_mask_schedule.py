"""classifier.mask_schedule: masking off, then each ratio from its fraction of the optimizer steps (the reference's
README recipe), checked on a real training run of the tiny classifier."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from wsss.lib.config import ConfigError, Params, load_params
from wsss.tasks import train_classifier
from wsss.tasks.ingest import ingest


def test_the_schedule_is_off_before_its_first_fraction_then_each_ratio():
    schedule = [[0.04, 0.2], [0.1, 0.5]]  # the reference's 20 and 50 of 500 epochs
    ratios = [train_classifier.scheduled_mask_ratio(schedule, step, 500) for step in (0, 19, 20, 49, 50, 499)]
    assert ratios == [0.0, 0.0, 0.2, 0.2, 0.5, 0.5]


@pytest.mark.parametrize(
    ("schedule", "problem"),
    [
        ("[[0.1, 0.2], [0.04, 0.5]]", "fractions of training must increase within [0, 1)"),
        ("[[0.04, 0.2], [0.1, 0.4]]", "the last ratio must be classifier.mask_ratio (0.5)"),
        ("[[0.04]]", "expected [[fraction, ratio], ...] pairs"),
        ("[[0.1, 1.5], [0.2, 0.5]]", "ratios must lie in [0, 1]"),
    ],
)
def test_a_bad_schedule_is_one_line_naming_it(schedule: str, problem: str):
    with pytest.raises(ConfigError) as caught:
        load_params(None, [f"classifier.mask_schedule={schedule}"])
    assert str(caught.value).startswith("classifier.mask_schedule [[") and str(caught.value).endswith(problem)


def test_training_masks_nothing_before_the_first_fraction_and_everything_after(tiny_params: Params, monkeypatch):
    """mask_ratio 1 from half the steps on: every absent class's output reaches the head in the first half of the
    steps and none does in the second (read at each training forward of the real run)."""
    params = dataclasses.replace(tiny_params, device="cpu")
    params.classifier = dataclasses.replace(
        params.classifier, epochs=2, batch_size=16, mask_ratio=1.0, mask_schedule=[[0.5, 1.0]], gates=False
    )
    ingest(Path(params.ingest.source), Path(params.ingest.out))
    seen: list[tuple[float, float]] = []  # (ratio, share of absent class outputs zeroed) per training forward
    build = train_classifier.build_classifier

    def build_and_watch(*args, **kwargs):
        model = build(*args, **kwargs)
        head, mask, zeroed = model.forward_head, model.mask_class_tokens, []

        def watched_mask(cls, labels, *rest, **more):
            masked = mask(cls, labels, *rest, **more)
            absent = labels <= 0
            zeroed.append(float(((masked.abs().sum(-1) == 0) & absent).sum() / absent.sum().clamp(min=1)))
            return masked

        def watched_head(x, labels=None, *rest, **more):
            zeroed.clear()
            logits = head(x, labels, *rest, **more)
            if model.training and labels is not None:
                seen.append((model.mask_ratio, zeroed[0] if zeroed else 0.0))
            return logits

        model.forward_head, model.mask_class_tokens = watched_head, watched_mask
        return model

    monkeypatch.setattr(train_classifier, "build_classifier", build_and_watch)
    train_classifier.main(params)
    steps = len(seen)
    assert steps == 2 * (48 // 16)
    assert seen[: steps // 2] == [(0.0, 0.0)] * (steps // 2)
    assert seen[steps // 2 :] == [(1.0, 1.0)] * (steps - steps // 2)
