"""Classification metrics (scikit-learn), robust to the one-class splits of tiny label fractions."""

from __future__ import annotations

import numpy as np
from sklearn import metrics as skm


def classification_metrics(labels: np.ndarray, probs: np.ndarray, multilabel: bool = False) -> dict[str, float]:
    """``probs``: (N, K) class probabilities (softmax) or (N, K) sigmoid outputs when ``multilabel``.

    AUROC is macro over classes (one-vs-rest); for binary tasks it is the AUROC of class 1.
    Metrics that are undefined (a class absent) are NaN, never an exception.
    """
    labels = np.asarray(labels)
    probs = np.asarray(probs, dtype=np.float64)
    out: dict[str, float] = {}
    k = probs.shape[1]
    if multilabel:
        onehot = labels.astype(int)
        preds = (probs >= 0.5).astype(int)
        out["accuracy"] = float((preds == onehot).mean())
    else:
        onehot = np.eye(k, dtype=int)[labels.astype(int)]
        preds = probs.argmax(1)
        out["accuracy"] = float((preds == labels).mean())
        out["balanced_accuracy"] = float(skm.balanced_accuracy_score(labels, preds)) if len(np.unique(labels)) > 1 else float("nan")
    per_class_auc, per_class_ap = [], []
    for c in range(k):
        y = onehot[:, c]
        if y.min() == y.max():
            per_class_auc.append(float("nan"))
            per_class_ap.append(float("nan"))
            continue
        per_class_auc.append(float(skm.roc_auc_score(y, probs[:, c])))
        per_class_ap.append(float(skm.average_precision_score(y, probs[:, c])))
    if k == 2 and not multilabel:
        out["auroc"], out["ap"] = per_class_auc[1], per_class_ap[1]
    else:
        out["auroc"] = float(np.nanmean(per_class_auc)) if not np.all(np.isnan(per_class_auc)) else float("nan")
        out["ap"] = float(np.nanmean(per_class_ap)) if not np.all(np.isnan(per_class_ap)) else float("nan")
    for c, v in enumerate(per_class_auc):
        out[f"auroc_class{c}"] = v
    return out
