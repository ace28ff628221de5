"""Data path benchmark: ms per image of the deterministic chain, cold / warm / parallel; the data share
of a pretraining step; peak memory of a pretraining pass over a large picture manifest.

    python bench/bench_data.py [--sections pictures,nifti,share,rss] [--out bench/results/data.md]

Sections (each generates its data in a temporary folder; nothing is downloaded):

* ``pictures``: 2D picture folders, ``--n`` 512² 8-bit PNGs and ``--n`` 224² JPEGs (smooth anatomy-like
  content + noise), chain to 64² (X-ray percentile preset, pad). Rows: PIL decode alone (the floor),
  the MONAI chain (the definition), the fast chain (in-process, one thread = ms per core), and
  ``materialize`` with ``data.cache=disk``: cold (compute + write shards) at 1 and ``--workers``
  processes, and warm (every item from the shards + one loader epoch).
* ``nifti``: ``--n3d`` CT-like 96³ int16 NIfTI volumes, chain read → RAS → 1.5 mm → CT window → 64³
  (MONAI; 3D has no fast path): uncached, cold, parallel cold, warm.
* ``share``: pretraining steps on a warm disk cache of 224² images (random resized crop on the device):
  MAE ViT-S/16 and SparK ResNet-18, DataLoader with 1 and 2 workers. Data share = 1 − (model-only
  step time) / (step time), model-only = the same steps on one batch held in memory.
* ``rss``: peak resident memory (``VmHWM`` of a fresh child process) of materialising + one pretraining
  epoch (tiny MAE) over N tiny PNGs, for ``--rss-counts``; disk cache, and the memory cache as the
  baseline that grows with N.

Torch runs one thread (``--threads``), loader workers one each. The machine is shared with other
jobs: the load average is recorded and the absolute times are noisy.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from medmim.config import load_config  # noqa: E402
from medmim.data.augment import augment_batch  # noqa: E402
from medmim.data.dataset import deterministic_transforms, make_loader, materialize, set_loader_epoch  # noqa: E402


def _picture(shape, seed):
    rng = np.random.default_rng(seed)
    h, w = shape
    yy, xx = np.mgrid[0:h, 0:w] / max(h, w)
    body = np.exp(-((xx - 0.5) ** 2 / 0.08 + (yy - 0.5) ** 2 / 0.12))
    ribs = 0.25 * (np.sin(yy * 60 + seed) > 0.6) * body
    img = 30 + 180 * body + 40 * ribs + rng.normal(0, 6, shape)
    return img.clip(0, 255).astype(np.uint8)


def write_pictures(folder: Path, n: int, shape, suffix: str) -> list[str]:
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for i in range(n):
        p = folder / f"img{i:06d}{suffix}"
        Image.fromarray(_picture(shape, i)).save(p, **({"quality": 90} if suffix == ".jpg" else {}))
        out.append(str(p))
    return out


def per_image_ms(fn, items, repeat=1) -> tuple[float, float]:
    """(CPU ms, wall ms) per image of ``fn`` in this process: CPU time is the cost per core, which the
    other jobs of a shared machine inflate much less than the wall time."""
    t, c = time.perf_counter(), time.process_time()
    for _ in range(repeat):
        for it in items:
            fn(it)
    k = len(items) * repeat
    return (time.process_time() - c) / k * 1e3, (time.perf_counter() - t) / k * 1e3


def epoch_seconds(items, batch_size=32, workers=0) -> float:
    t = time.perf_counter()
    n = 0
    for batch in make_loader(items, batch_size, shuffle=False, seed=0, num_workers=workers):
        n += batch["image"].shape[0]
    assert n == len(items)
    return time.perf_counter() - t


def cache_runs(recs, over, preset, workers, tmp: Path) -> dict:
    """ms per image: cold (1 process), cold (``workers`` processes), warm (lookup + one epoch)."""
    res = {}
    for label, w in (("cold, 1 process", 0), (f"cold, {workers} processes", workers)):
        dc = load_config(None, over + ["data.cache=disk", f"data.cache_dir={tmp / f'cache{w}'}",
                                       f"data.num_workers={w}"]).data
        t = time.perf_counter()
        materialize(recs, dc, preset, progress=False)
        res[label] = (time.perf_counter() - t) / len(recs) * 1e3
    t = time.perf_counter()
    warm = materialize(recs, dc, preset, progress=False)
    res["warm (shard lookup + loader epoch)"] = (time.perf_counter() - t + epoch_seconds(warm)) / len(recs) * 1e3
    return res


def section_pictures(args, tmp: Path) -> list[str]:
    from PIL import Image

    lines = ["### 2D picture folders → 64² (X-ray percentile preset, pad)", "",
             "| input | PIL decode alone (floor) | MONAI chain (definition) | fast chain | cold, 1 process | "
             f"cold, {args.workers} processes | warm |", "|---|---|---|---|---|---|---|"]
    cell = lambda cw: f"{cw[0]:.2f} ({cw[1]:.2f})"  # noqa: E731
    goal = None
    for name, shape, suffix in (("512² 8-bit PNG", (512, 512), ".png"), ("224² JPEG", (224, 224), ".jpg")):
        paths = write_pictures(tmp / suffix.strip("."), args.n, shape, suffix)
        over = ["data.image_size=64", "data.resize=pad"]
        dc = load_config(None, over).data
        det = deterministic_transforms(dc, "xray", False)
        items = [{"image": p} for p in paths]
        det(items[0])
        det.reference(items[0])
        pil = per_image_ms(lambda it: np.asarray(Image.open(it["image"])), items)
        ref = per_image_ms(det.reference, items[: max(20, args.n // 4)])
        fast = per_image_ms(det, items)
        res = cache_runs([{"image": p, "label": 0} for p in paths], over, "xray", args.workers, tmp / f"c{suffix}")
        vals = list(res.values())
        lines.append(f"| {name} | {cell(pil)} | {cell(ref)} | **{cell(fast)}** | {vals[0]:.2f} | {vals[1]:.2f} | "
                     f"{vals[2]:.3f} |")
        if suffix == ".png":
            goal = fast[0]
    lines += ["", f"ms per image, {args.n} images each, one torch thread; in-process rows: CPU time (wall time); "
              "cache rows: wall time (cold: compute + write shards; warm: shard lookup + one loader epoch). "
              f"Goal ≤ 10 ms per 512² PNG per core: **{goal:.2f} CPU ms, {'met' if goal <= 10 else 'NOT met'}**.", ""]
    return lines


def section_nifti(args, tmp: Path) -> list[str]:
    from medmim.data.synthetic import ct_like_volume, write_nifti

    paths = [write_nifti(tmp / "vols" / f"v{i:03d}.nii.gz", ct_like_volume((96,) * 3, seed=i),
                         spacing=(1.0, 1.0, 1.25)) for i in range(args.n3d)]
    recs = [{"image": str(p), "label": i % 2} for i, p in enumerate(paths)]
    over = ["data.spatial_dims=3", "data.image_size=64", "data.target_spacing=[1.5,1.5,1.5]"]
    lazy = materialize(recs, load_config(None, over + ["data.cache=none"]).data, "ct_soft_tissue", progress=False)
    unc = epoch_seconds(lazy, batch_size=4) / len(recs) * 1e3
    res = cache_runs(recs, over, "ct_soft_tissue", args.workers, tmp / "c3d")
    vals = list(res.values())
    return ["### 3D NIfTI → 64³ (96³ int16, RAS, 1.5 mm, CT soft-tissue window, pad; MONAI chain)", "",
            f"| uncached epoch | cold, 1 process | cold, {args.workers} processes | warm |", "|---|---|---|---|",
            f"| {unc:.1f} | {vals[0]:.1f} | {vals[1]:.1f} | {vals[2]:.2f} |", "",
            f"ms per volume, {args.n3d} volumes. Warm / uncached = {vals[2] / unc:.3f}.", ""]


def _pretrain_model(method: str, size: int):
    from medmim.models import build_pretext, encoder_from_config
    from medmim.train.tasks import PretrainTask

    over = [f"data.image_size={size}", f"pretrain.method={method}"]
    over += (["encoder.name=vit_small", "encoder.patch_size=16"] if method == "mae"
             else ["encoder.name=resnet18", "encoder.small_input=false"])
    cfg = load_config(None, over)
    enc = encoder_from_config(cfg.encoder, 2, size)
    task = PretrainTask(build_pretext(cfg.pretrain, enc))
    opt = torch.optim.AdamW(task.model.parameters(), lr=1e-4)
    return task, opt


def _step(task, opt, batch):
    loss = task.training_step(task.model, batch)["loss"]
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


def section_share(args, tmp: Path) -> list[str]:
    size, bs = 224, args.batch
    paths = write_pictures(tmp / "share", bs * (args.steps + 2), (512, 512), ".png")
    over = [f"data.image_size={size}", "data.cache=disk", f"data.cache_dir={tmp / 'share_cache'}",
            "data.random_resized_crop=true", f"data.num_workers={args.workers}"]
    cfg = load_config(None, over)
    items = materialize([{"image": p} for p in paths], cfg.data, "xray", progress=False)
    from medmim.data.dataset import pretrain_transforms

    lines = [f"### Data share of a pretraining step at 224² (batch {bs}, {args.steps} timed steps, CPU, "
             f"{torch.get_num_threads()} torch thread(s))", "",
             "| model | loader workers | step (s) | model only (s) | data share | data wait per step |",
             "|---|---|---|---|---|---|"]
    worst = 0.0
    for method, label in (("mae", "MAE ViT-S/16"), ("spark", "SparK ResNet-18")):
        task, opt = _pretrain_model(method, size)
        task.model.train()
        fixed = {"image": torch.stack([items[i]["image"] for i in range(bs)])}
        _step(task, opt, fixed)  # warm-up
        t = time.perf_counter()
        for _ in range(args.steps):
            _step(task, opt, fixed)
        model_only = (time.perf_counter() - t) / args.steps
        for workers in (1, 2):
            loader = make_loader(items, bs, shuffle=True, seed=0, augment=pretrain_transforms(cfg.data),
                                 drop_last=True, num_workers=workers)
            set_loader_epoch(loader, 0)
            it = iter(loader)
            _step(task, opt, augment_batch(loader, next(it)))  # workers started, first batch
            t = time.perf_counter()
            wait = 0.0
            for _ in range(args.steps):
                t_d = time.perf_counter()
                batch = augment_batch(loader, next(it))
                wait += time.perf_counter() - t_d
                _step(task, opt, batch)
            step = (time.perf_counter() - t) / args.steps
            del it
            share = max(0.0, 1 - model_only / step)
            direct = wait / args.steps / step
            worst = max(worst, share, direct)
            lines.append(f"| {label} | {workers} | {step:.3f} | {model_only:.3f} | {share:.3f} | "
                         f"{wait / args.steps * 1e3:.1f} ms ({direct:.3f}) |")
    lines += ["", "Data share = 1 − model-only / step (the definition; timing noise of a shared machine can push it "
              "below 0, shown as 0); data wait = time in `next(loader)` + the batched augmentation per step, "
              "measured directly (its share of the step in brackets).",
              f"Goal data share ≤ 0.10 on CPU at 224²: worst of both measures **{worst:.3f}, "
              f"{'met' if worst <= 0.10 else 'NOT met'}**.", ""]
    return lines


RSS_CHILD = r"""
import json, resource, sys, time
sys.path.insert(0, {root!r})
import torch
torch.set_num_threads(1)
from medmim.config import load_config
from medmim.data.augment import augment_batch
from medmim.data.dataset import make_loader, materialize, set_loader_epoch, without_labels
from medmim.models import build_pretext, encoder_from_config
from medmim.train.tasks import PretrainTask
paths = json.load(open({listing!r}))[:{n}]
cfg = load_config(None, ["data.image_size=32", "data.cache={cache}", "data.cache_dir={cache_dir}",
                         "data.num_workers={workers}", "encoder.name=vit_tiny", "encoder.patch_size=8",
                         "encoder.embed_dim=32", "encoder.depth=1", "encoder.num_heads=2", "pretrain.decoder_dim=16",
                         "pretrain.decoder_depth=1", "data.random_resized_crop=true"])
t = time.perf_counter()
items = without_labels(materialize([dict(image=p, label=0) for p in paths], cfg.data, "xray", progress=False))
t_mat = time.perf_counter() - t
from medmim.data.dataset import pretrain_transforms
task = PretrainTask(build_pretext(cfg.pretrain, encoder_from_config(cfg.encoder, 2, 32)))
opt = torch.optim.AdamW(task.model.parameters(), lr=1e-4)
loader = make_loader(items, 512, shuffle=True, seed=0, augment=pretrain_transforms(cfg.data), drop_last=True)
set_loader_epoch(loader, 0)
t = time.perf_counter()
steps = 0
for batch in loader:
    loss = task.training_step(task.model, augment_batch(loader, batch))["loss"]
    loss.backward(); opt.step(); opt.zero_grad(set_to_none=True)
    steps += 1
# VmHWM: this process's peak RSS since exec (ru_maxrss would carry the high-water mark of the forked parent)
hwm = next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM:"))
print(json.dumps(dict(n=len(items), steps=steps, materialize_s=t_mat, epoch_s=time.perf_counter() - t,
                      maxrss_mb=hwm / 1024)))
"""


def _write_tiny(args_tuple):
    folder, start, stop = args_tuple
    from PIL import Image

    for i in range(start, stop):
        Image.fromarray(_picture((48, 40), i)).save(Path(folder) / f"t{i:06d}.png")


def section_rss(args, tmp: Path) -> list[str]:
    from concurrent.futures import ProcessPoolExecutor

    counts = [int(c) for c in args.rss_counts.split(",")]
    folder = tmp / "tiny"
    folder.mkdir(parents=True)
    n_max = max(counts)
    step = 5000
    with ProcessPoolExecutor(max(1, args.workers)) as pool:
        list(pool.map(_write_tiny, [(str(folder), a, min(a + step, n_max)) for a in range(0, n_max, step)]))
    listing = tmp / "tiny.json"
    listing.write_text(json.dumps([str(folder / f"t{i:06d}.png") for i in range(n_max)]))
    lines = ["### Peak memory of materialise + one pretraining epoch over N tiny PNGs (48×40 → 32², "
             "a 1-block MAE ViT/8, batch 512, random resized crop on the device)", "",
             "| cache | N images | peak RSS (MB) | materialise (s) | epoch (s) |", "|---|---|---|---|---|"]
    results = {}
    for cache in ("disk", "memory"):
        for n in counts:
            if cache == "memory" and n > args.rss_memory_max:
                continue
            code = RSS_CHILD.format(root=str(ROOT), listing=str(listing), n=n, cache=cache,
                                    cache_dir=str(tmp / "rss_cache"), workers=args.workers)
            out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                                 env={**os.environ, "OMP_NUM_THREADS": "1"})
            if out.returncode != 0:
                raise RuntimeError(out.stderr[-2000:])
            r = json.loads(out.stdout.strip().splitlines()[-1])
            results[(cache, n)] = r
            lines.append(f"| {cache} | {n:,} | {r['maxrss_mb']:.0f} | {r['materialize_s']:.1f} | {r['epoch_s']:.1f} |")
    d = [(n, results[("disk", n)]["maxrss_mb"]) for n in counts]
    slope = (d[-1][1] - d[0][1]) * 1024 * 1024 / max(1, d[-1][0] - d[0][0])
    mem = [(n, results[("memory", n)]["maxrss_mb"]) for n in counts if ("memory", n) in results]
    mem_slope = ((mem[-1][1] - mem[0][1]) * 1024 * 1024 / max(1, mem[-1][0] - mem[0][0])) if len(mem) > 1 else float("nan")
    lines += ["", f"Disk cache: peak RSS grows by **{slope:.0f} bytes per image** from {d[0][0]:,} to {d[-1][0]:,} "
              f"images (the manifest rows and the cache's offset table); the pixels (32² float32 = 4,096 bytes "
              f"per image) are not held. Memory cache (baseline): {mem_slope:.0f} bytes per image. The disk runs "
              "share one cache folder, so each run computes only the images the previous one did not have "
              f"(materialise = lookup + the new images), as stages and study cells do.", ""]
    return lines


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sections", default="pictures,nifti,share,rss")
    ap.add_argument("--n", type=int, default=200, help="2D pictures per folder")
    ap.add_argument("--n3d", type=int, default=12, help="3D volumes")
    ap.add_argument("--workers", type=int, default=2, help="processes for the parallel rows")
    ap.add_argument("--threads", type=int, default=1, help="torch threads")
    ap.add_argument("--batch", type=int, default=16, help="share: batch size")
    ap.add_argument("--steps", type=int, default=4, help="share: timed steps")
    ap.add_argument("--rss-counts", default="10000,30000,100000")
    ap.add_argument("--rss-memory-max", type=int, default=30000, help="largest N for the memory-cache baseline")
    ap.add_argument("--out", default=None, help="append the result to this markdown file")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    tmp = Path(tempfile.mkdtemp(prefix="medmim_bench_data_"))
    load0 = os.getloadavg()[0]
    body: list[str] = []
    try:
        for name in args.sections.split(","):
            t = time.perf_counter()
            lines = globals()[f"section_{name.strip()}"](args, tmp / name)
            body += lines
            print("\n".join(lines), f"[{name}] {time.perf_counter() - t:.0f} s", sep="\n", file=sys.stderr, flush=True)
            shutil.rmtree(tmp / name, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    cmd = "python bench/bench_data.py " + " ".join(argv if argv is not None else sys.argv[1:])
    head = [f"## {dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M} UTC — data path ({args.sections})", "",
            f"- machine: {platform.machine()}, {len(os.sched_getaffinity(0))} cores visible, {platform.platform()}, "
            f"Python {platform.python_version()}, torch {torch.__version__}, {args.threads} torch thread(s); "
            f"load average {load0:.1f} at the start, {os.getloadavg()[0]:.1f} at the end (a machine shared with "
            f"other jobs: absolute times are noisy)",
            f"- command: `OMP_NUM_THREADS=1 {cmd.strip()}`", ""]
    text = "\n".join(head + body)
    print(text)
    if args.out:
        out = Path(args.out)
        with open(out, "a") as fh:
            fh.write(("" if out.exists() and out.stat().st_size else "# Data path benchmark (bench/bench_data.py)\n\n")
                     + text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
