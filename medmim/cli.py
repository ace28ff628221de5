"""The `medmim` command line.

Every verb takes ``-c CONFIG`` (a YAML file, or the name of one in configs/) followed by any number
of ``key.sub=value`` overrides. A user error exits with status 2 and one line on stderr.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from medmim import __version__
from medmim.errors import MedmimError

EPILOG = """examples:
  medmim demo                                   # the main job on the embedded phantoms
  medmim demo pretrain.epochs=2 run.name=quick  # any config key can be overridden
  medmim pretrain -c pneumonia_mae pretrain.epochs=5
  medmim finetune -c pneumonia_mae --init runs/pneumonia_mae/encoder.safetensors
  medmim study -c pneumonia_study               # resumable label-efficiency grid
  medmim config -c demo                         # print the resolved config
"""


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors (``medmim VERB: error: ...``, exit 2) instead of usage + error."""

    def error(self, message: str):  # noqa: D401 - argparse API
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _add_config_args(p: argparse.ArgumentParser, default: str | None = None) -> None:
    p.add_argument("-c", "--config", default=default,
                   help="YAML config file, or the name of one in configs/" + (f" (default: {default})" if default else ""))
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="override any config key, e.g. pretrain.epochs=3 data.image_size=28")


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="medmim", description="Masked image modelling for medical imaging: pretrain encoders on "
        "unlabelled scans, fine-tune them on small labelled sets.",
        formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EPILOG)
    parser.add_argument("--version", action="version", version=f"medmim {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="verb", metavar="VERB")

    p = sub.add_parser("demo", help="the main job: pretrain on the embedded phantoms, fine-tune on 10%% and 100%% "
                       "of the labels, compare with training from scratch, print a table",
                       description="Runs the small label-efficiency study in configs/demo.yaml on generated "
                       "phantoms (written under data/phantoms). Finishes in minutes on a laptop CPU.")
    _add_config_args(p, "demo")

    p = sub.add_parser("pretrain", help="self-supervised pretraining (MAE, SparK, SimCLR); exports encoder weights",
                       description="Pretrains cfg.encoder with cfg.pretrain.method on the train+val images "
                       "(test images only if data.pretrain_on_test=true) and writes runs/<run.name>/ with "
                       "encoder.safetensors + encoder.json, reconstruction grids, metrics and checkpoints.")
    _add_config_args(p)
    p.add_argument("--resume", action="store_true", help="continue from runs/<name>/checkpoints/last.pt")

    p = sub.add_parser("finetune", help="fine-tune a classifier (linear probe or full) from pretrained weights or scratch",
                       description="Trains a classifier on finetune.label_fraction of the train split, keeps the "
                       "best validation AUROC checkpoint and reports test metrics in runs/<name>/result.json.")
    _add_config_args(p)
    p.add_argument("--init", default=None, help="weights to start from: a .safetensors export, 'scratch' "
                   "(default: finetune.init from the config)")
    p.add_argument("--resume", action="store_true", help="continue an interrupted fine-tuning run")
    _add_init_args(p)
    _add_fold_arg(p)

    p = sub.add_parser("evaluate", help="evaluate a fine-tuned run's best checkpoint on a split of its own data",
                       description="Reads the run's own config.yaml and recorded preset (never writes into the run) "
                       "and writes per-image predictions, a confusion matrix (CSV, PNG), per-class sensitivity, "
                       "specificity, precision, F1 with bootstrap CIs (segmentation: Dice, HD95 per class) to OUT.")
    p.add_argument("run_dir", nargs="?", default=None, help="the fine-tuning run directory (runs/<name>, "
                   "runs/<name>/finetune, runs/<name>/segment, a study cell): the paths predict accepts")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="override config keys for this evaluation only (e.g. run.device=cpu)")
    p.add_argument("--run-dir", dest="run_dir_opt", default=None, help=argparse.SUPPRESS)
    p.add_argument("--split", default="test", choices=["train", "val", "test"])
    p.add_argument("-o", "--out", default=None, help="output folder (default: <run.out_dir>/evaluations/<run>-<stage>-<split>, beside the run)")
    p.add_argument("--device", default=None, help="torch device (default: run.device of the run's config)")

    p = sub.add_parser("study", help="label-efficiency study: fractions × seeds × initialisations, resumable",
                       description="Pretrains each method in study.inits once, then fine-tunes every cell of the "
                       "grid. Finished cells are never redone: rerun the same command to resume.")
    _add_config_args(p)
    _add_init_args(p)
    _add_fold_arg(p)

    p = sub.add_parser("predict", help="run a fine-tuned model on image files or folders (CSV of probabilities "
                       "or segmentation masks)",
                       description="Classification writes OUT/predictions.csv (class probabilities); segmentation "
                       "writes one mask per image (NIfTI with the input's affine, or PNG for PNG input). A file that "
                       "cannot be used gets one error line (and a row in OUT/errors.csv); the others go on.")
    p.add_argument("run_dir", help="the fine-tuning run directory (runs/<name>, runs/<name>/finetune, a study cell)")
    p.add_argument("inputs", nargs="+", help="image files (NIfTI, MHA/NRRD, PNG/JPEG, DICOM, .npy) or folders")
    p.add_argument("-o", "--out", default="predictions", help="output folder (default: predictions)")
    p.add_argument("--native", action="store_true", help="segmentation: slide the training-size window over the "
                   "native grid instead of resizing to the training image size")
    p.add_argument("--device", default="cpu", help="torch device (default: cpu)")

    p = sub.add_parser("phantoms", help="write the embedded phantom data set (PNG / NIfTI + manifest)")
    p.add_argument("--out", default="data/phantoms", help="output folder (default: data/phantoms)")
    p.add_argument("--dims", type=int, choices=[2, 3], default=2, help="2D chest X-ray-like or 3D CT-like")
    p.add_argument("--patients", type=int, default=120)
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--sequences", default="", help="multi-sequence brain MRI instead: 2-4 comma-separated sequence "
                   "names (e.g. t1,t2,flair,adc), one file each, manifest columns image_<name>")

    p = sub.add_parser("config", help="print the resolved config (defaults + file + overrides)")
    _add_config_args(p)

    from medmim.anomaly.cli import add_parser as add_anomaly_parser
    add_anomaly_parser(sub)
    __import__("medmim.data.cli", fromlist=["add_parser"]).add_parser(sub)  # `medmim data ...`
    return parser


def _add_init_args(p: argparse.ArgumentParser) -> None:
    """Options for public pretrained weights (docs/finetune.md); they set finetune.init_* keys."""
    p.add_argument("--inflate", action="store_true", help="2D weights into a 3D encoder: inflate the kernels "
                   "(finetune.init_inflate=true)")
    p.add_argument("--allow-partial", action="store_true", help="fine-tune even when some encoder weights are "
                   "not in the file (finetune.init_allow_partial=true)")


def _add_fold_arg(p: argparse.ArgumentParser) -> None:
    """Cross-validation (docs/study.md): ``--fold i`` is ``finetune.fold=i``."""
    p.add_argument("--fold", type=int, default=None, metavar="I", help="cross-validation fold used as the "
                   "validation split, the other data.folds - 1 train (finetune.fold=I; a study runs only this fold)")


def _cfg(args):
    from medmim.config import load_config

    extra = [f"finetune.init_{k}=true" for k in ("inflate", "allow_partial") if getattr(args, k, False)]
    if getattr(args, "fold", None) is not None:
        extra.append(f"finetune.fold={args.fold}")
    return load_config(args.config, [*args.overrides, *extra])


def cmd_demo(args) -> int:
    from pipelines.label_efficiency import format_table, run_study, summarize_study
    from medmim.eval.report import comparison, p_text, paired_test

    cfg = _cfg(args)
    rows = run_study(cfg)  # its set-up joins torchrun's process group, reads the data rank 0 first
    metric = cfg.study.metric
    summary = summarize_study(rows, metric)
    print("\n" + format_table(summary, metric))
    for c in comparison(summary, metric):
        t = paired_test(rows, c["best_init"], c["scratch_init"], c["mode"], c["fraction"], metric)
        print(f"  {c['mode']} f{c['fraction']:g}: best pretrained ({c['best_init']}) {c['best_pretrained']:.3f} vs "
              f"{c['scratch_init']} {c['scratch']:.3f} ({c['delta']:+.3f} {metric}; paired Wilcoxon "
              f"{p_text(t['p'], t['n_pairs'], t['ties'])})")
    out = Path(cfg.run.out_dir) / cfg.run.name
    print(f"\nresults: {out} (results.csv, summary.md, label_efficiency.png)")
    if (out / "report" / "index.html").exists():
        print(f"report:  {out / 'report' / 'index.html'}")
    return 0 if all(r.get("status") == "ok" for r in rows) else 1


def cmd_study(args) -> int:
    return cmd_demo(args)


def _stage_setup(args):
    """(cfg, run, data, runtime) of a stage verb: the config from the arguments, then the one
    run set-up every verb and pipeline shares (medmim.train.setup.setup_run)."""
    from medmim.train.setup import setup_run

    cfg = _cfg(args)
    return (cfg, *setup_run(cfg))


def _report_skipped(data, run) -> None:
    """Unreadable files were skipped, not fatal: list them in the run directory and say so."""
    from medmim.train.setup import report_skipped

    report_skipped(data, run)


def cmd_pretrain(args) -> int:
    from medmim.train.stages import pretrain_stage

    cfg, run, data, runtime = _stage_setup(args)
    if cfg.pretrain.method == "none":
        raise MedmimError("pretrain.method is 'none': nothing to pretrain")
    weights = pretrain_stage(cfg, data, run, runtime, resume=args.resume)
    _report_skipped(data, run)
    print(f"encoder weights: {weights}")
    return 0


def cmd_finetune(args) -> int:
    from medmim.train.stages import finetune_stage

    cfg = _cfg(args)
    if cfg.data.folds and cfg.finetune.fold is None:
        raise MedmimError(f"data.folds={cfg.data.folds}: choose the validation fold with --fold I (0..{cfg.data.folds - 1}), "
                          "or run every fold with `medmim study`")
    from medmim.train.setup import setup_run

    run, data, runtime = setup_run(cfg)
    init = args.init or cfg.finetune.init
    if init in ("scratch", "none"):
        init_path = None
    elif init == "pretrained":
        init_path = Path(cfg.run.out_dir) / cfg.run.name / "encoder.safetensors"
        if not init_path.exists():
            raise MedmimError(f"{init_path}: no pretrained encoder in this run; pass --init PATH or --init scratch")
    else:
        init_path = Path(init)
        if not init_path.exists():
            raise MedmimError(f"{init_path}: weights file not found")
    fold = "" if cfg.finetune.fold is None else f"-fold{cfg.finetune.fold}"  # one folder per fold, its own config
    stage_dir = run.child(("segment" if cfg.finetune.head == "segment" else "finetune") + fold)
    if fold:
        stage_dir.save_config(cfg)
    if cfg.finetune.head == "segment":
        from medmim.train.segment import segment_stage

        result = segment_stage(cfg, data, stage_dir, runtime, init=init_path, resume=args.resume)
    else:
        result = finetune_stage(cfg, data, stage_dir, runtime, init=init_path, resume=args.resume)
    _report_skipped(data, run)
    print(json.dumps({k: v for k, v in result.items() if not isinstance(v, dict)}, indent=2))
    return 0


def cmd_evaluate(args) -> int:
    from medmim.evaluate import evaluate_run

    run_dir = args.run_dir_opt or args.run_dir
    overrides = list(args.overrides)
    if run_dir and "=" in run_dir and args.run_dir_opt is None:  # `evaluate key=value ...` without a run
        overrides.insert(0, run_dir)
        run_dir = None
    elif args.run_dir_opt and args.run_dir:
        overrides.insert(0, args.run_dir)
    if not run_dir:
        raise MedmimError("evaluate: name the fine-tuning run directory, e.g. `medmim evaluate runs/<name>`")
    evaluate_run(run_dir, split=args.split, out_dir=args.out, overrides=overrides, device=args.device)
    return 0


def cmd_predict(args) -> int:
    from medmim.predict import predict

    result = predict(args.run_dir, args.inputs, args.out, native=args.native, device=args.device)
    done = len(result.outputs)
    where = result.table if result.table is not None else Path(args.out)
    print(f"predicted {done} file(s) -> {where}" + (f"; {len(result.failures)} failed (see "
          f"{Path(args.out) / 'errors.csv'})" if result.failures else ""))
    return 0 if result.ok else 1


def cmd_phantoms(args) -> int:
    from medmim.data.phantoms import PhantomSpec, generate

    seqs = tuple(q.strip() for q in args.sequences.split(",") if q.strip())
    try:
        manifest = generate(args.out, args.dims, PhantomSpec(n_patients=args.patients, seed=args.seed, sequences=seqs))
    except ValueError as exc:
        raise MedmimError(f"--sequences: {exc}") from None
    print(f"manifest: {manifest}")
    return 0


def cmd_config(args) -> int:
    from medmim.config import dump_config

    print(dump_config(_cfg(args)), end="")
    return 0


COMMANDS = {"demo": cmd_demo, "pretrain": cmd_pretrain, "finetune": cmd_finetune, "evaluate": cmd_evaluate,
            "study": cmd_study, "phantoms": cmd_phantoms, "config": cmd_config,
            "predict": cmd_predict,
            "anomaly": lambda args: args.handler(args),
            "data": lambda args: args.handler(args)}


def parse_args(parser: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    """Parse with ``key=value`` overrides allowed anywhere on the line (``... --init PATH k=v``,
    ``... --resume k=v``): argparse leaves those it cannot place after an option as extras; they are
    appended to ``overrides`` in order. Anything else left over is an error."""
    args, extra = parser.parse_known_args(argv)
    if any(a in ("-v", "--verbose") for a in extra):  # -v after the verb works too
        args.verbose = True
        extra = [a for a in extra if a not in ("-v", "--verbose")]
    overrides = [a for a in extra if "=" in a and not a.startswith("-")]
    unknown = [a for a in extra if a not in overrides]
    if overrides and not hasattr(args, "overrides"):
        unknown = extra
    if unknown:
        prog = " ".join(str(p) for p in (parser.prog, getattr(args, "verb", None), getattr(args, "data_verb", None)) if p)
        parser.exit(2, f"{prog}: error: unrecognized arguments: {' '.join(unknown)} (see {prog} --help)\n")
    if overrides:
        args.overrides = list(args.overrides or []) + overrides
    return args


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _os_error_line(exc: OSError) -> str:
    """``<file>: <reason>`` for file-system errors (missing file, permission, disk full)."""
    name = exc.filename if exc.filename is not None else ""
    reason = exc.strerror or _one_line(exc)
    return f"{name}: {reason}" if name != "" else reason


def _safe_streams() -> None:
    """File names that are not valid UTF-8 (kept as surrogate escapes) print as escapes, never crash."""
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.reconfigure(errors="backslashreplace")
        except (AttributeError, ValueError):  # a replaced stream (tests, pipes that cannot be reconfigured)
            pass


def main(argv: list[str] | None = None) -> int:
    """Run a verb. A user error (bad config, path, value, data) is one line on stderr and exit
    status 2; an unexpected failure is one line and exit status 1. ``-v`` adds the traceback."""
    _safe_streams()
    parser = build_parser()
    args = parse_args(parser, argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    if args.verb is None:
        parser.print_help()
        return 2
    finished = False
    try:
        code = COMMANDS[args.verb](args)
        finished = True
        return code
    except KeyboardInterrupt:
        print("medmim: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # noqa: BLE001 - every failure reaches the user as one line
        return _report_error(exc, args.verbose)
    finally:
        from medmim.train.distributed import shutdown

        shutdown(sync=finished)  # leave the torchrun process group, if one was joined


def _report_error(exc: Exception, verbose: bool) -> int:
    import traceback

    if verbose:
        traceback.print_exc()
    if isinstance(exc, MedmimError):
        print(f"medmim: error: {_one_line(exc)}", file=sys.stderr)
        return 2
    if isinstance(exc, (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)):
        print(f"medmim: error: {_os_error_line(exc)}", file=sys.stderr)
        return 2
    if isinstance(exc, OSError) and exc.strerror:  # e.g. disk full
        print(f"medmim: error: {_os_error_line(exc)}", file=sys.stderr)
        return 1
    hint = "" if verbose else " (medmim -v ... shows the traceback)"
    print(f"medmim: internal error: {type(exc).__name__}: {_one_line(exc)}{hint}", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
