"""Label-efficiency study: initialisations × label fractions × seeds × evaluation modes (× folds).

Each initialisation in ``study.inits`` is pretrained once; every cell (init, mode, fraction, seed,
and with ``data.folds = K`` the cross-validation fold) fine-tunes from it and records ``result.json``
in its own folder. With folds, a cell's validation split is its fold and its training split the
other K-1 folds; label fractions are drawn (nested, stratified) inside that training split; the test
split is the same held-out set for every fold; pretraining sees every non-test image (label-free),
as without folds it sees train+val. ``study.folds`` (or ``--fold``) runs some folds only.

A killed study resumes where it stopped and never redoes a finished cell; a failed cell is recorded
and the others go on (a rerun tries the failed cells again).

``study.inits`` entries: a pretext name (``mae``, ``spark``, ``simclr``), ``scratch`` (or ``none``),
or a weights file; any of them may carry its own encoder, ``method:encoder`` (``spark:resnet18``,
``mae:vit_tiny``, ``scratch:resnet18``), since SparK needs a CNN and MAE a ViT. A plain name uses
``cfg.encoder``. ``study.overrides[entry]`` adds ``key=value`` overrides for that init only (its
pretraining and its cells), e.g. a different learning rate for SimCLR.

Scratch cells fine-tune with ``finetune.layer_decay=1`` (layer-wise decay is for pretrained
weights; it only slows a random network's lower layers) unless ``study.overrides`` says otherwise.

    runs/<name>/
      config.yaml  environment.json  data_card.json
      pretrain-<init>/   encoder.safetensors, encoder.json, recon/*.png, metrics.jsonl, checkpoints/
      cells/<init>-<mode>-f<fraction>-s<seed>[-fold<k>]/   result.json (or error.txt), config.yaml,
                                                        metrics.jsonl, checkpoints/
      results.csv / results.json   one row per cell (rewritten after every cell)
      summary.csv / summary.json / summary.md   mean ± std and 95% CI per init × mode × fraction over the
                                   seeds (and folds), with each init's paired difference to scratch and
                                   its Wilcoxon signed-rank p-value over matched (fold, seed) cells
      label_efficiency.png   metric vs number of labelled images (log x)
      report/index.html      static HTML report (see medmim.eval.report)
"""

from __future__ import annotations

import json
import math
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from medmim.config import Config, with_overrides
from medmim.data.dataset import DataBundle, select_fold
from medmim.errors import ConfigError, MedmimError
from medmim.eval.metrics import UNIT_INTERVAL_METRICS
from medmim.io import write_csv, write_json, write_text
from medmim.train.loop import Runtime
from medmim.train.rundir import RunDir
from medmim.train.setup import report_skipped, setup_run
from medmim.train.stages import finetune_stage, pretrain_stage

SCRATCH = ("scratch", "none")


@dataclass(frozen=True)
class Init:
    """One entry of ``study.inits``, parsed."""

    entry: str  # as written in the config
    method: str  # "mae" | "spark" | "simclr" | "scratch" | "weights"
    encoder: str | None  # encoder name carried by the entry, else cfg.encoder
    weights: Path | None  # a given weights file

    @property
    def key(self) -> str:
        """Folder-safe name: the entry itself for plain names (``mae``), ``spark_resnet18``, a file's stem."""
        if self.weights is not None:
            return self.weights.stem
        return self.entry if self.encoder is None else f"{self.entry.partition(':')[0]}_{self.encoder}"

    @property
    def pretrains(self) -> bool:
        return self.method not in ("scratch", "weights")


def parse_init(entry: str) -> Init:
    p = Path(entry)
    if p.suffix in (".safetensors", ".pt", ".pth") or "/" in entry or p.is_file():
        return Init(entry, "weights", None, p)
    method, _, enc = entry.partition(":")
    method = "scratch" if method in SCRATCH else method
    if method not in ("mae", "spark", "simclr", "scratch"):
        raise ConfigError(f"study.inits: unknown initialisation '{entry}' (use mae, spark, simclr, scratch, "
                          "a weights file, optionally with ':encoder', e.g. spark:resnet18)")
    return Init(entry, method, enc or None, None)


def cell_name(init: str | Init, mode: str, fraction: float, seed: int, fold: int | None = None) -> str:
    key = (init if isinstance(init, Init) else parse_init(init)).key
    return f"{key}-{mode}-f{fraction:g}-s{seed}" + ("" if fold is None else f"-fold{fold}")


def study_folds(cfg: Config) -> list[int | None]:
    """The cross-validation folds a study runs: ``[None]`` without ``data.folds``; else ``study.folds``,
    or ``finetune.fold`` alone (``--fold``), or every fold."""
    k = cfg.data.folds
    if not k:
        return [None]
    if cfg.study.folds is not None:
        return list(cfg.study.folds)
    return [cfg.finetune.fold] if cfg.finetune.fold is not None else list(range(k))


def init_config(cfg: Config, init: Init) -> Config:
    """The config an init's pretraining and cells run with."""
    extra = list(cfg.study.overrides.get(init.entry, []))
    bad = [o for o in extra if o.split("=", 1)[0].strip().split(".")[0] in ("data", "run", "study")]
    if bad:
        raise ConfigError(f"study.overrides['{init.entry}']: {bad} — data, run and study settings are shared "
                          "by every init of a study")
    base = [f"encoder.name={init.encoder}"] if init.encoder else []
    if init.method == "scratch" and not any(o.startswith("finetune.layer_decay") for o in extra):
        base.append("finetune.layer_decay=1.0")
    if init.pretrains:
        base.append(f"pretrain.method={init.method}")
    return with_overrides(cfg, base + extra) if base or extra else cfg


# ---- progress ------------------------------------------------------------------------------------
def _fmt_s(seconds: float) -> str:
    seconds = max(0, int(seconds))
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m" if seconds >= 3600 else \
        f"{seconds // 60}m{seconds % 60:02d}s"


def _eta(done: int, total: int, elapsed: float) -> str:
    """Remaining time from the cells actually computed so far (resumed cells cost nothing)."""
    if done == 0:
        return "?"
    return _fmt_s(elapsed / done * (total - done))


class Progress:
    """Cells done / total with an ETA: a rich progress bar on a terminal, log lines otherwise."""

    def __init__(self, total: int, log: Callable[[str], None], fancy: bool):
        self.total, self.done, self.computed, self.busy_s = total, 0, 0, 0.0
        self._log, self._bar, self._task = log, None, None
        if fancy:
            from rich.progress import (BarColumn, MofNCompleteColumn, Progress as RichProgress, SpinnerColumn,
                                       TextColumn, TimeElapsedColumn)

            self._bar = RichProgress(SpinnerColumn(), TextColumn("[bold]study[/] {task.description}"), BarColumn(),
                                     MofNCompleteColumn(), TextColumn("cells"), TimeElapsedColumn(),
                                     TextColumn("ETA {task.fields[eta]}"), transient=False)
            self._task = self._bar.add_task("", total=total, eta="?")

    def log(self, msg: str) -> None:
        if self._bar is not None:
            self._bar.console.print(msg, markup=False, highlight=False)
        else:
            self._log(msg)

    def status(self, text: str) -> None:
        if self._bar is not None:
            self._bar.update(self._task, description=text)

    def advance(self, line: str, seconds: float, cached: bool) -> None:
        self.done += 1
        if not cached:
            self.computed += 1
            self.busy_s += seconds
        remaining = self.total - self.done
        eta = "0m00s" if remaining == 0 else ("?" if not self.computed else _fmt_s(self.busy_s / self.computed * remaining))
        if self._bar is not None:
            self._bar.update(self._task, advance=1, eta=eta)
        self.log(f"[study] cell {self.done}/{self.total} {line}" + (" (done before)" if cached else "")
                 + f" (ETA {eta})")

    def __enter__(self) -> "Progress":
        if self._bar is not None:
            self._bar.start()
        return self

    def __exit__(self, *exc) -> None:
        if self._bar is not None:
            self._bar.stop()


def _fancy_default() -> bool:
    return sys.stdout.isatty()


# ---- the study -----------------------------------------------------------------------------------
def run_study(cfg: Config, *, resume: bool = True, log: Callable[[str], None] = print,
              progress: bool | None = None) -> list[dict[str, Any]]:
    """Run (or resume) the study described by ``cfg``; return the per-cell result rows.

    ``progress``: a rich progress bar (default: when stdout is a terminal).
    """
    inits = [parse_init(e) for e in cfg.study.inits]
    keys = [i.key for i in inits]
    if len(set(keys)) != len(keys):
        raise ConfigError(f"study.inits: two entries share the folder name ({keys})")
    init_cfgs = {i.entry: init_config(cfg, i) for i in inits}  # fail on bad overrides before any work
    root, data, runtime = setup_run(cfg)
    if root.writer:
        write_json(root.path / "data_card.json", data_card(cfg, data))

    # smallest fraction first, every init side by side: a cut-off study still compares inits
    folds = study_folds(cfg)
    cells = [(init, mode, frac, seed, fold) for frac in cfg.study.fractions for seed in cfg.study.seeds
             for fold in folds for mode in cfg.study.modes for init in inits]
    views = {f: data if f is None else select_fold(data, f, cfg) for f in folds}  # fold -> its train/val split
    metric = cfg.study.metric
    rows: list[dict[str, Any]] = []
    fancy = _fancy_default() if progress is None else progress
    with Progress(len(cells), log, fancy) as prog:
        prog.log(f"[study] data: {data.source}; " + ", ".join(f"{k} {len(v)}" for k, v in data.records.items())
                 + (f"; {len(folds)} of {cfg.data.folds} cross-validation folds" if cfg.data.folds else "")
                 + f"; {len(inits)} init(s), {len(cells)} cells"
                 + (f"; pretraining pool {data.pool_info['images']} unlabelled + "
                    f"{data.pool_info['labelled_images']} labelled images" if data.pool_info else ""))
        init_weights: dict[str, Path | None] = {}
        for init in inits:
            prog.status(f"pretraining {init.entry}")
            init_weights[init.entry] = _init_weights(init_cfgs[init.entry], data, root, runtime, init, resume,
                                                     prog.log)
        for init, mode, frac, seed, fold in cells:
            name = cell_name(init, mode, frac, seed, fold)
            prog.status(name)
            cell_dir = root.child(f"cells/{name}")
            cached = resume and (cell_dir.path / "result.json").exists()
            t0 = time.time()
            row = run_cell(init_cfgs[init.entry], views[fold], cell_dir, runtime, init, mode, frac, seed,
                           init_weights.get(init.entry), resume, fold=fold)
            rows.append(row)
            if root.writer:
                write_results(rows, root.path, metric)  # a partial study always has its table
            value = row.get(f"test_{metric}")
            shown = f"{metric} {value:.3f}" if isinstance(value, float) else f"FAILED: {row.get('error', '?')}"
            prog.advance(f"{name}: {shown}", time.time() - t0, cached)

    if root.writer:
        summary = write_results(rows, root.path, metric)
        _plot(summary, root.path, metric, log)
        if cfg.study.report:
            try:
                from medmim.eval.report import write_report

                index = write_report(root.path)
                log(f"[study] report: {index}")
            except Exception as exc:  # noqa: BLE001 - the results are written; a report failure is logged
                log(f"[study] report failed: {type(exc).__name__}: {exc}")
    failed = [r for r in rows if r.get("status") != "ok"]
    if failed:
        log(f"[study] {len(failed)} of {len(rows)} cell(s) failed: " + ", ".join(r["cell"] for r in failed)
            + " (see cells/<name>/error.txt; rerun the same command to retry them)")
    report_skipped(data, root, log, prefix="[study] ")
    return rows


def run_cell(cfg: Config, data: DataBundle, run: RunDir, runtime: Runtime, init: Init, mode: str, frac: float,
             seed: int, weights: Path | None, resume: bool, fold: int | None = None) -> dict[str, Any]:
    """One cell; never raises: a failure becomes a row with ``status: failed`` and ``error.txt``.
    ``data``: the bundle of the cell's fold (``select_fold``) when ``fold`` is given."""
    from medmim.data.labels import fill_inferred

    name = run.path.name
    row: dict[str, Any] = {"cell": name, "init": init.key, "mode": mode, "fraction": frac, "seed": seed}
    if fold is not None:
        row["fold"] = fold
    try:
        if init.method == "weights" and weights is None:
            raise MedmimError(f"{init.entry}: weights file not found")
        if init.pretrains and weights is None:
            raise MedmimError(f"pretraining for '{init.entry}' failed; see pretrain-{init.key}/error.txt")
        extra = [] if fold is None else [f"finetune.fold={fold}"]
        cell_cfg = with_overrides(cfg, [f"finetune.label_fraction={frac}", f"finetune.mode={mode}",
                                        f"finetune.epochs={cell_epochs(cfg, data, frac, seed)}", *extra])
        sections = ("data", "encoder", "finetune") if init.method == "scratch" else \
            ("data", "encoder", "pretrain", "finetune")
        check_stage(run, stage_fingerprint(cell_cfg, sections) + f"-s{seed}")
        fill_inferred(cell_cfg, data)
        run.save_config(cell_cfg)  # evaluate / predict on this cell replay its own split (fold) and head
        result = finetune_stage(cell_cfg, data, run, runtime, init=weights, resume=resume, seed=seed,
                                log=lambda m: None)
        row.update(status="ok", **{k: v for k, v in result.items() if k not in row})
        if run.writer and (run.path / "error.txt").exists():
            (run.path / "error.txt").unlink()
    except Exception as exc:  # noqa: BLE001 - one broken cell must not stop the grid
        msg = str(exc).splitlines()[0] if str(exc) else ""
        row.update(status="failed", error=(msg if isinstance(exc, MedmimError) else f"{type(exc).__name__}: {msg}"))
        if run.writer:
            write_text(run.path / "error.txt", traceback.format_exc())
    return row


def stage_fingerprint(cfg: Config, sections: tuple[str, ...]) -> str:
    """A short hash of the config sections that decide a stage's result (run name/paths excluded)."""
    import hashlib

    # non-default values only: a new config field (with its default) does not invalidate old studies
    dump = cfg.model_dump(mode="json", exclude_defaults=True)
    dump.get("data", {}).pop("num_workers", None)
    dump.get("data", {}).pop("class_names", None)  # display names: filled from the data, never change results
    if dump.get("data", {}).get("num_classes") == 2:  # the default before it was inferred from the labels
        dump["data"].pop("num_classes")
    picked = {k: dump.get(k, {}) for k in sections}
    picked["seed"] = cfg.run.seed
    return hashlib.sha256(json.dumps(picked, sort_keys=True).encode()).hexdigest()[:16]


def check_stage(run: RunDir, fingerprint: str) -> None:
    """Refuse to resume a stage folder written under a different config (stale checkpoints)."""
    f = run.path / "stage.json"
    if f.exists():
        old = json.loads(f.read_text()).get("fingerprint")
        if old != fingerprint:
            raise MedmimError(f"{run.path}: written under a different config (fingerprint {old}, now "
                              f"{fingerprint}); use a new run.name, or delete this folder to redo it")
    elif run.path.exists() and any(p.name not in ("error.txt",) for p in run.path.iterdir()):
        return  # written before fingerprints existed: trusted as is
    elif run.writer:
        write_json(f, {"fingerprint": fingerprint})


def cell_epochs(cfg: Config, data: DataBundle, frac: float, seed: int) -> int:
    """``finetune.epochs``, raised so that the cell makes at least ``study.min_steps`` optimizer steps."""
    fc, min_steps = cfg.finetune, cfg.study.min_steps
    if not min_steps:
        return fc.epochs
    from medmim.data.splits import label_fraction

    n = len(label_fraction(data.split("train"), frac, seed=seed))
    bs = min(fc.batch_size, n)
    steps = max(1, (n // bs) if n > bs else 1) / fc.grad_accum
    return max(fc.epochs, math.ceil(min_steps / max(steps, 1e-9)))


def _init_weights(cfg: Config, data: DataBundle, root: RunDir, runtime: Runtime, init: Init, resume: bool,
                  log) -> Path | None:
    if init.method == "scratch":
        return None
    if init.weights is not None:
        if not init.weights.is_file():
            log(f"[study] {init.entry}: weights file not found")
            return None
        return init.weights
    run = root.child(f"pretrain-{init.key}")
    try:
        check_stage(run, stage_fingerprint(cfg, ("data", "encoder", "pretrain")))
        return pretrain_stage(cfg, data, run, runtime, resume=resume, log=log)
    except Exception as exc:  # noqa: BLE001 - its cells are reported failed; other inits go on
        log(f"[study] pretraining '{init.entry}' failed: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")
        if run.writer:
            write_text(run.path / "error.txt", traceback.format_exc())
        return None


# ---- data card -------------------------------------------------------------------------------------
def data_card(cfg: Config, data: DataBundle) -> dict[str, Any]:
    """Counts per split and class (images, patients); never an identifier (medmim.data.card). With
    cross-validation the non-test images count as one part, "cv folds" (the source's own train/val
    division is not used), and ``cross_validation`` gives each fold's counts."""
    from medmim.data.card import build_card

    records = [r for split in data.records.values() for r in split]
    if data.folds:
        records = [dict(r, split="cv folds") for r in data.fold_records] + data.split("test")
    card = build_card(records, name=cfg.run.name, source=data.source, modality=cfg.data.modality,
                      skipped=data.skipped, pool=data.pool_info or None)
    card["preset"] = data.preset
    if data.folds:
        card["cross_validation"] = fold_counts(data)
    return card


def fold_counts(data: DataBundle) -> dict[str, Any]:
    """Images, patients and images per class in each cross-validation fold (counts only)."""
    from collections import Counter

    per = []
    for k in range(data.folds):
        rs = [r for r in data.fold_records if r.get("fold") == k]
        classes = Counter(str(r.get("label")) for r in rs if r.get("label") not in (None, ""))
        per.append({"fold": k, "images": len(rs), "patients": len({str(r["patient_id"]) for r in rs}),
                    "classes": dict(sorted(classes.items()))})
    return {"folds": data.folds, "per_fold": per, "test_images": len(data.split("test"))}


# ---- results ---------------------------------------------------------------------------------------
def _finite(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def summarize_rows(rows: list[dict], metric: str, bounded: bool | None = None) -> list[dict]:
    """Mean ± std (and a t-based 95% CI over the cells, clipped to [0, 1] for metrics bounded there:
    ``bounded``, by default those in UNIT_INTERVAL_METRICS) of the test metric per init × mode ×
    fraction, over its seeds and cross-validation folds. ``n_cells``: the values summarised;
    ``n_seeds`` / ``n_folds``: how many distinct seeds / folds they come from (``n_folds`` 0 without folds)."""
    from medmim.eval.report import fold_of

    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["init"], r["mode"], r["fraction"]), []).append(r)
    out = []
    for (init, mode, frac), rs in sorted(groups.items(), key=lambda kv: (kv[0][0], kv[0][1], kv[0][2])):
        ok = [r for r in rs if r.get("status") == "ok" and _finite(r.get(f"test_{metric}"))]
        vals = np.array([float(r[f"test_{metric}"]) for r in ok])
        n = len(vals)
        mean = float(vals.mean()) if n else float("nan")
        std = float(vals.std(ddof=1)) if n > 1 else 0.0 if n else float("nan")
        half = _t95(n) * std / math.sqrt(n) if n > 1 else float("nan")
        lo, hi = (mean - half, mean + half) if n > 1 else (float("nan"), float("nan"))
        # a t-interval on 3 seeds can pass 1.0; AUROC cannot
        if (metric in UNIT_INTERVAL_METRICS) if bounded is None else bounded:
            lo, hi = max(lo, 0.0), min(hi, 1.0)
        labelled = [r.get("n_labelled") for r in rs if r.get("n_labelled")]
        out.append({"init": init, "mode": mode, "fraction": frac,
                    "n_labelled": int(np.median(labelled)) if labelled else None, "n_cells": n,
                    "n_seeds": len({r.get("seed") for r in ok}),
                    "n_folds": len({f for r in ok if (f := fold_of(r)) is not None}),
                    f"{metric}_mean": mean, f"{metric}_std": std,
                    "ci95_low": lo, "ci95_high": hi,
                    "failed": sum(r.get("status") != "ok" for r in rs)})
    return out


def summarize_study(rows: list[dict], metric: str) -> list[dict]:
    """``summarize_rows`` plus, on every pretrained init's row, its paired comparison with scratch
    over matched (fold, seed) cells (``medmim.eval.report.add_paired``): what summary.* and the
    printed table show."""
    from medmim.eval.report import add_paired

    return add_paired(summarize_rows(rows, metric), rows, metric)


def _t95(n: int) -> float:
    from scipy import stats

    return float(stats.t.ppf(0.975, n - 1)) if n > 1 else float("nan")


def format_table(summary: list[dict], metric: str) -> str:
    """The summary as a markdown table; the paired comparison with scratch (``add_paired``) beside
    each pretrained init: mean difference over matched cells and the Wilcoxon signed-rank p-value."""
    folds = any(s.get("n_folds") for s in summary)
    n_head = "cells (folds × seeds)" if folds else "seeds"
    lines = [f"| init | mode | fraction | labelled | {metric} (mean ± std) | 95% CI | {n_head} | Δ vs scratch (Wilcoxon p) |",
             "|---|---|---|---|---|---|---|---|"]
    for s in summary:
        m, sd = s[f"{metric}_mean"], s[f"{metric}_std"]
        n = s.get("n_cells", s.get("n_seeds", 0))
        # one value has no spread: its value alone, never "± 0.000"
        val = "failed" if not math.isfinite(m) else f"{m:.3f} ± {sd:.3f}" if n > 1 else f"{m:.3f} (n=1)"
        ci = f"{s['ci95_low']:.3f}–{s['ci95_high']:.3f}" if _finite(s["ci95_low"]) else "–"
        count = f"{n} ({s['n_folds']} × {s['n_seeds']})" if folds else f"{n}"
        count += f" ({s['failed']} failed)" if s.get("failed") else ""
        lines.append(f"| {s['init']} | {s['mode']} | {s['fraction']:g} | {s['n_labelled']} | {val} | {ci} | {count} "
                     f"| {_paired_text(s)} |")
    return "\n".join(lines)


def _paired_text(s: dict) -> str:
    """``+0.031 (p = 0.031, n=6)`` for a pretrained row with matched scratch cells, else ``–``."""
    if not s.get("vs_scratch") or not _finite(s.get("delta_vs_scratch")):
        return "–"
    from medmim.eval.report import p_text

    return f"{s['delta_vs_scratch']:+.3f} ({p_text(s['p_wilcoxon'], s['n_pairs'], s.get('ties', 0))})"


def _json_safe(obj):
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_json_safe(v) for v in obj]
    return obj


def write_results(rows: list[dict], out_dir: Path, metric: str) -> list[dict]:
    """results.csv/.json (one row per cell), summary.csv/.json/.md; returns the summary."""
    summary = summarize_study(rows, metric)
    write_csv(out_dir / "results.csv", rows)
    write_csv(out_dir / "summary.csv", summary)
    write_text(out_dir / "results.json", json.dumps(_json_safe(rows), indent=1, default=str) + "\n")
    write_text(out_dir / "summary.json", json.dumps({"metric": metric, "groups": _json_safe(summary)}, indent=1,
                                                    default=str) + "\n")
    write_text(out_dir / "summary.md", format_table(summary, metric) + "\n")
    return summary


def _plot(summary: list[dict], out_dir: Path, metric: str, log) -> None:
    try:
        from medmim.eval.plots import plot_label_efficiency

        plot_label_efficiency(summary, metric, out_dir / "label_efficiency.png")
    except Exception as exc:  # noqa: BLE001 - a plotting failure never loses the results
        log(f"[study] plot failed: {type(exc).__name__}: {exc}")


def load_results(run_dir: str | Path) -> list[dict]:
    """The per-cell rows a study wrote (results.json)."""
    p = Path(run_dir) / "results.json"
    if not p.exists():
        raise MedmimError(f"{p}: no study results here")
    return json.loads(p.read_text())
