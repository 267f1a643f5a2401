"""Process-wide settings every stage applies first: threads, seed, device; the precision models run at.

``num_threads: auto`` and ``trainer.precision: auto`` are decided here, once per process, from the machine the
process finds (:class:`Hardware`): bf16 pays off only where the silicon computes it (on a CPU without bf16 units
a ViT-S/14 training step under bf16 autocast was measured 29x slower than in fp32), and a fixed thread count
wastes a workstation's cores or oversubscribes a container's quota. Each choice is printed once, with its
reason, and recorded by the stages (``runtime.json`` beside their outputs) and MLflow (``wsss.runtime.*`` tags).
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
import platform
import random
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from wsss.lib.errors import WsssError

# oneDNN ISA caps (ONEDNN_MAX_CPU_ISA) under which its bf16 matmuls run on bf16 units (AVX512-BF16 or AMX)
_ONEDNN_BF16_ISAS = frozenset(
    {"ALL", "AVX512_CORE_BF16", "AVX512_CORE_FP16", "AVX512_CORE_AMX", "AVX512_CORE_AMX_FP16",
     "AVX10_1_512", "AVX10_1_512_AMX", "AVX10_1_512_AMX_FP16", "AVX10_2_512", "AVX10_2_512_AMX_2"}
)  # fmt: skip
_announced: set[str] = set()
_threads: dict[str, Any] = {}  # this process's thread decision (setup_runtime), for runtime_record
RUNTIME_FILE = "runtime.json"  # how a stage ran, beside its outputs (not a DVC output: it describes the machine)


@dataclass(frozen=True)
class Hardware:
    """What the precision and thread rules look at; :func:`hardware` probes it once per process.

    ``cpu_capability`` is ATen's kernel level (``torch.backends.cpu.get_cpu_capability()``: DEFAULT, AVX2,
    AVX512, ...; ``ATEN_CPU_CAPABILITY`` lowers it), ``amx``/``avx512_bf16`` the CPU's bf16 units as torch reports
    them, ``onednn_isa`` the ``ONEDNN_MAX_CPU_ISA`` cap (None: unset), ``cuda`` the first GPU's name (None: none).
    """

    cpu_model: str
    cpu_capability: str
    amx: bool
    avx512_bf16: bool
    onednn_isa: str | None
    cores: int
    cores_reason: str
    cuda: str | None
    cuda_bf16: bool

    @property
    def bf16_units(self) -> list[str]:
        """The CPU's bf16 units torch reports (``AMX``, ``AVX512-BF16``), whether or not a cap holds them back."""
        return [name for name, has in (("AMX", self.amx), ("AVX512-BF16", self.avx512_bf16)) if has]

    def record(self) -> dict[str, Any]:
        return asdict(self)


def cpu_model() -> str:
    """The CPU's marketing name (``/proc/cpuinfo``; elsewhere what ``platform`` knows)."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine() or "unknown"


def cgroup_cpu_limit(
    root: Path = Path("/sys/fs/cgroup"), proc_cgroup: Path = Path("/proc/self/cgroup")
) -> float | None:
    """The CPU quota (in cores) of this process's cgroup and its parents, the tightest one; None: no quota.

    cgroup v2: ``cpu.max`` (``"max 100000"`` or ``"<quota> <period>"``) along the unified path; v1:
    ``cpu.cfs_quota_us`` / ``cpu.cfs_period_us`` (quota -1: none) along the ``cpu`` controller's path.
    """
    try:
        entries = [line.split(":", 2) for line in proc_cgroup.read_text().splitlines() if line.count(":") >= 2]
    except OSError:
        return None
    limits = []
    for _, controllers, path in entries:
        if controllers == "":  # v2 unified hierarchy
            base, files = root, ("cpu.max",)
        elif "cpu" in controllers.split(","):
            base, files = root / controllers, ("cpu.cfs_quota_us", "cpu.cfs_period_us")
            if not base.is_dir():
                base = root / "cpu"
        else:
            continue
        folder = base / path.lstrip("/")
        while True:
            limit = _quota(folder, files)
            if limit is not None:
                limits.append(limit)
            if folder == base or base not in folder.parents:
                break
            folder = folder.parent
    return min(limits) if limits else None


def _quota(folder: Path, files: tuple[str, ...]) -> float | None:
    try:
        values = [(folder / name).read_text().split() for name in files]
    except OSError:
        return None
    with contextlib.suppress(ValueError, IndexError):
        if len(files) == 1:  # cpu.max
            quota, period = values[0][0], values[0][1]
            return None if quota == "max" else int(quota) / int(period)
        quota, period = int(values[0][0]), int(values[1][0])
        return None if quota < 0 else quota / period
    return None


def available_cores() -> tuple[int, str]:
    """The cores this process may use: its CPU affinity, capped by a cgroup CPU quota (rounded down, at least
    1); and why, in words."""
    try:
        affinity = len(os.sched_getaffinity(0))
        reason = f"{affinity} cores in this process's CPU affinity"
    except AttributeError:  # no sched_getaffinity (macOS, Windows)
        affinity = os.cpu_count() or 1
        reason = f"{affinity} cores"
    quota = cgroup_cpu_limit()
    if quota is not None and quota < affinity:
        cores = max(1, math.floor(quota))
        return cores, f"{reason}, cgroup CPU quota {quota:g}"
    return affinity, reason + ("" if quota is None else f", cgroup CPU quota {quota:g}")


@functools.cache
def hardware() -> Hardware:
    """This process's machine (probed once: CUDA initialisation is not free)."""
    cuda = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    cores, why = available_cores()
    return Hardware(
        cpu_model=cpu_model(),
        cpu_capability=torch.backends.cpu.get_cpu_capability(),
        amx=bool(torch.cpu._is_amx_tile_supported()),
        avx512_bf16=bool(torch.cpu._is_avx512_bf16_supported()),
        onednn_isa=os.environ.get("ONEDNN_MAX_CPU_ISA") or None,
        cores=cores,
        cores_reason=why,
        cuda=cuda,
        cuda_bf16=bool(cuda and torch.cuda.is_bf16_supported()),
    )


def cpu_bf16_units(hw: Hardware) -> tuple[bool, str]:
    """Whether bf16 runs natively on this CPU, and why in words (``"CPU AVX2, no bf16 units"``).

    Native means torch reports AMX or AVX512-BF16 AND neither ATen (``ATEN_CPU_CAPABILITY``: below AVX512) nor
    oneDNN (``ONEDNN_MAX_CPU_ISA``) is held below the ISA that has them.
    """
    units = hw.bf16_units
    where = f"CPU {hw.cpu_capability}"
    if not units:
        return False, f"{where}, no bf16 units"
    held = []
    if not hw.cpu_capability.startswith("AVX512"):
        held.append(f"ATen at {hw.cpu_capability}")
    if hw.onednn_isa is not None and hw.onednn_isa.upper() not in _ONEDNN_BF16_ISAS:
        held.append(f"oneDNN at ONEDNN_MAX_CPU_ISA={hw.onednn_isa}")
    if held:
        return False, f"{where}, its {'/'.join(units)} held back ({', '.join(held)})"
    return True, f"{where} with {'/'.join(units)}"


def resolve_precision(precision: str, device: torch.device, announce: bool = True) -> str:
    """``trainer.precision`` for this device (see :func:`decide_precision`); prints the choice once."""
    choice, reason = decide_precision(precision, device)
    if announce:
        _announce(f"precision: {choice} ({reason})")
    return choice


def decide_precision(precision: str, device: torch.device, hw: Hardware | None = None) -> tuple[str, str]:
    """(precision, reason): ``auto`` on CUDA is bf16 where the GPU has it, else fp16 (with the GradScaler); on
    a CPU bf16 where it runs natively (:func:`cpu_bf16_units`), else fp32. An explicit value is kept."""
    hw = hw or hardware()
    if device.type == "cuda":
        gpu = f"CUDA {hw.cuda}"
        if precision != "auto":
            return precision, f"trainer.precision set; {gpu}"
        return ("bf16", f"{gpu}, bf16 supported") if hw.cuda_bf16 else ("fp16", f"{gpu}, no bf16: fp16 loss-scaled")
    native, why = cpu_bf16_units(hw)
    if precision != "auto":
        slow = " - expect bf16 autocast to be slow" if precision in ("bf16", "fp16") and not native else ""
        return precision, f"trainer.precision set; {why}{slow}"
    return ("bf16", why) if native else ("fp32", why)


def resolve_threads(num_threads: int | str, share: int = 1, announce: bool = True) -> int:
    """``num_threads`` as a count: ``auto`` is :func:`available_cores` split evenly over ``share`` processes
    that run side by side (DDP ranks, Dask workers); prints the choice once."""
    if num_threads == "auto":
        hw = hardware()
        shared = f", shared by {share} processes" if share > 1 else ""
        count, reason = max(1, hw.cores // share), hw.cores_reason + shared
    else:
        count, reason = int(num_threads), "num_threads set"
    if announce:
        _threads.update(count=count, reason=reason)
        _announce(f"threads: {count} ({reason})")
    return count


def runtime_record(precision: str, device: torch.device) -> dict[str, Any]:
    """How a stage ran (after :func:`setup_runtime`): the precision ``precision`` resolves to and the threads,
    each with its reason, the device and the machine."""
    choice, why = decide_precision(precision, device)
    hw = hardware()
    threads = torch.get_num_threads()
    return {
        "precision": choice,
        "precision_reason": why,
        "num_threads": threads,
        "threads_reason": _threads["reason"] if _threads.get("count") == threads else "set by the caller",
        "device": str(device),
        "cpu_model": hw.cpu_model,
        "cpu_capability": hw.cpu_capability,
        "gpu": hw.cuda,
    }


def write_runtime(folder: str | Path, precision: str, device: torch.device) -> dict[str, Any]:
    """Writes :func:`runtime_record` to ``folder/runtime.json`` (atomically) and returns it."""
    from wsss.lib.io import write_json

    record = runtime_record(precision, device)
    write_json(Path(folder) / RUNTIME_FILE, record)
    return record


def _announce(line: str) -> None:
    if line not in _announced:
        _announced.add(line)
        print(line, flush=True)


def resolve_device(name: str) -> torch.device:
    """``auto`` -> CUDA when present, else CPU; ``cuda`` without a GPU is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise WsssError("device: cuda requested but no CUDA device is available (use device=auto or cpu)")
    return torch.device(name)


def setup_runtime(seed: int, num_threads: int | str, device: str, share: int = 1) -> torch.device:
    """Seeds python/numpy/torch, sets the intra-op threads (``auto``: the cores this process may use, split
    over ``share`` processes side by side) and picks the device."""
    torch.set_num_threads(resolve_threads(num_threads, share))
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    return resolve_device(device)


def autocast(precision: str, device: torch.device) -> contextlib.AbstractContextManager:
    """Mixed precision for the forward passes at a resolved ``precision`` (a no-op at fp32)."""
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16 if precision == "bf16" else torch.float16)
