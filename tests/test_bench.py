import copy
import json

import numpy as np
import torch

from tests.test_token_masking_vit import close_heads, tiny_model
from wsss.research.bench import TARGETS, fast_pseudo_masks, naive_pseudo_masks, recorded_attention_maps
from wsss.research.cli import main


def test_bench_smoke_writes_json_and_table(tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert (
        main(["bench", "--size", "smoke", "--device", "cpu", "--out", str(out), "--warmup", "1", "--repeats", "2"]) == 0
    )
    record = json.loads(out.read_text())
    assert set(TARGETS) <= set(record)
    assert all(record[key] > 0 for key in TARGETS)
    assert record["p4_params_pruned"] < record["p4_params_gated"]
    assert record["p2_mask_agreement"] >= 0.999
    assert {"median_s", "min_s", "peak_mem_mib"} <= set(record["timings"]["p1_timm_train"])
    table = (tmp_path / "bench.md").read_text()
    assert all(f"`{key}`" in table for key in TARGETS)
    assert "p1_train_step_ratio" in capsys.readouterr().out


def test_p2_paths_give_the_same_maps_and_masks():
    model = tiny_model().eval()
    close_heads(model, 3, [0, 2])
    images = torch.randn(3, 3, 32, 32)
    maps, logits = model.class_attention_maps(images)
    recorded_maps, recorded_logits = recorded_attention_maps(model, images)
    assert torch.allclose(recorded_maps, maps, atol=1e-6)
    assert torch.allclose(recorded_logits, logits, atol=1e-5)
    present = torch.tensor([[0, 2], [1, 0], [2, 1]])
    pruned = copy.deepcopy(model).prune_heads()
    fast, naive = fast_pseudo_masks(pruned, images, present), naive_pseudo_masks(model, images, present)
    assert all(np.array_equal(a, b) for a, b in zip(fast, naive, strict=True))
    assert {int(v) for mask in fast for v in np.unique(mask)} > {0}


def test_class_sampling_bench_smoke_writes_the_p3_table(tmp_path, capsys):
    out = tmp_path / "p3.json"
    args = ["bench", "--size", "smoke", "--device", "cpu", "--out", str(out), "--warmup", "1", "--repeats", "1"]
    assert main([*args, "--class-sample", "4"]) == 0
    record = json.loads(out.read_text())
    assert [r["classes"] for r in record["rows"]] == [20, 80, 150, 1000]
    c1000 = record["rows"][-1]
    assert c1000["joint_tokens"] == 1000 + 16 + 1 and c1000["sampled_tokens"] <= 3 + 4 + 16 + 1
    assert "| 1000 |" in (tmp_path / "p3.md").read_text() and "written to" in capsys.readouterr().out


def test_precision_bench_smoke_records_the_machine_and_the_auto_choice(tmp_path, capsys):
    out = tmp_path / "p10.json"
    tiny = [
        "-S",
        "classifier.model=wsss_vit_tiny_patch8",
        "-S",
        "classifier.img_size=32",
        "-S",
        "classifier.batch_size=4",
    ]
    args = ["bench", "--device", "cpu", "--out", str(out), "--warmup", "1", "--repeats", "1", *tiny]
    assert main([*args, "--precision"]) == 0
    record = json.loads(out.read_text())
    assert record["p10_bf16_vs_fp32"] > 0 and set(record["timings"]) == {"p10_fp32_train", "p10_bf16_train"}
    assert record["machine"]["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    assert record["auto_precision"] in ("fp32", "bf16") and record["config"]["patch_cam"] is True
    table = (tmp_path / "p10.md").read_text()
    assert f"`trainer.precision: auto` -> {record['auto_precision']}" in table and "P10 bf16 / fp32" in table
    assert "written to" in capsys.readouterr().out
