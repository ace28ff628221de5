"""``medmim anomaly train|score``: registered in ``medmim/cli.py`` through :func:`add_parser`."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from medmim.errors import MedmimError

DESCRIPTION = """Reconstruction-based anomaly detection with a masked autoencoder trained on normal images.

  train   train MAE / SparK (optionally with a memory of normal patterns) on the train-split images
          labelled anomaly.normal_label, choose a threshold on the validation split, and save
          runs/<name>/anomaly_model.safetensors + anomaly_model.json
  score   score a split with a trained model: scores.csv, metrics.json (image AUROC/AP for L2, L1,
          1-SSIM; pixel AUROC/AP/best Dice where lesion masks exist), heatmaps (PNG in 2D, NIfTI in
          the source geometry in 3D), and the sanity baselines (image statistics, the untrained model)
          chosen on val beside the detector with bootstrap CIs: baselines.md / baselines.csv

examples:
  medmim anomaly train -c anomaly_phantoms
  medmim anomaly score --run-dir runs/anomaly_phantoms
  medmim anomaly train -c anomaly_pneumonia pretrain.epochs=10 anomaly.memory=true run.name=pn_mem
  medmim anomaly score --run-dir runs/pn_mem anomaly.image_score=topk --split val
"""


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Add the ``anomaly`` verb (with ``train`` and ``score``) to the top-level subparsers."""
    p = subparsers.add_parser("anomaly", help="anomaly detection: train on normal images, score maps and images",
                              description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="anomaly_verb", metavar="STEP")
    t = sub.add_parser("train", help="train on the normal class, choose a threshold on validation")
    t.add_argument("-c", "--config", default="anomaly_phantoms",
                   help="YAML config file, or the name of one in configs/ (default: anomaly_phantoms)")
    t.add_argument("overrides", nargs="*", metavar="key=value", help="override any config key")
    t.add_argument("--resume", action="store_true", help="continue an interrupted training run")
    s = sub.add_parser("score", help="score a split with a trained model; write CSV, metrics, heatmaps")
    s.add_argument("--run-dir", required=True, help="the directory written by `medmim anomaly train`")
    s.add_argument("--split", default="test", choices=["train", "val", "test"])
    s.add_argument("--out", default=None, help="output folder (default: <run-dir>/scores_<split>)")
    s.add_argument("overrides", nargs="*", metavar="key=value",
                   help="override scoring settings, e.g. anomaly.num_masks=8 anomaly.image_score=topk")
    p.set_defaults(handler=handle, _anomaly_parser=p)
    return p


def handle(args) -> int:
    """Run ``medmim anomaly <step>``; user errors are raised as ``MedmimError``."""
    from medmim.anomaly.pipeline import score_anomaly, train_anomaly
    from medmim.config import load_config

    if args.anomaly_verb == "train":
        cfg = load_config(args.config, args.overrides)
        sidecar = train_anomaly(cfg, resume=args.resume)
        print(json.dumps({"run_dir": str(Path(cfg.run.out_dir) / cfg.run.name),
                          "threshold": sidecar.get("threshold"), "thresholds": sidecar.get("thresholds"),
                          "val_verdict": (sidecar.get("val_baselines") or {}).get("verdict")},
                         indent=2))
        return 0
    if args.anomaly_verb == "score":
        metrics = score_anomaly(args.run_dir, args.overrides, split=args.split, out_dir=args.out)
        summary = {k: {m: v for m, v in metrics[k].items() if not isinstance(v, dict)}
                   for k in ("l2", "l1", "ssim", "texture") if k in metrics}
        cmp = metrics.get("baselines")
        if cmp:
            summary["baselines"] = {"best_baseline": cmp["best_baseline"], "baseline_auroc": cmp["baseline"],
                                    "detector": cmp["detector_score"], "detector_auroc": cmp["detector"],
                                    "difference": cmp["difference"], "verdict": cmp["verdict"]}
        print(json.dumps(summary, indent=2))
        if cmp:
            print(cmp["verdict"])
        return 0
    args._anomaly_parser.print_help()
    raise MedmimError("medmim anomaly: choose a step: train or score")
