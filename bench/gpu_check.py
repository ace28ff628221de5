"""One prepared GPU check: every CUDA claim medmim makes, measured in one run of at most 8 minutes.

    python bench/gpu_check.py                          # on a CUDA server: bench/results/gpu/<date>.md + .json
    python bench/gpu_check.py --out /tmp/gpu           # results elsewhere
    python bench/gpu_check.py --quick --device cpu --out /tmp/q   # the same code at tiny sizes (CI)

Sections, in order of priority (each isolated: an error is one line of the report, the next section
still runs; a global time budget skips what no longer fits, with a note):

  setup       extra packages (spconv-cu12x by Python version; monai/einops if missing), each with a
              time limit; a package that cannot be installed is one line, not a crash
  env         GPU, driver, torch/CUDA/cuDNN versions, TF32 flags, which sparse variants exist
  sparse      SparK encoder outputs, loss and encoder gradients: every sparse variant (medmim's
              torch block kernel; spconv if installed) vs masked-dense, float32 (TF32 off), 2D + 3D
  bf16        MAE and SparK losses under bf16 autocast: finite, and close to the fp32 loss
  resume      pretraining cut off mid-epoch and resumed vs never interrupted, bit for bit
              (default kernels, then torch.use_deterministic_algorithms); runs in a child process
  mae         images/s and peak memory per step: MAE ViT-B/16 224^2 and 3D ViT-B/16 96^3, medmim vs
              MONAI MaskedAutoEncoderViT with the same loss, fp32 and bf16 (bench/bench_mae.py's models)
  spark       images/s and peak memory: SparK ResNet-50 224^2 and 3D ResNet-18 96^3, sparse vs
              masked-dense, encoder step (bench/bench_spark.py's step) and full pretext step
  data        share of a pretraining step spent waiting for data at 224^2, with the config's
              data.num_workers and data.cache (and with cache=none)

Timing: warm-up steps first, then CUDA events around every step (perf_counter on CPU); a step is
forward + backward (+ AdamW where said). Peak memory: torch.cuda.max_memory_allocated over the timed
steps, after reset_peak_memory_stats. What every number means: docs/gpu_server.md.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import datetime as dt
import faulthandler
import functools
import importlib
import json
import math
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
import typing
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as bench_mae: before torch loads libgomp

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

# --------------------------------------------------------------------------------------------
# sizes: the full run (a CUDA GPU) and --quick (tiny; the CI smoke run on CPU)
# --------------------------------------------------------------------------------------------

FULL = {
    "sparse": [dict(sd=2, arch="resnet50", img=224, batch=4), dict(sd=2, arch="convnext_tiny", img=224, batch=4),
               dict(sd=3, arch="resnet18", img=64, batch=2)],
    "bf16": dict(mae=dict(sd=2, img=224, patch=16, batch=16, enc=(768, 12, 12), dec=(512, 8, 16)),
                 spark=dict(sd=2, arch="resnet50", img=224, batch=16)),
    "resume": dict(img=96, patch=16, batch=8, n=24, epochs=2, fail_at=5),
    "mae": {"2D 224² ViT-B/16": dict(sd=2, img=224, patch=16, batch=64, enc=(768, 12, 12), dec=(512, 8, 16)),
            "3D 96³ ViT-B/16": dict(sd=3, img=96, patch=16, batch=16, enc=(768, 12, 12), dec=(512, 8, 16))},
    "spark": {"2D 224² ResNet-50": dict(sd=2, arch="resnet50", img=224, batch=32),
              "3D 96³ ResNet-18": dict(sd=3, arch="resnet18", img=96, batch=8)},
    "data": dict(img=224, source_px=512, n_images=256, batch=32, encoder="vit_base", patch=16),
    "spark_steps": ("encoder fwd+bwd", "SparK step fp32", "SparK step bf16"),
    "warmup": 3, "steps": 10,
}
_TINY_CNN = dict(small_input=True, base_channels=8)  # ratio 8: a 4x4 grid at 32^2
QUICK = {
    "sparse": [dict(sd=2, arch="resnet18", img=32, batch=2, kw=_TINY_CNN),
               dict(sd=2, arch="convnext_tiny", img=32, batch=2, kw=dict(small_input=True, base_channels=8,
                                                                        depths=(1, 1, 1, 1))),
               dict(sd=3, arch="resnet18", img=16, batch=2, kw=_TINY_CNN)],
    "bf16": dict(mae=dict(sd=2, img=32, patch=8, batch=2, enc=(96, 2, 3), dec=(48, 1, 2)),
                 spark=dict(sd=2, arch="resnet18", img=32, batch=2, kw=_TINY_CNN)),
    "resume": dict(img=32, patch=8, batch=4, n=8, epochs=2, fail_at=3, tiny=True),
    "mae": {"2D 32² tiny": dict(sd=2, img=32, patch=8, batch=2, enc=(96, 2, 3), dec=(48, 1, 2)),
            "3D 16³ tiny": dict(sd=3, img=16, patch=8, batch=1, enc=(96, 2, 3), dec=(48, 1, 2))},
    "spark": {"2D 32² ResNet-18 (tiny)": dict(sd=2, arch="resnet18", img=32, batch=2, kw=_TINY_CNN),
              "3D 16³ ResNet-18 (tiny)": dict(sd=3, arch="resnet18", img=16, batch=2, kw=_TINY_CNN)},
    "data": dict(img=32, source_px=48, n_images=16, batch=2, encoder="vit_tiny", patch=8),
    "spark_steps": ("encoder fwd+bwd", "SparK step bf16"),  # the fp32 step is the same code
    "warmup": 0, "steps": 1,
}
MASK_RATIO_SPARK = 0.6
# estimated seconds per section on one modern GPU (full) or a loaded 2-core CPU (quick): a section
# whose estimate no longer fits into what is left of the budget is skipped with a note
ESTIMATE_S = {"full": {"env": 5, "sparse": 30, "bf16": 25, "resume": 60, "mae": 90, "spark": 90, "data": 60},
              "quick": {"env": 1, "sparse": 3, "bf16": 3, "resume": 8, "mae": 5, "spark": 5, "data": 5}}
SECTIONS = ("env", "sparse", "bf16", "resume", "mae", "spark", "data")
TOL_BF16 = 3e-2  # |loss bf16 - loss fp32| / |loss fp32|


# --------------------------------------------------------------------------------------------
# report
# --------------------------------------------------------------------------------------------

class Report:
    """Sections in run order; written (markdown + JSON, atomically) after every section, so a run
    cut off by the slot's end still leaves what it measured."""

    def __init__(self, out_dir: Path, stem: str, meta: dict):
        self.md, self.json = out_dir / f"{stem}.md", out_dir / f"{stem}.json"
        self.meta, self.sections = meta, []

    def add(self, sec: dict) -> None:
        self.sections.append(sec)
        self.write()

    def write(self) -> None:
        from medmim.io import write_json, write_text

        write_json(self.json, {"meta": self.meta, "sections": self.sections})
        write_text(self.md, self.markdown())

    def markdown(self) -> str:
        m = self.meta
        lines = ["# GPU check", "", f"- date: {m['started']} (UTC)", f"- device: {m.get('device_name', m['device'])}",
                 f"- command: `{m['command']}`", f"- mode: {'quick (tiny sizes)' if m['quick'] else 'full'}; "
                 f"budget {m['budget_s']:.0f} s; whole run {m.get('elapsed_s', 0):.0f} s", ""]
        for sec in self.sections:
            head = f"## {sec['name']} — {sec['status']}"
            if sec.get("seconds") is not None:
                head += f" ({sec['seconds']:.1f} s)"
            lines += [head, ""]
            if sec.get("error"):
                lines += [f"**error**: `{sec['error']}`", ""]
            lines += [f"- {n}" for n in sec.get("notes", [])]
            rows = sec.get("rows") or []
            if rows:
                cols = list(dict.fromkeys(k for r in rows for k in r))
                lines += ["", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
                lines += ["| " + " | ".join(_fmt(r.get(c, "")) for c in cols) + " |" for r in rows]
            lines.append("")
        return "\n".join(lines) + "\n"


def _fmt(v) -> str:
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        if v != v:
            return "nan"
        return f"{v:.3g}" if (abs(v) < 1e-2 and v) or abs(v) >= 1e5 else f"{v:.3f}".rstrip("0").rstrip(".")
    return str(v).replace("|", "/")


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"[:400]


class SectionTimeout(Exception):
    pass


@contextlib.contextmanager
def _alarm(seconds: float):
    """Raise SectionTimeout in the main thread after ``seconds`` (a hung section cannot eat the slot)."""
    if not hasattr(signal, "SIGALRM") or seconds <= 0:
        yield
        return

    def handler(signum, frame):
        raise SectionTimeout(f"section ran past its limit of {seconds:.0f} s")

    old = signal.signal(signal.SIGALRM, handler)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def run_sections(sections: list[tuple[str, typing.Callable[[dict], dict | None], float]], report: Report,
                 deadline: float, device=None, limit_factor: float | None = None) -> None:
    """Run ``(name, fn, estimate_s)`` in order. ``fn(out)`` appends to ``out["rows"]`` /
    ``out["notes"]`` as it measures (or returns such a dict), so an exception or a timeout keeps the
    rows measured before it; the exception is the section's one error line. A section that no longer
    fits before ``deadline`` is skipped with a note, and so is everything after a failure that left
    the CUDA context unusable. ``limit_factor``: a section is stopped after that many times its
    estimate (+30 s), so that one hung kernel cannot eat the whole slot."""
    broken = None
    for name, fn, estimate in sections:
        left = deadline - time.monotonic()
        if broken:
            report.add({"name": name, "status": "skipped", "notes": [f"CUDA context unusable after '{broken}'; "
                        f"rerun with --sections {name}"]})
            continue
        if left < estimate:
            report.add({"name": name, "status": "skipped", "notes": [
                f"time budget: {max(left, 0):.0f} s left, the section needs ~{estimate:.0f} s"]})
            continue
        t0, c0 = time.monotonic(), time.process_time()
        print(f"[gpu_check] {name} ...", flush=True)
        sec, out = {"name": name}, {"rows": [], "notes": []}
        limit = left if limit_factor is None else min(left, limit_factor * estimate + 30)
        try:
            with _alarm(max(limit, 1.0)):
                got = fn(out)
            sec.update(status="ok", **{**out, **(got or {})})
        except Exception as exc:  # noqa: BLE001 - every failure is one line of the report
            sec.update(status="error", error=_one_line(exc), **out)
            traceback.print_exc()
            if device is not None and device.type == "cuda" and not _cuda_usable():
                broken = name
        sec["seconds"] = round(time.monotonic() - t0, 2)
        sec["cpu_seconds"] = round(time.process_time() - c0, 2)
        _free(device)
        report.add(sec)
        print(f"[gpu_check] {name}: {sec['status']} ({sec['seconds']:.1f} s)"
              + (f" {sec['error']}" if sec.get("error") else ""), flush=True)


def _cuda_usable() -> bool:
    import torch

    try:
        torch.zeros(1, device="cuda").add_(1)
        torch.cuda.synchronize()
        return True
    except Exception:  # noqa: BLE001
        return False


def _free(device) -> None:
    import gc

    gc.collect()
    if device is not None and device.type == "cuda":
        import torch

        with contextlib.suppress(Exception):
            torch.cuda.empty_cache()


# --------------------------------------------------------------------------------------------
# setup: packages, each under a time limit
# --------------------------------------------------------------------------------------------

def spconv_wheel() -> str:
    """The CUDA spconv wheel for this Python (pyproject's `cuda` extra): cu120 has no cp312 wheel."""
    return "spconv-cu126" if sys.version_info >= (3, 12) else "spconv-cu120"


def _dist_version(name: str) -> str | None:
    from importlib import metadata

    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def pip_install(spec: str, timeout_s: float, wheelhouse: str | None) -> tuple[bool, str]:
    """``pip install spec`` in this interpreter, no retries, killed after ``timeout_s``."""
    cmd = [sys.executable, "-m", "pip", "install", "--disable-pip-version-check", "--retries", "0",
           "--timeout", "15", spec]
    if wheelhouse:
        cmd[4:4] = ["--no-index", "--find-links", wheelhouse]
    try:
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return False, f"pip install {spec}: no result within {timeout_s:.0f} s"
    except OSError as exc:
        return False, f"pip install {spec}: {_one_line(exc)}"
    if res.returncode != 0:
        tail = [ln for ln in (res.stderr or res.stdout).strip().splitlines() if ln.strip()]
        return False, f"pip install {spec} failed: {tail[-1][:200] if tail else 'exit ' + str(res.returncode)}"
    importlib.invalidate_caches()
    return True, f"pip install {spec}: installed"


def setup_packages(cuda: bool, install: bool, timeout_s: float, wheelhouse: str | None) -> dict:
    """Import what the check needs; install what is missing (when allowed), one line per package."""
    notes, rows = [], []
    needed = [("monai", "monai"), ("einops", "einops"), ("safetensors", "safetensors"), ("pydantic", "pydantic"),
              ("yaml", "pyyaml")]
    for module, spec in needed:
        status = "present"
        if importlib.util.find_spec(module) is None:
            if install:
                ok, line = pip_install(spec, timeout_s, wheelhouse)
                notes.append(line)
                status = "installed" if ok else "MISSING"
            else:
                status = "MISSING (install disabled)"
        rows.append({"package": spec, "status": status, "version": _dist_version(spec) or ""})
    cuda_dists = [d for d in ("spconv-cu126", "spconv-cu124", "spconv-cu121", "spconv-cu120", "spconv-cu118")
                  if _dist_version(d)]
    cpu_spconv = _dist_version("spconv")
    if cuda and not cuda_dists:
        wheel = spconv_wheel()
        if cpu_spconv:
            notes.append(f"the CPU package spconv {cpu_spconv} is installed; {wheel} is not installed beside it "
                         f"(both provide the module `spconv`): `pip uninstall spconv && pip install {wheel}` "
                         "to time spconv on this GPU")
        elif install:
            ok, line = pip_install(wheel, timeout_s, wheelhouse)
            notes.append(line)
            if ok:
                cuda_dists = [wheel]
        else:
            notes.append(f"{wheel} not installed (install disabled): the spconv rows are skipped")
    for d in cuda_dists:
        rows.append({"package": d, "status": "present", "version": _dist_version(d)})
    if cpu_spconv:
        rows.append({"package": "spconv (CPU build)", "status": "present", "version": cpu_spconv})
    return {"rows": rows, "notes": notes}


# --------------------------------------------------------------------------------------------
# helpers shared by the sections
# --------------------------------------------------------------------------------------------

class Timer:
    """Per-step wall time: CUDA events on a GPU (recorded on the current stream), perf_counter
    after a synchronize-free step on CPU."""

    def __init__(self, device):
        self.device = device

    def __call__(self, fn, warmup: int, steps: int) -> list[float]:
        import torch

        for _ in range(warmup):
            fn()
        cuda = self.device.type == "cuda"
        if cuda:
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            pairs = []
            for _ in range(steps):
                a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                a.record()
                fn()
                b.record()
                pairs.append((a, b))
            torch.cuda.synchronize(self.device)
            return [a.elapsed_time(b) / 1000 for a, b in pairs]
        out = []
        for _ in range(steps):
            t = time.perf_counter()
            fn()
            out.append(time.perf_counter() - t)
        return out


def peak_gib(device) -> float | None:
    import torch

    if device.type != "cuda":
        return None
    return torch.cuda.max_memory_allocated(device) / 2 ** 30


def autocast(device, bf16: bool):
    import torch

    return torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()


@contextlib.contextmanager
def strict_fp32():
    """float32 without TF32 (cuDNN convs default to TF32 on Ampere and later)."""
    import torch

    old = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = old


def sparse_variants() -> dict[str, tuple[str, dict]]:
    """SparK execution variants other than masked-dense, as ``{label: (backend, encoder kwargs)}``.

    Found through the public config (``pretrain.backend``'s allowed values); where spconv is not a
    backend of its own but a sparse ``kernel=`` of the encoder, that kernel is added as a variant."""
    from medmim.config import PretrainConfig

    backends = [b for b in typing.get_args(PretrainConfig.model_fields["backend"].annotation) if b != "dense"]
    out = {b: (b, {}) for b in backends}
    if not any("spconv" in b for b in backends):
        try:
            from medmim.models import sparse as ms
            kernels = getattr(ms, "KERNELS", ())
        except ImportError:
            kernels = ()
        if "spconv" in kernels and "sparse" in backends:
            out["sparse kernel=spconv"] = ("sparse", {"kernel": "spconv"})
    return out


def _with_encoder_kwargs(encoder, kwargs: dict):
    """Make every call of ``encoder`` pass ``kwargs`` (e.g. a sparse kernel) through the pretext."""
    if kwargs:
        encoder.forward = functools.partial(type(encoder).forward, encoder, **kwargs)
    return encoder


def build_spark(s: dict, backend: str, kwargs: dict, device):
    """A SparK pretext for size dict ``s`` (arch, sd, img, optional encoder kw) with ``backend``."""
    from medmim.config import PretrainConfig
    from medmim.models import build_encoder, build_pretext

    enc = build_encoder(s["arch"], spatial_dims=s["sd"], in_channels=1, img_size=s["img"], **s.get("kw", {}))
    cfg = PretrainConfig(method="spark", backend=backend, mask_ratio=MASK_RATIO_SPARK, decoder_dim=128)
    model = build_pretext(cfg, _with_encoder_kwargs(enc, kwargs))
    return model.to(device)


def _spark_mask(model, batch: int, img: int, sd: int, device, seed: int = 0):
    from medmim.masking import random_mask

    grid = (img // model.encoder.downsample_ratio,) * sd
    return random_mask(batch, grid, MASK_RATIO_SPARK, generator=__import__("torch").Generator().manual_seed(seed)).to(device)


def _missing_spconv(exc: BaseException) -> bool:
    return isinstance(exc, ImportError) or "spconv" in str(exc) and "No module" in str(exc)


# --------------------------------------------------------------------------------------------
# sections
# --------------------------------------------------------------------------------------------

def section_env(out: dict, device) -> dict:
    import torch

    rows = [{"what": "python", "value": platform.python_version()},
            {"what": "torch", "value": torch.__version__},
            {"what": "torch CUDA", "value": str(torch.version.cuda)},
            {"what": "cuDNN", "value": str(torch.backends.cudnn.version())},
            {"what": "TF32 matmul / cuDNN (torch defaults, used by the throughput rows)",
             "value": f"{torch.backends.cuda.matmul.allow_tf32} / {torch.backends.cudnn.allow_tf32}"}]
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        rows += [{"what": "GPU", "value": f"{p.name}, {p.total_memory / 2**30:.0f} GiB, sm_{p.major}{p.minor}, "
                  f"{p.multi_processor_count} SMs"},
                 {"what": "GPUs visible", "value": torch.cuda.device_count()},
                 {"what": "bf16 supported", "value": torch.cuda.is_bf16_supported()}]
        with contextlib.suppress(Exception):
            smi = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                 capture_output=True, text=True, timeout=10)
            rows.append({"what": "driver", "value": smi.stdout.strip().splitlines()[0]})
    else:
        rows.append({"what": "device", "value": f"CPU, {torch.get_num_threads()} torch threads"})
    rows.append({"what": "SparK sparse variants", "value": ", ".join(sparse_variants()) or "none"})
    return {"rows": rows}


def section_sparse(out: dict, device, sizes) -> dict:
    """Sparse vs masked-dense: encoder maps, loss and encoder gradients, same weights and mask.

    The exact check is float64: every variant that runs in float64 must equal masked-dense float64
    to 1e-9. In float32 (TF32 off) every result is scored against masked-dense float64, beside a
    noise floor: the largest error of masked-dense float32 itself over its unperturbed input and two
    inputs perturbed by 1e-7 (relative). A variant passes when each error is within 10x that floor
    (+1e-6). Why a floor: with few active sites a ReLU input within rounding of 0 flips, and
    gradients upstream of it move by ~1e-2 in float32 for either backend (measured on CPU)."""
    import torch

    rows, notes = out["rows"], out["notes"]
    variants = sparse_variants()
    with strict_fp32():
        for s in sizes["sparse"]:
            tag = f"{s['sd']}D {s['arch']} {s['batch']}x{s['img']}^{s['sd']}"
            torch.manual_seed(0)
            ref = build_spark(s, "dense", {}, device)
            state = ref.state_dict()
            x = torch.randn(s["batch"], 1, *[s["img"]] * s["sd"], device=device)
            mask = _spark_mask(ref, s["batch"], s["img"], s["sd"], device)
            ref64 = _spark_pass(copy.deepcopy(ref).double(), x.double(), mask)
            g = torch.Generator(device=device).manual_seed(1)
            floor = {}
            for i in range(3):
                xp = x if i == 0 else x * (1 + 1e-7 * torch.randn(x.shape, generator=g, device=device))
                e = _errors(_spark_pass(copy.deepcopy(ref), xp, mask), ref64)
                floor = {k: max(floor.get(k, 0.0), e[k]) for k in JUDGED}
            rows.append({"setting": tag, "variant": "masked-dense fp32 (noise floor)", "visible cells":
                         f"{int((~mask).sum())}/{mask.numel()}", **{f"fp32 {k}": v for k, v in floor.items()}})
            for label, (backend, kw) in variants.items():
                try:
                    model = build_spark(s, backend, kw, device)
                    model.load_state_dict(state)
                    err = _errors(_spark_pass(model, x, mask), ref64)
                except Exception as exc:  # noqa: BLE001 - one variant failing is one row, the others still run
                    if _missing_spconv(exc):
                        notes.append(f"{tag} {label}: not run, spconv is not importable ({_one_line(exc)})")
                    else:
                        rows.append({"setting": tag, "variant": label, "error": _one_line(exc), "pass": False})
                    continue
                try:
                    e64 = _errors(_spark_pass(model.double(), x.double(), mask), ref64)
                    e64 = max(e64[k] for k in JUDGED)
                except Exception as exc:  # noqa: BLE001 - e.g. spconv has no float64 kernels
                    e64 = f"not run ({_one_line(exc)[:80]})"
                ok32 = all(err[k] <= 10 * floor[k] + 1e-6 for k in JUDGED)
                ok64 = not isinstance(e64, float) or e64 <= 1e-9
                rows.append({"setting": tag, "variant": label, "visible cells": f"{int((~mask).sum())}/{mask.numel()}",
                             **{f"fp32 {k}": v for k, v in err.items()}, "fp64 vs dense fp64": e64,
                             "pass": ok32 and ok64})
                del model
            del ref
    notes.append("errors against masked-dense in float64 (same weights, input and mask): maps = max over stages "
                 "of ||a-b||/||b||; grads = max over encoder parameters of ||a-b||/||b|| (worst grad: which); "
                 "loss = |a-b|/|b|. float32 with TF32 off, train-mode batch norm. pass: fp64 vs dense fp64 <= "
                 "1e-9 where the variant runs in float64, and each fp32 error <= 10 x the noise floor + 1e-6")
    return {"rows": rows, "notes": notes}


def _errors(out: dict, ref: dict) -> dict:
    """Norm-relative errors of a pass against a reference pass (see section_sparse)."""
    def nrel(a, b):
        a, b = a.detach().double(), b.detach().double()
        return float((a - b).norm() / b.norm().clamp(min=1e-30))

    grads = {k: nrel(out["grads"][k], ref["grads"][k]) for k in ref["grads"]}
    worst = max(grads, key=grads.get)
    return {"maps err": max(nrel(a, b) for a, b in zip(out["feats"], ref["feats"])),
            "grads err": grads[worst], "loss err": abs(out["loss"] - ref["loss"]) / max(abs(ref["loss"]), 1e-30),
            "worst grad": worst}


JUDGED = ("maps err", "grads err", "loss err")


def _spark_pass(model, x, mask) -> dict:
    feats = []
    hook = model.encoder.register_forward_hook(lambda m, i, o: feats.extend(t.detach().clone() for t in o))
    try:
        model.zero_grad(set_to_none=True)
        out = model(x, mask=mask)
        out["loss"].backward()
    finally:
        hook.remove()
    grads = {k: p.grad.detach().clone() for k, p in model.encoder.named_parameters() if p.grad is not None}
    return {"feats": feats, "grads": grads, "loss": float(out["loss"].detach())}


def section_bf16(out: dict, device, sizes) -> dict:
    """The same batch, mask and weights: the loss (and gradient norm) in fp32 and under bf16 autocast."""
    import torch

    from bench_mae import medmim_mae

    rows = out["rows"]
    s = sizes["bf16"]["mae"]
    name = f"MAE ViT {s['enc'][0]}x{s['enc'][1]} {s['sd']}D {s['batch']}x{s['img']}^{s['sd']}"
    try:  # each model is one row, an error too
        torch.manual_seed(0)
        model, _ = medmim_mae(s)
        model.to(device)
        x = torch.randn(s["batch"], 1, *[s["img"]] * s["sd"], device=device)
        rows.append(_loss_pair(name, lambda: model(x, generator=torch.Generator().manual_seed(0))["loss"],
                               model, device))
    except Exception as exc:  # noqa: BLE001
        rows.append({"model": name, "error": _one_line(exc)})
    model = None
    _free(device)
    s = sizes["bf16"]["spark"]
    for label, (backend, kw) in {"masked-dense": ("dense", {}), **sparse_variants()}.items():
        torch.manual_seed(0)
        try:
            m = build_spark(s, backend, kw, device)
        except ImportError:
            continue
        x = torch.randn(s["batch"], 1, *[s["img"]] * s["sd"], device=device)
        mask = _spark_mask(m, s["batch"], s["img"], s["sd"], device)
        name = f"SparK {s['arch']} {label} {s['sd']}D {s['batch']}x{s['img']}^{s['sd']}"
        try:
            rows.append(_loss_pair(name, lambda: m(x, mask=mask)["loss"], m, device))
        except Exception as exc:  # noqa: BLE001 - a variant without bf16 kernels is one row
            rows.append({"model": name, "error": _one_line(exc)})
        m = None
        _free(device)
    return {"rows": rows, "notes": [f"pass: both losses and gradient norms finite and |bf16 - fp32| / fp32 loss "
                                    f"<= {TOL_BF16:g}; fp32 rows with TF32 off; batch norm in eval mode so "
                                    "both passes see the same statistics"]}


def _loss_pair(name, loss_fn, model, device) -> dict:
    import torch

    model.eval()  # the same normalisation statistics in both passes (train-mode BN would update them)
    res = {}
    with strict_fp32():
        for tag, bf16 in (("fp32", False), ("bf16", True)):
            model.zero_grad(set_to_none=True)
            with autocast(device, bf16):
                loss = loss_fn()
            loss.float().backward()
            gn = torch.sqrt(sum((p.grad.float() ** 2).sum() for p in model.parameters() if p.grad is not None))
            res[tag] = (float(loss.detach()), float(gn))
    model.train()
    (l32, g32), (l16, g16) = res["fp32"], res["bf16"]
    rel = abs(l16 - l32) / max(abs(l32), 1e-12)
    finite = all(math.isfinite(v) for v in (l32, l16, g32, g16))
    return {"model": name, "loss fp32": l32, "loss bf16": l16, "rel diff": rel,
            "grad norm fp32": g32, "grad norm bf16": g16, "pass": finite and rel <= TOL_BF16}


def section_resume(out: dict, device, quick: bool, timeout_s: float) -> dict:
    """Run the resume check in a child process: it needs CUBLAS_WORKSPACE_CONFIG set before CUDA
    starts and deterministic algorithms switched on, which must not leak into the timed sections."""
    rows, notes = out["rows"], out["notes"]
    # CPU kernels are deterministic already: one child there; on CUDA, default kernels and then
    # torch.use_deterministic_algorithms (with the cuBLAS workspace setting it requires)
    for deterministic in ((False, True) if device.type == "cuda" else (False,)):
        env = dict(os.environ)
        if deterministic:
            env["CUBLAS_WORKSPACE_CONFIG"] = ":4096:8"
        cmd = [sys.executable, str(Path(__file__).resolve()), "--child-resume", "--device", str(device)]
        cmd += ["--quick"] if quick else []
        cmd += ["--deterministic"] if deterministic else []
        t0 = time.monotonic()
        try:
            res = subprocess.run(cmd, capture_output=True, text=True, timeout=max(timeout_s / 2, 5), env=env)
        except subprocess.TimeoutExpired:
            notes.append(f"deterministic={deterministic}: no result within {timeout_s / 2:.0f} s")
            continue
        timeout_s -= time.monotonic() - t0
        line = next((ln for ln in reversed(res.stdout.splitlines()) if ln.startswith("{")), None)
        if res.returncode != 0 or line is None:
            err = [ln for ln in res.stderr.strip().splitlines() if ln.strip()]
            notes.append(f"deterministic={deterministic}: child failed (exit {res.returncode}): "
                         f"{err[-1][:300] if err else 'no output'}")
            continue
        rows.extend(json.loads(line)["rows"])
    if not rows:
        raise RuntimeError("; ".join(notes) or "no resume result")
    notes.append("bit-identical: every parameter, buffer and the final loss equal (torch.equal) between a run "
                 "cut off mid-epoch (checkpoint every optimizer step, resumed from last.pt) and one never "
                 "interrupted; precision as run.precision=auto (bf16 autocast on CUDA)")
    return {"rows": rows, "notes": notes}


def child_resume(device_name: str, quick: bool, deterministic: bool) -> None:
    """(child process) MAE and SparK pretraining through medmim's loop, cut off and resumed."""
    import torch

    from medmim.config import PretrainConfig
    from medmim.data.dataset import make_loader
    from medmim.models import build_encoder, build_pretext
    from medmim.train.loop import Runtime, fit, resolve_precision
    from medmim.train.rundir import RunDir, seed_everything
    from medmim.train.tasks import PretrainTask

    warn_count = 0
    if deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
    device = torch.device(device_name)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    runtime = Runtime(device, resolve_precision("auto", device.type))
    s = (QUICK if quick else FULL)["resume"]
    tmp = Path(tempfile.mkdtemp(prefix="medmim_gpu_resume_"))

    class CutTask(PretrainTask):
        def __init__(self, pretext, fail_at=None):
            super().__init__(pretext)
            self.calls, self.fail_at = 0, fail_at

        def training_step(self, model, batch):
            self.calls += 1
            if self.fail_at is not None and self.calls == self.fail_at:
                raise KeyboardInterrupt("simulated kill")
            return super().training_step(model, batch)

    g = torch.Generator().manual_seed(5)
    items = [{"image": torch.rand(1, s["img"], s["img"], generator=g)} for _ in range(s["n"])]
    setups = {"MAE ViT (small)": ("vit_small", "mae"), "SparK resnet18 (narrow) sparse": ("resnet18", "spark")}
    rows = []
    import warnings
    for label, (arch, method) in setups.items():
        # small models (checkpoints are written every step), real CUDA kernels all the same
        if method == "mae":
            kw = dict(patch_size=s["patch"], embed_dim=64 if s.get("tiny") else 192, depth=2 if s.get("tiny") else 4,
                      num_heads=2 if s.get("tiny") else 3)
        else:
            kw = dict(_TINY_CNN) if s.get("tiny") else {"base_channels": 32}
        settings = PretrainConfig(method=method, epochs=s["epochs"], batch_size=s["batch"], lr=1e-3,
                                  checkpoint_every_steps=1, decoder_dim=32 if s.get("tiny") else 128,
                                  mask_ratio=0.75 if method == "mae" else MASK_RATIO_SPARK)

        def run(out: Path, fail_at=None, resume=False):
            seed_everything(3, 1 if device.type == "cpu" else None)
            enc = build_encoder(arch, spatial_dims=2, in_channels=1, img_size=s["img"], **kw)
            task = CutTask(build_pretext(settings, enc), fail_at)
            loader = make_loader(items, s["batch"], shuffle=True, seed=3, drop_last=True)
            result = fit(task, loader, settings, RunDir.create(out), runtime, resume=resume, stage="pretrain",
                         log=lambda m: None)
            return result, {k: v.detach().cpu().clone() for k, v in task.model.state_dict().items()}

        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            ref_res, ref = run(tmp / f"{method}_ref")
            try:
                run(tmp / f"{method}_cut", fail_at=s["fail_at"])
            except KeyboardInterrupt:
                pass
            got_res, got = run(tmp / f"{method}_cut", resume=True)
        warn_count = sum("deterministic" in str(w.message) for w in caught)
        differ = [k for k in ref if not torch.equal(ref[k], got[k])]
        diff = max((float((ref[k].double() - got[k].double()).abs().max()) for k in differ), default=0.0)
        rows.append({"pretext": label, "deterministic algorithms": deterministic,
                     "bit-identical": not differ and ref_res.get("train_loss") == got_res.get("train_loss"),
                     "tensors differing": f"{len(differ)}/{len(ref)}", "max abs diff": diff,
                     "final loss ref / resumed": f"{ref_res.get('train_loss'):.6g} / {got_res.get('train_loss'):.6g}",
                     "non-deterministic op warnings": warn_count if deterministic else ""})
    print(json.dumps({"rows": rows}))


def section_mae(out: dict, device, sizes, deadline) -> dict:
    """Images/s and peak memory: medmim MAE vs MONAI MaskedAutoEncoderViT (same loss), fp32 and bf16."""
    import torch

    from bench_mae import medmim_mae, monai_mae

    timer, rows, notes = Timer(device), out["rows"], out["notes"]
    for setting, s in sizes["mae"].items():
        per = {}
        for label, build in (("medmim MAE", medmim_mae), ("MONAI MaskedAutoEncoderViT", monai_mae)):
            for bf16 in (False, True):
                if time.monotonic() > deadline:
                    notes.append(f"{setting} {label}{' bf16' if bf16 else ''}: skipped, out of time")
                    continue
                name = f"{label}{' bf16' if bf16 else ' fp32'}"
                try:
                    torch.manual_seed(0)
                    model, loss_fn = build(s)
                    model.to(device)
                    step = _train_step(model, loss_fn, s, device, bf16)
                    times = timer(step, sizes["warmup"], sizes["steps"])
                except Exception as exc:  # noqa: BLE001 - a model that cannot run is a row, not a crash
                    rows.append({"setting": setting, "model": name, "batch": s["batch"], "error": _one_line(exc)})
                    model = step = None
                    _free(device)
                    continue
                med = statistics.median(times)
                per[name] = med
                rows.append({"setting": setting, "model": name, "batch": s["batch"], "step ms (median)": med * 1e3,
                             "images/s": s["batch"] / med, "peak GiB": peak_gib(device)})
                model = step = None
                _free(device)
        for prec in ("fp32", "bf16"):
            a, b = per.get(f"medmim MAE {prec}"), per.get(f"MONAI MaskedAutoEncoderViT {prec}")
            if a and b:
                notes.append(f"{setting} {prec}: MONAI step / medmim step = {b / a:.2f}x")
    for setting, s in sizes["mae"].items():
        notes.append(f"{setting}: encoder {s['enc'][0]} wide, {s['enc'][1]} deep, {s['enc'][2]} heads; decoder "
                     f"{s['dec'][0]} wide, {s['dec'][1]} deep, {s['dec'][2]} heads; patch {s['patch']}")
    notes.append("step = forward + backward + AdamW step on a fixed random batch; loss for both = MSE on the "
                 "hidden patches (raw pixels, no norm-pix), mask ratio 0.75, encoder MLP ratio 4; bf16 = "
                 "torch.autocast, weights and AdamW in fp32. A model that cannot run is a row with its error")
    return {"rows": rows, "notes": notes}


def _train_step(model, loss_fn, s, device, bf16: bool):
    import torch

    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x = torch.randn(s["batch"], 1, *([s["img"]] * s["sd"]), device=device)

    def step():
        with autocast(device, bf16):
            loss = loss_fn(x)
        opt.zero_grad(set_to_none=True)
        loss.float().backward()
        opt.step()
    return step


def section_spark(out: dict, device, sizes, deadline) -> dict:
    """Images/s and peak memory: SparK encoder step and full pretext step, sparse vs masked-dense."""
    import torch

    from bench_spark import encoder_step

    timer, rows, notes = Timer(device), out["rows"], out["notes"]
    variants = {"masked-dense": ("dense", {}), **sparse_variants()}
    for setting, s in sizes["spark"].items():
        x = torch.randn(s["batch"], 1, *[s["img"]] * s["sd"], device=device)
        dense_ms = {}
        for what in sizes["spark_steps"]:
            for label, (backend, kw) in variants.items():
                if time.monotonic() > deadline:
                    notes.append(f"{setting} {what} {label}: skipped, out of time")
                    continue
                try:
                    torch.manual_seed(0)
                    model = build_spark(s, backend, kw, device)
                    mask = _spark_mask(model, s["batch"], s["img"], s["sd"], device)
                    if what.startswith("encoder"):
                        enc = model.encoder
                        fn = encoder_step(enc, x, mask, backend, kw.get("kernel", "torch"))
                    else:
                        fn = _train_step(model, lambda inp: model(inp, mask=mask)["loss"], s, device,
                                         what.endswith("bf16"))
                    times = timer(fn, sizes["warmup"], sizes["steps"])
                except Exception as exc:  # noqa: BLE001
                    if _missing_spconv(exc):
                        notes.append(f"{setting} {label}: spconv not importable, not timed")
                    else:
                        rows.append({"setting": setting, "step": what, "variant": label, "error": _one_line(exc)})
                    model = fn = None
                    _free(device)
                    continue
                med = statistics.median(times)
                if label == "masked-dense":
                    dense_ms[what] = med
                base = dense_ms.get(what)
                rows.append({"setting": setting, "step": what, "variant": label, "batch": s["batch"],
                             "step ms (median)": med * 1e3, "images/s": s["batch"] / med,
                             "/ masked-dense": med / base if base else "", "peak GiB": peak_gib(device)})
                model = fn = None
                _free(device)
    notes.append(f"mask ratio {MASK_RATIO_SPARK:.0%}, uniform random cells; encoder fwd+bwd = "
                 "bench/bench_spark.py's encoder_step (sum of the stage means backpropagated); SparK step = "
                 "forward + backward + AdamW of the whole pretext (decoder 128 wide); '/ masked-dense' < 1 means "
                 "the sparse variant is faster")
    return {"rows": rows, "notes": notes}


def section_data(out: dict, device, sizes, config: str | None, overrides: list[str]) -> dict:
    """Share of a pretraining step spent waiting for the next batch, with the config's workers."""
    import numpy as np
    import torch
    from PIL import Image

    from medmim.config import load_config
    from medmim.data.augment import augment_batch
    from medmim.data.dataset import make_loader, materialize, prepare_data, pretrain_transforms
    from medmim.data.manifest import write_manifest
    from medmim.models import build_pretext, encoder_from_config

    s = sizes["data"]
    tmp = Path(tempfile.mkdtemp(prefix="medmim_gpu_data_"))
    rng = np.random.default_rng(0)
    rows_m = []
    yy, xx = np.mgrid[:s["source_px"], :s["source_px"]] / s["source_px"]
    for i in range(s["n_images"]):  # smooth X-ray-like 8-bit PNGs, larger than the network input
        img = 0.5 + 0.3 * np.sin(6 * xx + i) * np.cos(4 * yy) + 0.05 * rng.standard_normal(xx.shape)
        p = tmp / "img" / f"im{i:04d}.png"
        p.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray((np.clip(img, 0, 1) * 255).astype(np.uint8)).save(p)
        rows_m.append({"image": str(p), "patient_id": f"p{i:04d}", "label": i % 2})
    manifest = write_manifest(rows_m, tmp / "manifest.csv")
    base = list(overrides) + [
        "data.source=manifest", f"data.path={manifest}", "data.spatial_dims=2", f"data.image_size={s['img']}",
        "data.modality=xray", f"data.cache_dir={tmp / 'cache'}"]
    if config is None:
        base += [f"pretrain.batch_size={s['batch']}", f"encoder.name={s['encoder']}", f"encoder.patch_size={s['patch']}", "pretrain.method=mae"]
        if s["encoder"] == "vit_tiny":
            base += ["encoder.embed_dim=64", "encoder.depth=2", "encoder.num_heads=2", "pretrain.decoder_dim=32"]
    rows, notes = out["rows"], out["notes"]
    cfg0 = load_config(config, base)
    for cache in dict.fromkeys([cfg0.data.cache, "none"]):
        cfg = load_config(config, base + [f"data.cache={cache}"])
        data = prepare_data(cfg)
        t0 = time.perf_counter()
        items = materialize(data.pretrain_records(), cfg.data, data.preset)
        prep = time.perf_counter() - t0
        loader = make_loader(items, cfg.pretrain.batch_size, shuffle=True, seed=0,
                             augment=pretrain_transforms(cfg.data), drop_last=True,
                             num_workers=cfg.data.num_workers)
        torch.manual_seed(0)
        model = build_pretext(cfg.pretrain, encoder_from_config(cfg.encoder, 2, cfg.data.image_size)).to(device)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
        waits, computes = [], []
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        it = iter(loader)
        while True:
            t = time.perf_counter()
            try:
                batch = next(it)
            except StopIteration:
                break
            t_data = time.perf_counter()
            # as the training loop: host-to-device copy, then the batched augmentation on the device
            x = augment_batch(loader, {"image": batch["image"].to(device, non_blocking=True)})["image"]
            with autocast(device, device.type == "cuda"):
                loss = model(x)["loss"]
            opt.zero_grad(set_to_none=True)
            loss.float().backward()
            opt.step()
            float(loss)  # the loop reads the loss once per batch: a synchronisation point
            waits.append(t_data - t)
            computes.append(time.perf_counter() - t_data)
        w, c = sum(waits[1:]), sum(computes[1:])  # the first batch (worker start-up, cuDNN set-up) excluded
        if not waits[1:]:
            raise RuntimeError(f"{len(waits)} batches: too few to time (needs >= 2)")
        rows.append({"data.cache": cache, "data.num_workers": cfg.data.num_workers, "batch": cfg.pretrain.batch_size,
                     "model": f"{cfg.pretrain.method} {cfg.encoder.name}", "timed batches": len(waits) - 1,
                     "wait ms / step": 1e3 * w / (len(waits) - 1), "compute ms / step": 1e3 * c / (len(waits) - 1),
                     "waiting share": w / (w + c), "preparation s (once)": prep, "peak GiB": peak_gib(device)})
        del model, opt, loader
        _free(device)
    notes.append(f"{s['n_images']} synthetic 8-bit PNGs of {s['source_px']}² read by medmim's one chain and "
                 f"resized to {s['img']}²; step = next(batch) + host-to-device copy + batched augmentation + forward/backward/AdamW "
                 "(bf16 autocast on CUDA) + one loss read, as the training loop does it")
    notes.append("config: " + (config or "medmim defaults") + ", overrides: " + " ".join(base))
    return {"rows": rows, "notes": notes}


# --------------------------------------------------------------------------------------------
# main
# --------------------------------------------------------------------------------------------

def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="auto", help="auto (cuda if available), cuda, cuda:N or cpu")
    ap.add_argument("--quick", action="store_true", help="tiny sizes: the CI smoke run of the same code")
    ap.add_argument("--out", default=None, help="results folder (default: bench/results/gpu on CUDA; "
                    "required for CPU runs, which never write into the repository)")
    ap.add_argument("--budget-s", type=float, default=420.0,
                    help="wall-clock budget from start, setup included (default 420 = 7 min)")
    ap.add_argument("--sections", default=",".join(SECTIONS), help="comma list, from: " + ",".join(SECTIONS))
    ap.add_argument("--no-install", action="store_true", help="never run pip")
    ap.add_argument("--install-timeout-s", type=float, default=120.0, help="limit for each pip install")
    ap.add_argument("--wheelhouse", default=None, help="install from this folder of wheels (no index)")
    ap.add_argument("-c", "--config", default=None, help="config for the data-path section (default: defaults)")
    ap.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides for the data section")
    ap.add_argument("--child-resume", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--deterministic", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    started, t_start = dt.datetime.now(dt.timezone.utc), time.monotonic()
    deadline = t_start + args.budget_s

    if args.child_resume:
        if args.device == "cpu":
            import torch
            torch.set_num_threads(1)
        child_resume(args.device, args.quick, args.deterministic)
        return 0

    import torch

    want_cuda = args.device.startswith("cuda") or (args.device == "auto" and torch.cuda.is_available())
    if want_cuda and not torch.cuda.is_available():
        print("gpu_check: --device cuda but torch sees no CUDA device "
              f"(torch {torch.__version__}, CUDA build {torch.version.cuda})", file=sys.stderr)
        return 2
    device = torch.device(args.device if args.device.startswith("cuda") else ("cuda" if want_cuda else "cpu"))
    if device.type == "cuda":
        torch.cuda.set_device(device)
    else:
        torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1") or 1))
    if args.out is None:
        if device.type != "cuda":
            print("gpu_check: a CPU run needs --out (only GPU results go to bench/results/gpu)", file=sys.stderr)
            return 2
        args.out = str(ROOT / "bench" / "results" / "gpu")
    out_dir = Path(args.out)
    stem = started.strftime("%Y-%m-%d")
    if (out_dir / f"{stem}.md").exists():
        stem = started.strftime("%Y-%m-%d_%H%M")

    mode = "quick" if args.quick else "full"
    sizes = QUICK if args.quick else FULL
    wanted = [s.strip() for s in args.sections.split(",") if s.strip()]
    unknown = [s for s in wanted if s not in SECTIONS]
    if unknown:
        print(f"gpu_check: unknown section(s) {unknown}; choose from {', '.join(SECTIONS)}", file=sys.stderr)
        return 2
    meta = {"started": started.isoformat(timespec="seconds"), "device": str(device), "quick": args.quick,
            "budget_s": args.budget_s, "command": "python bench/gpu_check.py " + " ".join(sys.argv[1:] if argv is None
                                                                                        else argv),
            "python": platform.python_version(), "torch": torch.__version__, "host": platform.node()}
    if device.type == "cuda":
        meta["device_name"] = torch.cuda.get_device_name(device)
    report = Report(out_dir, stem, meta)

    # setup first: a package installed here is imported by the sections below
    t0 = time.monotonic()
    try:
        setup = setup_packages(device.type == "cuda", not args.no_install, args.install_timeout_s, args.wheelhouse)
        report.add({"name": "setup", "status": "ok", "seconds": round(time.monotonic() - t0, 2), **setup})
    except Exception as exc:  # noqa: BLE001
        report.add({"name": "setup", "status": "error", "error": _one_line(exc)})

    est = ESTIMATE_S[mode]
    table = {
        "env": lambda out: section_env(out, device),
        "sparse": lambda out: section_sparse(out, device, sizes),
        "bf16": lambda out: section_bf16(out, device, sizes),
        "resume": lambda out: section_resume(out, device, args.quick, max(deadline - time.monotonic(), 10)),
        "mae": lambda out: section_mae(out, device, sizes, deadline),
        "spark": lambda out: section_spark(out, device, sizes, deadline),
        "data": lambda out: section_data(out, device, sizes, args.config, args.overrides),
    }
    # a hard stop shortly after the budget even if a C call hangs (what was measured is on disk)
    faulthandler.dump_traceback_later(max(deadline - time.monotonic(), 0) + 60, exit=True)
    try:
        run_sections([(n, table[n], est[n]) for n in SECTIONS if n in wanted], report, deadline, device,
                     limit_factor=None if args.quick else 3.0)
    finally:
        faulthandler.cancel_dump_traceback_later()
    report.meta["elapsed_s"] = round(time.monotonic() - t_start, 1)
    report.write()
    bad = [s["name"] for s in report.sections if s["status"] == "error"]
    print(report.markdown())
    print(json.dumps({"written": [str(report.md), str(report.json)], "errors": bad}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
