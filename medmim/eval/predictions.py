"""Per-case test predictions of a classification stage, as a small CSV beside its ``result.json``.

    write_predictions(run / "predictions_test.csv", probs, labels, class_names)
    probs, labels, names = read_predictions(run / "predictions_test.csv")

Columns: ``index`` (position in the test split; no file names or patient identifiers),
``label`` and ``predicted`` (class indices; multi-label: ``;``-joined 0/1 per label),
``label_name`` / ``predicted_name`` (single-label only), then ``prob_<c>`` per class. The report
draws ROC / PR curves, confusion matrices and per-class metrics from it.
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from medmim.errors import MedmimError
from medmim.io import write_csv

PREDICTIONS_NAME = "predictions_test.csv"


def _as_2d(probs: Any) -> np.ndarray:
    p = np.asarray(probs, dtype=np.float64)
    if p.ndim == 1:  # one positive-class score: binary
        p = np.stack([1 - p, p], 1)
    if p.ndim != 2:
        raise MedmimError(f"predictions: probabilities must be (N, K), got shape {p.shape}")
    return p


def write_predictions(path: str | Path, probs: Any, labels: Any, class_names: Sequence[str] | None = None,
                      multilabel: bool | None = None) -> Path:
    """Write (atomically) one row per test case: label, predicted class, class probabilities.

    ``probs``: (N, K) softmax probabilities (or sigmoid outputs for multi-label; inferred when
    ``labels`` is (N, K)). ``class_names``: K names, written beside the indices (optional).
    """
    path = Path(path)
    p = _as_2d(probs)
    y = np.asarray(labels)
    n, k = p.shape
    if multilabel is None:
        multilabel = y.ndim == 2 and y.shape[1] == k and k > 1
    if len(y) != n:
        raise MedmimError(f"{path.name}: {len(y)} labels for {n} predictions")
    names = list(class_names) if class_names is not None else None
    if names is not None and len(names) != k:
        names = None  # a mismatched name list is dropped rather than mislabelling classes
    header = ["index", "label", "predicted"] + ([] if multilabel or names is None else ["label_name", "predicted_name"])
    header += [f"prob_{c}" for c in range(k)]
    rows = []
    for i in range(n):
        if multilabel:
            lab = ";".join(str(int(v)) for v in np.asarray(y[i]).reshape(-1))
            pred = ";".join(str(int(v >= 0.5)) for v in p[i])
            extra: list = []
        else:
            lab, pred = int(np.asarray(y[i]).reshape(-1)[0]), int(p[i].argmax())
            extra = [] if names is None else [names[lab] if 0 <= lab < k else "", names[pred]]
        rows.append(dict(zip(header, [i, lab, pred, *extra, *(f"{v:.9g}" for v in p[i])])))
    return write_csv(path, rows, header)


def read_predictions(path: str | Path) -> tuple[np.ndarray, np.ndarray, list[str] | None]:
    """``(probs (N, K), labels (N,) or (N, K) for multi-label, class names or None)``."""
    path = Path(path)
    try:
        with open(path, newline="") as fh:
            rows = list(csv.DictReader(fh))
    except OSError as exc:
        raise MedmimError(f"{path}: cannot read predictions ({exc.strerror or exc})") from None
    if not rows:
        raise MedmimError(f"{path}: no predictions in the file")
    cols = [c for c in rows[0] if c.startswith("prob_")]
    if not cols or "label" not in rows[0]:
        raise MedmimError(f"{path}: not a predictions file (needs 'label' and 'prob_<c>' columns)")
    k = len(cols)
    try:
        probs = np.array([[float(r[f"prob_{c}"]) for c in range(k)] for r in rows], dtype=np.float64)
        if ";" in rows[0]["label"]:
            labels = np.array([[int(v) for v in r["label"].split(";")] for r in rows], dtype=np.int64)
        else:
            labels = np.array([int(r["label"]) for r in rows], dtype=np.int64)
    except (KeyError, ValueError) as exc:
        raise MedmimError(f"{path}: malformed row ({exc})") from None
    names = None
    if "label_name" in rows[0]:
        found: dict[int, str] = {}
        for r in rows:
            found.setdefault(int(r["label"]), r["label_name"])
            found.setdefault(int(r["predicted"]), r["predicted_name"])
        if len(found) == k:
            names = [found[c] for c in range(k)]
    return probs, labels, names


def resolve_class_names(num_classes: int, config: dict | None = None, card: dict | None = None) -> list[str]:
    """Class names: ``data.class_names`` of the config, else the data card's ``label_names``
    (``{"0": "normal", ...}``), else the indices as strings. A partial mapping is filled with indices."""
    k = int(num_classes)
    data = (config or {}).get("data") or {}
    given = data.get("class_names")
    if isinstance(given, dict):
        given = {str(a): b for a, b in given.items()}
        return [str(given.get(str(c), c)) for c in range(k)]
    if isinstance(given, (list, tuple)) and len(given) == k:
        return [str(v) for v in given]
    names = (card or {}).get("label_names") or {}
    if isinstance(names, dict) and names:
        names = {str(a): b for a, b in names.items()}
        return [str(names.get(str(c), c)) for c in range(k)]
    if isinstance(names, (list, tuple)) and len(names) == k:
        return [str(v) for v in names]
    return [str(c) for c in range(k)]


def save_test_predictions(run, task, cfg) -> Path | None:
    """After a classification stage's test evaluation: write the predictions the task kept
    (``task.last_predictions``) to ``<run>/predictions_test.csv`` (rank 0). Heads without
    per-case class probabilities (segmentation) keep none: nothing is written."""
    preds = getattr(task, "last_predictions", None)
    if preds is None or not run.writer:
        return None
    task.last_predictions = None
    k = int(np.asarray(preds[0]).reshape(len(preds[0]), -1).shape[1])
    names = resolve_class_names(k, cfg.model_dump(mode="json"))
    return write_predictions(run.path / PREDICTIONS_NAME, preds[0], preds[1],
                             None if names == [str(c) for c in range(k)] else names,
                             multilabel=bool(cfg.finetune.multilabel))


__all__ = ["PREDICTIONS_NAME", "write_predictions", "read_predictions", "resolve_class_names",
           "save_test_predictions"]
