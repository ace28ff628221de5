"""Anomaly-detection metrics: image-level AUROC / AP, pixel-level AUROC / AP / best Dice, thresholds.

AUROC and AP come from the project's one metrics module (``medmim.eval.metrics``); only what is
specific to anomaly detection (best Dice over thresholds, thresholds at a specificity, operating
points) lives here. Undefined values (one class only) are NaN, never an exception.
"""

from __future__ import annotations

import numpy as np

from medmim.eval.metrics import binary_ap, binary_auroc


def _two_classes(y: np.ndarray) -> bool:
    return y.size > 0 and y.min() != y.max()


def image_metrics(is_anomalous, scores) -> dict[str, float]:
    """``is_anomalous`` (N,) bool/0-1, ``scores`` (N,) higher = more anomalous -> AUROC and AP."""
    y = np.asarray(is_anomalous).astype(bool).ravel()
    s = np.asarray(scores, dtype=np.float64).ravel()
    if not _two_classes(y):
        return {"auroc": float("nan"), "ap": float("nan")}
    return {"auroc": binary_auroc(y, s), "ap": binary_ap(y, s)}


def best_dice(gt, scores) -> tuple[float, float]:
    """The best Dice over all thresholds ``score >= t`` and the threshold reaching it.

    Sorting the scores once gives, for every cut, the true positives as a cumulative sum; only cuts
    between distinct score values are valid thresholds. Dice = 2 TP / (predicted + actual).
    """
    y = np.asarray(gt).astype(bool).ravel()
    s = np.asarray(scores, dtype=np.float64).ravel()
    n_pos = int(y.sum())
    if n_pos == 0 or y.size == 0:
        return float("nan"), float("nan")
    order = np.argsort(-s, kind="stable")
    s_sorted, tp = s[order], np.cumsum(y[order])
    # the last index of every run of equal scores: predicting "score >= s_sorted[i]" takes 0..i
    last = np.r_[np.nonzero(np.diff(s_sorted))[0], s.size - 1]
    predicted = last + 1
    dice = 2.0 * tp[last] / (predicted + n_pos)
    i = int(np.argmax(dice))
    return float(dice[i]), float(s_sorted[last[i]])


def pixel_metrics(gt, maps) -> dict[str, float]:
    """Pixel-level AUROC, AP and best Dice over all pixels of all images (``gt`` binary, same shape)."""
    y = np.asarray(gt).astype(bool).ravel()
    s = np.asarray(maps, dtype=np.float64).ravel()
    if y.shape != s.shape:
        raise ValueError(f"pixel masks {np.shape(gt)} and maps {np.shape(maps)} differ in size")
    out = {"pixel_auroc": float("nan"), "pixel_ap": float("nan"), "pixel_best_dice": float("nan"),
           "pixel_best_dice_threshold": float("nan")}
    if _two_classes(y):
        out["pixel_auroc"] = binary_auroc(y, s)
        out["pixel_ap"] = binary_ap(y, s)
        out["pixel_best_dice"], out["pixel_best_dice_threshold"] = best_dice(y, s)
    return out


def threshold_at_specificity(normal_scores, specificity: float = 0.95) -> float:
    """The smallest score threshold ``t`` with at least ``specificity`` of the normal scores ``<= t``
    (an image is called anomalous when its score is ``> t``)."""
    s = np.sort(np.asarray(normal_scores, dtype=np.float64).ravel())
    if s.size == 0:
        raise ValueError("no normal scores to choose a threshold from")
    k = int(np.ceil(specificity * s.size)) - 1
    return float(s[min(max(k, 0), s.size - 1)])


def operating_point(is_anomalous, scores, threshold: float) -> dict[str, float]:
    """Sensitivity, specificity and accuracy of ``score > threshold``."""
    y = np.asarray(is_anomalous).astype(bool).ravel()
    pred = np.asarray(scores, dtype=np.float64).ravel() > threshold
    tp, tn = int((pred & y).sum()), int((~pred & ~y).sum())
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    return {"threshold": float(threshold),
            "sensitivity": tp / n_pos if n_pos else float("nan"),
            "specificity": tn / n_neg if n_neg else float("nan"),
            "accuracy": (tp + tn) / y.size if y.size else float("nan")}
