"""`trainer.precision: auto` and `num_threads: auto`: the rules with the machine faked both ways, the real probe held
to AVX2 the way a user emulates a CPU without bf16 units, and the cgroup quota read from files laid out as the
kernel does. Nothing here depends on the CPU kind the suite runs on."""

import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from wsss.lib import runtime
from wsss.lib.config import ConfigError, load_params
from wsss.lib.runtime import Hardware, cgroup_cpu_limit, decide_precision

CPU, GPU = torch.device("cpu"), torch.device("cuda")
AVX2 = Hardware("AMD EPYC", "AVX2", False, False, None, 2, "2 cores", None, False)
AMX = Hardware("Intel Xeon Platinum 8480+", "AVX512", True, True, None, 2, "2 cores", None, False)


@pytest.mark.parametrize(
    ("hw", "expected"),
    [
        (AVX2, ("fp32", "CPU AVX2, no bf16 units")),
        (AMX, ("bf16", "CPU AVX512 with AMX/AVX512-BF16")),
        (dataclasses.replace(AMX, amx=False), ("bf16", "CPU AVX512 with AVX512-BF16")),
        # AVX-512 without its bf16 extension (Skylake, Zen 4 reports AVX512-BF16): no bf16 units
        (dataclasses.replace(AMX, amx=False, avx512_bf16=False), ("fp32", "CPU AVX512, no bf16 units")),
        # the emulation of an AVX2 machine on an AMX one: both libraries held below the units
        (
            dataclasses.replace(AMX, cpu_capability="AVX2", onednn_isa="AVX2"),
            ("fp32", "CPU AVX2, its AMX/AVX512-BF16 held back (ATen at AVX2, oneDNN at ONEDNN_MAX_CPU_ISA=AVX2)"),
        ),
        (
            dataclasses.replace(AMX, onednn_isa="AVX512_CORE"),
            ("fp32", "CPU AVX512, its AMX/AVX512-BF16 held back (oneDNN at ONEDNN_MAX_CPU_ISA=AVX512_CORE)"),
        ),
        (dataclasses.replace(AMX, onednn_isa="avx512_core_amx"), ("bf16", "CPU AVX512 with AMX/AVX512-BF16")),
    ],
)
def test_auto_precision_on_a_cpu_is_bf16_only_with_bf16_units(hw: Hardware, expected: tuple[str, str]):
    assert decide_precision("auto", CPU, hw) == expected


def test_an_explicit_precision_wins_and_says_when_it_will_be_slow():
    assert decide_precision("fp32", CPU, AMX) == ("fp32", "trainer.precision set; CPU AVX512 with AMX/AVX512-BF16")
    choice, why = decide_precision("bf16", CPU, AVX2)
    assert choice == "bf16" and why.endswith("no bf16 units - expect bf16 autocast to be slow")


def test_auto_precision_on_a_gpu():
    h100 = dataclasses.replace(AVX2, cuda="NVIDIA H100", cuda_bf16=True)
    t4 = dataclasses.replace(AVX2, cuda="Tesla T4", cuda_bf16=False)
    assert decide_precision("auto", GPU, h100) == ("bf16", "CUDA NVIDIA H100, bf16 supported")
    assert decide_precision("auto", GPU, t4) == ("fp16", "CUDA Tesla T4, no bf16: fp16 loss-scaled")
    assert decide_precision("fp32", GPU, h100)[0] == "fp32"


def test_the_real_probe_held_to_avx2_chooses_fp32():
    """What a user does to emulate a CPU without bf16 units (torch and oneDNN both honour the variables): on any
    machine the probe then says AVX2 and the rule fp32, with the line a stage prints."""
    code = (
        "import torch; from wsss.lib.runtime import hardware, resolve_precision; "
        "print(hardware().cpu_capability); resolve_precision('auto', torch.device('cpu'))"
    )
    env = {**os.environ, "ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    first, line = out.splitlines()
    assert first == "AVX2" and line.startswith("precision: fp32 (CPU AVX2, ")


def _cgroup_files(root: Path, files: dict[str, str]) -> None:
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)


def test_cgroup_v2_quota_is_the_tightest_along_the_path(tmp_path: Path):
    _cgroup_files(
        tmp_path / "fs",
        {"cpu.max": "max 100000\n", "jobs/cpu.max": "300000 100000\n", "jobs/wsss/cpu.max": "150000 100000\n"},
    )
    (tmp_path / "cgroup").write_text("0::/jobs/wsss\n")
    assert cgroup_cpu_limit(tmp_path / "fs", tmp_path / "cgroup") == 1.5
    (tmp_path / "cgroup").write_text("0::/\n")
    assert cgroup_cpu_limit(tmp_path / "fs", tmp_path / "cgroup") is None


def test_cgroup_v1_quota(tmp_path: Path):
    _cgroup_files(
        tmp_path / "fs", {"cpu,cpuacct/cpu.cfs_quota_us": "200000\n", "cpu,cpuacct/cpu.cfs_period_us": "100000\n"}
    )
    (tmp_path / "cgroup").write_text("4:memory:/x\n3:cpu,cpuacct:/\n0::/\n")
    assert cgroup_cpu_limit(tmp_path / "fs", tmp_path / "cgroup") == 2.0
    (tmp_path / "fs" / "cpu,cpuacct" / "cpu.cfs_quota_us").write_text("-1\n")  # no quota
    assert cgroup_cpu_limit(tmp_path / "fs", tmp_path / "cgroup") is None
    assert cgroup_cpu_limit(tmp_path / "fs", tmp_path / "missing") is None


def test_auto_threads_follow_affinity_quota_and_processes(monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(16)))
    monkeypatch.setattr(runtime, "cgroup_cpu_limit", lambda: 3.5)
    assert runtime.available_cores() == (3, "16 cores in this process's CPU affinity, cgroup CPU quota 3.5")
    monkeypatch.setattr(runtime, "cgroup_cpu_limit", lambda: None)
    assert runtime.available_cores()[0] == 16
    monkeypatch.setattr(runtime, "hardware", lambda: dataclasses.replace(AVX2, cores=16, cores_reason="16 cores"))
    assert runtime.resolve_threads("auto", share=4, announce=False) == 4
    assert runtime.resolve_threads("auto", share=32, announce=False) == 1
    assert runtime.resolve_threads(3, share=4, announce=False) == 3  # a number wins


def test_the_choices_are_printed_once_per_process(monkeypatch, capsys):
    monkeypatch.setattr(runtime, "_announced", set())
    monkeypatch.setattr(runtime, "hardware", lambda: AVX2)
    for _ in range(2):
        assert runtime.resolve_precision("auto", CPU) == "fp32"
        assert runtime.resolve_threads("auto") == 2
    assert capsys.readouterr().out == "precision: fp32 (CPU AVX2, no bf16 units)\nthreads: 2 (2 cores)\n"


def test_defaults_are_auto_and_the_settings_are_checked(tmp_path: Path):
    path = tmp_path / "params.yaml"
    path.write_text("{}\n")
    params = load_params(path)
    assert params.num_threads == "auto" and params.trainer.precision == "auto"
    assert load_params(path, ["num_threads=3"]).num_threads == 3
    for bad, message in (("many", "num_threads: 'many' is not auto or a number of threads > 0"),
                         ("0", "num_threads: 0 is not auto or a number of threads > 0"),
                         ("2.5", "num_threads: expected int or str, got 2.5")):  # fmt: skip
        with pytest.raises(ConfigError, match=message):
            load_params(path, [f"num_threads={bad}"])
