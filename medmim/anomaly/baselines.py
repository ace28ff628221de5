"""Sanity baselines that every anomaly evaluation reports beside the detector.

A detector has learned something only if it beats scores that need no learning. On the same images
(the same splits, through the same data chain) ``medmim anomaly`` computes:

* **image statistics**, each with both signs (``+name``: higher = more anomalous, ``-name``: lower):
  ``mean`` (intensity), ``variance``, ``laplacian`` (mean squared discrete Laplacian) and
  ``highfreq_s<sigma>`` (mean squared ``image - Gaussian blur``, sigma 0.5 and 1);
* **the same model untrained**: the configured architecture at its random initialisation (same seed),
  scored exactly like the trained one (``untrained_<error>`` for every error kind).

The best baseline is chosen on the **validation** split (highest val image AUROC), as the detector's
settings are, and compared with the detector on the scored split: both AUROCs with percentile
bootstrap CIs and the paired bootstrap CI of their difference (the same resamples for both). The
verdict says plainly whether the detector beats it. The best baseline on the scored split itself
(not chosen on val: an optimistic bound for the baselines) is reported too.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from medmim.anomaly.metrics import image_metrics
from medmim.anomaly.scoring import gaussian_filter
from medmim.eval.metrics import binary_auroc, bootstrap_cis

STATISTICS = ("mean", "variance", "laplacian", "highfreq_s0.5", "highfreq_s1")
HIGHFREQ_SIGMAS = {"highfreq_s0.5": 0.5, "highfreq_s1": 1.0}


# ---- image statistics ---------------------------------------------------------------------------
def laplacian(x: torch.Tensor) -> torch.Tensor:
    """Discrete Laplacian (2D 5-point / 3D 7-point stencil, edge-replicated borders) of
    ``(B, C, *spatial)``: the same as ``scipy.ndimage.laplace(mode="nearest")`` per channel."""
    d = x.ndim - 2
    if d not in (2, 3):
        raise ValueError(f"laplacian: expected (B, C, H, W[, D]), got shape {tuple(x.shape)}")
    b, c = x.shape[:2]
    flat = x.reshape(b * c, 1, *x.shape[2:]).float()
    k = torch.zeros((3,) * d, dtype=flat.dtype)
    centre = (1,) * d
    k[centre] = -2.0 * d
    for axis in range(d):
        for off in (0, 2):
            idx = list(centre)
            idx[axis] = off
            k[tuple(idx)] = 1.0
    conv = F.conv2d if d == 2 else F.conv3d
    out = conv(F.pad(flat, [1, 1] * d, mode="replicate"), k[None, None].to(flat.device))
    return out.reshape(x.shape)


def image_statistics(x: torch.Tensor) -> dict[str, torch.Tensor]:
    """``(B, C, *spatial)`` -> one value per image for each of :data:`STATISTICS` (``(B,)`` each)."""
    x = x.float()
    flat = x.reshape(x.shape[0], -1)
    out = {"mean": flat.mean(1), "variance": flat.var(1, unbiased=False),
           "laplacian": laplacian(x).reshape(x.shape[0], -1).pow(2).mean(1)}
    for name, sigma in HIGHFREQ_SIGMAS.items():
        out[name] = (x - gaussian_filter(x, sigma)).reshape(x.shape[0], -1).pow(2).mean(1)
    return out


def statistic_scores(items: Sequence[Mapping], batch_size: int = 256) -> dict[str, np.ndarray]:
    """Every statistic with both signs for materialised items (``{"image": (C, *spatial)}``):
    ``{"+mean": (N,), "-mean": (N,), ...}``."""
    parts: dict[str, list[torch.Tensor]] = {}
    for start in range(0, len(items), batch_size):
        x = torch.stack([it["image"] for it in items[start:start + batch_size]])
        for name, v in image_statistics(x).items():
            parts.setdefault(name, []).append(v)
    out: dict[str, np.ndarray] = {}
    for name in STATISTICS:
        v = torch.cat(parts[name]).double().numpy() if parts else np.zeros(0)
        out[f"+{name}"], out[f"-{name}"] = v, -v
    return out


# ---- choosing on val, comparing on the scored split ----------------------------------------------
def _auroc_col(j: int):
    def f(y, s):
        return binary_auroc(y, np.asarray(s)[:, j])
    return f


def _diff(y, s):
    s = np.asarray(s)
    return binary_auroc(y, s[:, 0]) - binary_auroc(y, s[:, 1])


def compare_with_baselines(detector: str, y_val, val_scores: Mapping[str, np.ndarray], y_eval,
                           eval_scores: Mapping[str, np.ndarray], *, n_boot: int = 1000, seed: int = 0,
                           alpha: float = 0.05) -> dict:
    """Choose the best baseline on val, compare the detector with it on the scored ("eval") split.

    ``val_scores`` / ``eval_scores`` map score names to ``(N,)`` arrays (higher = more anomalous);
    both hold ``detector`` and every baseline. Returns a JSON-ready dict: ``candidates`` (val and
    eval AUROC / AP of every score), ``best_baseline`` (by val AUROC), ``detector`` / ``baseline``
    (eval AUROC with its bootstrap CI), ``difference`` (detector minus baseline, paired bootstrap
    CI), ``best_baseline_on_eval`` (the best baseline by eval AUROC, an optimistic bound),
    ``beats_best_baseline`` (the difference's CI lies above 0) and a plain-language ``verdict``.
    """
    y_val = np.asarray(y_val).astype(bool)
    y_eval = np.asarray(y_eval).astype(bool)
    baselines = [k for k in eval_scores if k != detector]
    if detector not in eval_scores or not baselines:
        raise ValueError(f"compare_with_baselines: need '{detector}' and at least one baseline score")
    cands: dict[str, dict] = {}
    for name, s in eval_scores.items():
        ev = image_metrics(y_eval, s)
        vs = val_scores.get(name)
        va = binary_auroc(y_val, vs) if vs is not None and len(vs) == len(y_val) else float("nan")
        cands[name] = {"val_auroc": va, "auroc": ev["auroc"], "ap": ev["ap"]}
    ranked = sorted(baselines, key=lambda k: -np.nan_to_num(cands[k]["val_auroc"], nan=-1.0))
    best = ranked[0]
    best_eval = max(baselines, key=lambda k: np.nan_to_num(cands[k]["auroc"], nan=-1.0))
    pair = np.stack([np.asarray(eval_scores[detector], np.float64), np.asarray(eval_scores[best], np.float64)], 1)
    fns = [_auroc_col(0), _auroc_col(1), _diff]
    for f, name in zip(fns, ("detector", "baseline", "difference")):
        f.__name__ = name
    ci = bootstrap_cis(y_eval, pair, fns, n=n_boot, seed=seed, alpha=alpha)
    d = ci["difference"]
    beats = bool(d["low"] > 0)
    det_a, base_a = ci["detector"]["value"], ci["baseline"]["value"]
    level = int(round(100 * (1 - alpha)))
    if beats:
        verdict = (f"detector BEATS the best baseline ({best}, chosen on val): AUROC {det_a:.3f} vs {base_a:.3f}, "
                   f"difference {d['value']:+.3f} ({level}% CI {d['low']:+.3f} to {d['high']:+.3f})")
    elif d["value"] > 0:
        verdict = (f"detector does NOT clearly beat the best baseline ({best}, chosen on val): AUROC {det_a:.3f} "
                   f"vs {base_a:.3f}, difference {d['value']:+.3f} ({level}% CI {d['low']:+.3f} to "
                   f"{d['high']:+.3f} includes 0)")
    else:
        verdict = (f"detector does NOT beat the best baseline ({best}, chosen on val): AUROC {det_a:.3f} vs "
                   f"{base_a:.3f}, difference {d['value']:+.3f} ({level}% CI {d['low']:+.3f} to {d['high']:+.3f})")
    margin = det_a - cands[best_eval]["auroc"]
    if best_eval != best and not margin > 0:
        verdict += (f"; and it does NOT beat {best_eval} ({cands[best_eval]['auroc']:.3f}), the best baseline on "
                    f"this split itself")
    return {"detector_score": detector, "candidates": cands, "best_baseline": best,
            "detector": ci["detector"], "baseline": ci["baseline"], "difference": d,
            "best_baseline_on_eval": {"name": best_eval, "auroc": cands[best_eval]["auroc"], "margin": margin},
            "beats_best_baseline": beats, "verdict": verdict, "n_boot": int(n_boot), "alpha": alpha}


def _f(v: float) -> str:
    return "–" if v is None or (isinstance(v, float) and np.isnan(v)) else f"{v:.3f}"


def comparison_rows(cmp: Mapping) -> list[dict]:
    """One row per score (detector first, then baselines by val AUROC): the CSV / markdown table."""
    det, best = cmp["detector_score"], cmp["best_baseline"]
    names = [det] + sorted((k for k in cmp["candidates"] if k != det),
                           key=lambda k: -np.nan_to_num(cmp["candidates"][k]["val_auroc"], nan=-1.0))
    rows = []
    for k in names:
        c = cmp["candidates"][k]
        role = "detector" if k == det else ("best baseline (val)" if k == best else "baseline")
        ci = cmp["detector"] if k == det else (cmp["baseline"] if k == best else None)
        rows.append({"score": k, "role": role, "val_auroc": _f(c["val_auroc"]), "auroc": _f(c["auroc"]),
                     "auroc_ci_low": _f(ci["low"]) if ci else "", "auroc_ci_high": _f(ci["high"]) if ci else "",
                     "ap": _f(c["ap"])})
    return rows


def comparison_markdown(cmp: Mapping, split: str = "test") -> str:
    """The detector beside every baseline (val AUROC, ``split`` AUROC with CI, AP) and the verdict."""
    level = int(round(100 * (1 - cmp["alpha"])))
    lines = [f"| score | role | val AUROC | {split} AUROC ({level}% CI) | {split} AP |", "|---|---|---|---|---|"]
    for r in comparison_rows(cmp):
        ci = f" ({r['auroc_ci_low']}–{r['auroc_ci_high']})" if r["auroc_ci_low"] else ""
        name = f"**{r['score']}**" if r["role"] != "baseline" else r["score"]
        lines.append(f"| {name} | {r['role']} | {r['val_auroc']} | {r['auroc']}{ci} | {r['ap']} |")
    d = cmp["difference"]
    be = cmp["best_baseline_on_eval"]
    lines += ["", f"Detector minus best baseline ({split} AUROC, paired bootstrap, {cmp['n_boot']} resamples): "
              f"{d['value']:+.3f} ({level}% CI {d['low']:+.3f} to {d['high']:+.3f}).",
              f"Best baseline on the {split} split itself (not chosen on val, optimistic for the baselines): "
              f"{be['name']} {be['auroc']:.3f}; detector margin {be['margin']:+.3f}.", "", f"**{cmp['verdict']}**", ""]
    others = cmp.get("other_detectors") or {}
    if others:
        lines += [f"The other scores against the same baseline ({cmp['best_baseline']}), {split} AUROC and difference "
                  f"({level}% CIs):", ""]
        for kind, o in others.items():
            a, d = o["auroc"], o["difference"]
            lines.append(f"- {kind}: {a['value']:.3f} ({a['low']:.3f}–{a['high']:.3f}), {d['value']:+.3f} "
                         f"({d['low']:+.3f} to {d['high']:+.3f}){' — beats it' if o['beats_best_baseline'] else ''}")
        lines.append("")
    return "\n".join(lines)
