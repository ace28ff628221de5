"""Patient-level splits, a reusable split file, a leakage check, and nested stratified label fractions.

Everything is fixed by seed. Splits group all images of a patient together and stratify by the
patient's (majority) label. A split file (JSON: patient id -> split) makes a split permanent: it is
written on first use and reused afterwards, so adding images never moves a patient.
"""

from __future__ import annotations

import json
import math
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np

from medmim.errors import DataError
from medmim.io import write_json

SPLIT_NAMES = ("train", "val", "test")


def _strat_key(label) -> str:
    return repr(label)


def _patients(records: list[dict]) -> dict[str, list[dict]]:
    patients: dict[str, list[dict]] = defaultdict(list)
    for r in records:
        patients[str(r["patient_id"])].append(r)
    return patients


def _patient_class(rows: list[dict]) -> str:
    """The patient's stratification key: its most common label (ties: smallest key)."""
    counts = Counter(_strat_key(r.get("label")) for r in rows)
    return sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[0][0]


def patient_split(records: list[dict], val_fraction: float, test_fraction: float, seed: int) -> None:
    """Fill ``split`` for records without one: grouped by patient, stratified by the patient's label.

    Records that already carry a split keep it; a patient that already has a split elsewhere in
    ``records`` joins that split (never two splits for one patient).
    """
    if val_fraction + test_fraction >= 1:
        raise DataError(f"val_fraction + test_fraction must be < 1, got {val_fraction} + {test_fraction}")
    todo = [r for r in records if not r.get("split")]
    if not todo:
        return
    known = {str(r["patient_id"]): r["split"] for r in records if r.get("split")}
    patients = _patients(todo)
    by_class: dict[str, list[str]] = defaultdict(list)
    for pid, rows in sorted(patients.items()):
        if pid in known:
            for r in rows:
                r["split"] = known[pid]
            continue
        by_class[_patient_class(rows)].append(pid)
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
    """Fail loudly when one patient (or one image file) appears in two splits."""
    splits_of: dict[str, set[str]] = defaultdict(set)
    files_of: dict[str, set[str]] = defaultdict(set)
    for r in records:
        pid = str(r.get("patient_id", "") or "")
        if not pid:
            raise DataError(f"record without patient_id ({r.get('source') or r.get('image')!s:.80}): "
                            "splits by patient need one")
        split = r.get("split", "") or ""
        splits_of[pid].add(split)
        img = r.get("image")
        if isinstance(img, (str, Path)):
            files_of[f"{img}|{r.get('series_id') or ''}|{r.get('frame') if r.get('frame') is not None else ''}"].add(split)
    leaking = sorted(p for p, s in splits_of.items() if len(s) > 1)
    if leaking:
        first = leaking[0]
        raise DataError(f"patient-level leakage: {len(leaking)} patient(s) appear in more than one split "
                        f"(e.g. patient '{first}' in {', '.join(sorted(splits_of[first]))})")
    dup = sorted(f for f, s in files_of.items() if len(s) > 1)
    if dup:
        raise DataError(f"leakage: {len(dup)} image file(s) appear in more than one split "
                        f"(e.g. {dup[0].split('|')[0]})")


def split_counts(records: list[dict]) -> dict[str, dict[str, int]]:
    """{split: {label: count}}"""
    out: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
    for r in records:
        out[r.get("split") or ""][_strat_key(r.get("label"))] += 1
    return {s: dict(c) for s, c in out.items()}


def save_split_file(records: list[dict], path: str | Path, **info) -> Path:
    """Write ``{"patients": {patient_id: split}, ...info}`` atomically."""
    mapping = {}
    for r in records:
        mapping[str(r["patient_id"])] = r["split"]
    write_json(path, {"patients": dict(sorted(mapping.items())), **info})
    return Path(path)


def load_split_file(path: str | Path) -> dict[str, str]:
    path = Path(path)
    try:
        data = json.loads(path.read_text())
        mapping = data["patients"]
    except (OSError, ValueError, KeyError, TypeError):
        raise DataError(f"{path}: not a medmim split file (expected JSON with a 'patients' mapping)") from None
    bad = sorted({s for s in mapping.values() if s not in SPLIT_NAMES})
    if bad:
        raise DataError(f"{path}: unknown split name(s) {bad}; allowed: {', '.join(SPLIT_NAMES)}")
    return {str(k): v for k, v in mapping.items()}


def apply_split_file(records: list[dict], mapping: dict[str, str], where: str = "split file") -> int:
    """Give records the split of their patient in ``mapping``; returns how many were assigned.

    A record that already carries a different split (from its source) is a conflict: DataError.
    """
    n = 0
    for r in records:
        s = mapping.get(str(r["patient_id"]))
        if s is None:
            continue
        if r.get("split") and r["split"] != s:
            raise DataError(f"{where}: patient '{r['patient_id']}' is '{s}' in the split file but "
                            f"'{r['split']}' in the source")
        r["split"] = s
        n += 1
    return n


def label_fraction(records: list[dict], fraction: float, seed: int, group_by_patient: bool = True) -> list[dict]:
    """A stratified subset holding ``fraction`` of the records, at least one per class.

    Nested by construction: within each class, patients (or records) are ranked once by a seeded
    permutation that does not depend on ``fraction``, and a fraction takes the shortest prefix of
    that ranking holding ``ceil(fraction * n_class)`` images, so 1% ⊂ 10% ⊂ 100% for one seed.
    With ``group_by_patient`` a labelled patient brings all of its images (no patient is half in).
    """
    if not 0 < fraction <= 1:
        raise DataError(f"label fraction must be in (0, 1], got {fraction}")
    if fraction == 1:
        return list(records)
    groups: dict[str, list[int]] = defaultdict(list)
    for i, r in enumerate(records):
        gid = str(r.get("patient_id")) if group_by_patient and r.get("patient_id") not in (None, "") else f"#{i}"
        groups[gid].append(i)
    by_class: dict[str, list[str]] = defaultdict(list)
    for gid in sorted(groups):
        by_class[_patient_class([records[i] for i in groups[gid]])].append(gid)
    rng = np.random.default_rng(seed)
    keep: list[int] = []
    for key in sorted(by_class):
        gids = by_class[key]
        ranked = [gids[j] for j in rng.permutation(len(gids))]
        n_images = sum(len(groups[g]) for g in gids)
        target = max(1, math.ceil(fraction * n_images - 1e-9))
        taken = 0
        for g in ranked:
            keep.extend(groups[g])
            taken += len(groups[g])
            if taken >= target:
                break
    return [records[i] for i in sorted(keep)]
