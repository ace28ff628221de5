"""Label checks before any training, and the classes a data set holds.

Two checks, each failing with one ``DataError`` line that names the row (or file) and the reason:

* ``check_labels`` (every run, from ``prepare_data``): every label present is a class index (an
  integer, or a 0/1 list for multi-label data), inside ``0..data.num_classes-1``. It fills
  ``data.num_classes`` from the labels when the config leaves it empty, and ``data.class_names``
  from the manifest's ``label_name`` column (``medmim data manifest --from folder`` writes the
  folder names there), so the run's saved config records both.
* ``check_supervised`` (fine-tuning, after the label fraction is drawn): every train/val/test row
  has a label, and the labelled training set and the validation split each hold at least two
  classes (with one class, AUROC -- the model-selection metric -- is undefined).
"""

from __future__ import annotations

import math
from collections import Counter
from typing import Any

from medmim.errors import DataError


def where(record: dict) -> str:
    """A short locator for messages: manifest row (when known) and the file (a multi-channel case:
    its first channel's file, ``manifest.case_name``)."""
    from medmim.data.manifest import case_name

    ref = record.get("source") or case_name(record)
    row = record.get("_row")
    return f"{row} ({ref})" if row else ref


def _missing(label: Any) -> bool:
    return label is None or (isinstance(label, str) and not label.strip()) or \
        (isinstance(label, float) and math.isnan(label))


def class_index(label: Any, record: dict) -> int:
    """A single-label class index from an int, an integral float or a numeric string."""
    if isinstance(label, bool):
        return int(label)
    if isinstance(label, int):
        return label
    if isinstance(label, float) and label.is_integer():
        return int(label)
    if isinstance(label, str):
        try:
            value = float(label.strip())
        except ValueError:
            raise DataError(f"{where(record)}: label {label!r} is not a number (labels are class indices "
                            "0..K-1; class names go in a 'label_name' column)") from None
        if value.is_integer():
            return int(value)
    raise DataError(f"{where(record)}: label {label!r} is not a class index (an integer 0..K-1)")


def check_labels(records: list[dict], cfg) -> None:
    """Validate the labels present and fill ``cfg.data.num_classes`` / ``cfg.data.class_names`` when
    empty (see module doc). Segmentation data is not checked here (its labels are masks)."""
    dc = cfg.data
    if dc.task != "classification":
        return
    multilabel = bool(getattr(cfg.finetune, "multilabel", False)) or any(isinstance(r.get("label"), list)
                                                                          for r in records)
    labelled = [r for r in records if not _missing(r.get("label"))]
    k = dc.num_classes
    if multilabel:
        for r in labelled:
            lab = r["label"]
            if not isinstance(lab, list) or any(v not in (0, 1) for v in lab):
                raise DataError(f"{where(r)}: multi-label label {lab!r} is not a list of 0/1 values")
        widths = Counter(len(r["label"]) for r in labelled)
        if len(widths) > 1:
            first = next(r for r in labelled if len(r["label"]) != widths.most_common(1)[0][0])
            raise DataError(f"{where(first)}: label has {len(first['label'])} entries, most rows have "
                            f"{widths.most_common(1)[0][0]}")
        if labelled:
            width = next(iter(widths))
            if k is None:
                dc.num_classes = width
            elif width != k:
                raise DataError(f"{where(labelled[0])}: label has {width} entries but data.num_classes is {k}")
        return
    seen: dict[int, dict] = {}
    for r in labelled:
        idx = class_index(r["label"], r)
        r["label"] = idx
        if idx < 0 or (k is not None and idx >= k):
            rng = f"0..{k - 1} (data.num_classes={k})" if k is not None else "a class index >= 0"
            raise DataError(f"{where(r)}: label {idx} is out of range; expected {rng}")
        seen.setdefault(idx, r)
    if k is None and seen:
        dc.num_classes = max(2, max(seen) + 1)
    _class_names(records, cfg)


def _class_names(records: list[dict], cfg) -> None:
    """Names from the ``label_name`` column, one per class index; a label with two names is an error."""
    dc = cfg.data
    names: dict[int, str] = {}
    for r in records:
        name = r.get("label_name")
        if _missing(r.get("label")) or name in (None, ""):
            continue
        idx = int(r["label"])
        if names.setdefault(idx, str(name)) != str(name):
            raise DataError(f"{where(r)}: label {idx} is named '{name}' here but '{names[idx]}' in other rows")
    if dc.class_names is not None:
        if dc.num_classes is not None and len(dc.class_names) != dc.num_classes:
            raise DataError(f"data.class_names has {len(dc.class_names)} names but data.num_classes is "
                            f"{dc.num_classes}")
        return
    if names and dc.num_classes is not None:
        dc.class_names = [names.get(i, str(i)) for i in range(dc.num_classes)]


def fill_inferred(cfg, data) -> None:
    """Give a config derived before ``prepare_data`` ran (e.g. a study cell's) the number of classes
    and their names that ``check_labels`` read from the data (``DataBundle``), where it has none."""
    if cfg.data.num_classes is None and getattr(data, "num_classes", None):
        cfg.data.num_classes = data.num_classes
    if cfg.data.class_names is None and getattr(data, "class_names", None) and \
            len(data.class_names) == cfg.data.num_classes:
        cfg.data.class_names = list(data.class_names)


def class_names(cfg) -> list[str]:
    """Display names of the classes, index order: ``data.class_names``, else "0", "1", ..."""
    dc = cfg.data
    k = dc.num_classes or (len(dc.class_names) if dc.class_names else 0)
    if dc.class_names and len(dc.class_names) == k:
        return [str(n) for n in dc.class_names]
    return [str(i) for i in range(k)]


def check_supervised(train: list[dict], val: list[dict], test: list[dict], cfg, *, stage: str = "fine-tuning") -> None:
    """Before supervised training: every row labelled; >= 2 classes in the labelled training set (at
    ``finetune.label_fraction``) and in the validation split used for model selection."""
    if cfg.data.task != "classification" or getattr(cfg.finetune, "head", "classify") != "classify":
        return
    for split, rows in (("train", train), ("val", val), ("test", test)):
        if rows and all(_missing(r.get("label")) for r in rows):
            raise DataError(f"{split} split: no labels ({where(rows[0])} and every other row); {stage} needs a "
                            "'label' column with a class index per row")
        for r in rows:
            if _missing(r.get("label")):
                raise DataError(f"{where(r)}: no label ({split} split); {stage} needs a class index on every "
                                "train/val/test row (unlabelled images can be used for pretraining)")
    if cfg.finetune.multilabel:
        return
    names = class_names(cfg)
    frac = cfg.finetune.label_fraction
    for split, rows, what in (("train", train, f"the labelled training set (finetune.label_fraction={frac:g})"),
                              ("val", val, "the validation split (model selection by AUROC)")):
        present = sorted({int(r["label"]) for r in rows})
        if rows and len(present) < 2:
            only = present[0]
            shown = names[only] if only < len(names) else str(only)
            raise DataError(f"{what} holds one class only ('{shown}', {len(rows)} image(s)); "
                            "a classifier needs at least two classes there")
