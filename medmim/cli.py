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


def _add_config_args(p: argparse.ArgumentParser, default: str | None = None) -> None:
    p.add_argument("-c", "--config", default=default,
                   help="YAML config file, or the name of one in configs/" + (f" (default: {default})" if default else ""))
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="override any config key, e.g. pretrain.epochs=3 data.image_size=28")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
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

    p = sub.add_parser("evaluate", help="evaluate a fine-tuned run's best checkpoint on a split",
                       description="Loads runs/<name>/checkpoints/best.pt of a finetune run and prints metrics.")
    _add_config_args(p)
    p.add_argument("--run-dir", required=True, help="the fine-tuning run directory")
    p.add_argument("--split", default="test", choices=["train", "val", "test"])

    p = sub.add_parser("study", help="label-efficiency study: fractions × seeds × initialisations, resumable",
                       description="Pretrains each method in study.inits once, then fine-tunes every cell of the "
                       "grid. Finished cells are never redone: rerun the same command to resume.")
    _add_config_args(p)

    p = sub.add_parser("phantoms", help="write the embedded phantom data set (PNG / NIfTI + manifest)")
    p.add_argument("--out", default="data/phantoms", help="output folder (default: data/phantoms)")
    p.add_argument("--dims", type=int, choices=[2, 3], default=2, help="2D chest X-ray-like or 3D CT-like")
    p.add_argument("--patients", type=int, default=120)
    p.add_argument("--seed", type=int, default=1234)

    p = sub.add_parser("config", help="print the resolved config (defaults + file + overrides)")
    _add_config_args(p)
    return parser


def _cfg(args):
    from medmim.config import load_config

    return load_config(args.config, args.overrides)


def cmd_demo(args) -> int:
    from pipelines.label_efficiency import format_table, run_study, summarize_rows

    cfg = _cfg(args)
    rows = run_study(cfg)
    table = format_table(summarize_rows(rows, cfg.study.metric), cfg.study.metric)
    print("\n" + table)
    print(f"\nresults: {Path(cfg.run.out_dir) / cfg.run.name}")
    return 0 if all(r.get("status") == "ok" for r in rows) else 1


def cmd_study(args) -> int:
    return cmd_demo(args)


def _stage_setup(args):
    from medmim.data.dataset import prepare_data, summarize
    from medmim.train.loop import Runtime
    from medmim.train.rundir import RunDir, seed_everything

    cfg = _cfg(args)
    seed_everything(cfg.run.seed, cfg.run.num_threads)
    run = RunDir.create(Path(cfg.run.out_dir) / cfg.run.name)
    data = prepare_data(cfg)
    run.save_config(cfg)
    run.save_environment(cfg.run.seed, data.fingerprint, {"data": summarize(data)})
    return cfg, run, data, Runtime.from_config(cfg.run)


def cmd_pretrain(args) -> int:
    from medmim.train.stages import pretrain_stage

    cfg, run, data, runtime = _stage_setup(args)
    if cfg.pretrain.method == "none":
        raise MedmimError("pretrain.method is 'none': nothing to pretrain")
    weights = pretrain_stage(cfg, data, run, runtime, resume=args.resume)
    print(f"encoder weights: {weights}")
    return 0


def cmd_finetune(args) -> int:
    from medmim.train.stages import finetune_stage

    cfg, run, data, runtime = _stage_setup(args)
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
    result = finetune_stage(cfg, data, run.child("finetune"), runtime, init=init_path, resume=args.resume)
    print(json.dumps({k: v for k, v in result.items() if not isinstance(v, dict)}, indent=2))
    return 0


def cmd_evaluate(args) -> int:
    from medmim.data.dataset import make_loader, materialize
    from medmim.models.heads import Classifier
    from medmim.train.checkpoint import safe_torch_load
    from medmim.train.stages import build_encoder_for
    from medmim.train.tasks import ClassificationTask

    cfg, _run, data, runtime = _stage_setup(args)
    ckpt_path = Path(args.run_dir) / "checkpoints" / "best.pt"
    if not ckpt_path.exists():
        raise MedmimError(f"{ckpt_path}: no best checkpoint in this run directory")
    model = Classifier(build_encoder_for(cfg), cfg.data.num_classes, mode=cfg.finetune.mode)
    model.load_state_dict(safe_torch_load(ckpt_path)["model"])
    items = materialize(data.split(args.split), cfg.data, data.preset, skipped=data.skipped)
    task = ClassificationTask(model.to(runtime.device), cfg.data.num_classes, multilabel=cfg.finetune.multilabel)
    metrics = task.evaluate(model, make_loader(items, 256, shuffle=False, seed=0), runtime)
    print(json.dumps({"split": args.split, "n": len(items), **metrics}, indent=2))
    return 0


def cmd_phantoms(args) -> int:
    from medmim.data.phantoms import PhantomSpec, generate

    manifest = generate(args.out, args.dims, PhantomSpec(n_patients=args.patients, seed=args.seed))
    print(f"manifest: {manifest}")
    return 0


def cmd_config(args) -> int:
    from medmim.config import dump_config

    print(dump_config(_cfg(args)), end="")
    return 0


COMMANDS = {"demo": cmd_demo, "pretrain": cmd_pretrain, "finetune": cmd_finetune, "evaluate": cmd_evaluate,
            "study": cmd_study, "phantoms": cmd_phantoms, "config": cmd_config}


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    if args.verb is None:
        parser.print_help()
        return 2
    try:
        return COMMANDS[args.verb](args)
    except MedmimError as exc:
        print(f"medmim: error: {str(exc).splitlines()[0]}", file=sys.stderr)
        for line in str(exc).splitlines()[1:]:
            print(f"  {line}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("medmim: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
