"""Does multi-sequence input matter, and does channel dropout buy robustness to a missing sequence?

On the 2D multi-sequence phantoms (medmim.data.phantoms: a lesion dark on T1 / ADC, bright on T2 /
FLAIR, and look-alikes that match it in exactly one sequence), fine-tune the config
``multiseq_mri`` from scratch with several channel sets, seeds 0-2, and report the test AUROC
(scikit-learn, on the run's own test predictions). Runs with all four sequences are also scored with
one sequence blanked (zeros: what channel dropout trains for), with and without
``data.channel_dropout``.

    OMP_NUM_THREADS=1 python bench/bench_multisequence.py [--patients 160] [--epochs 20] [--seeds 0 1 2]

Writes a markdown table to stdout (copy into bench/results/multisequence.md).
"""

from __future__ import annotations

import argparse
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from sklearn.metrics import roc_auc_score

SEQS = ["t1", "t2", "flair", "adc"]


def run_one(work: Path, manifest: Path, channels: list[str], seed: int, epochs: int, dropout: float) -> dict:
    from medmim.config import load_config
    from medmim.data.dataset import materialize
    from medmim.predict import load_run_model
    from medmim.train.setup import setup_run
    from medmim.train.stages import finetune_stage

    name = f"{'-'.join(channels)}_d{dropout}_s{seed}"
    cfg = load_config("multiseq_mri", [f"data.path={manifest}", f"data.channels=[{','.join(channels)}]",
                                       f"data.channel_dropout={dropout}", f"run.seed={seed}",
                                       f"run.out_dir={work}", f"run.name={name}", f"finetune.epochs={epochs}",
                                       "finetune.bootstrap=0", "run.num_threads=1", "run.tensorboard=false"])
    t0 = time.perf_counter()
    run, data, runtime = setup_run(cfg)
    res = finetune_stage(cfg, data, run.child("finetune"), runtime, init=None, log=lambda s: None)
    out = {"channels": channels, "seed": seed, "dropout": dropout, "auroc": res["test_auroc"],
           "time_s": time.perf_counter() - t0}
    if len(channels) == 4:  # the same model with one sequence blanked at test time
        model = load_run_model(run.path / "finetune" / "checkpoints" / "best.pt", cfg)
        items = materialize(data.split("test"), cfg.data, data.preset)
        x = torch.stack([it["image"] for it in items])
        y = np.array([int(it["label"]) for it in items])
        for k, seq in enumerate(channels):
            xk = x.clone()
            xk[:, k] = 0
            with torch.no_grad():
                p = model(xk).softmax(1)[:, 1].numpy()
            out[f"without_{seq}"] = roc_auc_score(y, p)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--patients", type=int, default=160)
    ap.add_argument("--epochs", type=int, default=20)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--dropout-only", action="store_true", help="only the four-sequence runs (dropout 0 and 0.2)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    from medmim.data.phantoms import PhantomSpec, generate

    work = Path(tempfile.mkdtemp(prefix="medmim_mc_"))
    manifest = generate(work / "data", 2, PhantomSpec(n_patients=args.patients, sequences=tuple(SEQS)))
    sets = [(SEQS, 0.0), (SEQS, 0.2), (["t2", "flair"], 0.0), (["flair"], 0.0), (["t2"], 0.0)]
    if args.dropout_only:
        sets = sets[:2]
    rows = []
    for channels, dropout in sets:
        for seed in args.seeds:
            r = run_one(work / "runs", manifest, channels, seed, args.epochs, dropout)
            rows.append(r)
            print(f"# {r}", flush=True)
    print(f"\nMachine: {platform.processor() or platform.machine()}, torch {torch.__version__}, 1 thread; "
          f"{args.patients} patients x 2 studies, image 32x32, config multiseq_mri, scratch, "
          f"{args.epochs} epochs, seeds {args.seeds}. Chance AUROC = 0.5.\n")
    print("| channels | channel_dropout | test AUROC (mean ± sd) | without t1 | without t2 | without flair "
          "| without adc | s / run |")
    print("|---|---|---|---|---|---|---|---|")
    for channels, dropout in sets:
        sel = [r for r in rows if r["channels"] == channels and r["dropout"] == dropout]
        a = np.array([r["auroc"] for r in sel])
        miss = [np.mean([r[f"without_{s}"] for r in sel]) if f"without_{s}" in sel[0] else None for s in SEQS]
        cells = " | ".join("-" if m is None else f"{m:.3f}" for m in miss)
        print(f"| {', '.join(channels)} | {dropout} | {a.mean():.3f} ± {a.std(ddof=1) if len(a) > 1 else 0:.3f} "
              f"| {cells} | {np.mean([r['time_s'] for r in sel]):.0f} |")


if __name__ == "__main__":
    main()
