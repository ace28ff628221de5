"""Study plots (matplotlib, Agg backend: no display needed)."""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from medmim.io import atomic_path  # noqa: E402

_STYLE = {"full": "-", "linear": "--"}


def plot_label_efficiency(summary: list[dict], metric: str, path: str | Path, title: str | None = None) -> Path:
    """The label-efficiency curve: test ``metric`` (mean over seeds, or folds × seeds, 95% CI band or ± std) against the
    number of labelled images (log x), one line per initialisation × evaluation mode. The CI band is
    drawn as the summary gives it (``summarize_rows`` clips it to [0, 1] for bounded metrics)."""
    path = Path(path)
    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=110)
    lines: dict[tuple[str, str], list[dict]] = {}
    for s in summary:
        lines.setdefault((s["init"], s["mode"]), []).append(s)
    inits = sorted({k[0] for k in lines})
    colours = {init: plt.cm.tab10(i % 10) for i, init in enumerate(inits)}
    plotted = 0
    for (init, mode), pts in sorted(lines.items()):
        pts = [p for p in pts if p.get("n_labelled") and _finite(p[f"{metric}_mean"])]
        if not pts:
            continue
        pts.sort(key=lambda p: p["n_labelled"])
        x = [p["n_labelled"] for p in pts]
        y = [p[f"{metric}_mean"] for p in pts]
        lo = [p["ci95_low"] if _finite(p.get("ci95_low")) else p[f"{metric}_mean"] - (p[f"{metric}_std"] or 0)
              for p in pts]
        hi = [p["ci95_high"] if _finite(p.get("ci95_high")) else p[f"{metric}_mean"] + (p[f"{metric}_std"] or 0)
              for p in pts]
        c = colours[init]
        ax.plot(x, y, _STYLE.get(mode, ":"), marker="o", color=c, label=f"{init} ({mode})")
        ax.fill_between(x, lo, hi, color=c, alpha=0.15, linewidth=0)
        plotted += 1
    ax.set_xscale("log")
    ax.set_xlabel("labelled training images (log scale)")
    ax.set_ylabel(f"test {metric}")
    over = "folds × seeds" if any((s.get("n_folds") or 0) > 1 for s in summary) else "seeds"
    ax.set_title(title or f"Label efficiency: test {metric} vs labels (mean, 95% CI over {over})", fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    if plotted:
        ax.legend(fontsize=8, loc="lower right")
    else:
        ax.text(0.5, 0.5, "no finished cells yet", transform=ax.transAxes, ha="center")
    fig.tight_layout()
    return save_figure(fig, path)


def _finite(v) -> bool:
    return isinstance(v, (int, float)) and v is not None and math.isfinite(v)


# ---- per-fraction figures of the report: ROC / PR, confusion matrices, learning curves ------------

def curve_points(labels, probs) -> dict:
    """ROC and precision-recall points of one cell's test predictions (scikit-learn).

    Binary: the scores of class 1. Multi-class and multi-label: the micro-average over the
    one-vs-rest problems (every (case, class) pair is one decision). Returns ``fpr``, ``tpr``,
    ``precision``, ``recall``, ``auroc``, ``ap`` and ``average`` ("class 1" or "micro"); the
    curves are None when the labels hold one class only.
    """
    import numpy as np
    from sklearn.metrics import auc, average_precision_score, precision_recall_curve, roc_curve

    p = np.asarray(probs, dtype=np.float64)
    y = np.asarray(labels)
    if p.ndim == 1:
        p = np.stack([1 - p, p], 1)
    k = p.shape[1]
    if y.ndim == 2:  # multi-label
        y_bin, score, average = y.astype(int).ravel(), p.ravel(), "micro"
    elif k == 2:
        y_bin, score, average = (y.astype(int) == 1).astype(int), p[:, 1], "class 1"
    else:
        y_bin, score, average = np.eye(k, dtype=int)[y.astype(int)].ravel(), p.ravel(), "micro"
    out = {"average": average, "fpr": None, "tpr": None, "precision": None, "recall": None,
           "auroc": float("nan"), "ap": float("nan"), "prevalence": float(y_bin.mean()) if len(y_bin) else float("nan")}
    if y_bin.min(initial=0) == y_bin.max(initial=0):
        return out
    fpr, tpr, _ = roc_curve(y_bin, score)
    prec, rec, _ = precision_recall_curve(y_bin, score)
    out.update(fpr=fpr, tpr=tpr, precision=prec, recall=rec, auroc=float(auc(fpr, tpr)),
               ap=float(average_precision_score(y_bin, score)))
    return out


def plot_roc_pr(curves: dict[str, list[dict]], path: str | Path, title: str) -> Path:
    """ROC (left) and precision-recall (right) curves, one colour per init, one line per seed.

    ``curves``: init -> list of :func:`curve_points` results (one per seed). The legend gives the
    mean AUROC / AP over the seeds drawn."""
    import numpy as np

    path = Path(path)
    fig, (ax_roc, ax_pr) = plt.subplots(1, 2, figsize=(9.6, 4.2), dpi=100)
    average = "class 1"
    prevalences = []
    for i, (init, cells) in enumerate(sorted(curves.items())):
        c = plt.cm.tab10(i % 10)
        drawn = [cp for cp in cells if cp["fpr"] is not None]
        if not drawn:
            continue
        average = drawn[0]["average"]
        prevalences += [cp["prevalence"] for cp in drawn]
        n = len(drawn)
        auroc = float(np.mean([cp["auroc"] for cp in drawn]))
        ap = float(np.mean([cp["ap"] for cp in drawn]))
        for j, cp in enumerate(drawn):
            lab = j == 0
            ax_roc.plot(cp["fpr"], cp["tpr"], color=c, lw=1.2, alpha=0.8,
                        label=f"{init}: AUROC {auroc:.3f}" + (f" (mean of {n})" if n > 1 else "") if lab else None)
            ax_pr.step(cp["recall"], cp["precision"], where="post", color=c, lw=1.2, alpha=0.8,
                       label=f"{init}: AP {ap:.3f}" + (f" (mean of {n})" if n > 1 else "") if lab else None)
    ax_roc.plot([0, 1], [0, 1], ":", color="grey", lw=1, label="chance")
    if prevalences:
        ax_pr.axhline(float(np.mean(prevalences)), ls=":", color="grey", lw=1, label="chance (prevalence)")
    for ax, xl, yl in ((ax_roc, "false positive rate", "true positive rate (sensitivity)"),
                       (ax_pr, "recall (sensitivity)", "precision (PPV)")):
        ax.set_xlim(-0.01, 1.01)
        ax.set_ylim(-0.01, 1.01)
        ax.set_xlabel(xl)
        ax.set_ylabel(yl)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7, loc="lower right" if ax is ax_roc else "lower left")
    ax_roc.set_title(f"ROC ({average})", fontsize=9)
    ax_pr.set_title(f"precision-recall ({average})", fontsize=9)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return save_figure(fig, path)


def plot_confusion(matrices: dict[str, tuple], class_names: list[str], path: str | Path, title: str) -> Path:
    """One confusion matrix per init (rows: true class, columns: predicted), counts summed over the
    seeds; cells are shaded by the row share. ``matrices``: init -> (matrix (K, K), n_seeds)."""
    import numpy as np

    path = Path(path)
    items = sorted(matrices.items())
    n = max(1, len(items))
    k = len(class_names)
    side = max(2.6, 0.5 * k + 1.6)
    fig, axes = plt.subplots(1, n, figsize=(side * n, side), dpi=100, squeeze=False)
    short = [nm if len(nm) <= 12 else nm[:11] + "…" for nm in class_names]
    for ax, (init, (cm, seeds)) in zip(axes[0], items):
        cm = np.asarray(cm, dtype=np.int64)
        rows = cm.sum(1, keepdims=True)
        share = np.divide(cm, rows, out=np.zeros(cm.shape, dtype=float), where=rows > 0)
        ax.imshow(share, cmap="Blues", vmin=0, vmax=1)
        for a in range(k):
            for b in range(k):
                ax.text(b, a, str(cm[a, b]), ha="center", va="center", fontsize=8,
                        color="white" if share[a, b] > 0.6 else "black")
        ax.set_xticks(range(k), short, rotation=45 if k > 3 else 0, ha="right" if k > 3 else "center", fontsize=7)
        ax.set_yticks(range(k), short, fontsize=7)
        ax.set_xlabel("predicted", fontsize=8)
        ax.set_ylabel("true", fontsize=8)
        ax.set_title(f"{init} ({seeds} seed{'s' if seeds != 1 else ''})", fontsize=9)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return save_figure(fig, path)


def plot_learning_curves(cells: dict[str, list[tuple[int, list[dict]]]], path: str | Path, title: str,
                         metric: str = "val_auroc") -> Path:
    """Train / val loss (left) and the validation ``metric`` (right) per epoch, one colour per init,
    one line per cell (seed). ``cells``: init -> [(seed, metrics.jsonl records)]. Epochs without a
    validation pass (``finetune.max_evals``) are skipped on the val lines."""
    path = Path(path)
    fig, (ax_l, ax_m) = plt.subplots(1, 2, figsize=(9.6, 3.8), dpi=100)
    for i, (init, runs) in enumerate(sorted(cells.items())):
        c = plt.cm.tab10(i % 10)
        for j, (seed, recs) in enumerate(sorted(runs, key=lambda t: t[0])):
            ep = [r["epoch"] + 1 for r in recs if _finite(r.get("train_loss"))]
            tl = [r["train_loss"] for r in recs if _finite(r.get("train_loss"))]
            vr = [r for r in recs if _finite(r.get("val_loss"))]
            mr = [r for r in recs if _finite(r.get(metric))]
            first = j == 0
            ax_l.plot(ep, tl, "-", color=c, lw=1, alpha=0.8, label=f"{init} train" if first else None)
            if vr:
                ax_l.plot([r["epoch"] + 1 for r in vr], [r["val_loss"] for r in vr], "--", color=c, lw=1, alpha=0.8,
                          marker="." if len(vr) < 30 else None, label=f"{init} val" if first else None)
            if mr:
                ax_m.plot([r["epoch"] + 1 for r in mr], [r[metric] for r in mr], "-", color=c, lw=1, alpha=0.8,
                          marker="." if len(mr) < 30 else None, label=init if first else None)
    ax_l.set_xlabel("epoch")
    ax_l.set_ylabel("loss")
    ax_l.set_title("train (solid) / val (dashed) loss", fontsize=9)
    ax_m.set_xlabel("epoch")
    ax_m.set_ylabel(metric)
    ax_m.set_title(f"{metric} (best checkpoint chosen on it)", fontsize=9)
    from matplotlib.ticker import MaxNLocator

    for ax in (ax_l, ax_m):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(True, alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return save_figure(fig, path)


def save_figure(fig, path: str | Path, **savefig_kw) -> Path:
    """Write ``fig`` as a PNG atomically (``savefig_kw``: more ``Figure.savefig`` options) and close it."""
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", **savefig_kw)
    plt.close(fig)
    return path
