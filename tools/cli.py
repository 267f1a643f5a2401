"""``wsss``: one subcommand per stage, all reading params.yaml (``-S section.key=value`` overrides).

Bad input ends with one line ``wsss <command>: error: ...`` on stderr and exit code 1.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
from collections.abc import Callable
from pathlib import Path

from wsss.lib.config import (
    DEFAULT_PARAMS,
    PIXEL_REFINERS,
    PREDICT_PIXEL_ITERATIONS,
    PROFILES,
    Params,
    load_params,
    profile_overrides,
)
from wsss.lib.errors import WsssError
from wsss.lib.io import os_error_line
from wsss.tasks.stages import STAGES


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
    if args.pixel_refine is None and args.pixel_refine_iterations is not None:
        raise WsssError("--pixel-refine-iterations: name the refiner too (--pixel-refine par|crf)")
    # None: the model's own (a registered classifier's rule; else none)
    refiner = args.pixel_refine and (args.pixel_refine, args.pixel_refine_iterations or PREDICT_PIXEL_ITERATIONS)
    main(
        params, args.images, model, args.out, bool(args.from_attention), args.overlay, args.img_size, args.bands,
        args.overwrite, refiner,
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
    predict.add_argument("--img-size", type=positive_int, help="model input size (default: its training size)")
    predict.add_argument("--bands", help="bands.json of the training data set (multi-band .tif/.npy images)")
    predict.add_argument(
        "--pixel-refine",
        choices=PIXEL_REFINERS,
        help="refine the masks with the image's pixels: PAR (AFA/ToCo) or a local dense CRF (default: none, or the "
        "rule registered with a classifier version for --from-attention models:/...)",
    )
    predict.add_argument("--pixel-refine-iterations", type=positive_int, metavar="N",
                         help=f"the refiner's iterations (default: {PREDICT_PIXEL_ITERATIONS})")  # fmt: skip
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
    """Serial in this process, or with ``dask.shards`` > 1 the sharded Prefect flow (same artifact bit for bit),
    started as its own program (``python -m wsss.pipelines.pseudo_masks``): the CLI never imports the flows."""
    if params.dask.shards > 1:
        import subprocess

        overrides = [f"-S{override}" for override in args.overrides]
        code = subprocess.run(
            [sys.executable, "-m", "wsss.pipelines.pseudo_masks", "--params", args.params, *overrides]
        )
        if code.returncode:
            raise SystemExit(code.returncode)  # the flow printed its own one-line error
        return None
    from wsss.tasks.pseudo_masks import main

    return main(params)


def _train_segmenter(params: Params, args: argparse.Namespace) -> object:
    from wsss.tasks.train_segmenter import main

    return main(params, mask_source=args.masks)


STAGE_HANDLERS = {"pseudo-masks": _pseudo_masks, "train-segmenter": _train_segmenter}  # commands with options


def positive_int(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}")
    return int(text)


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
            action.add_argument("-j", "--jobs", type=positive_int, help="parallel transfers (DVC's default if unset)")
            action.add_argument("targets", nargs="*", help=".dvc files or stages (default: all)")
        action.set_defaults(handler=_s3)


def _plots(params: Params, args: argparse.Namespace) -> None:
    from wsss.tools.plots import show

    print(f"plots written to {show(args.out)} (renders offline: Vega inline)")


def _print_profile(params: Params, args: argparse.Namespace) -> None:
    """One override per line (what ``make run PROFILE=`` passes on), checked against the params file."""
    overrides = profile_overrides(args.name)
    load_params(args.params, [*overrides, *args.overrides])
    print(" ".join(f"-S {o}" for o in overrides) if args.dvc else "\n".join(overrides))


# Commands that work outside a wsss repo: without a params.yaml in the working directory they use the defaults
# (the importers write a data set anywhere; predict and bench need no pipeline).
REPO_FREE = ("predict", "export", "import")


def common_parser() -> argparse.ArgumentParser:
    """The options every command takes: ``--params``, ``--profile`` and ``-S key=value`` overrides."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--params", default=str(DEFAULT_PARAMS), help="params file (default: params.yaml)")
    common.add_argument("--profile", help=f"a named override list of {PROFILES} (before -S), e.g. paper")
    common.add_argument(
        "-S", "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
        help="override a parameter, e.g. -S classifier.epochs=5 (repeatable)",
    )  # fmt: skip
    return common


def build_parser() -> argparse.ArgumentParser:
    # The module docstring is reST; a terminal shows plain text.
    parser = argparse.ArgumentParser(prog="wsss", description=__doc__.splitlines()[0].replace("``", ""))
    common = common_parser()
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    imp = sub.add_parser("import", help="write a data set in the wsss on-disk format")
    imp_sub = imp.add_subparsers(dest="source", required=True, metavar="SOURCE")
    emb = imp_sub.add_parser("embedded", parents=[common], help="generate the embedded default data set")
    emb.add_argument("--out", help="output directory (default: embedded.out)")
    emb.set_defaults(handler=_import_embedded)
    _add_importers(imp_sub, common)

    # The stages in pipeline order (as `wsss --help` lists them), from the one table of them.
    first_rows = {}
    for stage in STAGES:  # a command that runs two stages (train-segmenter, --masks gt) is listed once
        first_rows.setdefault(stage.command, stage)
    for command, stage in first_rows.items():
        parser_ = sub.add_parser(command, parents=[common], help=stage.help)
        parser_.set_defaults(handler=STAGE_HANDLERS.get(command) or _stage(stage.module))
        if command == "train-segmenter":
            parser_.add_argument("--masks", choices=("pseudo", "gt"), default="pseudo", help="gt: the upper bound")
    _add_predict(sub, common)
    _add_export(sub, common)
    _add_s3(sub, common)
    profile = sub.add_parser("profile", parents=[common], help=f"print a profile's overrides ({PROFILES})")
    profile.add_argument("name", help="the profile, e.g. paper")
    profile.add_argument("--dvc", action="store_true", help="as -S arguments: dvc exp run $(wsss profile NAME --dvc)")
    profile.set_defaults(handler=_print_profile)
    plots = sub.add_parser("plots", parents=[common], help="dvc plots show, rendering offline (Vega inline)")
    plots.add_argument("--out", default="dvc_plots", help="output folder of the page (default: dvc_plots)")
    plots.set_defaults(handler=_plots)
    return parser


class Terminated(BaseException):
    """SIGTERM, raised in the command's own process so that ``finally`` blocks run: Python's default SIGTERM
    handling exits at once, and `atomic_file` then leaves its temporary file beside the old output."""


def _terminate_here(pid: int) -> Callable[[int, object], None]:
    def handler(signum: int, _frame: object) -> None:
        if os.getpid() != pid:  # a forked child (a DataLoader worker) keeps the default: it dies at once
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        raise Terminated

    return handler


def run(parser: argparse.ArgumentParser, argv: list[str] | None, prog: str, repo_free: tuple[str, ...] = ()) -> int:
    """Parses ``argv``, loads the params and runs the command's handler; bad input and faults of the machine or
    of the MLflow store end with one line ``<prog> <command>: error: ...`` and exit code 1; SIGTERM (``kill``,
    a scheduler's stop) ends it with one line and exit code 143 after the partial outputs are removed."""
    args = parser.parse_args(argv)
    command = args.command if args.command != "import" else f"import {args.source}"
    if args.command == "s3":
        command = f"s3 {args.action}"
    if threading.current_thread() is not threading.main_thread():  # only the main thread may set handlers
        return _run(args, prog, command, repo_free)
    previous = signal.signal(signal.SIGTERM, _terminate_here(os.getpid()))
    try:
        return _run(args, prog, command, repo_free)
    finally:  # a caller in the same process (tests, a notebook) gets its own handling back
        signal.signal(signal.SIGTERM, previous)


def _run(args: argparse.Namespace, prog: str, command: str, repo_free: tuple[str, ...]) -> int:
    try:
        params_file = args.params
        if args.command in repo_free and args.params == str(DEFAULT_PARAMS) and not DEFAULT_PARAMS.is_file():
            params_file = None  # outside the repo: the defaults (and -S overrides)
        if getattr(args, "profile", None):  # handlers that load params again (research grids) see them too
            args.overrides = [*profile_overrides(args.profile), *args.overrides]
        params = load_params(params_file, args.overrides)
        args.handler(params, args)
    except WsssError as err:
        print(f"{prog} {command}: error: {err}", file=sys.stderr)
        return 1
    except OSError as err:  # a fault of the machine (disk, permissions) outside an artifact write: still one line
        print(f"{prog} {command}: error: {os_error_line(err)}", file=sys.stderr)
        return 1
    except Exception as err:
        from wsss.lib.tracking import store_error_line

        line = store_error_line(err)
        if line is None:
            raise
        print(f"{prog} {command}: error: {line}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{prog} {command}: interrupted", file=sys.stderr)
        return 130
    except Terminated:
        print(f"{prog} {command}: terminated", file=sys.stderr)
        return 143
    return 0


def main(argv: list[str] | None = None) -> int:
    return run(build_parser(), argv, "wsss", REPO_FREE)


if __name__ == "__main__":
    sys.exit(main())
