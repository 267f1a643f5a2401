"""``wsss-research``: the research bench (ablations, report, map diagnostics, curves, refiner placement, benchmarks).

Like ``wsss``, every command reads params.yaml (``-S section.key=value`` overrides) and ends bad input with one
line ``wsss-research <command>: error: ...`` and exit code 1.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from wsss.lib.config import Params
from wsss.lib.errors import WsssError
from wsss.tools.cli import common_parser, positive_int, run

SIZE_NAMES = ("cpu", "vit-b", "smoke")  # research.bench.SIZES, named here so `--help` does not import torch
BENCH_OUT = "reports/bench.json"


def _bench(params: Params, args: argparse.Namespace) -> None:
    from wsss.research.bench import class_sampling_benchmark, precision_benchmark, run_benchmarks

    if args.precision:  # P10: the default classifier's training step, bf16 vs fp32
        out = args.out if args.out != BENCH_OUT else "reports/bench_p10.json"
        precision_benchmark(params.classifier, args.device, out, args.warmup, args.repeats)
        print(Path(out).with_suffix(".md").read_text(), end="")
        print(f"written to {out}")
        return
    if args.class_sample:  # P3 over the class count, joint vs sampled
        out = args.out if args.out != BENCH_OUT else "reports/bench_p3.json"
        class_sampling_benchmark(args.size, args.device, out, args.warmup, args.repeats, args.bf16, args.class_sample)
        print(Path(out).with_suffix(".md").read_text(), end="")
        print(f"written to {out}")
        return
    record = run_benchmarks(
        args.size, args.device, args.out, args.warmup, args.repeats, args.bf16, args.compile, args.torch_profile
    )
    print(Path(args.out).with_suffix(".md").read_text(), end="")
    print(f"written to {args.out} (P1 {record['p1_train_step_ratio']}, P4 {record['p4_pruned_head_speedup']})")


def _add_bench(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    """``wsss-research bench`` (research/bench.py): speed against plain timm."""
    bench = sub.add_parser("bench", parents=[common], help="P1-P4 speed benchmarks, writes reports/bench.json")
    bench.add_argument(
        "--size",
        choices=SIZE_NAMES,
        default="cpu",
        help="cpu: ViT-Ti/16, vit-b: ViT-B/16 (GPU), smoke: tiny, for tests",
    )
    bench.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    bench.add_argument("--out", default=BENCH_OUT, help="JSON record; the table goes beside it (.md)")
    bench.add_argument("--warmup", type=positive_int, default=2, help="untimed runs per case")
    bench.add_argument("--repeats", type=positive_int, default=7, help="timed runs per case (median reported)")
    bench.add_argument("--bf16", action="store_true", help="bfloat16 autocast")
    bench.add_argument("--compile", action="store_true", help="torch.compile the models")
    bench.add_argument("--torch-profile", action="store_true", help="torch.profiler tables of the P1 train steps")
    bench.add_argument(
        "--class-sample",
        type=positive_int,
        metavar="K",
        help="instead of P1-P4: P3 train steps at C = 20/80/150/1000, joint vs class_sample=K "
        "(default out reports/bench_p3.json)",
    )
    bench.add_argument(
        "--precision",
        action="store_true",
        help="instead of P1-P4: P10, a training step of params.yaml's classifier in fp32 and bf16 autocast, with "
        "the CPU it ran on and what trainer.precision auto decides there (default out reports/bench_p10.json)",
    )
    bench.set_defaults(handler=_bench)


def _ablations(params: Params, args: argparse.Namespace) -> None:
    from wsss.lib.runtime import available_cores
    from wsss.research import ablations

    config = ablations.read_config(args.config)
    cells = ablations.plan(config, args.params, args.root, args.scale, args.variant, args.seed, args.overrides)
    if args.jobs > 1:
        # the children share the cores: num_threads auto would give each all of them
        threads = [] if params.num_threads != "auto" else [f"num_threads={max(1, available_cores()[0] // args.jobs)}"]
        grid_args = ["--params", args.params, "--config", args.config, "--root", args.root]
        ablations.run_in_processes(cells, args.jobs, [*grid_args, *(f"-S{o}" for o in (*args.overrides, *threads))])
    else:
        ablations.run_grid(cells)
    if not args.no_report:
        _write_report(config, cells[0].scale, args)


def _report(params: Params, args: argparse.Namespace) -> None:
    from wsss.research import ablations

    config = ablations.read_config(args.config)
    _write_report(config, args.scale or next(iter(config.scales)), args)


def _write_report(config, scale: str, args: argparse.Namespace) -> None:
    from wsss.research.report import write_report

    summary = write_report(config, scale, args.root, args.out, args.grid_images, mlflow=not args.no_mlflow)
    print((Path(args.out) / scale / "table.md").read_text(), end="")
    print(f"report of {len(summary)} variants written to {Path(args.out) / scale}")


def _add_ablations(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    """``wsss-research ablations`` (research/ablations.py) and ``wsss-research report`` (research/report.py)."""
    from wsss.research.ablations import ABLATIONS_FILE, DEFAULT_ROOT, REPORT_ROOT

    grid = argparse.ArgumentParser(add_help=False)
    grid.add_argument("--config", default=str(ABLATIONS_FILE), help="the grid (default: ablations.yaml)")
    grid.add_argument("--scale", help="run length of ablations.yaml (default: its first, `default`)")
    grid.add_argument("--root", default=str(DEFAULT_ROOT), help="where the runs live")
    grid.add_argument("--out", default=str(REPORT_ROOT), help="report folder (a subfolder per scale)")
    grid.add_argument("--grid-images", type=int, default=6, help="rows of the qualitative grid (0: none)")
    grid.add_argument("--no-mlflow", action="store_true", help="do not log the report to MLflow")
    abl = sub.add_parser(
        "ablations",
        parents=[common, grid],
        help="run the ablation grid (ablations.yaml), one run at a time, then the report",
    )
    abl.add_argument("--variant", action="append", help="only this variant (repeatable; default: all)")
    abl.add_argument("--seed", action="append", type=int, help="only this seed (repeatable; default: the grid's)")
    abl.add_argument("--no-report", action="store_true", help="run the cells only")
    abl.add_argument(
        "--jobs",
        type=positive_int,
        default=1,
        help="classifier groups run at once, each in its own process with cores/jobs threads (num_threads auto); "
        "for a GPU or many cores (default 1: in this process, one cell after the other)",
    )
    abl.set_defaults(handler=_ablations)
    rep = sub.add_parser("report", parents=[common, grid], help="ablation table, charts and grid from finished runs")
    rep.set_defaults(handler=_report)


def _curve(params: Params, args: argparse.Namespace) -> None:
    from wsss.research import ablations, curves

    config = ablations.read_config(args.config)
    scale = args.scale or next(iter(config.scales))
    if not args.report_only:
        if not args.variant:
            raise WsssError("curve: name the variant to train (--variant), or pass --report-only")
        cell = curves.plan_curve(
            config, args.params, args.root, scale, args.variant, args.seed, args.epochs, args.overrides
        )
        ablations.prepare([cell])
        if not (args.cell and curves.classifier_done(cell)):
            curves.run_curve(cell, args.epochs, args.images, Path(args.out))
        if args.cell:
            curves.curve_cell(cell, args.epochs, Path(args.out))
    heads = curves.read_outs(config, args.params, args.root, scale, curves.curve_files(scale, Path(args.out)))
    table = curves.curve_report(scale, Path(args.out), heads)
    print((Path(args.out) / scale / "table.md").read_text(), end="")  # as written: its rates unrounded
    print(f"{len(table)} curve{'' if len(table) == 1 else 's'}: {Path(args.out) / scale / 'curves.png'}")


def _add_curve(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    """``wsss-research curve`` (research/curves.py): class specificity of the class tokens' attention per epoch."""
    from wsss.research.ablations import ABLATIONS_FILE, DEFAULT_ROOT

    curve = sub.add_parser(
        "curve", parents=[common], help="train one ablation cell's classifier longer, probing its attention each epoch"
    )
    curve.add_argument("--config", default=str(ABLATIONS_FILE), help="the grid (default: ablations.yaml)")
    curve.add_argument("--scale", help="scale of ablations.yaml (default: its first)")
    curve.add_argument("--variant", help="variant of ablations.yaml whose classifier is trained")
    curve.add_argument("--seed", type=int, default=0)
    curve.add_argument("--epochs", type=positive_int, default=16, help="classifier epochs (each one probe)")
    curve.add_argument("--images", type=positive_int, default=200, help="training images with >= 2 classes probed")
    curve.add_argument("--root", default=str(DEFAULT_ROOT), help="where the runs live")
    curve.add_argument("--out", default="reports/curves", help="curve CSVs, picture and table (a folder per scale)")
    curve.add_argument("--report-only", action="store_true", help="draw the scale's finished curves only")
    curve.add_argument(
        "--cell", action="store_true", help="then the cell's pseudo masks and segmenter on the trained classifier"
    )
    curve.set_defaults(handler=_curve)


def _diagnose_maps(params: Params, args: argparse.Namespace) -> None:
    from wsss.research.diagnose_maps import main

    main(args.classifier, args.dataset or params.ingest.out, args.images, args.out)


def _add_diagnose_maps(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    """``wsss-research diagnose-maps`` (research/diagnose_maps.py): class specificity of every block's attention."""
    diag = sub.add_parser(
        "diagnose-maps", parents=[common], help="class specificity of the class-token attention, per block"
    )
    diag.add_argument("classifier", help="classifier model.pt")
    diag.add_argument("--dataset", help="ingested data set (default: ingest.out)")
    diag.add_argument("--images", type=positive_int, default=300, help="training images with >= 2 classes")
    diag.add_argument("--out", help="also write the table as CSV")
    diag.set_defaults(handler=_diagnose_maps)


def _placement(params: Params, args: argparse.Namespace) -> None:
    from wsss.research import ablations, placement

    config = ablations.read_config(args.config)
    if args.tune >= args.images:
        raise WsssError(f"placement: --tune {args.tune} leaves no image of --images {args.images} to score")
    (cell,) = ablations.plan(config, args.params, args.root, args.scale, [args.variant], [args.seed], args.overrides)
    ablations.prepare([cell])
    result = placement.measure(cell, args.images, args.tune, args.refiner or ("par", "crf"))
    path = placement.write(result, Path(args.out) / cell.scale)
    print(placement.table(result), end="")
    print(f"written to {path}")


def _add_placement(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    """``wsss-research placement`` (research/placement.py): a pixel refiner on the mask vs on the class maps."""
    from wsss.research.ablations import ABLATIONS_FILE, DEFAULT_ROOT

    place = sub.add_parser(
        "placement",
        parents=[common],
        help="one ablation cell's classifier: a pixel refiner on the decided mask vs on the class maps (train images)",
    )
    place.add_argument("--config", default=str(ABLATIONS_FILE), help="the grid (default: ablations.yaml)")
    place.add_argument("--scale", help="scale of ablations.yaml (default: its first)")
    place.add_argument("--variant", required=True, help="variant of ablations.yaml whose classifier makes the maps")
    place.add_argument("--seed", type=int, default=0)
    place.add_argument("--images", type=positive_int, default=600, help="training images with ground truth used")
    place.add_argument("--tune", type=positive_int, default=200, help="of them, the first deciding the rule")
    place.add_argument("--refiner", action="append", choices=("par", "crf"), help="repeatable (default: both)")
    place.add_argument("--root", default=str(DEFAULT_ROOT), help="where the runs live")
    place.add_argument("--out", default="reports/pixel_refine", help="tables go to <out>/<scale>/")
    place.set_defaults(handler=_placement)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="wsss-research", description=__doc__.splitlines()[0].replace("``", ""))
    common = common_parser()
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_ablations(sub, common)
    _add_diagnose_maps(sub, common)
    _add_curve(sub, common)
    _add_placement(sub, common)
    _add_bench(sub, common)
    return parser


def main(argv: list[str] | None = None) -> int:
    return run(build_parser(), argv, "wsss-research", repo_free=("bench",))


if __name__ == "__main__":
    sys.exit(main())
