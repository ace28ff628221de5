"""Multi-channel data path: CPU ms per case of the deterministic chain with data.channels.

2D: C pictures per case (512² 8-bit PNG, per-channel presets) -> 64²: PIL decode alone (floor), the MONAI
chain (definition), the fast chain; beside it the grayscale (C = 1) fast chain. 3D: C NIfTI volumes per
case -> 64³: on one grid (stacked as read) and on different grids (channels after the first resampled by
MONAI ResampleToMatch), beside the grayscale chain.

    OMP_NUM_THREADS=1 PYTHONPATH=. python bench/bench_multichannel.py --out bench/results/multichannel.md
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch


def _cpu_ms(fn, items, repeat=1):
    best_cpu, best_wall = float("inf"), float("inf")
    for _ in range(repeat):
        c0, w0 = time.process_time(), time.perf_counter()
        for it in items:
            fn(it)
        best_cpu = min(best_cpu, (time.process_time() - c0) * 1000 / len(items))
        best_wall = min(best_wall, (time.perf_counter() - w0) * 1000 / len(items))
    return best_cpu, best_wall


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n2d", type=int, default=40)
    ap.add_argument("--n3d", type=int, default=6)
    ap.add_argument("--channels", type=int, default=2)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    import nibabel as nib
    from PIL import Image

    from medmim.config import load_config
    from medmim.data.dataset import deterministic_transforms

    C = args.channels
    names = [f"c{i}" for i in range(C)]
    presets = ["xray", "mri_zscore", "mri_percentile", "uint8"][:C]
    chans = "[" + ",".join(f'{{"name": "{n}", "preset": "{p}"}}' for n, p in zip(names, presets)) + "]"
    rng = np.random.default_rng(0)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        cases = []
        yy, xx = np.mgrid[0:512, 0:512]
        for i in range(args.n2d):
            files = []
            for c in range(C):
                img = (120 + 80 * np.sin(xx / (17.0 + c)) * np.cos(yy / 23.0) + rng.normal(0, 20, (512, 512)))
                path = tmp / f"p{i}_{c}.png"
                Image.fromarray(img.clip(0, 255).astype(np.uint8)).save(path)
                files.append(str(path))
            cases.append(files)
        dc = load_config(None, ["data.image_size=64", f"data.channels={chans}"]).data
        det = deterministic_transforms(dc, "xray", with_mask=False)
        gray = deterministic_transforms(load_config(None, ["data.image_size=64"]).data, "xray", with_mask=False)
        floor = _cpu_ms(lambda fs: [np.asarray(Image.open(f)) for f in fs], cases, 2)
        monai = _cpu_ms(lambda fs: det.reference({"image": fs}), cases, 2)
        fast = _cpu_ms(lambda fs: det({"image": fs}), cases, 2)
        gray_fast = _cpu_ms(lambda fs: gray({"image": fs[0]}), cases, 2)
        assert all(det.fast({"image": fs}) is not None for fs in cases[:3])
        rows.append(("2d", floor, monai, fast, gray_fast))

        vols_same, vols_diff = [], []
        for i in range(args.n3d):
            same, diff = [], []
            for c in range(C):
                arr = rng.normal(100, 30, (96, 96, 96)).astype(np.int16)
                aff = np.diag([1.0, 1.0, 1.0, 1.0])
                p = tmp / f"v{i}_{c}.nii.gz"
                nib.save(nib.Nifti1Image(arr, aff), str(p))
                same.append(str(p))
                aff2 = np.diag([1.2, 1.1, 1.3, 1.0]) if c else aff
                q = tmp / f"w{i}_{c}.nii.gz"
                nib.save(nib.Nifti1Image(arr[:80, :86, :74] if c else arr, aff2), str(q))
                diff.append(str(q))
            vols_same.append(same)
            vols_diff.append(diff)
        dc3 = load_config(None, ["data.spatial_dims=3", "data.image_size=64", f"data.channels={chans}"]).data
        det3 = deterministic_transforms(dc3, "mri_zscore", with_mask=False)
        gray3 = deterministic_transforms(load_config(None, ["data.spatial_dims=3", "data.image_size=64"]).data,
                                         "mri_zscore", with_mask=False)
        t_same = _cpu_ms(lambda fs: det3({"image": fs}), vols_same)
        t_diff = _cpu_ms(lambda fs: det3({"image": fs}), vols_diff)
        t_gray = _cpu_ms(lambda fs: gray3({"image": fs[0]}), vols_same)
        rows.append(("3d", t_gray, t_same, t_diff))

    load = os.getloadavg()[0]
    d2, d3 = rows
    text = [
        f"## {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} — multi-channel data path (C = {C})", "",
        f"- machine: {platform.machine()}, {os.cpu_count()} cores visible, {platform.platform()}, Python "
        f"{platform.python_version()}, torch {torch.__version__}, 1 torch thread; load average {load:.1f} at the end "
        "(a machine shared with other jobs: absolute times are noisy; CPU time is the steadier figure)",
        f"- command: `OMP_NUM_THREADS=1 PYTHONPATH=. python bench/bench_multichannel.py --channels {C}"
        + (f" --out {args.out}`" if args.out else "`"),
        f"- presets per channel: {', '.join(presets)}", "",
        f"### 2D: {C} × 512² 8-bit PNG per case → {C}×64² ({args.n2d} cases)", "",
        "| PIL decode alone (floor) | MONAI chain (definition) | fast chain | grayscale fast chain (1 PNG) |",
        "|---|---|---|---|",
        "| " + " | ".join(f"{c:.2f} ({w:.2f})" for c, w in d2[1:]) + " |", "",
        "ms per case: CPU time (wall time). The fast chain gives the MONAI chain's numbers "
        "(tests/test_multichannel_data.py::test_fast_path_channels_equal_monai_chain, 1e-6).", "",
        f"### 3D: {C} × 96³ int16 NIfTI per case → {C}×64³, RAS, z-score/percentile ({args.n3d} cases)", "",
        "| grayscale (channel 0 alone) | C channels, one grid | C channels, channels after the first on other grids "
        "(ResampleToMatch) |", "|---|---|---|",
        "| " + " | ".join(f"{c:.1f} ({w:.1f})" for c, w in d3[1:]) + " |", "",
        "ms per case: CPU time (wall time).", ""]
    out = "\n".join(text)
    print(out)
    if args.out:
        path = Path(args.out)
        old = path.read_text() if path.exists() else "# Multi-channel data path (bench/bench_multichannel.py)\n\n"
        path.write_text(old + out + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
