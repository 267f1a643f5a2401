"""``wsss-research bench``: the token-masking ViT against plain timm, side by side in one process.

P1 train step (fwd + bwd + AdamW) of ``TokenMaskingViT`` (C = 20, [REG], active gates) / timm
``VisionTransformer`` of the same dims; P2 pseudo-mask throughput at 2/3 of the heads closed and 2 present
classes per image, the plain path (every block's full N x N attention recorded, maps of all C classes
upsampled) / the pipeline's path (pruned heads, class rows of the present classes, fused SDPA); P3 cost at
C = 150 / C = 20; P4 inference with 2/3 of the heads closed, gated / pruned.
Each timing is the median of ``repeats`` runs after ``warmup`` runs; memory is
the peak RSS growth (CPU, sampled) or ``torch.cuda.max_memory_allocated`` (CUDA).
"""

from __future__ import annotations

import copy
import ctypes
import json
import os
import statistics
import threading
import time
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import timm
import torch
import torch.nn.functional as F
from timm.models.vision_transformer import VisionTransformer

from wsss.lib.config import ClassifierParams
from wsss.lib.mask_rule import merge_maps, normalized_maps
from wsss.lib.runtime import autocast, decide_precision, hardware, resolve_device
from wsss.models.token_masking_vit import TokenMaskingViT
from wsss.tasks.train_classifier import model_kwargs

__all__ = ["SIZES", "class_sampling_benchmark", "precision_benchmark", "run_benchmarks"]

# dims shared by both models; batch for training, infer_batch for inference
SIZES: dict[str, dict[str, int]] = {  # keys: research.cli.SIZE_NAMES
    "cpu": dict(img_size=224, patch_size=16, embed_dim=192, depth=12, num_heads=3, batch=8, infer_batch=16),
    "vit-b": dict(img_size=224, patch_size=16, embed_dim=768, depth=12, num_heads=12, batch=64, infer_batch=128),
    "smoke": dict(img_size=32, patch_size=8, embed_dim=48, depth=2, num_heads=3, batch=2, infer_batch=2),
}
TARGETS = {
    "p1_train_step_ratio": ("<=", 1.10),
    "p2_pseudo_mask_speedup": (">=", 2.0),
    "p3_class_scaling_ratio": ("<=", None),  # the token-count ratio
    "p4_pruned_head_speedup": (">=", 1.3),
}
# P2 merges with fixed thresholds: the pipeline tunes them, the cost does not depend on their values
BENCH_FG, BENCH_BG = 0.3, 0.1


class _PeakRss:
    """Samples this process's resident set size in a thread; ``peak_mb`` is the growth over the start.

    Free heap memory is first handed back to the OS (glibc ``malloc_trim``), else a case reusing the
    previous case's freed memory would show no growth.
    """

    def __init__(self, interval: float = 0.002) -> None:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
        self.interval = interval
        self.peak = self.start = self._rss()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    @staticmethod
    def _rss() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def _sample(self) -> None:
        while not self._stop.wait(self.interval):
            self.peak = max(self.peak, self._rss())

    def __enter__(self) -> _PeakRss:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._rss())

    @property
    def peak_mb(self) -> float:
        return (self.peak - self.start) / 2**20


class _Bench:
    def __init__(self, device: torch.device, warmup: int, repeats: int, bf16: bool) -> None:
        self.device, self.warmup, self.repeats, self.bf16 = device, warmup, repeats, bf16

    def autocast(self) -> AbstractContextManager:
        if not self.bf16:
            return nullcontext()
        return torch.autocast(self.device.type, dtype=torch.bfloat16)

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def time_all(self, fns: dict[str, Callable[[], object]]) -> dict[str, dict[str, float]]:
        """Median/min seconds per call of each case, and its peak memory (MiB) from one more, separate call.

        Cases are timed round-robin (each repeat runs every case once), so the machine's drifts hit them
        alike and their ratios stay stable.
        """
        times: dict[str, list[float]] = {name: [] for name in fns}
        with self.autocast():
            for fn in fns.values():
                for _ in range(self.warmup):
                    fn()
            self.sync()
            for _ in range(self.repeats):
                for name, fn in fns.items():
                    start = time.perf_counter()
                    fn()
                    self.sync()
                    times[name].append(time.perf_counter() - start)
        return {
            name: {
                "median_s": statistics.median(times[name]),
                "min_s": min(times[name]),
                "peak_mem_mib": round(self.peak_memory(fn), 1),
            }
            for name, fn in fns.items()
        }

    def peak_memory(self, fn: Callable[[], object]) -> float:
        """MiB: ``max_memory_allocated`` on CUDA, sampled peak RSS growth on CPU (kept out of the timings)."""
        with self.autocast():
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats(self.device)
                fn()
                self.sync()
                return torch.cuda.max_memory_allocated(self.device) / 2**20
            with _PeakRss() as rss:
                fn()
            return rss.peak_mb

    def profile(self, fn: Callable[[], object], steps: int = 3, rows: int = 25) -> str:
        """torch.profiler table of ``steps`` calls, sorted by self time on the device."""
        activities = [torch.profiler.ProfilerActivity.CPU]
        if self.device.type == "cuda":
            activities.append(torch.profiler.ProfilerActivity.CUDA)
        with self.autocast():
            fn()
            with torch.profiler.profile(activities=activities) as prof:
                for _ in range(steps):
                    fn()
                self.sync()
        key = "self_cuda_time_total" if self.device.type == "cuda" else "self_cpu_time_total"
        return prof.key_averages().table(sort_by=key, row_limit=rows)


def _wsss(dims: dict[str, int], num_classes: int, **kwargs: Any) -> TokenMaskingViT:
    torch.manual_seed(0)
    model_dims = {k: v for k, v in dims.items() if not k.endswith("batch")}
    return TokenMaskingViT(num_classes=num_classes, **model_dims, **kwargs)


def _timm(dims: dict[str, int], num_classes: int) -> VisionTransformer:
    torch.manual_seed(0)
    model_dims = {k: v for k, v in dims.items() if not k.endswith("batch")}
    return VisionTransformer(num_classes=num_classes, **model_dims)


Wrap = Callable[[Callable], Callable]


def _train_step(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor, wrap: Wrap) -> Callable[[], None]:
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    model.train()
    wsss = isinstance(model, TokenMaskingViT)
    forward = wrap(model)

    def step() -> None:
        logits = forward(images, labels) if wsss else forward(images)
        loss = F.binary_cross_entropy_with_logits(logits.float(), labels)
        if wsss:
            loss = loss + 0.01 * model.gate_penalty()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step


def _infer(model: torch.nn.Module, images: torch.Tensor, wrap: Wrap) -> Callable[[], object]:
    forward = wrap(model.eval())
    return torch.no_grad()(lambda: forward(images))


@torch.no_grad()
def recorded_attention_maps(model: TokenMaskingViT, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Maps and logits as :meth:`TokenMaskingViT.class_attention_maps`, read the way an attention recorder reads
    them off a ViT (the reference code's way): every block computes its full softmax attention explicitly and
    all of them are kept (``[depth, B, H, N, N]``), then the map layer's rows of all C classes are sliced out."""
    C, layer = model.num_classes, model.map_layer()
    x, (h, w) = model._embed(images)
    recorded = []
    for blk in model.blocks:
        attn_module = blk.attn
        q, k, v = attn_module._qkv(blk.norm1(x))
        attn = ((q * attn_module.scale) @ k.transpose(-2, -1)).softmax(-1)
        recorded.append(attn)
        out = attn @ v
        if attn_module.head_gate is not None:
            out = out * attn_module.head_gate().view(1, -1, 1, 1)
        out = attn_module.proj(attn_module.norm(out.transpose(1, 2).reshape(x.shape[0], x.shape[1], -1)))
        x = x + blk.ls1(out)
        x = x + blk.ls2(blk.mlp(blk.norm2(x)))
    attention = torch.stack(recorded)
    open_heads = model.blocks[layer].attn.open_heads()
    maps = attention[layer][:, open_heads, :C, C : C + h * w].mean(1).reshape(len(images), C, h, w)
    return maps, model.forward_head(model.norm(x))


def naive_pseudo_masks(model: TokenMaskingViT, images: torch.Tensor, present: torch.Tensor) -> list[np.ndarray]:
    """Pseudo masks the plain way: recorded attention of every block, maps of all C classes upsampled to the
    image size, then the present classes merged (tasks/pseudo_masks.py rule)."""
    maps, logits = recorded_attention_maps(model, images)
    probs, size = torch.sigmoid(logits).cpu().numpy(), tuple(images.shape[-2:])
    masks = []
    for i, classes in enumerate(present.cpu().numpy()):
        norm = normalized_maps(maps[i].float().cpu(), size)
        masks.append(merge_maps(norm[classes], classes, probs[i], BENCH_FG, BENCH_BG))
    return masks


def fast_pseudo_masks(
    pruned: TokenMaskingViT, images: torch.Tensor, present: torch.Tensor, rule_on_device: bool = True
) -> list[np.ndarray]:
    """Pseudo masks the pipeline's way: closed heads removed, only the present classes' attention rows in
    the map layer (fused SDPA everywhere else), only their maps upsampled, the rule where the maps are
    (``rule_on_device=False``: the maps are moved to the CPU first, as before the rule ran on the device)."""
    maps, logits = pruned.class_attention_maps(images, present)
    probs = torch.zeros(len(images), pruned.num_classes).scatter_(1, present.cpu(), torch.sigmoid(logits).cpu())
    size, masks = tuple(images.shape[-2:]), []
    for i, classes in enumerate(present.cpu().numpy()):
        norm = normalized_maps(maps[i].float() if rule_on_device else maps[i].float().cpu(), size)
        masks.append(merge_maps(norm, classes, probs[i].numpy(), BENCH_FG, BENCH_BG))
    return masks


def block_macs_ratio(dims: dict[str, int], tokens: int, base_tokens: int) -> float:
    """Ratio of the blocks' multiply-adds at two sequence lengths: N (12 D^2 + 2 N D) per block."""
    D = dims["embed_dim"]
    return tokens * (12 * D * D + 2 * tokens * D) / (base_tokens * (12 * D * D + 2 * base_tokens * D))


def _close_two_thirds(model: TokenMaskingViT) -> None:
    with torch.no_grad():
        for gate in model.gate_modules():
            gate.log_alpha[: round(2 * len(gate.log_alpha) / 3)] = -4.0


def run_benchmarks(
    size: str = "cpu",
    device: str = "auto",
    out: str | Path = "reports/bench.json",
    warmup: int = 2,
    repeats: int = 7,
    bf16: bool = False,
    compile: bool = False,
    profile: bool = False,
) -> dict[str, Any]:
    """Runs P1-P4, writes ``out`` (JSON) and the markdown table beside it (``.md``); returns the record.

    With ``profile``, the P1 train steps are also profiled (torch.profiler) into ``<out>_profile.txt``.
    """
    dims = SIZES[size]
    dev = resolve_device(device)
    bench = _Bench(dev, warmup, repeats, bf16)
    wrap: Wrap = torch.compile if compile else (lambda fn: fn)
    n_patches = (dims["img_size"] // dims["patch_size"]) ** 2
    g = torch.Generator().manual_seed(0)
    images = torch.randn(dims["batch"], 3, dims["img_size"], dims["img_size"], generator=g).to(dev)
    infer_images = torch.randn(dims["infer_batch"], 3, dims["img_size"], dims["img_size"], generator=g).to(dev)

    def labels(num_classes: int) -> torch.Tensor:
        return (torch.rand(dims["batch"], num_classes, generator=g) < 0.1).float().to(dev)

    wsss20 = _wsss(dims, 20).to(dev)
    p1_steps = {
        "p1_timm_train": _train_step(_timm(dims, 20).to(dev), images, labels(20), wrap),
        "p1_wsss_c20_train": _train_step(wsss20, images, labels(20), wrap),
    }
    c150_step = _train_step(_wsss(dims, 150).to(dev), images, labels(150), wrap)
    raw = bench.time_all({**p1_steps, "p3_wsss_c150_train": c150_step})

    wsss20.eval()
    # two present classes per image: read_only class tokens keep only them in the sequence
    present = torch.stack([torch.randperm(20, generator=g)[:2] for _ in range(dims["infer_batch"])]).to(dev)
    read_only = {c: _wsss(dims, c, class_tokens="read_only").to(dev).eval() for c in (20, 150)}
    gated = _wsss(dims, 20).to(dev).eval()
    _close_two_thirds(gated)
    pruned = copy.deepcopy(gated).prune_heads()
    naive_masks = naive_pseudo_masks(gated, infer_images, present)
    fast_masks = fast_pseudo_masks(pruned, infer_images, present)
    mask_agreement = float(np.mean([np.mean(a == b) for a, b in zip(naive_masks, fast_masks, strict=True)]))
    inference = {
        "p3_wsss_c20_infer": _infer(wsss20, infer_images, wrap),
        "p3_wsss_c150_infer": _infer(_wsss(dims, 150).to(dev), infer_images, wrap),
        "p2_naive_pseudo_masks": lambda: naive_pseudo_masks(gated, infer_images, present),
        "p2_fast_pseudo_masks": lambda: fast_pseudo_masks(pruned, infer_images, present),
        "p2_fast_pseudo_masks_rule_on_cpu": lambda: fast_pseudo_masks(pruned, infer_images, present, False),
        "p2_recorded_maps": wrap(lambda: recorded_attention_maps(gated, infer_images)),
        "p2_class_rows_maps": wrap(lambda: gated.class_attention_maps(infer_images, present)),
        # map_blocks: all (the reference's sum over blocks) and the affinity refinement, same pass
        "p2_class_rows_maps_all_blocks": wrap(lambda: gated.class_attention_maps(infer_images, present, blocks=None)),
        "p2_class_rows_maps_affinity": wrap(
            lambda: gated.class_attention_maps(infer_images, present, blocks=None, refine=1)
        ),
        **{
            f"p3_read_only_c{c}_present_maps": wrap(
                lambda model=model: model.class_attention_maps(infer_images, present)
            )
            for c, model in read_only.items()
        },
        "p4_gated_infer": _infer(gated, infer_images, wrap),
        "p4_pruned_infer": _infer(pruned, infer_images, wrap),
    }
    raw |= bench.time_all(inference)

    def ratio(a: str, b: str) -> float:
        return round(raw[a]["median_s"] / raw[b]["median_s"], 3)

    n = infer_images.shape[0]
    record: dict[str, Any] = {
        "p1_train_step_ratio": ratio("p1_wsss_c20_train", "p1_timm_train"),
        "p1_token_count_ratio": round((n_patches + 20 + 1) / (n_patches + 1), 3),
        "p1_macs_ratio": round(block_macs_ratio(dims, n_patches + 20 + 1, n_patches + 1), 3),
        "p2_pseudo_mask_speedup": ratio("p2_naive_pseudo_masks", "p2_fast_pseudo_masks"),
        "p2_images_per_s": round(n / raw["p2_fast_pseudo_masks"]["median_s"], 1),
        "p2_naive_images_per_s": round(n / raw["p2_naive_pseudo_masks"]["median_s"], 1),
        # the same masks with the rule (upsampling, normalisation, painting) on the maps' device vs the CPU
        "p2_rule_on_device_speedup": ratio("p2_fast_pseudo_masks_rule_on_cpu", "p2_fast_pseudo_masks"),
        # the maps alone on the same gated model: fused SDPA + class rows vs every block recorded
        "p2_maps_speedup_same_model": ratio("p2_recorded_maps", "p2_class_rows_maps"),
        # cost of the aggregation over every block (and of the affinity refinement) vs the last block only
        "p2_all_blocks_cost": ratio("p2_class_rows_maps_all_blocks", "p2_class_rows_maps"),
        "p2_affinity_cost": ratio("p2_class_rows_maps_affinity", "p2_class_rows_maps"),
        "p2_mask_agreement": round(mask_agreement, 6),
        "p3_class_scaling_ratio": ratio("p3_wsss_c150_train", "p1_wsss_c20_train"),
        "p3_infer_ratio": ratio("p3_wsss_c150_infer", "p3_wsss_c20_infer"),
        "p3_read_only_present_ratio": ratio("p3_read_only_c150_present_maps", "p3_read_only_c20_present_maps"),
        "p3_token_count_ratio": round((n_patches + 150 + 1) / (n_patches + 20 + 1), 3),
        "p3_macs_ratio": round(block_macs_ratio(dims, n_patches + 150 + 1, n_patches + 20 + 1), 3),
        "p4_pruned_head_speedup": ratio("p4_gated_infer", "p4_pruned_infer"),
        "p4_params_gated": sum(p.numel() for p in gated.parameters()),
        "p4_params_pruned": sum(p.numel() for p in pruned.parameters()),
        "config": {
            "size": size,
            **dims,
            "num_patches": n_patches,
            "warmup": warmup,
            "repeats": repeats,
            "bf16": bf16,
            "compile": compile,
            "device": _device_name(dev),
            "torch": torch.__version__,
            "timm": timm.__version__,
            "threads": torch.get_num_threads(),
        },  # fmt: skip
        "timings": raw,
    }
    out = _write_record(out, record, markdown_table(record))
    if profile:
        tables = [f"## {name}\n{bench.profile(step)}" for name, step in p1_steps.items()]
        out.with_name(f"{out.stem}_profile.txt").write_text("\n\n".join(tables) + "\n")
    return record


CLASS_COUNTS = (20, 80, 150, 1000)


def class_sampling_benchmark(
    size: str = "cpu",
    device: str = "auto",
    out: str | Path = "reports/bench_p3.json",
    warmup: int = 2,
    repeats: int = 7,
    bf16: bool = False,
    sample: int = 16,
) -> dict[str, Any]:
    """P3 over the class count: the training step at C = 20, 80, 150, 1,000, the joint sequence (every class token)
    beside ``class_sample=sample`` (the present classes' tokens plus absent ones), timed round-robin in one
    process; peak memory per case. Labels: 1-3 present classes per image, as in VOC/COCO. Per-class head for
    every case: the reference's linear head alone has C x C x D weights (1,000 classes: 192 M at ViT-Ti width)."""
    dims = SIZES[size]
    dev = resolve_device(device)
    bench = _Bench(dev, warmup, repeats, bf16)
    g = torch.Generator().manual_seed(0)
    images = torch.randn(dims["batch"], 3, dims["img_size"], dims["img_size"], generator=g).to(dev)
    n_patches = (dims["img_size"] // dims["patch_size"]) ** 2
    cases, present = {}, {}
    for c in CLASS_COUNTS:
        labels = torch.zeros(dims["batch"], c)
        for row in labels:
            row[torch.randperm(c, generator=g)[: int(torch.randint(1, 4, (1,), generator=g))]] = 1
        present[c] = int(labels.sum(1).max())
        for mode, k in (("joint", 0), ("sampled", sample)):
            model = _wsss(dims, c, head="per_class", class_sample=k).to(dev)
            cases[f"p3_c{c}_{mode}_train"] = _train_step(model, images, labels.to(dev), lambda fn: fn)
    raw = bench.time_all(cases)

    def ratio(a: str, b: str) -> float:
        return round(raw[a]["median_s"] / raw[b]["median_s"], 3)

    rows = [
        {
            "classes": c,
            "joint_s": raw[f"p3_c{c}_joint_train"]["median_s"],
            "sampled_s": raw[f"p3_c{c}_sampled_train"]["median_s"],
            "joint_vs_c20": ratio(f"p3_c{c}_joint_train", "p3_c20_joint_train"),
            "sampled_vs_c20_joint": ratio(f"p3_c{c}_sampled_train", "p3_c20_joint_train"),
            "sampled_speedup": ratio(f"p3_c{c}_joint_train", f"p3_c{c}_sampled_train"),
            "joint_tokens": c + n_patches + 1,
            "sampled_tokens": min(c, present[c] + sample) + n_patches + 1,
            "joint_peak_mib": raw[f"p3_c{c}_joint_train"]["peak_mem_mib"],
            "sampled_peak_mib": raw[f"p3_c{c}_sampled_train"]["peak_mem_mib"],
        }
        for c in CLASS_COUNTS
    ]
    record = {
        "sample": sample,
        "rows": rows,
        "target_c1000_sampled_vs_c20": 1.2,
        "c1000_sampled_vs_c20_sampled": ratio("p3_c1000_sampled_train", "p3_c20_sampled_train"),
        "config": {
            "size": size,
            **dims,
            "warmup": warmup,
            "repeats": repeats,
            "bf16": bf16,
            "device": _device_name(dev),
            "torch": torch.__version__,
        },  # fmt: skip
        "timings": raw,
    }
    lines = [
        f"Device: {record['config']['device']}; size `{size}` ({dims['img_size']} px, patch {dims['patch_size']}, "
        f"dim {dims['embed_dim']}, depth {dims['depth']}, train batch {dims['batch']}), per-class head, 1-3 present "
        f"classes per image, class_sample K = {sample}; bf16 {bf16}; median of {repeats} after {warmup} warm-ups, "
        "cases timed round-robin.",
        "",
        "| C | tokens joint / sampled | step s joint | step s sampled | joint / C=20 joint | sampled / C=20 joint "
        "| speed-up | peak MiB joint / sampled |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['classes']} | {r['joint_tokens']} / {r['sampled_tokens']} "
            f"| {r['joint_s']:.3f} | {r['sampled_s']:.3f} "
            f"| {r['joint_vs_c20']:.2f} | {r['sampled_vs_c20_joint']:.2f} | {r['sampled_speedup']:.2f}x "
            f"| {r['joint_peak_mib']} / {r['sampled_peak_mib']} |"
        )
    lines += ["", f"C = 1,000 sampled / C = 20 sampled: {record['c1000_sampled_vs_c20_sampled']:.2f} (target <= 1.2)."]
    _write_record(out, record, "\n".join(lines) + "\n")
    return record


def _write_record(out: str | Path, record: dict[str, Any], table: str) -> Path:
    """The record as JSON at ``out`` and its table beside it (``.md``); returns ``out`` as a Path."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=2) + "\n")
    out.with_suffix(".md").write_text(table)
    return out


def _device_name(dev: torch.device) -> str:
    """The device a figure was measured on; a CPU with its model and ATen capability (AVX2, AVX512, ...)."""
    if dev.type == "cuda":
        return torch.cuda.get_device_name(dev)
    hw = hardware()
    kind = hw.cpu_capability + ("; " + "/".join(hw.bf16_units) if hw.bf16_units else "")
    return f"CPU {hw.cpu_model} ({kind}), {torch.get_num_threads()} threads"


def markdown_table(record: dict[str, Any]) -> str:
    """The P1-P4 table with targets, then the raw timings."""
    cfg = record["config"]
    lines = [
        f"Device: {cfg['device']}; size `{cfg['size']}` ({cfg['img_size']} px, patch {cfg['patch_size']}, "
        f"dim {cfg['embed_dim']}, depth {cfg['depth']}, heads {cfg['num_heads']}, train batch {cfg['batch']}, "
        f"inference batch {cfg['infer_batch']}); bf16 {cfg['bf16']}, compile {cfg['compile']}; "
        f"median of {cfg['repeats']} after {cfg['warmup']} warm-up runs.",
        "",
        "| metric | measured | target | met |",
        "|---|---|---|---|",
    ]
    for key, (op, target) in TARGETS.items():
        target = record["p3_token_count_ratio"] if target is None else target
        value = record[key]
        met = value <= target if op == "<=" else value >= target
        lines.append(f"| `{key}` | {value:.3f} | {op} {target:.3f} | {'yes' if met else 'no'} |")
    lines += [
        "",
        f"P1 token-count ratio {record['p1_token_count_ratio']:.3f}, multiply-add ratio "
        f"{record['p1_macs_ratio']:.3f}; P2 {record['p2_images_per_s']} vs "
        f"{record['p2_naive_images_per_s']} images/s, maps alone on the same gated model "
        f"{record['p2_maps_speedup_same_model']:.3f}x, rule on the maps' device vs on the CPU "
        f"{record['p2_rule_on_device_speedup']:.3f}x, maps of all blocks / of the last "
        f"{record['p2_all_blocks_cost']:.3f}x (with the affinity refinement {record['p2_affinity_cost']:.3f}x), "
        f"pixels equal in both paths' masks "
        f"{record['p2_mask_agreement']:.4%}; "
        f"P3 multiply-add ratio {record['p3_macs_ratio']:.3f}, inference ratio {record['p3_infer_ratio']:.3f}, "
        f"read_only maps of 2 present classes C=150/C=20 {record['p3_read_only_present_ratio']:.3f}; "
        f"P4 parameters {record['p4_params_gated']:,} gated -> {record['p4_params_pruned']:,} pruned.",
        "",
        "| case | median s | min s | peak memory MiB |",
        "|---|---|---|---|",
    ]
    for name, t in record["timings"].items():
        lines.append(f"| {name} | {t['median_s']:.4f} | {t['min_s']:.4f} | {t['peak_mem_mib']} |")
    return "\n".join(lines) + "\n"


def precision_benchmark(
    params: ClassifierParams,
    device: str = "auto",
    out: str | Path = "reports/bench_p10.json",
    warmup: int = 1,
    repeats: int = 3,
    num_classes: int = 6,
) -> dict[str, Any]:
    """P10: one training step of the default classifier (``params``: model, input size, batch, [REG], PatchCAM,
    gates active; untrained weights, the cost is the same) in fp32 and under bf16 autocast, timed round-robin in
    one process, beside the CPU it ran on and what ``trainer.precision: auto`` decides there."""
    dev = resolve_device(device)
    bench = _Bench(dev, warmup, repeats, bf16=False)  # each case sets its own precision
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    model = timm.create_model(params.model, **model_kwargs(params, num_classes, 3)).to(dev)
    model.set_gates_active(True)
    images = torch.randn(params.batch_size, 3, params.img_size, params.img_size, generator=g).to(dev)
    labels = torch.zeros(params.batch_size, num_classes)
    for row in labels:
        row[torch.randperm(num_classes, generator=g)[: int(torch.randint(1, 4, (1,), generator=g))]] = 1
    labels = labels.to(dev)
    noise = torch.rand(params.batch_size, num_classes, generator=g).to(dev)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)

    def step(precision: str) -> Callable[[], None]:
        def run() -> None:
            with autocast(precision, dev):
                out = model(images, labels, mask_noise=noise, patch_logits=params.patch_cam)
                logits, *extra = out if isinstance(out, tuple) else (out,)
                loss = sum(F.binary_cross_entropy_with_logits(x.float(), labels) for x in (logits, *extra))
                loss = loss + 0.01 * model.gate_penalty()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()

        return run

    raw = bench.time_all({"p10_fp32_train": step("fp32"), "p10_bf16_train": step("bf16")})
    auto, why = decide_precision("auto", dev)
    hw = hardware()
    fp32_s, bf16_s = raw["p10_fp32_train"]["median_s"], raw["p10_bf16_train"]["median_s"]
    record = {
        "p10_bf16_vs_fp32": round(bf16_s / fp32_s, 3),
        "fp32_images_per_s": round(params.batch_size / fp32_s, 2),
        "bf16_images_per_s": round(params.batch_size / bf16_s, 2),
        "auto_precision": auto,
        "auto_reason": why,
        "machine": {**hw.record(), "threads": torch.get_num_threads(), "device": _device_name(dev)},
        "config": {
            "model": params.model,
            "img_size": params.img_size,
            "batch": params.batch_size,
            "classes": num_classes,
            "reg_token": params.reg_token,
            "patch_cam": params.patch_cam,
            "head": params.head,
            "warmup": warmup,
            "repeats": repeats,
            "torch": torch.__version__,
        },  # fmt: skip
        "timings": raw,
    }
    table = (
        f"Device: {record['machine']['device']}; `trainer.precision: auto` -> {auto} ({why}).\n"
        f"One training step of `{params.model}` at {params.img_size} px, batch {params.batch_size}, {num_classes} "
        f"classes, [REG] {params.reg_token}, PatchCAM {params.patch_cam}, gates active; median of {repeats} after "
        f"{warmup} warm-up, cases round-robin.\n\n"
        "| precision | step s (median) | min s | images/s | peak MiB |\n|---|---|---|---|---|\n"
        + "".join(
            f"| {name} | {raw[key]['median_s']:.3f} | {raw[key]['min_s']:.3f} | "
            f"{params.batch_size / raw[key]['median_s']:.2f} | {raw[key]['peak_mem_mib']} |\n"
            for name, key in (("fp32", "p10_fp32_train"), ("bf16 autocast", "p10_bf16_train"))
        )
        + f"\nP10 bf16 / fp32 step time: {record['p10_bf16_vs_fp32']:.2f}x.\n"
    )
    _write_record(out, record, table)
    return record
