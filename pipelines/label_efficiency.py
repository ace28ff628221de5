"""Label-efficiency study: initialisations × label fractions × seeds × evaluation modes.

Each pretraining method in ``study.inits`` is pretrained once; every cell (init, mode, fraction,
seed) fine-tunes from it and records ``result.json`` in its own folder. A killed study resumes where
it stopped and never redoes a finished cell; a failed cell is recorded and the others go on.

    runs/<name>/
      config.yaml  environment.json
      pretrain-<method>/   encoder.safetensors, encoder.json, recon/*.png, metrics.jsonl, checkpoints/
      cells/<init>-<mode>-f<fraction>-s<seed>/   result.json, metrics.jsonl, checkpoints/
      results.csv   (one row per cell)   summary.csv / summary.md   (mean ± std per init × mode × fraction)
"""

from __future__ import annotations

import csv
import math
import time
import traceback
from pathlib import Path
from typing import Any, Callable

import numpy as np

from medmim.config import Config, with_overrides
from medmim.data.dataset import DataBundle, prepare_data, summarize
from medmim.errors import MedmimError
from medmim.io import atomic_path, write_text
from medmim.train.loop import Runtime
from medmim.train.rundir import RunDir, seed_everything
from medmim.train.stages import finetune_stage, pretrain_stage


def cell_name(init: str, mode: str, fraction: float, seed: int) -> str:
    safe_init = Path(init).stem if ("/" in init or init.endswith(".safetensors")) else init
    return f"{safe_init}-{mode}-f{fraction:g}-s{seed}"


def _eta(done: int, total: int, elapsed: float) -> str:
    if done == 0:
        return "?"
    remaining = elapsed / done * (total - done)
    return f"{int(remaining // 60)}m{int(remaining % 60):02d}s"


def run_study(cfg: Config, *, resume: bool = True, log: Callable[[str], None] = print) -> list[dict[str, Any]]:
    """Run (or resume) the study described by ``cfg``; return the per-cell result rows."""
    seed_everything(cfg.run.seed, cfg.run.num_threads)
    runtime = Runtime.from_config(cfg.run)
    root = RunDir.create(Path(cfg.run.out_dir) / cfg.run.name)
    data = prepare_data(cfg)
    root.save_config(cfg)
    root.save_environment(cfg.run.seed, data.fingerprint, {"data": summarize(data)})
    log(f"[study] data: {data.source}; " + ", ".join(f"{k} {len(v)}" for k, v in data.records.items()))

    init_weights: dict[str, Path | None] = {}
    for init in cfg.study.inits:
        init_weights[init] = _init_weights(cfg, data, root, runtime, init, resume, log)

    cells = [(init, mode, frac, seed) for init in cfg.study.inits for mode in cfg.study.modes
             for frac in cfg.study.fractions for seed in cfg.study.seeds]
    rows: list[dict[str, Any]] = []
    t0 = time.time()
    for i, (init, mode, frac, seed) in enumerate(cells):
        name = cell_name(init, mode, frac, seed)
        cell_cfg = with_overrides(cfg, [f"finetune.label_fraction={frac}", f"finetune.mode={mode}"])
        row = {"cell": name, "init": init, "mode": mode, "fraction": frac, "seed": seed}
        weights = init_weights.get(init)
        try:
            if init != "scratch" and weights is None:
                raise MedmimError(f"pretraining for '{init}' failed; see the log above")
            result = finetune_stage(cell_cfg, data, root.child(f"cells/{name}"), runtime, init=weights,
                                    resume=resume, seed=seed, log=lambda m: None)
            row.update(status="ok", **result)
        except MedmimError as exc:
            row.update(status="failed", error=str(exc).splitlines()[0])
        except Exception as exc:  # noqa: BLE001 - one broken cell must not stop the grid
            row.update(status="failed", error=f"{type(exc).__name__}: {exc}".splitlines()[0])
            (root.path / "cells" / name).mkdir(parents=True, exist_ok=True)
            write_text(root.path / "cells" / name / "error.txt", traceback.format_exc())
        rows.append(row)
        metric = row.get(f"test_{cfg.study.metric}")
        shown = f"{metric:.3f}" if isinstance(metric, float) else row.get("error", "-")
        log(f"[study] cell {i + 1}/{len(cells)} {name}: {cfg.study.metric} {shown} "
            f"(ETA {_eta(i + 1, len(cells), time.time() - t0)})")
    if root.writer:
        write_results(rows, root.path, cfg.study.metric)
    if data.skipped:
        log(f"[study] skipped {len(data.skipped)} unreadable file(s); see {root.path / 'skipped.csv'}")
        _write_csv(root.path / "skipped.csv", data.skipped)
    return rows


def _init_weights(cfg: Config, data: DataBundle, root: RunDir, runtime: Runtime, init: str, resume: bool,
                  log) -> Path | None:
    if init == "scratch":
        return None
    if Path(init).is_file():
        return Path(init)
    pre_cfg = with_overrides(cfg, [f"pretrain.method={init}"])
    try:
        return pretrain_stage(pre_cfg, data, root.child(f"pretrain-{init}"), runtime, resume=resume, log=log)
    except MedmimError as exc:
        log(f"[study] pretraining '{init}' failed: {exc}")
        return None


def _write_csv(path: Path, rows: list[dict]) -> None:
    fields: list[str] = []
    for r in rows:
        fields += [k for k in r if k not in fields and not isinstance(r[k], dict)]
    with atomic_path(path) as tmp:
        with open(tmp, "w", newline="") as fh:
            w = csv.DictWriter(fh, fieldnames=fields, extrasaction="ignore")
            w.writeheader()
            w.writerows(rows)


def summarize_rows(rows: list[dict], metric: str) -> list[dict]:
    """Mean ± std (and a t-based 95% CI) of the test metric per init × mode × fraction."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["init"], r["mode"], r["fraction"]), []).append(r)
    out = []
    for (init, mode, frac), rs in sorted(groups.items(), key=lambda kv: (kv[0][0], kv[0][1], kv[0][2])):
        vals = np.array([r[f"test_{metric}"] for r in rs if r.get("status") == "ok"
                         and isinstance(r.get(f"test_{metric}"), float) and math.isfinite(r[f"test_{metric}"])])
        n = len(vals)
        mean = float(vals.mean()) if n else float("nan")
        std = float(vals.std(ddof=1)) if n > 1 else 0.0 if n else float("nan")
        half = _t95(n) * std / math.sqrt(n) if n > 1 else float("nan")
        labelled = [r.get("n_labelled") for r in rs if r.get("n_labelled")]
        out.append({"init": init, "mode": mode, "fraction": frac,
                    "n_labelled": int(np.median(labelled)) if labelled else None, "n_seeds": n,
                    f"{metric}_mean": mean, f"{metric}_std": std,
                    "ci95_low": mean - half if n > 1 else float("nan"),
                    "ci95_high": mean + half if n > 1 else float("nan"),
                    "failed": sum(r.get("status") != "ok" for r in rs)})
    return out


def _t95(n: int) -> float:
    from scipy import stats

    return float(stats.t.ppf(0.975, n - 1)) if n > 1 else float("nan")


def format_table(summary: list[dict], metric: str) -> str:
    lines = [f"| init | mode | fraction | labelled | {metric} (mean ± std) | seeds |",
             "|---|---|---|---|---|---|"]
    for s in summary:
        m, sd = s[f"{metric}_mean"], s[f"{metric}_std"]
        val = "failed" if not math.isfinite(m) else f"{m:.3f} ± {sd:.3f}"
        lines.append(f"| {s['init']} | {s['mode']} | {s['fraction']:g} | {s['n_labelled']} | {val} | {s['n_seeds']} |")
    return "\n".join(lines)


def write_results(rows: list[dict], out_dir: Path, metric: str) -> list[dict]:
    summary = summarize_rows(rows, metric)
    _write_csv(out_dir / "results.csv", rows)
    _write_csv(out_dir / "summary.csv", summary)
    write_text(out_dir / "summary.md", format_table(summary, metric) + "\n")
    return summary
