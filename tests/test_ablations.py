"""The ablation grid (tasks/ablations.py), its report (tasks/report.py) and the Prefect deployment's flow, on
the tiny data set with real stage functions, real MLflow (sqlite) and a real Prefect test server."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import sys
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
import torch
import yaml

from wsss.lib.config import ConfigError, Params, key_settings, load_params
from wsss.lib.errors import WsssError
from wsss.research import ablations, cli
from wsss.research.ablations import plan, read_config, run_cell, run_grid
from wsss.research.report import collect, paired_differences, paired_markdown, per_class_iou, write_report

GRID = {
    "seeds": [0],
    "scales": {"tiny": [], "longer": ["classifier.epochs=3"]},
    "variants": {
        "full": [],
        "no_masking": ["classifier.mask_ratio=0"],
        "fixed_thresholds": ["pseudo_masks.tune_thresholds=false", "pseudo_masks.flip=true"],  # full's classifier
        "cam_baseline": [
            "classifier.model=wsss_cam_vit_tiny_patch8",
            "classifier.mask_ratio=0",
            "classifier.reg_token=false",
            "classifier.gates=false",
        ],
    },
    "mask_ratio_sweep": ["no_masking", "full"],
}
VOLATILE = (
    "classifier_seconds",
    "segmenter_seconds",
    "pseudo_seconds_per_1000",
    "classifier_dir",
    "dataset",
)  # wall time, where it ran
ADDED_LATER = (  # options declared with added_option: at their default they stay out of run keys
    ("classifier", "diversity"),
    ("classifier", "backbone_lr"),
    ("classifier", "class_token_spread"),
    ("classifier", "patch_cam"),
    ("classifier", "separation"),
    ("classifier", "class_sample"),
    ("classifier", "mask_schedule"),
    ("embedded", "family"),
    ("pseudo_masks", "pixel_refine"),
    ("pseudo_masks", "pixel_refine_iterations"),
)


def _write_grid(folder: Path, params: Params, grid: dict = GRID) -> tuple[Path, Path]:
    """params.yaml (tiny settings, one thread) and ablations.yaml in ``folder``."""
    tree = params.to_dict()
    tree["num_threads"] = 1
    params_file, config_file = folder / "params.yaml", folder / "ablations.yaml"
    params_file.write_text(yaml.safe_dump(tree, sort_keys=False))
    config_file.write_text(yaml.safe_dump(grid, sort_keys=False))
    return params_file, config_file


@pytest.fixture(scope="module")
def finished_grid(tmp_path_factory: pytest.TempPathFactory, tiny_dataset: Path) -> tuple[Path, Path, Path]:
    """The tiny grid run once: (params file, grid file, runs root)."""
    from tests.conftest import TINY_CLASSIFIER, TINY_SEGMENTER, TINY_TRAINER, tiny_embedded_params

    folder = tmp_path_factory.mktemp("grid")
    params = load_params(None, [f"ingest.source={tiny_dataset}"])
    tiny = dataclasses.replace(
        params,
        embedded=tiny_embedded_params(folder / "embedded"),
        classifier=dataclasses.replace(params.classifier, **TINY_CLASSIFIER),
        pseudo_masks=dataclasses.replace(params.pseudo_masks, tune_images=16),
        segmenter=dataclasses.replace(params.segmenter, **TINY_SEGMENTER),
        trainer=TINY_TRAINER,
    )
    params_file, config_file = _write_grid(folder, tiny)
    root = folder / "runs"
    run_grid(plan(read_config(config_file), params_file, root))
    return params_file, config_file, root


@pytest.mark.parametrize(
    ("grid", "message"),
    [
        ({**GRID, "stages": []}, "unknown key 'stages'"),
        (["full"], "expected a mapping with seeds, scales, variants"),
        ({**GRID, "seeds": "0"}, "seeds: expected a non-empty list of integers"),
        ({**GRID, "variants": {"full": "classifier.mask_ratio=0"}}, "variants.full: expected a list"),
        ({**GRID, "scales": {}}, "scales: expected a non-empty mapping"),
        ({**GRID, "mask_ratio_sweep": ["full", "mask_0.3"]}, "mask_ratio_sweep names unknown variant 'mask_0.3'"),
        ({**GRID, "scale_variants": ["full"]}, "scale_variants: expected a mapping of scale -> variants"),
        ({**GRID, "scale_variants": {"huge": ["full"]}}, "scale_variants names unknown scale 'huge'"),
        ({**GRID, "scale_variants": {"longer": ["no_reg"]}}, "scale_variants.longer names unknown variant 'no_reg'"),
        ({**GRID, "paired": {"no_masking": "no_reg"}}, "paired names unknown variant 'no_reg'"),
        ({**GRID, "paired": ["no_masking"]}, "paired: expected a mapping of variant -> reference variant"),
        ({**GRID, "paired": {"no_masking": []}}, "paired: expected a mapping of variant -> reference variant"),
    ],
)
def test_a_malformed_grid_file_is_one_clear_error(tmp_path: Path, grid: dict | list, message: str):
    path = tmp_path / "ablations.yaml"
    path.write_text(yaml.safe_dump(grid))
    with pytest.raises(ConfigError, match=message) as err:
        read_config(path)
    assert str(path) in str(err.value)


def test_plan_rejects_unknown_names_and_overrides_that_do_not_apply(tmp_path: Path, tiny_params: Params):
    params_file, config_file = _write_grid(tmp_path, tiny_params)
    config = read_config(config_file)
    with pytest.raises(
        WsssError, match=r"unknown variant 'no_reg' \(known: full, no_masking, fixed_thresholds, cam_baseline\)"
    ):
        plan(config, params_file, tmp_path, variants=["no_reg"])
    with pytest.raises(WsssError, match="unknown scale 'converged'"):
        plan(config, params_file, tmp_path, scale="converged")
    broken = dataclasses.replace(config, variants={"bad": ["classifier.mask_ratio=2"]})
    with pytest.raises(ConfigError, match=r"ablation tiny/bad: classifier.mask_ratio: 2.0 is outside \[0, 1\]"):
        plan(broken, params_file, tmp_path)


def test_the_committed_grid_plans_every_variant_at_every_scale(tmp_path: Path):
    """ablations.yaml as committed: every override of every scale and variant applies to params.yaml (a typo in a
    grid cell fails here, not an hour into a grid run)."""
    repo = Path(__file__).resolve().parents[1]
    config = read_config(repo / ablations.ABLATIONS_FILE)
    for scale in config.scales:
        cells = plan(config, repo / "params.yaml", tmp_path, scale=scale, variants=list(config.variants))
        assert len(cells) == len(config.variants) * len(config.seeds)
    many = {c.variant: c.params for c in plan(config, repo / "params.yaml", tmp_path, scale="many_classes", seeds=[0])}
    assert many["full"].classifier.class_sample == 0 and many["class_sample"].classifier.class_sample == 16
    assert many["full"].embedded.family == "tinted_shapes" and many["full"].embedded.classes == []
    # The core table's scale aliases the shapes scale, itself holding an alias: both are spliced in.
    core = {
        c.variant: c.params for c in plan(config, repo / "params.yaml", tmp_path, "pretrained_shapes_e4", seeds=[0])
    }
    assert set(core) == {"full", "no_masking", "no_reg", "no_pruning", "cam_baseline", "patch_cam"}
    assert core["full"].embedded.family == "shapes" and core["full"].classifier.model == "wsss_vit_small_patch14"
    assert core["full"].classifier.head == "shared" and core["full"].classifier.epochs == 4
    assert core["cam_baseline"].classifier.head == "linear" and core["cam_baseline"].classifier.epochs == 4


def test_plan_shares_a_classifier_only_between_variants_with_equal_classifier_params(
    tmp_path: Path, tiny_params: Params
):
    params_file, config_file = _write_grid(tmp_path, tiny_params)
    cells = {c.variant: c for c in plan(read_config(config_file), params_file, tmp_path / "runs", seeds=[3])}
    classifier = {name: cell.params.classifier.out for name, cell in cells.items()}
    assert classifier["full"] == classifier["fixed_thresholds"] != classifier["no_masking"]
    assert cells["no_masking"].params.classifier.mask_ratio == 0 and cells["full"].params.seed == 3
    assert cells["full"].fingerprint != cells["fixed_thresholds"].fingerprint
    longer = plan(read_config(config_file), params_file, tmp_path / "runs", scale="longer", variants=["full"])
    assert longer[0].params.classifier.epochs == 3 and longer[0].run_dir == tmp_path / "runs/longer/full/seed0"


def test_a_scale_with_its_own_backbone_and_data(tmp_path: Path, tiny_params: Params):
    """A scale may splice another scale's overrides (YAML alias), train on another data set (its own ingested
    copy) and replace a variant's model (the CAM twin of its backbone)."""
    grid = {
        **GRID,
        "scales": {
            "tiny": (base := ["classifier.epochs=1"]),
            "other_data": [base, "ingest.source=data/other", "embedded.out=data/other"],
        },
        "scale_variant_overrides": {"other_data": {"cam_baseline": ["classifier.model=wsss_cam_vit_tiny_patch16"]}},
    }
    params_file, config_file = _write_grid(tmp_path, tiny_params, grid)
    config = read_config(config_file)
    assert config.scales["other_data"] == ["classifier.epochs=1", "ingest.source=data/other", "embedded.out=data/other"]
    cells = {c.variant: c for c in plan(config, params_file, tmp_path / "runs", scale="other_data")}
    assert cells["cam_baseline"].params.classifier.model == "wsss_cam_vit_tiny_patch16"
    assert cells["full"].params.ingest.out == str(tmp_path / "runs/datasets/other")
    (tiny,) = plan(config, params_file, tmp_path / "runs", variants=["cam_baseline"])
    assert tiny.params.classifier.model == "wsss_cam_vit_tiny_patch8"
    with pytest.raises(ConfigError, match="scale_variant_overrides.other_data names unknown variant 'nope'"):
        bad = {**grid, "scale_variant_overrides": {"other_data": {"nope": []}}}
        read_config(_write_grid(tmp_path, tiny_params, bad)[1])


def test_overrides_of_the_caller_beat_the_scale_but_not_the_variant(tmp_path: Path, tiny_params: Params):
    config = read_config(_write_grid(tmp_path, tiny_params)[1])
    given = ["classifier.epochs=2", "classifier.mask_ratio=0.25"]
    full, no_masking = plan(config, tmp_path / "params.yaml", tmp_path / "runs", "longer", ["full", "no_masking"],
                            base_overrides=given)  # fmt: skip
    assert full.params.classifier.epochs == no_masking.params.classifier.epochs == 2  # the scale says 3
    assert (full.params.classifier.mask_ratio, no_masking.params.classifier.mask_ratio) == (0.25, 0.0)


def test_an_option_added_later_keys_runs_only_when_it_is_set(tmp_path: Path, tiny_params: Params):
    params_file, config_file = _write_grid(tmp_path, tiny_params)
    config = read_config(config_file)
    # pixel_refine's default (par) is not its absent value: runs from before the option were unrefined (none)
    unrefined = ["pseudo_masks.pixel_refine=none"]
    (before,) = plan(config, params_file, tmp_path / "runs", variants=["full"], base_overrides=unrefined)
    assert "diversity" not in key_settings(before.params)["classifier"]
    (refined,) = plan(config, params_file, tmp_path / "runs", variants=["full"])
    assert key_settings(refined.params)["pseudo_masks"]["pixel_refine"] == "par"
    # the key without the options added later is the hash of every other param, as before they existed
    settings = before.params.to_dict()
    for section, name in ADDED_LATER:
        del settings[section][name]
    assert key_settings(before.params) == settings
    (after,) = plan(
        config,
        params_file,
        tmp_path / "runs",
        variants=["full"],
        base_overrides=[*unrefined, "classifier.diversity=0.1"],
    )
    assert after.fingerprint != before.fingerprint and after.params.classifier.out != before.params.classifier.out
    assert key_settings(after.params)["classifier"]["diversity"] == 0.1


def test_a_scale_runs_its_own_variants_unless_variants_are_named(tmp_path: Path, tiny_params: Params):
    params_file, config_file = _write_grid(tmp_path, tiny_params, {**GRID, "scale_variants": {"longer": ["full"]}})
    config = read_config(config_file)
    assert [c.variant for c in plan(config, params_file, tmp_path, scale="longer")] == ["full"]
    named = plan(config, params_file, tmp_path, scale="longer", variants=["no_masking"])
    assert [c.variant for c in named] == ["no_masking"]
    assert [c.variant for c in plan(config, params_file, tmp_path, scale="tiny")] == list(GRID["variants"])


def test_grid_rows_hold_every_number_of_the_table(finished_grid):
    _, config_file, root = finished_grid
    runs = {p.parent.parent.name: json.loads(p.read_text()) for p in root.glob("tiny/*/seed0/result.json")}
    assert sorted(runs) == ["cam_baseline", "fixed_thresholds", "full", "no_masking"]
    for row in runs.values():
        assert 0.0 <= row["pseudo_miou"] <= 1.0 and 0.0 <= row["segmenter_miou"] <= 1.0
        assert 0.0 <= row["val_map"] <= 1.0 and row["classifier_seconds"] > 0
    assert runs["full"]["classifier_dir"] == runs["fixed_thresholds"]["classifier_dir"]
    assert runs["no_masking"]["mask_ratio"] == 0.0 and runs["full"]["mask_ratio"] == 0.5


def test_same_seed_gives_identical_numbers_and_finished_cells_are_not_rerun(
    finished_grid, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    params_file, config_file, root = finished_grid
    (first,) = plan(read_config(config_file), params_file, root, variants=["no_masking"])
    before = (first.run_dir / "result.json").stat().st_mtime_ns
    # A finished cell returns its row without touching any stage.
    monkeypatch.setattr("wsss.tasks.train_classifier.main", lambda params: pytest.fail("classifier retrained"))
    assert run_cell(first) == json.loads((first.run_dir / "result.json").read_text())
    assert (first.run_dir / "result.json").stat().st_mtime_ns == before
    monkeypatch.undo()

    (again,) = plan(read_config(config_file), params_file, tmp_path / "again", variants=["no_masking"])
    (rerun,) = run_grid([again])
    original = json.loads((first.run_dir / "result.json").read_text())
    assert {k: v for k, v in rerun.items() if k not in VOLATILE} == {
        k: v for k, v in original.items() if k not in VOLATILE
    }


def test_report_writes_table_charts_grid_and_an_mlflow_run(
    finished_grid, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    _, config_file, root = finished_grid
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.chdir(tmp_path)  # the experiment's artifacts go to ./mlruns
    summary = write_report(read_config(config_file), "tiny", root, tmp_path / "reports", grid_images=3)

    out = tmp_path / "reports" / "tiny"
    assert list(summary["variant"]) == ["full", "no_masking", "fixed_thresholds", "cam_baseline"]  # grid order
    table = (out / "table.md").read_text()
    assert "| full | 1 |" in table and "pseudo-mask mIoU (train)" in table
    assert pd.read_parquet(out / "table.parquet").shape[0] == 4
    assert pd.read_parquet(out / "runs.parquet").shape[0] == 4
    assert list(pd.read_csv(out / "mask_ratio.csv")["mask_ratio"]) == [0.0, 0.5]
    assert "| no_masking | full | 1 | " in (out / "paired.md").read_text()  # minus full on seed 0
    for name in ("bars.png", "mask_ratio.png", "grid.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
    # per-class IoU recomputed from the masks on disk: its mean is the stage's own mIoU, run by run
    per_class = pd.read_csv(out / "per_class.csv")
    runs = pd.read_parquet(out / "runs.parquet").dropna(subset=["pseudo_miou"]).set_index(["variant", "seed"])
    recomputed = per_class.set_index(["variant", "seed"]).mean(axis=1)
    assert recomputed.to_dict() == pytest.approx(runs["pseudo_miou"].to_dict())
    assert "| full | 1 | " in (out / "per_class.md").read_text()

    client = mlflow.tracking.MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("wsss-ablations").experiment_id])
    assert run.data.metrics["full.pseudo_miou_mean"] == pytest.approx(summary.loc[0, "pseudo_miou_mean"])
    logged = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"table.md", "table.parquet", "bars.png", "grid.png"} <= logged


def test_per_class_iou_names_the_table_that_lacks_a_training_images_mask(finished_grid, tmp_path: Path):
    _, _, root = finished_grid
    copy = Path(shutil.copytree(root, tmp_path / "runs"))
    table = copy / "tiny" / "no_masking" / "seed0" / "pseudo_masks" / "train.parquet"
    masks = pd.read_parquet(table)
    masks.iloc[1:].to_parquet(table, index=False)
    with pytest.raises(WsssError) as err:
        per_class_iou(collect(copy, "tiny"), copy)
    assert str(err.value) == f"{table}: no prediction for id {masks['id'].iloc[0]!r} of split 'train'"


def test_paired_differences_subtract_full_on_the_same_seed():
    pseudo = {("full", 0): 0.3, ("full", 1): 0.2, ("full", 2): 0.4, ("no_masking", 0): 0.25, ("no_masking", 1): 0.25}
    pseudo |= {("no_masking", 2): 0.35, ("cam_baseline", 1): 0.1, ("mask_1.0", 0): None}  # mask_1.0: no maps
    pseudo |= {("other_head", 0): 0.5, ("other_head_no_masking", 0): 0.45}
    runs = pd.DataFrame(
        [
            {"variant": v, "seed": s, "pseudo_miou": p, "segmenter_miou": p and p / 2, "class_specificity": p and 0.4}
            for (v, s), p in pseudo.items()
        ]
    )
    references = {"other_head_no_masking": ["other_head", "no_masking"]}
    order = ["full", "cam_baseline", "no_masking"]
    both = paired_differences(runs, references, order)
    assert both[both["variant"] == "other_head_no_masking"]["reference"].tolist() == ["other_head", "no_masking"]
    assert both.iloc[-1]["pseudo_miou_diff_mean"] == pytest.approx(0.45 - 0.25)  # seed 0 only: the seed both ran
    paired = both.drop(index=len(both) - 1).set_index("variant")
    assert list(paired.index) == ["cam_baseline", "no_masking", "other_head", "other_head_no_masking"]
    assert paired.loc["other_head_no_masking", "pseudo_miou_diff_mean"] == pytest.approx(-0.05)
    assert paired.loc["other_head", "reference"] == "full"
    no_masking = paired.loc["no_masking"]
    assert no_masking["seeds"] == 3 and no_masking["pseudo_miou_higher"] == 1
    assert no_masking["pseudo_miou_diff_mean"] == pytest.approx(-0.05 / 3)
    assert no_masking["pseudo_miou_diff_std"] == pytest.approx(np.std([-0.05, 0.05, -0.05], ddof=1))
    assert paired.loc["cam_baseline", "pseudo_miou_diff_mean"] == pytest.approx(-0.1)
    table = paired_markdown(paired.reset_index())
    assert "| no_masking | full | 3 | -0.017 ± 0.058 (1/3) | -0.008 ± 0.029 (1/3) | +0.000 ± 0.000 (0/3) |" in table
    assert "| cam_baseline | full | 1 | -0.100 (0/1) |" in table
    assert paired_differences(runs[runs["variant"] != "full"]).empty


def test_report_without_finished_runs_is_one_clear_error(tmp_path: Path, capsys: pytest.CaptureFixture):
    config = tmp_path / "ablations.yaml"
    config.write_text(yaml.safe_dump(GRID, sort_keys=False))
    code = cli.main(["report", "--config", str(config), "--root", str(tmp_path / "none"), "--no-mlflow"])
    assert code == 1
    assert capsys.readouterr().err.strip() == (
        f"wsss-research report: error: {tmp_path / 'none' / 'tiny'}: no finished ablation runs "
        "(run `wsss-research ablations` first)"
    )


def test_prefect_flow_runs_the_grid_in_processes_and_reports(
    finished_grid, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, prefect_server
):
    from wsss.research.flow import ablations as ablations_flow

    params_file, config_file, _ = finished_grid
    shutil.copy2(params_file, tmp_path / "params.yaml")
    shutil.copy2(config_file, tmp_path / ablations.ABLATIONS_FILE)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("PATH", f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")

    result = ablations_flow(variants=["no_masking"], seeds=[1], jobs=2)
    assert result["runs"] == ["tiny/no_masking/seed1"]
    assert "| no_masking | 1 |" in result["table"]
    assert (tmp_path / "artifacts/ablations/tiny/no_masking/seed1/result.json").is_file()
    assert (tmp_path / "reports/ablations/tiny/grid.png").is_file()

    state = ablations_flow(variants=["no_reg"], return_state=True)  # an unknown variant fails at planning
    assert state.is_failed()
    with pytest.raises(Exception, match=r"wsss-research ablations: error: unknown variant 'no_reg'"):
        state.result()


def test_jobs_run_the_groups_in_processes_with_the_in_process_numbers(
    finished_grid, tmp_path: Path, capsys: pytest.CaptureFixture
):
    params_file, config_file, root = finished_grid
    grid = ["--params", str(params_file), "--config", str(config_file), "--root", str(tmp_path / "runs")]
    argv = ["ablations", *grid, "--variant", "no_masking", "--variant", "full", "--variant", "fixed_thresholds"]
    assert cli.main([*argv, "--seed", "0", "--jobs", "2", "--no-report"]) == 0
    logs = sorted(p.name for p in (tmp_path / "runs/tiny/logs").iterdir())
    assert logs == ["full+fixed_thresholds_seed0.log", "no_masking_seed0.log"]  # full's classifier group, in order
    for variant in ("no_masking", "fixed_thresholds", "full"):
        in_process, in_child = (json.loads((base / f"tiny/{variant}/seed0/result.json").read_text())
                                for base in (root, tmp_path / "runs"))  # fmt: skip
        assert {k: v for k, v in in_child.items() if k not in VOLATILE} == {
            k: v for k, v in in_process.items() if k not in VOLATILE
        }

    if torch.cuda.is_available():
        return  # the failing child below asks for a GPU that this machine lacks
    capsys.readouterr()  # a child that fails (planning in the parent passes): one line naming its log
    argv = ["ablations", *grid, "--variant", "no_masking", "--seed", "0", "--jobs", "2", "--no-report"]
    assert cli.main([*argv, "-S", "device=cuda"]) == 1
    err = capsys.readouterr().err.strip()
    log = tmp_path / "runs/tiny/logs/no_masking_seed0.log"
    assert err == f"wsss-research ablations: error: 1 of the runs failed, see their logs: no_masking_seed0 ({log})"
    assert "cuda requested but no CUDA device" in log.read_text()


def test_a_variant_that_closes_every_head_is_a_row_without_maps(finished_grid, tmp_path: Path):
    params_file, config_file, _ = finished_grid
    config = dataclasses.replace(read_config(config_file), variants={"closed": ["classifier.gate_init=-3"]})
    (row,) = run_grid(plan(config, params_file, tmp_path))
    assert row["closed_heads"] == 16 and row["map_layer"] is None
    assert row["pseudo_miou"] is None and row["segmenter_miou"] is None and 0.0 <= row["val_map"] <= 1.0
    with pytest.raises(WsssError, match="the classifier closed every attention head"):
        from wsss.tasks import pseudo_masks

        pseudo_masks.main(plan(config, params_file, tmp_path)[0].params)


def test_diagnose_maps_scores_every_block(finished_grid, capsys):
    from wsss.lib.artifacts import load_classifier, read_ingested
    from wsss.research.diagnose_maps import specificity_by_block

    _, _, root = finished_grid
    rows = {p.parent.parent.name: json.loads(p.read_text()) for p in root.glob("tiny/*/seed0/result.json")}
    model, _ = load_classifier(Path(rows["full"]["classifier_dir"]) / "model.pt")
    table = specificity_by_block(model, read_ingested(root / "datasets/embedded"), max_images=8)
    blocks, aggregated, refined = table.iloc[:4], table.iloc[4:8], table.iloc[8:]
    assert list(blocks["block"]) == [0, 1, 2, 3] and (blocks["open_heads"] == 4).all()
    for column in ("open_mean", "all_heads_mean", "best_head_share", "area_share", "tuned_miou"):
        assert blocks[column].between(0, 1).all(), column
    assert blocks["class_token_cosine"].between(-1, 1).all() and blocks["class_token_cosine"].nunique() == 4
    # the aggregations map_blocks can choose: last (= block 3), last2, last3, all (every block, 16 heads)
    assert list(aggregated["block"]) == ["last [3]", "last2 [2, 3]", "last3 [1, 2, 3]", "all [0, 1, 2, 3]"]
    assert list(aggregated["open_heads"]) == [4, 8, 12, 16]
    assert aggregated.iloc[0]["open_mean"] == pytest.approx(blocks.iloc[3]["open_mean"])
    for column in ("open_mean", "tuned_miou"):
        assert aggregated[column].between(0, 1).all(), column
        assert refined[column].between(0, 1).all(), column
    # the same aggregations after one affinity step: a row spreads over 1..P patches, the top
    # three hold at most all of it, and averaging over patches can only lower a map's spread
    patches = model.grid_size[0] * model.grid_size[1]
    assert list(refined["block"]) == [f"refined {name}" for name in aggregated["block"]]
    assert refined["affinity_patches"].between(1, patches).all()
    assert refined["affinity_top3"].between(3 / patches, 1).all()
    assert refined["refined_contrast"].between(0, 1).all() and aggregated["refined_contrast"].isna().all()
    cam, _ = load_classifier(Path(rows["cam_baseline"]["classifier_dir"]) / "model.pt")
    with pytest.raises(WsssError, match=r"one \[CLS\] token per class"):
        specificity_by_block(cam, read_ingested(root / "datasets/embedded"))


def test_diagnosis_affinity_is_the_refinement_of_the_maps(finished_grid):
    """Oracle: the affinity diagnose-maps builds from per-block query rows refines the maps the way the
    model's one-pass ``class_attention_maps(refine=1)`` does."""
    import torch

    from wsss.lib.artifacts import classifier_images, load_classifier, read_ingested
    from wsss.lib.datasets import normalize, shape_groups
    from wsss.research.diagnose_maps import block_class_rows

    _, _, root = finished_grid
    result = json.loads((root / "tiny/full/seed0/result.json").read_text())
    model, _ = load_classifier(Path(result["classifier_dir"]) / "model.pt")
    dataset = read_ingested(root / "datasets/embedded")
    _, images = next(shape_groups(classifier_images(model, dataset, "train").images[:8], 0))
    rows, _, transition = block_class_rows(model, images)
    assert torch.allclose(transition.sum(-1), torch.ones(transition.shape[:2]))
    layers = model.map_layers(None)
    summed = sum(rows[b][:, model.blocks[b].attn.open_heads()].mean(1) for b in layers)
    expected = (summed.flatten(2) @ transition.transpose(1, 2)).reshape(summed.shape)
    maps, _ = model.class_attention_maps(normalize(images), blocks=None, refine=1)
    assert torch.allclose(maps, expected, atol=1e-5)


def test_pairwise_cosine_of_class_tokens():
    import torch

    from wsss.research.diagnose_maps import pairwise_cosine

    same = torch.ones(3, 8)
    assert pairwise_cosine(same) == pytest.approx(1.0)
    assert pairwise_cosine(torch.eye(4, 8)) == pytest.approx(0.0)
    # pairs (a, b), (a, c), (b, c) of a=(1,0), b=(0,1), c=(1,1)/sqrt2: cosines 0, 0.707, 0.707
    assert pairwise_cosine(torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])) == pytest.approx(2**0.5 / 3)


def test_mask_ratio_curve_marks_a_ratio_without_maps(tmp_path, monkeypatch):
    """A sweep point whose classifiers closed every head (mask_ratio 1: the labels leak) has no mIoU; the
    table keeps it as NaN and the curve marks it instead of dropping it silently."""
    import matplotlib.pyplot as plt
    import pandas as pd

    from wsss.research.report import mask_ratio_curve, mask_ratio_table

    runs = pd.DataFrame(
        {
            "variant": ["no_masking", "full", "full", "mask_1.0"],
            "mask_ratio": [0.0, 0.5, 0.5, 1.0],
            "pseudo_miou": [0.38, 0.39, 0.41, None],
            "segmenter_miou": [0.37, 0.36, 0.38, None],
        }
    )
    table = mask_ratio_table(runs, ["no_masking", "full", "mask_1.0"])
    assert list(table["mask_ratio"]) == [0.0, 0.5, 1.0]
    assert table["pseudo_miou_mean"].isna().tolist() == [False, False, True]
    assert table["pseudo_miou_mean"].iloc[1] == pytest.approx(0.40)
    figures = []
    monkeypatch.setattr(plt, "close", figures.append)  # keep the figure to read its annotations
    mask_ratio_curve(table, tmp_path / "mask_ratio.png")
    assert (tmp_path / "mask_ratio.png").stat().st_size > 0
    assert [text.get_text() for text in figures[0].axes[0].texts] == ["no maps\n(every head\nclosed)"]
