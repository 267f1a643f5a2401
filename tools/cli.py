"""``wsss``: one subcommand per stage, all reading params.yaml (``-S section.key=value`` overrides).

Bad input ends with one line ``wsss <command>: error: ...`` on stderr and exit code 1.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

from wsss.lib.config import DEFAULT_PARAMS, Params, load_params
from wsss.lib.errors import WsssError
from wsss.lib.io import os_error_line


def _import_embedded(params: Params, args: argparse.Namespace) -> None:
    from wsss.tools.embedded import build_embedded_dataset

    out = Path(args.out or params.embedded.out)
    build_embedded_dataset(params.embedded, out)
    print(f"embedded data set written to {out}")


def _import(params: Params, args: argparse.Namespace) -> None:
    """``wsss import voc|coco|folder`` (tools/importers.py)."""
    from wsss.tools import importers

    out = Path(args.out)
    if args.source == "voc":
        summary = importers.import_voc(Path(args.root), out, Path(args.aug) if args.aug else None)
    elif args.source == "coco":
        val = tuple(Path(p) for p in args.val) if args.val else None
        summary = importers.import_coco(Path(args.annotations), Path(args.images), out, val)
    else:
        classes = importers.read_class_names(args.classes)
        summary = importers.import_folder(Path(args.manifest), classes, out)
    sizes = ", ".join(f"{name} {split['images']}" for name, split in summary["splits"].items())
    skipped, ids = summary["skipped_unlabelled_train_images"], summary["skipped_unlabelled_ids"]
    named = ", ".join(ids) + (", ..." if skipped > len(ids) else "")
    note = (
        f" ({skipped} training image{'' if skipped == 1 else 's'} without labels skipped: {named})" if skipped else ""
    )
    print(f"{args.source} data set written to {out}: {summary['num_classes']} classes, images: {sizes}{note}")


def _add_importers(imp_sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    """``wsss import voc|coco|folder``: write a data set in the wsss format (validated, atomic)."""
    voc = imp_sub.add_parser("voc", parents=[common], help="Pascal VOC 2012 (VOCdevkit/VOC2012), optional SBD")
    voc.add_argument("root", help="VOCdevkit/VOC2012 (or VOCdevkit)")
    voc.add_argument("--aug", metavar="SBD_ROOT", help="SBD: SegmentationClassAug/*.png or cls/*.mat -> train_aug")
    coco = imp_sub.add_parser("coco", parents=[common], help="COCO instance annotations (pycocotools)")
    coco.add_argument("annotations", metavar="ANNOTATIONS_JSON", help="instances file of the train split")
    coco.add_argument("images", metavar="IMAGES_DIR", help="folder of its images")
    coco.add_argument("--val", nargs=2, metavar=("ANNOTATIONS_JSON", "IMAGES_DIR"), help="the val split")
    folder = imp_sub.add_parser("folder", parents=[common], help="any images listed in a CSV/parquet manifest")
    folder.add_argument("--manifest", required=True, help="CSV/parquet: image, split, labels[, mask, id]")
    folder.add_argument("--classes", required=True, nargs="+", help="class names, or one .txt/.json file")
    for parser in (voc, coco, folder):
        parser.add_argument(
            "--out", required=True, help="output data set root (new, empty, or a data set it replaces as a whole)"
        )
        parser.set_defaults(handler=_import)


def _predict(params: Params, args: argparse.Namespace) -> None:
    from wsss.tools.predict import main

    model = args.from_attention or args.model
    main(
        params, args.images, model, args.out, bool(args.from_attention), args.overlay, args.img_size, args.bands,
        args.overwrite,
    )  # fmt: skip


def _add_predict(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    """``wsss predict`` (tools/predict.py): masks for new images; not a pipeline stage."""
    predict = sub.add_parser("predict", parents=[common], help="palette PNG masks for new images")
    predict.add_argument("images", nargs="+", metavar="IMAGE")
    source = predict.add_mutually_exclusive_group(required=True)
    source.add_argument("--model", help="segmenter: models:/wsss-segmenter@champion, runs:/..., or model.pt")
    source.add_argument("--from-attention", metavar="CLASSIFIER", help="classifier URI or model.pt: attention masks")
    predict.add_argument("--out", required=True, help="output folder (created if missing; other files are kept)")
    predict.add_argument("--overwrite", action="store_true", help="replace masks of the same names already in --out")
    predict.add_argument("--overlay", action="store_true", help="also write <name>_overlay.png")
    predict.add_argument("--img-size", type=_positive_int, help="model input size (default: its training size)")
    predict.add_argument("--bands", help="bands.json of the training data set (multi-band .tif/.npy images)")
    predict.set_defaults(handler=_predict)


def _export(params: Params, args: argparse.Namespace) -> None:
    from wsss.lib.runtime import setup_runtime
    from wsss.tools.export import main as export

    setup_runtime(params.seed, params.num_threads, "cpu")
    model, out = args.onnx
    export(model, out)


def _add_export(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    """``wsss export`` (tools/export.py): a trained model as ONNX, checked against torch with onnxruntime."""
    export = sub.add_parser("export", parents=[common], help="a segmenter or classifier as ONNX (dynamic sizes)")
    export.add_argument("--onnx", nargs=2, metavar=("MODEL", "OUT"), required=True, dest="onnx",
                        help="models:/wsss-segmenter@champion, runs:/..., or model.pt; OUT.onnx")  # fmt: skip
    export.set_defaults(handler=_export)


def _stage(module: str, **kwargs) -> Callable[[Params, argparse.Namespace], object]:
    """Imports stage modules lazily so `wsss --help` stays fast."""

    def run(params: Params, args: argparse.Namespace) -> object:
        import importlib

        return importlib.import_module(f"wsss.tasks.{module}").main(params, **kwargs)

    return run


def _pseudo_masks(params: Params, args: argparse.Namespace) -> object:
    """Serial in this process, or with ``dask.shards`` > 1 the sharded Prefect flow (same artifact bit for bit)."""
    if params.dask.shards > 1:
        from wsss.pipelines.pseudo_masks import run_sharded

        return run_sharded(params)["stats"]
    from wsss.tasks.pseudo_masks import main

    return main(params)


def _train_segmenter(params: Params, args: argparse.Namespace) -> object:
    from wsss.tasks.train_segmenter import main

    return main(params, mask_source=args.masks)


def _add_register(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    """``wsss register`` (the pipeline's last DVC stage, see tasks/register.py)."""
    text = "log the pipeline run to MLflow, register both models, move alias champion if better"
    sub.add_parser("register", parents=[common], help=text).set_defaults(handler=_stage("register"))


def _bench(params: Params, args: argparse.Namespace) -> None:
    from wsss.benchmarks.bench import run_benchmarks

    record = run_benchmarks(
        args.size, args.device, args.out, args.warmup, args.repeats, args.bf16, args.compile, args.profile
    )
    print(Path(args.out).with_suffix(".md").read_text(), end="")
    print(f"written to {args.out} (P1 {record['p1_train_step_ratio']}, P4 {record['p4_pruned_head_speedup']})")


def _positive_int(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}")
    return int(text)


def _add_bench(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    """``wsss bench`` (benchmarks/bench.py): speed against plain timm; not a pipeline stage."""
    from wsss.benchmarks import SIZE_NAMES

    bench = sub.add_parser("bench", parents=[common], help="P1-P4 speed benchmarks, writes reports/bench.json")
    bench.add_argument(
        "--size",
        choices=SIZE_NAMES,
        default="cpu",
        help="cpu: ViT-Ti/16, vit-b: ViT-B/16 (GPU), smoke: tiny, for tests",
    )
    bench.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    bench.add_argument("--out", default="reports/bench.json", help="JSON record; the table goes beside it (.md)")
    bench.add_argument("--warmup", type=_positive_int, default=2, help="untimed runs per case")
    bench.add_argument("--repeats", type=_positive_int, default=7, help="timed runs per case (median reported)")
    bench.add_argument("--bf16", action="store_true", help="bfloat16 autocast")
    bench.add_argument("--compile", action="store_true", help="torch.compile the models")
    bench.add_argument("--profile", action="store_true", help="torch.profiler tables of the P1 train steps")
    bench.set_defaults(handler=_bench)


def _s3(params: Params, args: argparse.Namespace) -> None:
    from wsss.lib import storage

    store = storage.store_from_env()
    if store is None:
        raise WsssError(f"{storage.BUCKET_VAR} is not set: name the bucket (endpoint and keys: AWS_* variables)")
    if args.action == "setup":
        created = storage.check_store(store, create_bucket=True)
        storage.configure_dvc_remote(store)
        print(
            f"{store.where}: {'created' if created else 'ready'}; DVC remote {storage.DVC_REMOTE} -> {store.dvc_url} "
            f"(.dvc/config.local); MLflow artifacts -> {store.mlflow_url}"
        )
    elif args.action == "check":
        storage.check_store(store)
        print(f"{store.where}: reachable, credentials accepted; {storage.summarize(store)}")
    else:
        print(storage.dvc_transfer(store, args.action, jobs=args.jobs, targets=args.targets))


def _add_s3(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    """``wsss s3 setup|check|push|pull`` (lib/storage.py): the S3 store named by the environment."""
    s3 = sub.add_parser("s3", help="S3 store for DVC and MLflow (WSSS_S3_BUCKET, AWS_* variables)")
    actions = s3.add_subparsers(dest="action", required=True, metavar="ACTION")
    for name, text in (
        ("setup", "create the bucket if missing, make it the DVC remote (.dvc/config.local)"),
        ("check", "check endpoint, credentials and bucket"),
        ("push", "dvc push to the bucket"),
        ("pull", "dvc pull from the bucket"),
    ):
        action = actions.add_parser(name, parents=[common], help=text)
        if name in ("push", "pull"):
            action.add_argument("-j", "--jobs", type=_positive_int, help="parallel transfers (DVC's default if unset)")
            action.add_argument("targets", nargs="*", help=".dvc files or stages (default: all)")
        action.set_defaults(handler=_s3)


def _ablations(params: Params, args: argparse.Namespace) -> None:
    from wsss.tools import ablations

    config = ablations.read_config(args.config)
    cells = ablations.plan(config, args.params, args.root, args.scale, args.variant, args.seed, args.overrides)
    if args.print_dvc:
        print("\n".join(ablations.dvc_commands(cells)))
        return
    if args.jobs > 1:
        grid_args = ["--params", args.params, "--config", args.config, "--root", args.root]
        ablations.run_parallel(cells, args.jobs, [*grid_args, *(f"-S{o}" for o in args.overrides)])
    else:
        ablations.run_grid(cells)
    if not args.no_report:
        _write_report(config, cells[0].scale, args)


def _report(params: Params, args: argparse.Namespace) -> None:
    from wsss.tools import ablations

    config = ablations.read_config(args.config)
    _write_report(config, args.scale or next(iter(config.scales)), args)


def _write_report(config, scale: str, args: argparse.Namespace) -> None:
    from wsss.tools.report import write_report

    summary = write_report(config, scale, args.root, args.out, args.grid_images, mlflow=not args.no_mlflow)
    print((Path(args.out) / scale / "table.md").read_text(), end="")
    print(f"report of {len(summary)} variants written to {Path(args.out) / scale}")


def _add_ablations(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    """``wsss ablations`` (tools/ablations.py) and ``wsss report`` (tools/report.py); not pipeline stages."""
    from wsss.tools.ablations import ABLATIONS_FILE, DEFAULT_ROOT, REPORT_ROOT

    grid = argparse.ArgumentParser(add_help=False)
    grid.add_argument("--config", default=str(ABLATIONS_FILE), help="the grid (default: ablations.yaml)")
    grid.add_argument("--scale", help="run length of ablations.yaml (default: its first, `default`)")
    grid.add_argument("--root", default=str(DEFAULT_ROOT), help="where the runs live")
    grid.add_argument("--out", default=str(REPORT_ROOT), help="report folder (a subfolder per scale)")
    grid.add_argument("--grid-images", type=int, default=6, help="rows of the qualitative grid (0: none)")
    grid.add_argument("--no-mlflow", action="store_true", help="do not log the report to MLflow")
    abl = sub.add_parser(
        "ablations", parents=[common, grid], help="run the ablation grid (ablations.yaml), then the report"
    )
    abl.add_argument("--variant", action="append", help="only this variant (repeatable; default: all)")
    abl.add_argument("--seed", action="append", type=int, help="only this seed (repeatable; default: the grid's)")
    abl.add_argument("--print-dvc", action="store_true", help="print the grid as queued `dvc exp run` commands")
    abl.add_argument("--no-report", action="store_true", help="run the cells only")
    abl.add_argument(
        "--jobs", type=_positive_int, default=1, help="concurrent runs, one process each (e.g. on a GPU box)"
    )
    abl.set_defaults(handler=_ablations)
    rep = sub.add_parser("report", parents=[common, grid], help="ablation table, charts and grid from finished runs")
    rep.set_defaults(handler=_report)


def _diagnose_maps(params: Params, args: argparse.Namespace) -> None:
    from wsss.tools.diagnose_maps import main

    main(args.classifier, args.dataset or params.ingest.out, args.images, args.out)


def _plots(params: Params, args: argparse.Namespace) -> None:
    from wsss.tools.plots import show

    print(f"plots written to {show(args.out)} (renders offline: Vega inline)")


def _add_diagnose_maps(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    """``wsss diagnose-maps`` (tools/diagnose_maps.py): class specificity of every block's attention."""
    diag = sub.add_parser(
        "diagnose-maps", parents=[common], help="class specificity of the class-token attention, per block"
    )
    diag.add_argument("classifier", help="classifier model.pt")
    diag.add_argument("--dataset", help="ingested data set (default: ingest.out)")
    diag.add_argument("--images", type=_positive_int, default=300, help="training images with >= 2 classes")
    diag.add_argument("--out", help="also write the table as CSV")
    diag.set_defaults(handler=_diagnose_maps)


# Commands that work outside a wsss repo: without a params.yaml in the working directory they use the defaults
# (the importers write a data set anywhere; predict and bench need no pipeline).
REPO_FREE = ("predict", "export", "bench", "import")


def build_parser() -> argparse.ArgumentParser:
    # The module docstring is reST; a terminal shows plain text.
    parser = argparse.ArgumentParser(prog="wsss", description=__doc__.splitlines()[0].replace("``", ""))
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--params", default=str(DEFAULT_PARAMS), help="params file (default: params.yaml)")
    common.add_argument(
        "-S", "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
        help="override a parameter, e.g. -S classifier.epochs=5 (repeatable)",
    )  # fmt: skip
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    imp = sub.add_parser("import", help="write a data set in the wsss on-disk format")
    imp_sub = imp.add_subparsers(dest="source", required=True, metavar="SOURCE")
    emb = imp_sub.add_parser("embedded", parents=[common], help="generate the embedded default data set")
    emb.add_argument("--out", help="output directory (default: embedded.out)")
    emb.set_defaults(handler=_import_embedded)
    _add_importers(imp_sub, common)

    # The stages in pipeline order (as `wsss --help` lists them).
    for name, module, text in (
        ("ingest", "ingest", "validate the data set, write the canonical manifest"),
        ("train-classifier", "train_classifier", "train the token-masking ViT classifier"),
    ):
        sub.add_parser(name, parents=[common], help=text).set_defaults(handler=_stage(module))
    masks = sub.add_parser("pseudo-masks", parents=[common], help="pseudo masks from the class-token attention")
    masks.set_defaults(handler=_pseudo_masks)
    seg = sub.add_parser("train-segmenter", parents=[common], help="train the segmenter on the pseudo masks")
    seg.add_argument("--masks", choices=("pseudo", "gt"), default="pseudo", help="gt: the upper bound")
    seg.set_defaults(handler=_train_segmenter)
    text = "score pseudo masks and segmenter (mIoU), write metrics and plots"
    sub.add_parser("evaluate", parents=[common], help=text).set_defaults(handler=_stage("evaluate"))
    _add_register(sub, common)
    _add_bench(sub, common)
    _add_predict(sub, common)
    _add_export(sub, common)
    _add_s3(sub, common)
    _add_ablations(sub, common)
    _add_diagnose_maps(sub, common)
    plots = sub.add_parser("plots", parents=[common], help="dvc plots show, rendering offline (Vega inline)")
    plots.add_argument("--out", default="dvc_plots", help="output folder of the page (default: dvc_plots)")
    plots.set_defaults(handler=_plots)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    command = args.command if args.command != "import" else f"import {args.source}"
    if args.command == "s3":
        command = f"s3 {args.action}"
    try:
        params_file = args.params
        if args.command in REPO_FREE and args.params == str(DEFAULT_PARAMS) and not DEFAULT_PARAMS.is_file():
            params_file = None  # outside the repo: the defaults (and -S overrides)
        params = load_params(params_file, args.overrides)
        args.handler(params, args)
    except WsssError as err:
        print(f"wsss {command}: error: {err}", file=sys.stderr)
        return 1
    except OSError as err:  # a fault of the machine (disk, permissions) outside an artifact write: still one line
        print(f"wsss {command}: error: {os_error_line(err)}", file=sys.stderr)
        return 1
    except Exception as err:
        from wsss.lib.tracking import store_error_line

        line = store_error_line(err)
        if line is None:
            raise
        print(f"wsss {command}: error: {line}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"wsss {command}: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
