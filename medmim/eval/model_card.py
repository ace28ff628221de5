"""A model card (markdown) beside every exported encoder: ``<run>/model_card.md``.

    write_model_card(run_dir, cfg, data, runtime=runtime, n_images=len(items))

It says what the weights are (architecture, parameters, SHA-256 of ``encoder.safetensors``), what
they were trained on (counts per split and class, modality, the data card's summary when the run
or its study recorded ``data_card.json``), how (pretext, the resolved config), on what and for how
long (hardware, wall-clock time split into train / data), and what they are for: research use, as
the starting point of fine-tuning; not for clinical decisions. Counts only: no file names, no
patient identifiers (identifying keys are dropped, as in the report).
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
from pathlib import Path
from typing import Any

from medmim.io import read_jsonl, sha256_file, write_text

CARD_NAME = "model_card.md"


def _read_json(path: Path) -> dict:
    try:
        obj = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return obj if isinstance(obj, dict) else {}


def _param_count(weights: Path) -> int | None:
    """Parameters in a safetensors file, from its header (no tensor is read)."""
    try:
        from safetensors import safe_open

        n = 0
        with safe_open(str(weights), framework="pt") as f:
            for key in f.keys():
                size = 1
                for d in f.get_slice(key).get_shape():
                    size *= int(d)
                n += size
        return n
    except Exception:  # noqa: BLE001 - the card describes; a missing count is no error
        return None


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def hardware(runtime=None) -> dict[str, Any]:
    """Device, precision, CPU, threads and processes of the current run."""
    import torch

    from medmim.train.distributed import current

    device = getattr(runtime, "device", None)
    out: dict[str, Any] = {"device": str(device) if device is not None else ("cuda" if torch.cuda.is_available()
                                                                               else "cpu")}
    if device is not None and getattr(device, "type", "") == "cuda" and torch.cuda.is_available():
        out["gpu"] = torch.cuda.get_device_name(device)
    amp = getattr(runtime, "amp_dtype", None)
    out["precision"] = str(amp).replace("torch.", "") if amp is not None else "fp32"
    out["cpu"] = f"{_cpu_name()} ({os.cpu_count()} logical cores)"
    out["torch_threads"] = torch.get_num_threads()
    out["processes"] = current().world_size
    out["torch"] = torch.__version__
    return out


def _fmt_s(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.1f} s"
    seconds = int(round(seconds))
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m{seconds % 60:02d}s" if seconds >= 3600 else \
        f"{seconds // 60}m{seconds % 60:02d}s"


def _table(rows: list[tuple[str, Any]]) -> str:
    lines = ["| | |", "|---|---|"]
    for k, v in rows:
        if isinstance(v, dict):
            v = ", ".join(f"{a} ({b})" for a, b in v.items())
        if v not in (None, "", {}, []):
            lines.append(f"| {k} | {str(v).replace('|', '/')} |")
    return "\n".join(lines)


def _split_counts(data) -> tuple[list[str], list[list[Any]]]:
    """(header, rows): images, patients and class counts per split of a DataBundle."""
    from collections import Counter

    classes: set[str] = set()
    per = {}
    for split, recs in data.records.items():
        if not recs:
            continue
        c = Counter(json.dumps(r.get("label")) if r.get("label") not in (None, "") else "unlabelled" for r in recs)
        classes |= set(c)
        per[split] = (len(recs), len({str(r.get("patient_id")) for r in recs}), c)
    cls = sorted(classes)
    rows = [[s, n, p, *[c.get(k, 0) for k in cls]] for s, (n, p, c) in per.items()]
    return ["split", "images", "patients", *[f"class {k}" for k in cls]], rows


def model_card(run_dir: str | Path, cfg, data=None, *, runtime=None, n_images: int | None = None,
               card: dict | None = None) -> str:
    """The card's markdown text (see :func:`write_model_card`)."""
    from medmim.config import dump_config
    from medmim.eval.predictions import resolve_class_names
    from medmim.eval.report import scrub_identifiers
    from medmim.models.export import SIDECAR_NAME, WEIGHTS_NAME

    run = Path(run_dir)
    side = _read_json(run / SIDECAR_NAME)
    weights = run / WEIGHTS_NAME
    if card is None:
        card = _read_json(run / "data_card.json") or _read_json(run.parent / "data_card.json")
    card = scrub_identifiers(card or {})
    pc, enc, dc = cfg.pretrain, cfg.encoder, cfg.data
    done = _read_json(run / "done.json")
    recs = [r for r in read_jsonl(run / "metrics.jsonl") if "train_loss" in r]
    times = done.get("time_s") or {}
    total_s = sum(float(r.get("epoch_time_s") or 0) for r in recs) + float(times.get("val", 0) or 0)
    n_params = _param_count(weights) if weights.exists() else None
    arch = side.get("architecture", enc.name)
    dims = side.get("spatial_dims", dc.spatial_dims)
    title = f"{arch} encoder ({dims}D), self-supervised {str(side.get('pretext', pc.method)).upper()} pretraining"
    hw = hardware(runtime)

    parts = [f"# Model card: {title}", "",
             f"Written by medmim at export, {_dt.datetime.now(_dt.timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}. "
             "Weights: `encoder.safetensors` (+ `encoder.json`: architecture and provenance) in this folder.", ""]

    parts += ["## Model", "", _table([
        ("architecture", arch), ("spatial dims", dims), ("input channels", side.get("in_channels")),
        ("channels (preset)", _channels_text(side.get("channels"))),
        ("input size", f"{dc.image_size} per side" if dc.image_size else None),
        ("parameters", f"{n_params:,}" if n_params else None),
        ("feature channels (finest first)", side.get("feature_channels")),
        ("downsampling", side.get("downsample_ratio")),
        ("weights SHA-256", sha256_file(weights) if weights.exists() else None),
        ("medmim format", side.get("format"))]), ""]

    parts += ["## Pretraining", "", _table([
        ("pretext", pc.method), ("mask ratio", pc.mask_ratio if pc.method in ("mae", "spark") else None),
        ("masking", pc.masking if pc.method in ("mae", "spark") else None),
        ("epochs", f"{len(recs)} of {pc.epochs}" if recs and len(recs) != pc.epochs else pc.epochs),
        ("batch size", pc.batch_size), ("learning rate", pc.lr), ("seed", cfg.run.seed),
        ("first / last train loss", f"{recs[0]['train_loss']:.4g} / {recs[-1]['train_loss']:.4g}" if recs else None),
        ("images seen per epoch", n_images),
        ("labels used", "none (self-supervised; labels never enter pretraining batches)")]), ""]

    parts += ["## Data", ""]
    facts = [("source", card.get("source") or getattr(data, "source", None)), ("name", card.get("name")),
             ("licence", card.get("licence")), ("modality", card.get("modality") or dc.modality),
             ("intensity preset", getattr(data, "preset", None) or card.get("preset")),
             ("images / patients (all splits)", f"{card['n_images']} / {card.get('n_patients', '?')}"
              if card.get("n_images") else None),
             ("data fingerprint", side.get("data_fingerprint") or getattr(data, "fingerprint", None)),
             ("test split in pretraining", "yes (data.pretrain_on_test)" if dc.pretrain_on_test else "no"),
             ("unreadable files skipped", card.get("skipped") if card.get("skipped") is not None
              else (len(data.skipped) if data is not None else None))]
    sizes = card.get("size_histogram") or {}
    if sizes:
        facts.append(("image sizes (most common)", ", ".join(f"{k} ({v})" for k, v in list(sizes.items())[:4])))
    spacing = card.get("spacing_histogram") or {}
    if spacing:
        facts.append(("voxel spacing (most common)", ", ".join(f"{k} ({v})" for k, v in list(spacing.items())[:3])))
    parts += [_table(facts), ""]
    if data is not None:
        head, rows = _split_counts(data)
        names = resolve_class_names(max(cfg.data.num_classes or data.num_classes or 0, 1),
                                    cfg.model_dump(mode="json"), card)
        head = [h if not h.startswith("class ") or not h[6:].isdigit() or int(h[6:]) >= len(names)
                or names[int(h[6:])] == h[6:] else f"{h} ({names[int(h[6:])]})" for h in head]
        parts += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        parts += ["| " + " | ".join(str(v) for v in r) + " |" for r in rows]
        pool = list(getattr(data, "pool", None) or [])
        info = getattr(data, "pool_info", None) or {}
        dropped = info.get("dropped") or {}
        pool_text = ""
        if pool:
            pool_text = (f" and an unlabelled pool of {len(pool)} images (leakage guard: "
                         f"{(dropped.get('val') or 0) + (dropped.get('test') or 0)} duplicates of val/test and "
                         f"{(dropped.get('id_val') or 0) + (dropped.get('id_test') or 0)} images of val/test patients "
                         "dropped)")
        parts += ["", "Pretraining used the train and val splits" + (" and the test split" if dc.pretrain_on_test
                                                                      else "") + pool_text
                  + ("" if dc.pretrain_on_test else "; the test split was held out") + ".", ""]

    parts += ["## Hardware and time", "", _table([
        ("device", hw.get("gpu") or hw["device"]), ("precision", hw["precision"]), ("CPU", hw["cpu"]),
        ("torch threads", hw["torch_threads"]), ("processes (DDP ranks)", hw["processes"]), ("torch", hw["torch"]),
        ("pretraining time", _fmt_s(total_s) if total_s else None),
        ("of which waiting for data", _fmt_s(float(times["data"])) if times.get("data") is not None else None),
        ("seconds per epoch (mean)", f"{total_s / len(recs):.1f}" if recs and total_s else None)]), ""]

    parts += ["## Intended use", "",
              "* **Intended**: research on self-supervised learning for medical images; the starting weights of "
              f"fine-tuning (`medmim finetune --init {WEIGHTS_NAME}`, a `study.inits` entry) on {dims}D "
              f"{dc.modality} images prepared like the pretraining data (same preset, "
              "same input size, same channels).",
              "* **Out of scope**: clinical use of any kind: diagnosis, triage, screening, treatment decisions or "
              "any decision about a patient. These weights are not a medical device, have not been validated "
              "clinically, and carry no claim of safety or effectiveness.",
              "* **Limitations**: the encoder has seen only the data described above; images from other "
              "scanners, sites, populations, modalities or preprocessing are out of distribution, and features "
              "may encode biases of this data set. Judge any downstream model on held-out data from its own "
              "target population.", ""]

    dump = dump_config(cfg)
    parts += ["## Configuration", "", "The resolved config of the run (defaults + file + overrides):", "",
              "```yaml", dump.rstrip(), "```", ""]
    env = _read_json(run / "environment.json") or _read_json(run.parent / "environment.json")
    if env.get("git_commit"):
        parts += [f"medmim commit: `{env['git_commit']}`.", ""]
    return "\n".join(parts)


def _channels_text(channels) -> str | None:
    """``t1 (mri_zscore), flair (mri_zscore)`` from the sidecar's ``channels`` list."""
    if not isinstance(channels, list) or not channels:
        return None
    out = []
    for c in channels:
        if isinstance(c, dict) and c.get("name"):
            out.append(f"{c['name']} ({c['preset']})" if c.get("preset") else str(c["name"]))
    return ", ".join(out) or None


def write_model_card(run_dir: str | Path, cfg, data=None, *, runtime=None, n_images: int | None = None,
                     card: dict | None = None) -> Path:
    """Write ``model_card.md`` (atomically) beside ``encoder.safetensors`` in ``run_dir``.

    ``data``: the run's DataBundle (counts per split and class); ``card``: a data card dict (else
    ``data_card.json`` of the run folder or its parent, the study); ``runtime``: device and
    precision; ``n_images``: images per pretraining epoch."""
    path = Path(run_dir) / CARD_NAME
    write_text(path, model_card(run_dir, cfg, data, runtime=runtime, n_images=n_images, card=card))
    return path
