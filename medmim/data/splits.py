"""Patient-level splits and nested, stratified label fractions, all fixed by seed."""

from __future__ import annotations

import math
from collections import defaultdict

import numpy as np

from medmim.errors import DataError


def _strat_key(label) -> str:
    return repr(label)


def patient_split(records: list[dict], val_fraction: float, test_fraction: float, seed: int) -> None:
    """Fill ``split`` for records without one: grouped by patient, stratified by the patient's label.

    Records that already carry a split keep it.
    """
    todo = [r for r in records if not r.get("split")]
    if not todo:
        return
    patients: dict[str, list[dict]] = defaultdict(list)
    for r in todo:
        patients[r["patient_id"]].append(r)
    by_class: dict[str, list[str]] = defaultdict(list)
    for pid, rows in sorted(patients.items()):
        by_class[_strat_key(rows[0].get("label"))].append(pid)
    rng = np.random.default_rng(seed)
    for key in sorted(by_class):
        pids = list(by_class[key])
        rng.shuffle(pids)
        n = len(pids)
        n_test = int(round(test_fraction * n))
        n_val = int(round(val_fraction * n))
        for i, pid in enumerate(pids):
            split = "test" if i < n_test else "val" if i < n_test + n_val else "train"
            for r in patients[pid]:
                r["split"] = split


def check_leakage(records: list[dict]) -> None:
    """Fail loudly when one patient appears in two splits."""
    seen: dict[str, str] = {}
    for r in records:
        pid, split = r["patient_id"], r.get("split", "")
        if pid in seen and seen[pid] != split:
            raise DataError(f"patient-level leakage: one patient appears in splits '{seen[pid]}' and "
                            f"'{split}' (manifest row for {r.get('source') or r['image']!s:.80})")
        seen[pid] = split


def label_fraction(records: list[dict], fraction: float, seed: int) -> list[dict]:
    """A stratified subset holding ``fraction`` of the records, at least one per class.

    Nested by construction: each class's records are ranked once by a seeded permutation, and a
    fraction takes a prefix of that ranking, so 1% ⊂ 10% ⊂ 100% for the same seed.
    """
    if not 0 < fraction <= 1:
        raise DataError(f"label fraction must be in (0, 1], got {fraction}")
    by_class: dict[str, list[int]] = defaultdict(list)
    for i, r in enumerate(records):
        by_class[_strat_key(r.get("label"))].append(i)
    rng = np.random.default_rng(seed)
    keep: list[int] = []
    for key in sorted(by_class):
        idx = by_class[key]
        ranked = [idx[j] for j in rng.permutation(len(idx))]
        k = max(1, math.ceil(fraction * len(idx) - 1e-9))
        keep.extend(ranked[:k])
    return [records[i] for i in sorted(keep)]
