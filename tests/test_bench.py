import json

from benchmarks.bench import TARGETS
from tasks.cli import main


def test_bench_smoke_writes_json_and_table(tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert (
        main(["bench", "--size", "smoke", "--device", "cpu", "--out", str(out), "--warmup", "1", "--repeats", "2"]) == 0
    )
    record = json.loads(out.read_text())
    assert set(TARGETS) <= set(record)
    assert all(record[key] > 0 for key in TARGETS)
    assert record["p4_params_pruned"] < record["p4_params_gated"]
    assert {"median_s", "min_s", "peak_mem_mib"} <= set(record["timings"]["p1_timm_train"])
    table = (tmp_path / "bench.md").read_text()
    assert all(f"`{key}`" in table for key in TARGETS)
    assert "p1_train_step_ratio" in capsys.readouterr().out
