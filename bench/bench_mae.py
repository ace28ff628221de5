"""MAE step-time benchmark (CPU): medmim MAE vs MONAI's MaskedAutoEncoderViT, and MAE vs full-token.

One "step" = forward + backward + AdamW step on a random batch. Three models per setting, at the
same configuration (encoder width/depth/heads, MLP ratio 4, decoder width/depth/heads, mask ratio,
image and patch size):

- ``medmim MAE``   -- medmim.models.mae.MAE (encoder sees visible tokens only, fused qkv + SDPA)
- ``MONAI MAE``    -- monai.networks.nets.MaskedAutoEncoderViT, trained with the same loss
                      (MSE over the hidden patches, raw pixel targets: norm-pix is off for both)
- ``full-token``   -- medmim.models.mae.SimMIM: every token through the encoder (mask tokens)
- ``... bf16``     -- the same step under ``torch.autocast("cpu", bfloat16)`` (medmim's
                      ``run.precision=bf16``); MONAI's MaskedAutoEncoderViT is tried the same way
                      and the error it raises is recorded when it cannot run

Goals: medmim MAE >= 1.3x faster than the MONAI path; MAE step <= 0.4x the full-token step. The
bench also profiles one fp32 medmim step and prints the share of time in matrix products and
attention: the part of the step that is the same arithmetic in both implementations.

Run:  .venv/bin/python bench/bench_mae.py            (writes bench/results/mae.md)
      .venv/bin/python bench/bench_mae.py --quick    (tiny sizes, a smoke test; no file written)
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import statistics
import sys
import time
from pathlib import Path

# Passive OpenMP waiting: on a shared machine spinning threads of an oversubscribed CPU slow every
# process down badly. It must be set before torch loads libgomp; both models are timed alike.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from medmim.io import write_text  # noqa: E402
from medmim.models.mae import MAE, SimMIM, patchify  # noqa: E402
from medmim.models.vit import build_vit  # noqa: E402

SETTINGS = {
    # name: spatial_dims, img, patch, batch, encoder (dim, depth, heads), decoder (dim, depth, heads)
    "2D 224² p16 ViT-S": dict(sd=2, img=224, patch=16, batch=8, enc=(384, 12, 6), dec=(192, 4, 6)),
    "3D 96³ p16 ViT-S": dict(sd=3, img=96, patch=16, batch=4, enc=(384, 12, 6), dec=(192, 4, 6)),
}
QUICK = {
    "2D 64² p8 tiny": dict(sd=2, img=64, patch=8, batch=4, enc=(96, 2, 3), dec=(48, 1, 2)),
    "3D 32³ p8 tiny": dict(sd=3, img=32, patch=8, batch=2, enc=(96, 2, 3), dec=(48, 1, 2)),
}
MASK_RATIO = 0.75


def medmim_mae(s):
    d, depth, heads = s["enc"]
    enc = build_vit("small", spatial_dims=s["sd"], img_size=s["img"], patch_size=s["patch"],
                    embed_dim=d, depth=depth, num_heads=heads)
    dd, ddepth, dheads = s["dec"]
    model = MAE(enc, decoder_dim=dd, decoder_depth=ddepth, decoder_heads=dheads,
                mask_ratio=MASK_RATIO, norm_pix_loss=False)
    return model, lambda x: model(x)["loss"]


def medmim_full_token(s):
    d, depth, heads = s["enc"]
    enc = build_vit("small", spatial_dims=s["sd"], img_size=s["img"], patch_size=s["patch"],
                    embed_dim=d, depth=depth, num_heads=heads)
    model = SimMIM(enc, mask_ratio=MASK_RATIO, loss="mse")
    return model, lambda x: model(x)["loss"]


def monai_mae(s):
    from monai.networks.nets import MaskedAutoEncoderViT

    d, depth, heads = s["enc"]
    dd, ddepth, dheads = s["dec"]
    model = MaskedAutoEncoderViT(
        in_channels=1, img_size=s["img"], patch_size=s["patch"], hidden_size=d, mlp_dim=4 * d,
        num_layers=depth, num_heads=heads, masking_ratio=MASK_RATIO, decoder_hidden_size=dd,
        decoder_mlp_dim=4 * dd, decoder_num_layers=ddepth, decoder_num_heads=dheads,
        spatial_dims=s["sd"], qkv_bias=True)

    def loss_fn(x):
        pred, mask = model(x)
        target = patchify(x, s["patch"])  # MONAI's token order is the same row-major grid order
        return ((pred - target) ** 2).mean(-1)[mask.bool()].mean()

    return model, loss_fn


def bf16(build):
    """The same model, its loss computed under CPU bf16 autocast (weights and AdamW stay fp32)."""
    def wrapped(s):
        model, loss_fn = build(s)

        def loss_bf16(x):
            with torch.autocast("cpu", dtype=torch.bfloat16):
                return loss_fn(x)
        return model, loss_bf16
    return wrapped


def make_step(build, s):
    """Build one model and return a closure that runs one timed training step on a fixed batch."""
    torch.manual_seed(0)
    model, loss_fn = build(s)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x = torch.randn(s["batch"], 1, *([s["img"]] * s["sd"]))

    def step() -> tuple[float, float]:
        t0, c0 = time.perf_counter(), time.process_time()
        loss = loss_fn(x)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return time.perf_counter() - t0, time.process_time() - c0

    return step


def runnable(builders: dict, s) -> tuple[dict, dict[str, str]]:
    """Drop the models whose first step raises; return (kept builders, {label: error line})."""
    kept, failed = {}, {}
    for label, build in builders.items():
        try:
            make_step(build, s)()
            kept[label] = build
        except RuntimeError as exc:
            failed[label] = str(exc).splitlines()[0]
    return kept, failed


def matmul_share(s) -> float:
    """Share of one fp32 medmim MAE step's CPU time spent in GEMMs and fused attention."""
    from torch.profiler import profile

    step = make_step(medmim_mae, s)
    step()
    with profile() as prof:
        step()
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events)
    dense = sum(e.self_cpu_time_total for e in events
                if e.key in ("aten::mm", "aten::addmm", "aten::bmm") or "scaled_dot_product" in e.key)
    return dense / total


def time_interleaved(builders: dict, s, steps: int, warmup: int) -> dict[str, list[tuple[float, float]]]:
    """Round-robin one step of each model per round, so that a busy neighbour process on a shared
    machine slows all of them alike instead of whichever happened to be running. Each step records
    (wall seconds, process CPU seconds): CPU time counts the work done and hardly moves when other
    processes compete for the cores, wall time is what a quiet machine would show."""
    stepper = {label: make_step(build, s) for label, build in builders.items()}
    times = {label: [] for label in builders}
    for r in range(warmup + steps):
        for label, step in stepper.items():
            t = step()
            if r >= warmup:
                times[label].append(t)
    return times


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--quick", action="store_true", help="tiny sizes, no results file")
    ap.add_argument("--out", default=str(ROOT / "bench/results/mae.md"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    settings = QUICK if args.quick else SETTINGS
    candidates = {"medmim MAE": medmim_mae, "MONAI MAE": monai_mae, "full-token (SimMIM)": medmim_full_token,
                  "medmim MAE bf16": bf16(medmim_mae), "MONAI MAE bf16": bf16(monai_mae)}

    rows, ratios, notes = [], [], []
    t_start, load_start = time.perf_counter(), os.getloadavg()[0]
    for name, s in settings.items():
        models, failed = runnable(candidates, s)
        for label, err in failed.items():
            notes.append(f"- {name}: **{label} cannot run**: `{err}`")
            print(notes[-1], flush=True)
        share = matmul_share(s)
        notes.append(f"- {name}: {share:.0%} of a medmim fp32 step's CPU time is GEMM + fused "
                     "attention (torch.profiler), arithmetic both implementations share")
        print(notes[-1], flush=True)
        times = time_interleaved(models, s, args.steps, args.warmup)
        wall = {k: statistics.median(t[0] for t in v) for k, v in times.items()}
        best = {k: min(t[0] for t in v) for k, v in times.items()}
        cpu = {k: statistics.median(t[1] for t in v) for k, v in times.items()}
        for label in times:
            rows.append(f"| {name} | {s['batch']} | {label} | {wall[label] * 1000:.0f} "
                        f"| {best[label] * 1000:.0f} | {cpu[label] * 1000:.0f} |")
            print(rows[-1], flush=True)
        for stat, v in (("CPU time (median)", cpu), ("wall (median)", wall), ("wall (best)", best)):
            speedup = v["MONAI MAE"] / v["medmim MAE"]
            frac = v["medmim MAE"] / v["full-token (SimMIM)"]
            ratios.append(f"| {name} | {stat} | {speedup:.2f}x {'PASS' if speedup >= 1.3 else 'FAIL'} "
                          f"| {frac:.2f} {'PASS' if frac <= 0.4 else 'FAIL'} |")
            print(ratios[-1], flush=True)
        for stat, v in (("CPU time (median)", cpu), ("wall (median)", wall)):
            if "medmim MAE bf16" in v:
                monai_best = min(v[k] for k in ("MONAI MAE", "MONAI MAE bf16") if k in v)
                notes.append(f"- {name}, {stat}: fastest MONAI step / medmim bf16 step = "
                             f"{monai_best / v['medmim MAE bf16']:.2f}x; medmim fp32 / bf16 = "
                             f"{v['medmim MAE'] / v['medmim MAE bf16']:.2f}x")
                print(notes[-1], flush=True)
    total = time.perf_counter() - t_start

    text = "\n".join([
        "# MAE step-time benchmark",
        "",
        f"- date: {dt.date.today().isoformat()}",
        f"- machine: {platform.processor() or platform.machine()}, CPU, torch threads = {args.threads} "
        f"(2-core CPU), torch {torch.__version__}, Python {platform.python_version()}",
        f"- command: `.venv/bin/python bench/bench_mae.py {' '.join(sys.argv[1:])}` "
        f"(steps={args.steps}, warmup={args.warmup}, OMP_WAIT_POLICY={os.environ['OMP_WAIT_POLICY']}); "
        f"whole run {total:.0f} s",
        "- step = forward + backward + AdamW step, fp32 (rows marked bf16: the loss under CPU bf16 "
        "autocast, weights and optimizer fp32), random input; mask ratio 0.75; encoder MLP "
        "ratio 4; decoder 192 wide, 4 deep, 6 heads (ViT-S settings)",
        "- MONAI path: `monai.networks.nets.MaskedAutoEncoderViT` with the same sizes (qkv bias on, "
        "mlp_dim = 4 x width) and the same loss (MSE on hidden patches, raw pixels)",
        f"- 1-min load average at the start / end: {load_start:.2f} / {os.getloadavg()[0]:.2f} "
        "(a load above 2 means other processes shared the 2 cores; the models are timed round-robin, "
        "one step each per round, and CPU time is reported beside wall time)",
        "",
        "| setting | batch | model | wall median (ms) | wall best (ms) | CPU time median (ms) |",
        "|---|---|---|---|---|---|",
        *rows,
        "",
        "| setting | measured on | MONAI / medmim, both fp32 (goal >= 1.3x) | MAE / full-token (goal <= 0.4) |",
        "|---|---|---|---|",
        *ratios,
        "",
        *notes,
        "",
    ])
    print(text)
    if not args.quick:
        write_text(args.out, text)
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
