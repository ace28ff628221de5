"""A static HTML report of a study folder: one folder, opens offline, no scripts or styles fetched.

    write_report("runs/demo")  ->  runs/demo/report/index.html  (+ report/img/*.png)

It reads only what the study wrote (summary.json, results.json, label_efficiency.png,
pretrain-*/recon/*.png, pretrain-*/metrics.jsonl, cells/*/metrics.jsonl, cells/*/predictions_test.csv,
data_card.json, config.yaml, environment.json, and an anomaly run's scores_*/metrics.json), so it can
be re-rendered at any time. From those it adds: paired tests of each init against scratch (Wilcoxon
signed-rank over matched (fold, seed) cells), per-class metrics with 95% CIs, ROC / precision-recall curves and
confusion matrices per init at each fraction, train/val learning curves per cell, and flags for
degenerate classifiers (one class predicted for every image; best checkpoint at epoch 0). Images are copied next to the page. Patient identifiers
never appear: the data card holds counts only, and keys that name identifying fields are dropped
from everything shown.

When every ``<img>`` has loaded, a small inline script sets ``<body data-images="ok:N">`` (or
``broken:K``), which a headless browser can check.
"""

from __future__ import annotations

import datetime as _dt
import html
import json
import math
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from medmim.io import read_jsonl, write_text

PHI_KEYS = ("patient", "patientname", "patientid", "patient_id", "birth", "accession", "institution",
            "referringphysician", "otherpatient", "study_id", "studyinstanceuid", "seriesinstanceuid")


def scrub_identifiers(obj: Any) -> Any:
    """Drop keys that name patient-identifying fields, at any depth (counts stay)."""
    if isinstance(obj, dict):
        return {k: scrub_identifiers(v) for k, v in obj.items()
                if not any(p in str(k).lower().replace(" ", "") for p in PHI_KEYS) or str(k) == "n_patients"
                or str(k) == "patients"}
    if isinstance(obj, list):
        return [scrub_identifiers(v) for v in obj]
    return obj


def _read_json(path: Path, default=None):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return default


def _e(v: Any) -> str:
    return html.escape(str(v), quote=True)


def _num(v: Any, nd: int = 3) -> str:
    if isinstance(v, bool) or v is None:
        return "–" if v is None else str(v)
    if isinstance(v, float):
        return "–" if not math.isfinite(v) else f"{v:.{nd}f}"
    return _e(v)


def _table(headers: list[str], rows: list[list[str]], table_id: str | None = None) -> str:
    tid = f' id="{table_id}"' if table_id else ""
    head = "".join(f"<th>{_e(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table{tid}><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _is_scratch(init: str) -> bool:
    return init.startswith("scratch") or init.startswith("none")


def comparison(summary: list[dict], metric: str) -> list[dict]:
    """Per mode × fraction: the best scratch mean, the best pretrained mean, and their difference."""
    out = []
    for mode in sorted({s["mode"] for s in summary}):
        for frac in sorted({s["fraction"] for s in summary if s["mode"] == mode}):
            grp = [s for s in summary if s["mode"] == mode and s["fraction"] == frac
                   and isinstance(s.get(f"{metric}_mean"), (int, float)) and s[f"{metric}_mean"] is not None
                   and math.isfinite(s[f"{metric}_mean"])]
            scratch = [s for s in grp if _is_scratch(s["init"])]
            pre = [s for s in grp if not _is_scratch(s["init"])]
            if not scratch or not pre:
                continue
            sb = max(scratch, key=lambda s: s[f"{metric}_mean"])
            pb = max(pre, key=lambda s: s[f"{metric}_mean"])
            out.append({"mode": mode, "fraction": frac, "scratch": sb[f"{metric}_mean"], "scratch_init": sb["init"],
                        "best_pretrained": pb[f"{metric}_mean"], "best_init": pb["init"],
                        "delta": pb[f"{metric}_mean"] - sb[f"{metric}_mean"]})
    return out


# ---- paired tests ---------------------------------------------------------------------------------
# Below this many matched pairs the exact two-sided Wilcoxon signed-rank test cannot reach p < 0.05
# (its smallest p-value is 2 / 2**n: 0.0625 at n = 5), so no p-value is shown.
MIN_PAIRS = 6


def wilcoxon_p(diffs) -> float:
    """Two-sided Wilcoxon signed-rank p-value (scipy; exact for small samples without ties);
    1.0 when every difference is zero."""
    from scipy.stats import wilcoxon

    d = [float(v) for v in diffs]
    if all(v == 0 for v in d):
        return 1.0
    return float(wilcoxon(d, alternative="two-sided").pvalue)


def fold_of(row: dict) -> int | None:
    """A result row's cross-validation fold, None without one (also a pandas NaN)."""
    f = row.get("fold")
    return None if f is None or (isinstance(f, float) and math.isnan(f)) else int(f)


def _by_pair(rows: list[dict], init: str, mode: str, frac: float, metric: str) -> dict:
    """(fold, seed) -> test value of ``init``'s finished cells (fold None without cross-validation)."""
    return {(fold_of(r), int(r["seed"])): float(r[f"test_{metric}"]) for r in rows
            if r.get("init") == init and r.get("mode") == mode and r.get("fraction") == frac
            and r.get("status") == "ok" and _finite(r.get(f"test_{metric}"))}


def paired_test(rows: list[dict], init: str, scratch: str, mode: str, frac: float, metric: str) -> dict:
    """``init`` against ``scratch`` on the cells with the same fold and seed (matched pairs: the same
    training patients, label subset and fine-tuning randomness): the mean difference and, with at
    least :data:`MIN_PAIRS` pairs, the Wilcoxon signed-rank p-value."""
    a = _by_pair(rows, init, mode, frac, metric)
    b = _by_pair(rows, scratch, mode, frac, metric)
    pairs = sorted(set(a) & set(b), key=lambda k: (-1 if k[0] is None else k[0], k[1]))
    diffs = [a[k] - b[k] for k in pairs]
    out = {"init": init, "scratch": scratch, "mode": mode, "fraction": frac, "n_pairs": len(pairs),
           "mean_diff": sum(diffs) / len(diffs) if diffs else float("nan"),
           "wins": sum(d > 0 for d in diffs), "losses": sum(d < 0 for d in diffs), "ties": sum(d == 0 for d in diffs),
           "p": None,
           "folds": len({k[0] for k in pairs if k[0] is not None})}
    if len(pairs) >= MIN_PAIRS:
        out["p"] = wilcoxon_p(diffs)
    return out


def paired_tests(rows: list[dict], metric: str) -> list[dict]:
    """Every pretrained init against every scratch init, per mode × fraction (see :func:`paired_test`)."""
    inits = sorted({r["init"] for r in rows if "init" in r})
    scratch = [i for i in inits if _is_scratch(i)]
    out = []
    for mode in sorted({r["mode"] for r in rows if "mode" in r}):
        for frac in sorted({r["fraction"] for r in rows if r.get("mode") == mode}):
            for init in inits:
                if _is_scratch(init):
                    continue
                for sc in scratch:
                    t = paired_test(rows, init, sc, mode, frac, metric)
                    if t["n_pairs"]:
                        out.append(t)
    return out


def scratch_partner(init: str, scratch: list[str]) -> str | None:
    """The scratch init an init is compared with: the only one, else the one with the same encoder
    suffix (``mae_vit_tiny`` -> ``scratch_vit_tiny``), else the first."""
    if not scratch:
        return None
    suffix = init.partition("_")[2]
    return next((s for s in scratch if suffix and s.partition("_")[2] == suffix), scratch[0])


def add_paired(summary: list[dict], rows: list[dict], metric: str) -> list[dict]:
    """Give every pretrained row of a study summary its paired comparison with scratch
    (:func:`paired_test`, the partner from :func:`scratch_partner`): ``vs_scratch``,
    ``delta_vs_scratch`` (mean difference over matched cells), ``n_pairs`` and ``p_wilcoxon``
    (None below :data:`MIN_PAIRS` pairs). Scratch rows get empty fields. Returns ``summary``."""
    scratch = sorted({s["init"] for s in summary if _is_scratch(s["init"])})
    for s in summary:
        partner = None if _is_scratch(s["init"]) else scratch_partner(s["init"], scratch)
        t = paired_test(rows, s["init"], partner, s["mode"], s["fraction"], metric) if partner else None
        ok = bool(t and t["n_pairs"])
        s.update(vs_scratch=partner if ok else None, delta_vs_scratch=t["mean_diff"] if ok else None,
                 n_pairs=t["n_pairs"] if ok else 0, ties=t["ties"] if ok else 0, p_wilcoxon=t["p"] if ok else None)
    return summary


def p_text(p: float | None, n_pairs: int, ties: int = 0) -> str:
    """The Wilcoxon p-value as printed beside a difference (``n too small`` below MIN_PAIRS);
    ``ties``: pairs with a zero difference, which the test leaves out (scipy's default)."""
    if p is None:
        return f"n too small (n={n_pairs}; needs ≥{MIN_PAIRS})"
    return (f"p = {p:.3f}" if p >= 0.001 else "p < 0.001") + f", n={n_pairs}" + (f", {ties} tied" if ties else "")


def _p_text(t: dict) -> str:
    return p_text(t["p"], t["n_pairs"], t.get("ties", 0))


def _delta_html(delta: float, t: dict | None) -> str:
    """The difference, coloured only when a paired test backs it (p < 0.05); else grey."""
    if not _finite(delta):
        return "–"
    significant = t is not None and t["p"] is not None and t["p"] < 0.05
    cls = ("pos" if delta >= 0 else "neg") if significant else "muted"
    test = f" <span class='muted'>({_e(_p_text(t))})</span>" if t is not None else ""
    return f"<span class='{cls}'>{delta:+.3f}</span>{test}"


# ---- cells: predictions, learning curves, flags --------------------------------------------------
def _finite(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)




def _cell_predictions(study: Path, row: dict):
    from medmim.eval.predictions import PREDICTIONS_NAME, read_predictions

    f = study / "cells" / str(row.get("cell", "")) / PREDICTIONS_NAME
    if row.get("status") != "ok" or not f.is_file():
        return None
    try:
        return read_predictions(f)
    except Exception:  # noqa: BLE001 - a damaged file costs its figures, not the report
        return None


def degenerate_flags(row: dict, preds=None, val_epochs: list[int] | None = None) -> list[str]:
    """Why a finished cell's classifier looks degenerate: the same class predicted for every test
    image (or identical outputs), or the best checkpoint at the first validation pass (nothing
    gained after it). ``val_epochs``: the epochs that were validated (from metrics.jsonl; with
    ``finetune.max_evals`` not every epoch is); only flagged when more than one pass ran. Without
    them: best epoch 0."""
    flags = []
    if row.get("status") != "ok":
        return flags
    if preds is not None:
        import numpy as np

        probs, labels, _ = preds
        if len(probs) > 1 and float(np.ptp(probs, axis=0).max()) < 1e-6:
            flags.append("constant output")
        elif labels.ndim == 1 and len(probs) > 1 and len(np.unique(probs.argmax(1))) == 1:
            flags.append(f"one class predicted for all {len(probs)} test images")
        elif labels.ndim == 2 and len(probs) > 1 and bool(((probs >= 0.5).all(0) | (probs < 0.5).all(0)).all()):
            flags.append("every label predicted the same for all test images")
    else:
        k = row.get("_num_classes")
        bal = row.get("test_balanced_accuracy")
        if k and _finite(bal) and abs(bal - 1.0 / k) < 1e-9 and not row.get("_multilabel"):
            flags.append("balanced accuracy exactly 1/K (one class predicted?)")
    best = row.get("best_epoch")
    if val_epochs:
        if len(val_epochs) > 1 and best == val_epochs[0]:
            flags.append("best epoch 0" if best == 0 else f"best epoch {best} = first validation")
    elif best == 0:
        flags.append("best epoch 0")
    return flags


def _per_cell_class_metrics(preds, row: dict, k: int) -> dict[str, float]:
    """Per-class AUROC (from result.json when recorded), sensitivity and precision (argmax; sigmoid
    outputs at 0.5 for multi-label) of one cell, keyed ``test_<metric>_class<c>``."""
    out = {}
    for c in range(k):
        v = row.get(f"test_auroc_class{c}")
        if _finite(v):
            out[f"test_auroc_class{c}"] = float(v)
    if preds is None:
        return out
    probs, labels, _ = preds
    for c in range(probs.shape[1]):
        sens, prec = _per_class_fns(c, labels.ndim == 2)
        out[f"test_sensitivity_class{c}"] = sens(labels, probs)
        out[f"test_precision_class{c}"] = prec(labels, probs)
        if f"test_auroc_class{c}" not in out:
            from medmim.eval.metrics import binary_auroc

            y = labels[:, c] if labels.ndim == 2 else (labels == c)
            out[f"test_auroc_class{c}"] = binary_auroc(y, probs[:, c])
    return out  # NaN kept: a class absent from the test split


def _per_class_fns(c: int, multilabel: bool):
    """Sensitivity and precision of class ``c`` as ``f(labels, probs)``: medmim evaluate's own
    (argmax decision; multi-label: each output at 0.5), so the report and ``medmim evaluate`` agree."""
    from medmim.evaluate import per_class_value

    return per_class_value("sensitivity", c, multilabel), per_class_value("precision", c, multilabel)


PER_CLASS = ("auroc", "sensitivity", "precision")


def per_class_table(rows: list[dict], preds: dict, k: int, n_boot: int = 1000) -> list[dict]:
    """Per init × mode × fraction × class: AUROC, sensitivity and precision, mean over the seeds
    with a t-based 95% CI over seeds (``summarize_rows``); with one seed, the percentile bootstrap
    CI over the test cases (``bootstrap_cis``; AUROC's from result.json) instead, marked as such."""
    from medmim.eval.metrics import bootstrap_cis
    from pipelines.label_efficiency import summarize_rows

    cell_rows = []
    for r in rows:
        if r.get("status") != "ok":
            continue
        cell_rows.append({"init": r["init"], "mode": r["mode"], "fraction": r["fraction"], "status": "ok",
                          "cell": r.get("cell"), **_per_cell_class_metrics(preds.get(r.get("cell")), r, k)})
    out = []
    for c in range(k):
        per_metric = {m: {(s["init"], s["mode"], s["fraction"]): s
                          for s in summarize_rows(cell_rows, f"{m}_class{c}", bounded=True)} for m in PER_CLASS}
        for key in sorted(per_metric["auroc"]):
            entry = {"init": key[0], "mode": key[1], "fraction": key[2], "class": c}
            for m in PER_CLASS:
                s = per_metric[m][key]
                entry[m] = {"mean": s[f"{m}_class{c}_mean"], "low": s["ci95_low"], "high": s["ci95_high"],
                            "n": s["n_cells"], "ci": "seeds"}
            if entry["auroc"]["n"] + entry["sensitivity"]["n"] == 0:
                continue
            group = [r for r in cell_rows if (r["init"], r["mode"], r["fraction"]) == key]
            if len(group) == 1:  # one seed: the test-set bootstrap CI of that cell
                r0 = next(r for r in rows if r.get("cell") == group[0]["cell"])
                lo, hi = r0.get(f"test_auroc_class{c}_ci_low"), r0.get(f"test_auroc_class{c}_ci_high")
                if _finite(lo) and _finite(hi):
                    entry["auroc"].update(low=lo, high=hi, ci="bootstrap")
                pr = preds.get(group[0]["cell"])
                if pr is not None and n_boot and c < pr[0].shape[1]:
                    cis = bootstrap_cis(pr[1], pr[0], list(_per_class_fns(c, pr[1].ndim == 2)), n=n_boot, seed=0)
                    for m in ("sensitivity", "precision"):
                        ci = cis[f"{m}_class{c}"]
                        if _finite(ci["low"]):
                            entry[m].update(low=ci["low"], high=ci["high"], ci="bootstrap")
            out.append(entry)
    out.sort(key=lambda e: (e["mode"], e["fraction"], e["init"], e["class"]))
    return out


def _ci_cell(v: dict) -> str:
    if not _finite(v.get("mean")):
        return "–"
    if v["ci"] == "bootstrap":
        return f"{v['mean']:.3f} <span class='muted'>[{v['low']:.3f}, {v['high']:.3f}] test bootstrap</span>"
    if v["n"] < 2 or not _finite(v.get("low")):
        return f"{v['mean']:.3f} <span class='muted'>(n={v['n']})</span>"
    return f"{v['mean']:.3f} <span class='muted'>[{v['low']:.3f}, {v['high']:.3f}]</span>"


def _frac(f) -> str:
    return _num(float(f), 3).rstrip("0").rstrip(".")


def _slug(*parts) -> str:
    return "-".join(str(p).replace(".", "_").replace("/", "_") for p in parts)


def _cell_figures(study: Path, img_dir: Path, rows: list[dict], preds: dict, class_names: list[str],
                  multilabel: bool) -> list[tuple[str, str, list[tuple[str, str]]]]:
    """Per mode × fraction: (mode, fraction, [(image path, caption)]) for ROC/PR, confusion matrices
    and learning curves, drawn from the cells' predictions and metrics.jsonl."""
    from medmim.eval.plots import curve_points, plot_confusion, plot_learning_curves, plot_roc_pr

    out = []
    ok = [r for r in rows if r.get("status") == "ok"]
    for mode in sorted({r["mode"] for r in ok}):
        for frac in sorted({r["fraction"] for r in ok if r["mode"] == mode}):
            group = [r for r in ok if r["mode"] == mode and r["fraction"] == frac]
            figs: list[tuple[str, str]] = []
            where = f"{mode} fine-tuning" if mode == "full" else f"{mode} probe"
            n_lab = sorted({r.get("n_labelled") for r in group if r.get("n_labelled")})
            label = f"{float(frac) * 100:g}% of the labels" + (f" ({n_lab[0]} images)" if len(n_lab) == 1 else "")
            curves: dict[str, list] = {}
            for r in group:
                pr = preds.get(r["cell"])
                if pr is not None:
                    curves.setdefault(r["init"], []).append(curve_points(pr[1], pr[0]))
            mats = confusion_by_init(group, preds)
            if curves:
                name = f"roc_pr-{_slug(mode, frac)}.png"
                plot_roc_pr(curves, img_dir / name, f"Test ROC and precision-recall, {where}, {label}")
                figs.append((f"img/{name}", "ROC (left) and precision-recall (right) on the test split, one "
                             "line per seed; legend: mean AUROC / AP over the seeds"
                             + ("; micro-average over the one-vs-rest problems" if multilabel or len(class_names) > 2
                                else f"; positive class: {class_names[1] if len(class_names) > 1 else 1}")))
            if mats:
                name = f"confusion-{_slug(mode, frac)}.png"
                names = class_names if len(class_names) == next(iter(mats.values()))[0].shape[0] else \
                    [str(c) for c in range(next(iter(mats.values()))[0].shape[0])]
                plot_confusion(mats, names, img_dir / name, f"Test confusion matrices, {where}, {label}")
                figs.append((f"img/{name}", "Confusion matrices (rows: true class, columns: predicted = argmax), "
                             "counts summed over the seeds, shaded by the share of the true class"))
            runs: dict[str, list] = {}
            for r in group:
                recs = read_jsonl(study / "cells" / str(r["cell"]) / "metrics.jsonl")
                recs = [m for m in recs if _finite(m.get("epoch"))]
                if recs:
                    runs.setdefault(r["init"], []).append((r.get("seed", 0), recs))
            if runs:
                name = f"learning-{_slug(mode, frac)}.png"
                plot_learning_curves(runs, img_dir / name, f"Learning curves, {where}, {label}")
                figs.append((f"img/{name}", "Per cell (one line per seed): train loss (solid) and validation "
                             "loss (dashed), and the validation AUROC that picks the best checkpoint"))
            if figs:
                out.append((mode, frac, figs))
    return out


def confusion_by_init(group: list[dict], preds: dict) -> dict[str, tuple]:
    """init -> (confusion matrix of the argmax decision summed over its cells, number of cells);
    single-label cells with predictions only (scikit-learn ``confusion_matrix``)."""
    from sklearn.metrics import confusion_matrix

    mats: dict[str, tuple] = {}
    for r in group:
        pr = preds.get(r.get("cell"))
        if pr is None or pr[1].ndim != 1:
            continue
        probs, labels, _ = pr
        cm = confusion_matrix(labels, probs.argmax(1), labels=list(range(probs.shape[1])))
        old = mats.get(r["init"])
        mats[r["init"]] = (cm, 1) if old is None or old[0].shape != cm.shape else (old[0] + cm, old[1] + 1)
    return mats


def _anomaly_runs(study: Path) -> list[tuple[str, dict]]:
    """(name, metrics.json) of every scored split of an anomaly run in or under ``study``."""
    found = []
    for f in sorted(list(study.glob("scores_*/metrics.json")) + list(study.glob("*/scores_*/metrics.json"))):
        m = _read_json(f, None)
        if isinstance(m, dict):
            found.append((str(f.parent.relative_to(study)), m))
    return found


def _anomaly_html(runs: list[tuple[str, dict]]) -> str:
    rows = []
    for name, m in runs:
        for kind in ("l2", "l1", "ssim", "texture"):
            mk = m.get(kind)
            if not isinstance(mk, dict):
                continue
            op = mk.get("operating_point") or {}
            rows.append([_e(name) + (" (primary)" if m.get("primary_error") == kind else ""), _e(kind),
                         _num(mk.get("image_auroc")), _num(mk.get("image_ap")), _num(mk.get("pixel_auroc")),
                         _num(mk.get("pixel_best_dice")), _num(op.get("sensitivity")), _num(op.get("specificity")),
                         _num(m.get("n_anomalous")), _num(m.get("n_normal"))])
    html = _table(["scored split", "error", "image AUROC", "image AP", "pixel AUROC", "best pixel Dice",
                   "sensitivity @thr", "specificity @thr", "anomalous", "normal"], rows, "anomaly")
    # the detector beside the best sanity baseline (chosen on val; medmim/anomaly/baselines.py)
    base_rows = []
    for name, m in runs:
        b = m.get("baselines")
        if not isinstance(b, dict):
            continue
        ci = lambda c: f"{_num(c.get('value'))} ({_num(c.get('low'))}–{_num(c.get('high'))})"  # noqa: E731
        base_rows.append([_e(name), _e(b.get("detector_score", "")), ci(b.get("detector", {})),
                          _e(b.get("best_baseline", "")), ci(b.get("baseline", {})), ci(b.get("difference", {})),
                          _e(b.get("verdict", ""))])
    if base_rows:
        html += _table(["scored split", "detector", "AUROC (95% CI)", "best baseline (chosen on val)",
                        "baseline AUROC (95% CI)", "difference (paired CI)", "verdict"], base_rows, "anomaly-baselines")
    return html


CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:2em auto;max-width:1100px;padding:0 1em;color:#222}
h1{font-size:1.6em}h2{font-size:1.25em;border-bottom:1px solid #ddd;padding-bottom:.2em;margin-top:1.8em}
table{border-collapse:collapse;margin:.6em 0;font-size:.9em}th,td{border:1px solid #ccc;padding:.25em .6em;text-align:right}
th{background:#f3f3f3}td:first-child,th:first-child{text-align:left}tr.failed td{color:#a00}
pre{background:#f7f7f7;padding:.8em;overflow:auto;font-size:.8em;max-height:40em}
img{max-width:100%;border:1px solid #eee}figure{margin:1em 0}figcaption{font-size:.85em;color:#555}
.muted{color:#666;font-size:.9em}.pos{color:#070}.neg{color:#a00}
"""

JS = """
(function(){
  function check(){
    var imgs=document.images, ok=0, bad=0;
    for(var i=0;i<imgs.length;i++){ if(!imgs[i].complete) return false; if(imgs[i].naturalWidth>0) ok++; else bad++; }
    document.body.setAttribute('data-images', bad ? 'broken:'+bad : 'ok:'+ok);
    return true;
  }
  window.addEventListener('load', function(){ if(!check()){ var t=setInterval(function(){ if(check()) clearInterval(t); },50); } });
})();
"""


def _copy_images(study: Path, img_dir: Path) -> tuple[str | None, list[tuple[str, str, str]]]:
    """Copy the curve and the reconstruction grids; return (curve name, [(pretrain, caption, file)])."""
    img_dir.mkdir(parents=True, exist_ok=True)
    curve = None
    if (study / "label_efficiency.png").exists():
        shutil.copyfile(study / "label_efficiency.png", img_dir / "label_efficiency.png")
        curve = "img/label_efficiency.png"
    grids = []
    for pre in sorted(study.glob("pretrain-*")):
        pngs = sorted((pre / "recon").glob("*.png"))
        if not pngs:
            continue
        picks = [pngs[0], pngs[-1]] if len(pngs) > 1 else pngs
        for p in picks:
            name = f"{pre.name}-{p.name}"
            shutil.copyfile(p, img_dir / name)
            grids.append((pre.name.removeprefix("pretrain-"), p.stem, f"img/{name}"))
    return curve, grids


def _pretrain_rows(study: Path) -> list[list[str]]:
    rows = []
    for pre in sorted(study.glob("pretrain-*")):
        meta = _read_json(pre / "encoder.json", {}) or {}
        metrics = read_jsonl(pre / "metrics.jsonl")
        secs = sum(m.get("epoch_time_s", 0) or 0 for m in metrics)
        status = "failed" if (pre / "error.txt").exists() and not (pre / "done.json").exists() else \
            ("done" if (pre / "done.json").exists() else "incomplete")
        rows.append([_e(pre.name.removeprefix("pretrain-")), _e(meta.get("pretext", "")),
                     _e(meta.get("architecture", "")), _num(len(metrics)),
                     _num(metrics[0]["train_loss"]) if metrics else "–",
                     _num(metrics[-1]["train_loss"]) if metrics else "–", f"{secs:.0f}", _e(status)])
    return rows


def _data_card_html(card: dict | None, class_names: list[str] | None = None) -> str:
    if not card:
        return "<p class='muted'>no data card recorded</p>"
    card = scrub_identifiers(card)
    facts = [(k, card.get(k)) for k in ("name", "source", "licence", "modality", "preset", "n_images",
                                        "n_patients", "fingerprint", "skipped") if card.get(k) not in (None, "", {})]
    out = _table(["field", "value"], [[_e(k), _e(json.dumps(v) if isinstance(v, dict) else v)] for k, v in facts])
    splits = card.get("splits") or {}
    classes = sorted({c for s in splits.values() for c in (s.get("classes") or {})})
    names = {str(k): v for k, v in (card.get("label_names") or {}).items()} if isinstance(card.get("label_names"), dict) \
        else {}
    for i, n in enumerate(class_names or []):
        if n != str(i):
            names.setdefault(str(i), n)
    head = ["split", "images", "patients"] + [f"class {c}" + (f" ({names[c]})" if c in names else "") for c in classes]
    rows = [[_e(s), _num(v.get("images")), _num(v.get("patients")), *[_num((v.get("classes") or {}).get(c, 0))
                                                                        for c in classes]]
            for s, v in splits.items()]
    out += _table(head, rows, "data-card")
    cv = card.get("cross_validation")
    if cv and cv.get("per_fold"):
        fold_classes = sorted({c for f in cv["per_fold"] for c in (f.get("classes") or {})})
        out += (f"<p>Cross-validation: {_num(cv.get('folds'))} folds of the non-test patients (grouped by patient, "
                f"stratified); each cell validates on its fold and trains on the others; the test split "
                f"({_num(cv.get('test_images'))} images) is held out for every fold.</p>")
        out += _table(["fold", "images", "patients"] + [f"class {c}" + (f" ({names[c]})" if c in names else "")
                                                        for c in fold_classes],
                      [[_num(f.get("fold")), _num(f.get("images")), _num(f.get("patients")),
                        *[_num((f.get("classes") or {}).get(c, 0)) for c in fold_classes]] for f in cv["per_fold"]],
                      "folds")
    sizes = card.get("size_histogram")
    if sizes:
        out += "<p class='muted'>image sizes: " + ", ".join(f"{_e(k)} ({_e(v)})" for k, v in list(sizes.items())[:8]) \
            + "</p>"
    return out


def _load_yaml(path: Path) -> dict:
    try:
        import yaml

        obj = yaml.safe_load(path.read_text())
        return obj if isinstance(obj, dict) else {}
    except Exception:  # noqa: BLE001 - a missing or odd config only costs class names
        return {}


def study_context(study: Path, img_dir: Path | None = None) -> dict[str, Any]:
    """Everything the page shows beyond the study's own tables: class names, predictions per cell,
    per-class metrics, paired tests, degenerate-classifier flags and (with ``img_dir``) the figures."""
    summary_doc = _read_json(study / "summary.json", {}) or {}
    metric = summary_doc.get("metric", "auroc")
    rows = _read_json(study / "results.json", []) or []
    config = _load_yaml(study / "config.yaml")
    card = _read_json(study / "data_card.json")
    data_cfg = config.get("data") or {}
    multilabel = bool((config.get("finetune") or {}).get("multilabel"))
    preds = {r["cell"]: pr for r in rows if "cell" in r and (pr := _cell_predictions(study, r)) is not None}
    k = int(data_cfg.get("num_classes") or 0) or (next(iter(preds.values()))[0].shape[1] if preds else 0)
    if not k:
        k = len({c for s in ((card or {}).get("splits") or {}).values() for c in (s.get("classes") or {})}) or 2
    from medmim.eval.predictions import resolve_class_names

    names = resolve_class_names(k, config, card)
    if names == [str(c) for c in range(k)]:  # names recorded beside the predictions
        for pr in preds.values():
            if pr[2] and len(pr[2]) == k:
                names = pr[2]
                break
    flags = {}
    for r in rows:
        val_epochs = None
        mfile = study / "cells" / str(r.get("cell", "")) / "metrics.jsonl"
        if mfile.exists():
            val_epochs = sorted({int(m["epoch"]) for m in read_jsonl(mfile)
                                 if _finite(m.get("epoch")) and _finite(m.get("val_auroc"))})
        f = degenerate_flags({**r, "_num_classes": k, "_multilabel": multilabel}, preds.get(r.get("cell")),
                             val_epochs)
        if f:
            flags[r["cell"]] = f
    ctx = {"metric": metric, "rows": rows, "class_names": names, "num_classes": k, "preds": preds, "flags": flags,
           "paired": paired_tests(rows, metric), "per_class": per_class_table(rows, preds, k) if rows else [],
           "anomaly": _anomaly_runs(study), "figures": []}
    if img_dir is not None and rows:
        ctx["figures"] = _cell_figures(study, img_dir, rows, preds, names, multilabel)
    return ctx


def _pool_html(card: dict | None, summary: list[dict]) -> str:
    """What pretraining saw, beside the labelled fractions: pool size per source and the guard's drops."""
    pool = scrub_identifiers(card or {}).get("pretraining_pool")
    if not pool:
        return ""
    d = pool.get("dropped", {})
    fr = sorted({(s["fraction"], s.get("n_labelled")) for s in summary}, key=lambda t: t[0])
    labelled = ", ".join(f"{f:g} = {_num(n)}" for f, n in fr) or "–"
    text = (f"<p id='pool'>Pretraining saw <b>{_num(pool.get('pretraining_images'))}</b> images: "
            f"{_num(pool.get('labelled_images'))} labelled (train+val) + <b>{_num(pool.get('images'))}</b> "
            f"unlabelled pool images. Labelled images per fraction: {_e(labelled)}. Leakage guard: "
            f"{_num(d.get('val'))} duplicate(s) of val and {_num(d.get('test'))} of test dropped (content hash), "
            f"{_num((d.get('id_val') or 0) + (d.get('id_test') or 0))} image(s) of val/test patients dropped.</p>")
    rows = [[_e(s.get("name")), _e(s.get("kind")), _e(s.get("preset")), _num(s.get("found")), _num(s.get("images")),
             _num(s.get("dropped_val")), _num(s.get("dropped_test")),
             _num((s.get("dropped_id_val") or 0) + (s.get("dropped_id_test") or 0)), _num(s.get("patients"))]
            for s in pool.get("sources", [])]
    return text + _table(["pool source", "kind", "preset", "found", "used", "dup. val", "dup. test",
                          "val/test patient", "patients"], rows, "pool")


def render_html(study: Path, curve: str | None, grids: list[tuple[str, str, str]],
                ctx: dict[str, Any] | None = None) -> str:
    summary_doc = _read_json(study / "summary.json", {}) or {}
    metric = summary_doc.get("metric", "auroc")
    summary = summary_doc.get("groups", [])
    ctx = ctx if ctx is not None else study_context(study)
    rows = ctx["rows"]
    env = scrub_identifiers(_read_json(study / "environment.json", {}) or {})
    card = _read_json(study / "data_card.json")
    config = (study / "config.yaml").read_text() if (study / "config.yaml").exists() else ""
    n_ok = sum(r.get("status") == "ok" for r in rows)
    n_fail = len(rows) - n_ok
    names = ctx["class_names"]
    flags = ctx["flags"]

    parts = [f"<!doctype html><html lang='en'><head><meta charset='utf-8'><title>medmim study: {_e(study.name)}</title>",
             f"<style>{CSS}</style></head><body data-images='pending'>",
             f"<h1>Label-efficiency study <code>{_e(study.name)}</code></h1>",
             f"<p class='muted'>metric: test {_e(metric)} · cells finished: {n_ok}"
             + (f" · <span class='neg'>failed: {n_fail}</span>" if n_fail else "")
             + (f" · <span class='neg'>flagged degenerate: {len(flags)}</span>" if flags else "")
             + f" · classes: {_e(', '.join(f'{c} = {n}' if n != str(c) else str(c) for c, n in enumerate(names)))}"
             + f" · report written {_e(_dt.datetime.now().strftime('%Y-%m-%d %H:%M'))}</p>"]

    parts.append("<h2>Results</h2>")
    cv = any(fold_of(r) is not None for r in rows)
    unit = "cells (folds × seeds)" if cv else "seeds"
    if rows:
        summary = add_paired([dict(s) for s in summary], rows, metric)  # also for a summary.json written before
    srows = []
    for s in summary:
        m = s.get(f"{metric}_mean")
        n = s.get("n_cells", s.get("n_seeds")) or 0
        sd = _num(s.get(f"{metric}_std")) if n >= 2 else "–"
        ci = f"{_num(s.get('ci95_low'))} – {_num(s.get('ci95_high'))}" if n >= 2 and _finite(s.get("ci95_low")) \
            else f"– <span class='muted'>(n={n})</span>"
        n_flag = sum(1 for r in rows if r.get("cell") in flags and (r.get("init"), r.get("mode"), r.get("fraction"))
                     == (s["init"], s["mode"], s["fraction"]))
        count = f"{n} ({s.get('n_folds')} × {s.get('n_seeds')})" if cv else _num(n)
        t = {"p": s.get("p_wilcoxon"), "n_pairs": s.get("n_pairs") or 0, "ties": s.get("ties") or 0}
        delta = _delta_html(s["delta_vs_scratch"], t) + f" <span class='muted'>vs {_e(s['vs_scratch'])}</span>" \
            if s.get("vs_scratch") else "–"
        srows.append([_e(s["init"]), _e(s["mode"]), _frac(s["fraction"]),
                      _num(s.get("n_labelled")), _num(m), sd, ci, count, delta, _num(s.get("failed")),
                      f"<span class='neg'>{n_flag}</span>" if n_flag else "0"])
    parts.append(_table(["init", "mode", "fraction", "labelled images", f"{metric} mean", "std",
                         "95% CI (cells)" if cv else "95% CI (seeds)",
                         unit, "Δ vs scratch (Wilcoxon)", "failed", "degenerate"], srows, "summary"))
    parts.append(f"<p class='muted'>95% CI: t-interval over the {unit}' test values (shown from 2 on)"
                 + (": the folds share training patients, so treat it as optimistic" if cv else "")
                 + ". Δ vs scratch: mean difference over matched cells (same " + ("fold and " if cv else "")
                 + "seed) with the two-sided Wilcoxon signed-rank p-value. "
                 "Degenerate: cells flagged below (one class predicted for every image, or the best checkpoint "
                 "at the first validation pass).</p>")
    parts.append(_pool_html(card, summary))
    comp = comparison(summary, metric)
    if comp:
        crow = []
        for c in comp:
            t = paired_test(rows, c["best_init"], c["scratch_init"], c["mode"], c["fraction"], metric) if rows else None
            crow.append([_e(c["mode"]), _frac(c["fraction"]), f"{_num(c['scratch'])} ({_e(c['scratch_init'])})",
                         f"{_num(c['best_pretrained'])} ({_e(c['best_init'])})",
                         _delta_html(c["delta"], t if t and t["n_pairs"] else None)])
        parts.append("<h3>Best pretrained initialisation vs scratch</h3>")
        parts.append(_table(["mode", "fraction", "scratch", "best pretrained", "Δ (paired test)"], crow, "comparison"))
    if ctx["paired"]:
        prow = [[_e(t["mode"]), _frac(t["fraction"]), _e(t["init"]), _e(t["scratch"]), _num(t["n_pairs"]),
                 _delta_html(t["mean_diff"], None), f"{t['wins']} / {t['losses']}", _e(_p_text(t))]
                for t in ctx["paired"]]
        parts.append("<h3>Paired tests: each initialisation against scratch</h3>")
        what = "(fold, seed) pairs" if cv else "seeds"
        parts.append(_table(["mode", "fraction", "init", "against", f"matched {what}", f"mean Δ {metric}",
                             "pairs better / worse", "Wilcoxon signed-rank (two-sided)"], prow, "paired"))
        parts.append("<p class='muted'>Pairs are cells with the same " + ("cross-validation fold and " if cv else "")
                     + "seed (same " + ("training and validation patients, " if cv else "") + "label subset and same "
                     f"fine-tuning randomness). Below {MIN_PAIRS} pairs the exact test cannot reach p &lt; 0.05, so no "
                     "p-value is given; a Δ is coloured only when p &lt; 0.05.</p>")
    if curve:
        parts.append(f"<figure><img src='{_e(curve)}' alt='label-efficiency curve'><figcaption>Test {_e(metric)} "
                     "against the number of labelled images (log scale); band: 95% CI over "
                     + ("folds × seeds" if cv else "seeds") + ".</figcaption></figure>")

    if ctx["per_class"]:
        parts.append("<h2>Per-class metrics</h2>")
        pcr = [[_e(p["mode"]), _frac(p["fraction"]), _e(p["init"]),
                _e(f"{p['class']} ({names[p['class']]})" if names[p["class"]] != str(p["class"]) else p["class"]),
                _ci_cell(p["auroc"]), _ci_cell(p["sensitivity"]), _ci_cell(p["precision"]),
                _num(max(p["auroc"]["n"], p["sensitivity"]["n"]))] for p in ctx["per_class"]]
        parts.append(_table(["mode", "fraction", "init", "class", "AUROC (one-vs-rest)", "sensitivity (recall)",
                             "precision (PPV)", "cells" if cv else "seeds"], pcr, "per-class"))
        over = "cells (folds × seeds)" if cv else "seeds"
        parts.append(f"<p class='muted'>Mean over {over} [95% CI: t-interval over {over}]; with one cell, the "
                     "percentile bootstrap CI over the test images of that cell. Sensitivity and precision of the "
                     "argmax decision (multi-label: each output at 0.5).</p>")

    if ctx["figures"]:
        parts.append("<h2>Curves per fraction</h2>")
        for mode, frac, figs in ctx["figures"]:
            parts.append(f"<h3>{_e(mode)}, fraction {_frac(frac)}</h3>")
            for src, caption in figs:
                parts.append(f"<figure><img src='{_e(src)}' alt='{_e(caption[:60])}'>"
                             f"<figcaption>{_e(caption)}</figcaption></figure>")

    if flags:
        parts.append("<h2>Degenerate classifiers</h2>")
        parts.append(_table(["cell", "why"], [[_e(c), _e("; ".join(f))] for c, f in sorted(flags.items())],
                            "degenerate"))
        parts.append("<p class='muted'>A cell that predicts one class for every test image has learned nothing "
                     "usable whatever its AUROC; a best checkpoint at the first validation pass (epoch 0 when "
                     "every epoch is validated) means validation never improved after it (too few updates, a "
                     "too-high learning rate, or too few validation labels to select on).</p>")

    parts.append("<h2>Cells</h2>")
    fields = [k for k in ("cell", "init", "mode", "fraction", "seed", "fold", "n_labelled", "best_epoch", "val_auroc",
                          f"test_{metric}", "test_accuracy", "status", "error")
              if any(k in r for r in rows)]
    crow_html = []
    for r in rows:
        cls = "" if r.get("status") == "ok" else " class='failed'"
        fl = flags.get(r.get("cell"))
        crow_html.append(f"<tr{cls}>" + "".join(f"<td>{_num(r.get(k))}</td>" for k in fields)
                         + f"<td>{_e('; '.join(fl)) if fl else ''}</td></tr>")
    parts.append("<table id='cells'><thead><tr>" + "".join(f"<th>{_e(f)}</th>" for f in fields + ["flags"])
                 + "</tr></thead><tbody>" + "".join(crow_html) + "</tbody></table>")

    parts.append("<h2>Pretraining</h2>")
    prow = _pretrain_rows(study)
    parts.append(_table(["init", "pretext", "encoder", "epochs", "first loss", "last loss", "seconds", "status"], prow)
                 if prow else "<p class='muted'>no pretraining in this study</p>")
    for init, caption, src in grids:
        parts.append(f"<figure><img src='{_e(src)}' alt='reconstructions {_e(init)} {_e(caption)}'>"
                     f"<figcaption>{_e(init)}, {_e(caption)}: input / masked input / reconstruction</figcaption></figure>")

    if ctx["anomaly"]:
        parts.append("<h2>Anomaly detection</h2>")
        parts.append(_anomaly_html(ctx["anomaly"]))

    parts.append("<h2>Data</h2>")
    parts.append(_data_card_html(card, names))

    parts.append("<h2>Configuration</h2>")
    parts.append(f"<pre id='config'>{_e(config)}</pre>")
    parts.append("<h2>Environment</h2>")
    parts.append(f"<pre id='environment'>{_e(json.dumps(env, indent=2, sort_keys=True, default=str))}</pre>")
    parts.append(f"<script>{JS}</script></body></html>")
    return "\n".join(parts)


def write_report(study_dir: str | Path, out_dir: str | Path | None = None) -> Path:
    """Render ``<study_dir>/report/index.html`` (+ img/); the folder is replaced as a whole."""
    study = Path(study_dir)
    out = Path(out_dir) if out_dir else study / "report"
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".report.", dir=out.parent))
    try:
        curve, grids = _copy_images(study, tmp / "img")
        ctx = study_context(study, tmp / "img")
        write_text(tmp / "index.html", render_html(study, curve, grids, ctx))
        old = None
        if out.exists():
            old = out.with_name(f".{out.name}.old.{os.getpid()}")
            os.replace(out, old)
        os.replace(tmp, out)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out / "index.html"
