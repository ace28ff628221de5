"""Data loading benchmark: throughput on a generated 3D NIfTI set, cached vs uncached epoch time.

    python bench/bench_data.py [--n 24] [--size 96] [--out bench/results/data.md]

Generates ``n`` CT-like volumes (int16 NIfTI .nii.gz, 1×1×1.25 mm) in a temporary folder and runs
the deterministic chain (read, RAS, resample to 1.5 mm, CT soft-tissue window, pad-resize to 64³)
through a DataLoader, one epoch each:

* uncached: ``data.cache=none`` (every epoch reads and transforms every file);
* disk cache, cold: the first ``data.cache=disk`` run (computes and writes the cache);
* disk cache, warm: a later run, every item served by MONAI's PersistentDataset from disk;
* memory: an epoch over the in-memory items of ``data.cache=memory``.

All in one process, one run, so the ratios compare like with like. Goal: warm cached ≤ 0.2 × uncached.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from medmim.config import load_config  # noqa: E402
from medmim.data.dataset import make_loader, materialize  # noqa: E402
from medmim.data.synthetic import ct_like_volume, write_nifti  # noqa: E402


def epoch(items, batch_size: int = 4) -> float:
    t = time.perf_counter()
    n = 0
    for batch in make_loader(items, batch_size, shuffle=False, seed=0):
        n += batch["image"].shape[0]
    assert n == len(items)
    return time.perf_counter() - t


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=24, help="volumes")
    ap.add_argument("--size", type=int, default=96, help="side length of the generated volumes")
    ap.add_argument("--out", default=None, help="append the result to this markdown file")
    args = ap.parse_args(argv)
    torch.set_num_threads(2)
    root = Path(tempfile.mkdtemp(prefix="medmim_bench_data_"))
    try:
        paths = [write_nifti(root / "vols" / f"v{i:03d}.nii.gz", ct_like_volume((args.size,) * 3, seed=i),
                             spacing=(1.0, 1.0, 1.25)) for i in range(args.n)]
        mb = sum(p.stat().st_size for p in paths) / 1e6
        recs = [{"image": str(p), "label": i % 2} for i, p in enumerate(paths)]
        base = ["data.spatial_dims=3", "data.image_size=64", "data.target_spacing=[1.5,1.5,1.5]",
                f"data.cache_dir={root / 'cache'}"]
        preset = "ct_soft_tissue"

        lazy = materialize(recs, load_config(None, base + ["data.cache=none"]).data, preset)
        t_uncached = epoch(lazy)
        disk_cfg = load_config(None, base + ["data.cache=disk"]).data
        t0 = time.perf_counter()
        materialize(recs, disk_cfg, preset)
        t_cold = time.perf_counter() - t0
        t0 = time.perf_counter()
        warm = materialize(recs, disk_cfg, preset)
        t_warm = time.perf_counter() - t0 + epoch(warm)
        mem = materialize(recs, load_config(None, base + ["data.cache=memory"]).data, preset)
        t_mem = epoch(mem)
    finally:
        shutil.rmtree(root, ignore_errors=True)

    rows = [("uncached epoch (cache=none)", t_uncached), ("disk cache, cold (compute + write)", t_cold),
            ("disk cache, warm epoch (PersistentDataset read + epoch)", t_warm),
            ("memory cache epoch", t_mem)]
    cmd = "python bench/bench_data.py " + " ".join(argv if argv is not None else sys.argv[1:])
    lines = [f"## {dt.date.today().isoformat()} — {args.n} volumes of {args.size}³ int16 NIfTI ({mb:.1f} MB)", "",
             f"- machine: {platform.machine()}, {os.cpu_count()} cores visible, {platform.platform()}, "
             f"Python {platform.python_version()}, torch {torch.__version__}, 2 torch threads, "
             f"load average at the end {os.getloadavg()[0]:.1f} (shared machine)",
             f"- command: `{cmd.strip()}`",
             "- chain: read → RAS → resample 1.5 mm → CT soft-tissue window → pad-resize 64³; batch 4, 0 workers",
             "", "| measure | seconds | volumes/s | ratio to uncached |", "|---|---|---|---|"]
    for name, t in rows:
        lines.append(f"| {name} | {t:.2f} | {args.n / t:.1f} | {t / t_uncached:.3f} |")
    ratio = t_warm / t_uncached
    lines += ["", f"Warm disk cache / uncached = **{ratio:.3f}** (goal ≤ 0.2: {'met' if ratio <= 0.2 else 'NOT met'}).",
              ""]
    text = "\n".join(lines)
    print(text)
    if args.out:
        out = Path(args.out)
        head = "" if out.exists() else "# Data loading benchmark (bench/bench_data.py)\n\n"
        with open(out, "a") as fh:
            fh.write(head + text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
