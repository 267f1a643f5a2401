"""The `wsss` stages end to end on the tiny config, and their one-line errors on bad input."""

import json
import shutil
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml
from PIL import Image

from wsss.lib import runtime
from wsss.lib.config import Params
from wsss.tools.cli import main


def write_params(params: Params, path: Path) -> str:
    path.write_text(yaml.safe_dump(params.to_dict(), sort_keys=False))
    return str(path)


def run(capsys: pytest.CaptureFixture, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_all_stages_end_to_end(tiny_params: Params, tmp_path: Path, capsys, monkeypatch):
    monkeypatch.setattr(runtime, "_announced", set())  # the once-per-process lines, as a stage command prints them
    params = write_params(tiny_params, tmp_path / "params.yaml")
    for stage in ("ingest", "train-classifier", "pseudo-masks", "train-segmenter"):
        code, out, err = run(capsys, stage, "--params", params)
        assert code == 0, err
        if stage == "train-classifier":  # each choice once, with its reason
            assert out.count("precision: fp32 (trainer.precision set; CPU ") == 1
            assert out.count("threads: 2 (num_threads set)") == 1
    code, out, err = run(capsys, "train-segmenter", "--masks", "gt", "--params", params)  # the upper bound
    assert code == 0 and "segmenter (gt masks): val mIoU" in out
    code, out, err = run(capsys, "evaluate", "--params", params)
    assert code == 0, err
    for folder in ("classifier", "pseudo_masks", "segmenter", "metrics"):  # how each stage ran, beside its outputs
        record = json.loads((tmp_path / folder / "runtime.json").read_text())
        assert record["precision"] == "fp32" and record["num_threads"] == 2
        assert record["cpu_capability"] == torch.backends.cpu.get_cpu_capability()

    classifier = json.loads((tmp_path / "classifier" / "metrics.json").read_text())
    assert 0.0 <= classifier["val_map"] <= 1.0
    assert len(classifier["closed_per_layer"]) == 4
    stats = json.loads((tmp_path / "pseudo_masks" / "stats.json").read_text())
    assert stats["images"] == 48 and 0.0 <= stats["miou"] <= stats["ceiling_miou"] <= 1.0
    masks = pd.read_parquet(tmp_path / "pseudo_masks" / "train.parquet")
    assert len(masks) == 48
    metrics = json.loads((tmp_path / "metrics" / "metrics.json").read_text())
    for key in ("pseudo_mask_miou", "segmenter_miou"):
        assert 0.0 <= metrics[key] <= 1.0
    assert "segmenter_gt_miou" not in metrics  # the upper bound is `make upper-bound`'s, not a stage's
    assert metrics["pseudo_mask_miou"] == pytest.approx(stats["miou"])
    assert metrics["classifier_val_map"] == classifier["val_map"] and metrics["area_share"] == stats["area_share"]
    assert all(isinstance(value, int | float) for value in metrics.values())  # flat: `dvc metrics show` is short
    assert (tmp_path / "plots" / "grid.png").stat().st_size > 0
    with Image.open(tmp_path / "plots" / "maps.png") as maps:  # image + 3 map columns, a row per grid image
        assert maps.width > 4 * 96 and maps.height > tiny_params.evaluate.grid_images * 96


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("classifier.mask_ratio=2", "classifier.mask_ratio: 2.0 is outside [0, 1]"),
        ("classifier.diversity=-0.1", "classifier.diversity: must be >= 0, got -0.1"),
        ("classifier.epochs=many", "classifier.epochs: expected int"),
        ("classifier.dropout=0.1", "unknown parameter classifier.dropout"),
        ("classifier.epoch=3", "unknown parameter classifier.epoch (did you mean classifier.epochs? known:"),
        ("classifier.model=wsss_vit_huge_patch3", "unknown model 'wsss_vit_huge_patch3'"),
    ],
)
def test_bad_params_fail_with_one_line_and_write_nothing(tiny_params, tmp_path, capsys, override, expected):
    params = write_params(tiny_params, tmp_path / "params.yaml")
    assert run(capsys, "ingest", "--params", params)[0] == 0
    code, _, err = run(capsys, "train-classifier", "--params", params, "-S", override)
    assert code == 1
    assert err.count("\n") == 1 and expected in err and err.startswith("wsss train-classifier: error:")
    assert not (tmp_path / "classifier").exists()


def test_missing_checkpoint_is_named(tiny_params, tmp_path, capsys):
    params = write_params(tiny_params, tmp_path / "params.yaml")
    assert run(capsys, "ingest", "--params", params)[0] == 0
    code, _, err = run(capsys, "pseudo-masks", "--params", params)
    assert code == 1 and str(tmp_path / "classifier" / "model.pt") in err and err.count("\n") == 1
    assert not (tmp_path / "pseudo_masks").exists()


def test_empty_split_is_named_and_ingest_leaves_no_output(tiny_params, tiny_dataset, tmp_path, capsys):
    root = tmp_path / "no_val"
    shutil.copytree(tiny_dataset, root)
    manifest = pd.read_parquet(root / "manifest.parquet")
    manifest[manifest["split"] == "train"].to_parquet(root / "manifest.parquet", index=False)
    tiny_params.ingest.source = str(root)
    code, _, err = run(capsys, "ingest", "--params", write_params(tiny_params, tmp_path / "params.yaml"))
    assert code == 1 and "empty split 'val'" in err and err.count("\n") == 1
    assert not Path(tiny_params.ingest.out).exists()


def test_unreadable_params_file(tmp_path, capsys):
    code, _, err = run(capsys, "ingest", "--params", str(tmp_path / "nope.yaml"))
    assert code == 1 and "nope.yaml: cannot read params file" in err


def test_help_texts_are_plain_text():
    """Help is read in a terminal: no reST markup (double backticks) from the docstrings it is built from."""
    import argparse

    from wsss.tools.cli import build_parser

    def helps(parser: argparse.ArgumentParser, path: str) -> list[tuple[str, str]]:
        found = [(path, parser.format_help())]
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, sub in action.choices.items():
                    found += helps(sub, f"{path} {name}")
        return found

    marked = [path for path, text in helps(build_parser(), "wsss") if "``" in text]
    assert not marked, f"reST markup in the help of {marked}"


def test_params_yaml_holds_exactly_the_dataclass_defaults():
    """Defaults are written once: params.yaml (the file every entry point reads) names every parameter but the
    research bench's own (BENCH_OPTIONS) with the value of its dataclass default in lib/config.py, so neither can
    drift from the other."""
    import yaml

    from wsss.lib.config import BENCH_OPTIONS, DEFAULT_PARAMS, Params, flatten

    REPO = Path(__file__).resolve().parents[1]
    written = flatten(yaml.safe_load((REPO / DEFAULT_PARAMS).read_text()))
    defaults = flatten(Params().to_dict())
    assert set(defaults) >= BENCH_OPTIONS
    defaults = {key: value for key, value in defaults.items() if key not in BENCH_OPTIONS}
    assert set(written) == set(defaults), (sorted(set(defaults) - set(written)), sorted(set(written) - set(defaults)))
    differ = {key: (written[key], defaults[key]) for key in defaults if written[key] != defaults[key]}
    assert not differ, f"params.yaml vs lib/config.py defaults: {differ}"


def test_profiles_list_overrides_that_load_and_reach_2000_steps_on_make_runs_data(capsys):
    """profiles.yaml's `paper`: overrides valid against params.yaml, printed for OVERRIDES and for dvc exp run, and
    the ~2,000 optimizer steps the class-token curves needed (issue 32) on make run's own training images."""
    from wsss.lib.config import load_params, profile_overrides
    from wsss.lib.distributed import steps_per_epoch

    code, out, err = run(capsys, "profile", "paper")
    assert code == 0, err
    overrides = out.split()
    assert overrides == profile_overrides("paper") and "classifier.head=shared" in overrides
    code, out, _ = run(capsys, "profile", "paper", "--dvc")
    assert out.split() == [word for o in overrides for word in ("-S", o)]
    params = load_params("params.yaml", overrides)
    steps = params.classifier.epochs * steps_per_epoch(params.embedded.train_images, params.classifier.batch_size)
    assert 2000 <= steps <= 2200 and not params.classifier.patch_cam


def test_a_profile_goes_before_the_overrides_and_a_bad_one_is_one_line(capsys, tmp_path, monkeypatch):
    from wsss.lib.config import profile_overrides

    monkeypatch.chdir(tmp_path)
    Path("profiles.yaml").write_text("short:\n  - classifier.epochs=3\nspaced:\n  - 'pseudo_masks.scales=[1.0, 2.0]'\n")
    code, out, err = run(capsys, "profile", "short", "--params", "none.yaml")
    assert code == 1 and err.strip().endswith("none.yaml: cannot read params file (No such file or directory)")
    Path("params.yaml").write_text("seed: 0\n")
    code, out, err = run(capsys, "profile", "nope")
    assert code == 1 and err.strip() == "wsss profile: error: profiles.yaml: no profile 'nope' (known: short, spaced)"
    code, out, err = run(capsys, "ingest", "--profile", "spaced")
    assert code == 1 and "'pseudo_masks.scales=[1.0, 2.0]' is not one word section.key=value" in err
    assert len(err.strip().splitlines()) == 1
    assert profile_overrides("short") == ["classifier.epochs=3"]
    # -S comes after the profile: its bad epochs win over the profile's good ones (the other order would pass)
    code, out, err = run(capsys, "profile", "short", "--profile", "short", "-S", "classifier.epochs=0")
    assert code == 1 and err.strip() == "wsss profile: error: classifier.epochs: must be > 0, got 0"
    code, out, err = run(capsys, "profile", "short", "--profile", "short")
    assert code == 0 and out == "classifier.epochs=3\n"


# A command that is stopped by SIGTERM while it writes its output (the real `run` and `atomic_file`).
WRITER = """
import argparse, sys, time
from wsss.lib.io import atomic_file
from wsss.tools.cli import run

def write_slowly(params, args):
    with atomic_file(args.target) as handle:
        handle.write(b"partial")
        handle.flush()
        print("writing", flush=True)
        time.sleep(60)

parser = argparse.ArgumentParser()
write = parser.add_subparsers(dest="command").add_parser("write")
write.add_argument("target")
write.set_defaults(handler=write_slowly, params=None, overrides=[])
sys.exit(run(parser, sys.argv[1:], "wsss"))
"""


def test_sigterm_mid_write_keeps_the_old_output_and_leaves_no_temporary_file(tmp_path):
    target = tmp_path / "out" / "model.pt"
    target.parent.mkdir()
    target.write_bytes(b"old")
    script = tmp_path / "writer.py"
    script.write_text(WRITER)
    process = subprocess.Popen(
        [sys.executable, str(script), "write", str(target)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        assert process.stdout.readline() == "writing\n", process.stderr.read()
        assert len(list(target.parent.iterdir())) == 2  # the temporary file is there, beside the old output
        process.send_signal(signal.SIGTERM)
        _, err = process.communicate(timeout=60)
    finally:
        process.kill()
    assert (process.returncode, err) == (143, "wsss write: terminated\n")
    assert [path.name for path in target.parent.iterdir()] == ["model.pt"] and target.read_bytes() == b"old"


def test_a_command_run_in_process_gives_the_callers_sigterm_handling_back(capsys):
    before = signal.getsignal(signal.SIGTERM)
    assert main(["profile", "paper"]) == 0
    assert signal.getsignal(signal.SIGTERM) is before


def test_a_command_run_from_another_thread_runs_without_touching_signal_handlers(capsys):
    # Python lets only the main thread set handlers: a caller's worker thread (a notebook, a scheduler) still gets
    # the command run, with the process's own SIGTERM handling left as it is.
    before, results = signal.getsignal(signal.SIGTERM), []
    worker = threading.Thread(target=lambda: results.append(main(["profile", "paper"])))
    worker.start()
    worker.join(timeout=60)
    assert results == [0] and signal.getsignal(signal.SIGTERM) is before
    assert "classifier.epochs=" in capsys.readouterr().out
