"""`wsss-research curve`: a classifier trained longer with the attention probe after every epoch (issue 32)."""

import json
from pathlib import Path

import pandas as pd
import torch

from tests.test_ablations import GRID, _write_grid
from wsss.lib.artifacts import read_ingested
from wsss.lib.config import Params
from wsss.research import cli
from wsss.research.curves import PROBE_KEYS, attention_probe
from wsss.research.diagnose_maps import multi_class_train_images
from wsss.tasks.ingest import ingest
from wsss.tasks.train_classifier import build_classifier


def test_a_curve_is_one_probed_row_per_epoch_in_its_own_classifier(tmp_path: Path, tiny_params: Params, capsys):
    grid = {**GRID, "variants": {**GRID["variants"], "shared_head": ["classifier.head=shared"]}}
    params_file, config_file = _write_grid(tmp_path, tiny_params, grid)
    args = ["curve", "--params", str(params_file), "--config", str(config_file), "--scale", "tiny"]
    args += ["--root", str(tmp_path / "runs"), "--out", str(tmp_path / "curves"), "--epochs", "3", "--images", "6"]
    train_args = ["--variant", "shared_head", "-S", "classifier.batch_size=20", "-S", "classifier.backbone_lr=5e-4"]
    assert cli.main([*args, *train_args]) == 0
    curve = pd.read_csv(tmp_path / "curves" / "tiny" / "shared_head_seed0.csv")
    # 48 images in batches of 20: the loader drops the incomplete third batch, 2 steps (40 images) an epoch
    assert list(curve["epoch"]) == [1, 2, 3] and list(curve["steps"]) == [2, 4, 6]
    assert list(curve["images_seen"]) == [40, 80, 120]
    assert set(PROBE_KEYS) <= set(curve.columns) and curve["specificity"].between(0, 1).all()
    assert (curve["assignment_chance"] >= 0.5 - 1e-9).all()  # the largest of >= 2 classes holds half at least
    assert (tmp_path / "curves" / "tiny" / "curves.png").stat().st_size > 0
    table = (tmp_path / "curves" / "tiny" / "table.md").read_text()
    assert "| shared_head_seed0 | shared " in table  # each curve names its read-out (classifier.head)
    settings = tiny_params.classifier  # and its peak rates as set, not rounded away by the table's 3 decimals
    # no pretrained weights: the backbone trained at the one lr, whatever backbone_lr says
    assert settings.pretrained is None and list(curve["backbone_lr"].unique()) == [settings.lr]
    assert f" {settings.lr:g} " in table and "backbone_lr" in table
    # its own classifier (3 epochs): the grid's one-epoch classifier of the same variant is another folder
    assert len(list((tmp_path / "runs" / "tiny" / "classifiers").iterdir())) == 1
    capsys.readouterr()
    assert cli.main([*args, "--report-only"]) == 0
    printed = capsys.readouterr().out  # the table as written, its rates unrounded, then where the picture is
    assert printed.startswith(table) and "1 curve: " in printed
    # --cell: the trained classifier (not trained again) gives its pseudo masks and segmenter, in a folder of its own
    trained = (tmp_path / "runs" / "tiny" / "classifiers").iterdir().__next__() / "model.pt"
    before = trained.stat().st_mtime_ns
    assert cli.main([*args, *train_args, "--cell"]) == 0
    row = json.loads((tmp_path / "curves" / "tiny" / "shared_head_seed0_cell.json").read_text())
    assert row["classifier_epochs"] == 3 and 0 <= row["pseudo_miou"] <= 1 and row["pseudo_ceiling_miou"] > 0
    assert row["overrides"][-3:] == ["classifier.epochs=3", "classifier.head=shared", "seed=0"]  # as it was trained
    assert row["segmenter_miou"] is not None and trained.stat().st_mtime_ns == before
    assert (tmp_path / "runs" / "tiny" / "curves" / "shared_head_e3" / "seed0" / "result.json").is_file()
    assert not (tmp_path / "runs" / "tiny" / "shared_head").exists()  # the grid's own cell is left alone


def test_without_a_variant_or_a_curve_it_says_what_to_run(tmp_path: Path, tiny_params: Params, capsys):
    params_file, config_file = _write_grid(tmp_path, tiny_params)
    args = ["curve", "--params", str(params_file), "--config", str(config_file), "--out", str(tmp_path / "none")]
    assert cli.main(args) == 1 and "name the variant to train (--variant)" in capsys.readouterr().err
    assert cli.main([*args, "--report-only"]) == 1
    assert "no curve yet (run `wsss-research curve --scale tiny" in capsys.readouterr().err


def test_identical_class_tokens_probe_as_one_token(tmp_path: Path, tiny_params: Params):
    """Oracle: copies of one token attend alike (cosine 1), and the argmax over identical maps names one class
    everywhere, which can beat always naming the image's largest class nowhere."""
    ingest(Path(tiny_params.ingest.source), tmp_path / "dataset")
    subset, gts = multi_class_train_images(read_ingested(tmp_path / "dataset"), 8)
    model = build_classifier(tiny_params.classifier, 3)
    with torch.no_grad():
        model.class_tokens.copy_(model.class_tokens[:, :1].expand_as(model.class_tokens))
    probe = attention_probe(model, subset, gts)
    assert abs(probe["token_cosine"] - 1.0) < 1e-5
    assert probe["assignment"] <= probe["assignment_chance"] + 1e-9
