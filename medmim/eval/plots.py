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
    """The label-efficiency curve: test ``metric`` (mean over seeds, 95% CI band or ± std) against the
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
    ax.set_title(title or f"Label efficiency: test {metric} vs labels (mean, 95% CI over seeds)", fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    if plotted:
        ax.legend(fontsize=8, loc="lower right")
    else:
        ax.text(0.5, 0.5, "no finished cells yet", transform=ax.transAxes, ha="center")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
    return path


def _finite(v) -> bool:
    return isinstance(v, (int, float)) and v is not None and math.isfinite(v)
