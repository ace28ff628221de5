"""Patient-level splits, a reusable split file, a leakage check, and nested stratified label fractions.

Everything is fixed by seed. Splits group all images of a patient together and stratify by the
patient's (majority) label. A split file (JSON: patient id -> split) makes a split permanent: it is
written on first use and reused afterwards, so adding images never moves a patient.
"""

from __future__ import annotations

import json
import logging
import math
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

import numpy as np

from medmim.errors import DataError
from medmim.io import write_json

SPLIT_NAMES = ("train", "val", "test")
log = logging.getLogger("medmim.data")


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
    ``records`` joins that split (never two splits for one patient). When the source names splits
    (the ``split`` column or split folders of labelled rows; a split file does not count), it has
    chosen its test set: records without a split go to train and val only, never silently to test. A
    source that names train but no val split gives ``val_fraction`` of its train patients to val
    (model selection needs one); test is never drawn from train.
    """
    if val_fraction + test_fraction >= 1:
        raise DataError(f"val_fraction + test_fraction must be < 1, got {val_fraction} + {test_fraction}")
    named = {r.get("split") for r in records if r.get("split") and r.get("_split_from") != "file" and _labelled(r)}
    if named:
        if "val" not in named and val_fraction > 0:  # val comes from the source's train patients
            for r in records:
                if r.get("split") == "train" and r.get("_split_from") != "file":
                    r["split"], r["_split_from"] = "", "train"
        val_fraction, test_fraction = (0.0 if "val" in named else val_fraction), 0.0
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


def _labelled(record: dict) -> bool:
    """A row that can be evaluated (a label or a mask). Named splits of rows without either -- e.g. a
    Decathlon dataset's imagesTs, whose labels are withheld -- do not fix the source's test set."""
    label = record.get("label")
    return (label not in (None, "") and not (isinstance(label, float) and math.isnan(label))) or bool(record.get("mask"))


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

    A record that already carries a different split (from its source) is a conflict: DataError --
    except train -> val, which ``patient_split`` does when a source names no val split.
    """
    n = 0
    for r in records:
        s = mapping.get(str(r["patient_id"]))
        if s is None:
            continue
        if r.get("split") and r["split"] != s and not (r["split"] == "train" and s == "val"):
            raise DataError(f"{where}: patient '{r['patient_id']}' is '{s}' in the split file but "
                            f"'{r['split']}' in the source")
        if not r.get("split"):
            r["split"], r["_split_from"] = s, "file"
        else:  # a source's train patient that an earlier run gave to val (patient_split) stays there
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


# ---- byte-identical images across splits -------------------------------------------------------
SPLIT_ORDER = {"train": 0, "val": 1, "test": 2}


def _size_key(record: dict):
    """A cheap key that byte-identical images share (file size; array shape + dtype), or None when the
    record's content is not hashed (a DICOM series folder, a missing file)."""
    import os

    from medmim.data.readers import NPZ_REF, npz_entry

    img = record.get("image")
    if isinstance(img, (list, tuple)):  # one file per channel (data.channels): every size, in order
        keys = [_size_key({"image": ref}) for ref in img]
        return None if any(k is None for k in keys) else ("channels", tuple(keys))
    if isinstance(img, np.ndarray):
        return ("array", img.shape, img.dtype.str)
    text = str(img)
    if NPZ_REF.match(text):
        arr = npz_entry(text)
        return ("array", arr.shape, arr.dtype.str)
    try:
        st = os.stat(text)
    except OSError:
        return None
    import stat as stat_mod

    return ("file", st.st_size) if stat_mod.S_ISREG(st.st_mode) else None


def content_hash(record: dict) -> str:
    """blake2b of a file's bytes, or of an array's shape, dtype and bytes (npz entries, in-memory data);
    for a case with one file per channel (``image`` a list), of the channel count and each channel's hash
    in channel order."""
    import hashlib

    from medmim.data.readers import NPZ_REF, npz_entry

    h = hashlib.blake2b(digest_size=20)
    img = record.get("image")
    if isinstance(img, (list, tuple)):
        h.update(f"channels={len(img)}".encode())
        for ref in img:
            h.update(content_hash({"image": ref}).encode())
        return h.hexdigest()
    if isinstance(img, np.ndarray) or NPZ_REF.match(str(img)):
        arr = np.ascontiguousarray(img if isinstance(img, np.ndarray) else npz_entry(str(img)))
        h.update(repr((arr.shape, arr.dtype.str)).encode())
        h.update(memoryview(arr).cast("B"))
        return h.hexdigest()
    with open(str(img), "rb") as fh:
        while block := fh.read(1 << 20):
            h.update(block)
    return h.hexdigest()


def cross_split_duplicates(records: list[dict]) -> list[list[dict]]:
    """Groups of byte-identical images that span two or more splits (each group sorted train, val,
    test). Only images whose size (or array shape) occurs in more than one split are hashed."""
    by_size: dict[Any, list[dict]] = defaultdict(list)
    for r in records:
        if not r.get("split") or r.get("frame") not in (None, ""):
            continue  # time points of one 4D series share a file: the leakage check covers them
        try:
            key = _size_key(r)
        except DataError:
            key = None  # unreadable: the reader reports it later
        if key is not None:
            by_size[key].append(r)
    groups: list[list[dict]] = []
    for same_size in by_size.values():
        if len({r["split"] for r in same_size}) < 2:
            continue
        by_hash: dict[str, list[dict]] = defaultdict(list)
        for r in same_size:
            try:
                by_hash[content_hash(r)].append(r)
            except (OSError, DataError):
                continue
        for group in by_hash.values():
            if len({r["split"] for r in group}) > 1:
                groups.append(sorted(group, key=lambda r: SPLIT_ORDER.get(r["split"], 3)))
    return groups


def _name(record: dict) -> str:
    ref = record.get("source") or record.get("image")
    if isinstance(ref, (list, tuple)) and ref:  # one file per channel: the case's first channel
        ref = ref[0]
    return str(ref) if isinstance(ref, (str, Path)) else "<array>"


def handle_duplicates(records: list[dict], mode: str) -> tuple[list[dict], list[dict]]:
    """Apply ``data.duplicates`` to byte-identical images in two splits; return (records kept, dropped).

    ``drop``: keep the copies in the earliest split (train < val < test), drop the others, so that no
    evaluation image was seen in training; ``error``: refuse (one line naming a pair); ``ignore``:
    nothing is hashed; ``auto``: drop when the images are files, only report for in-memory arrays
    (MedMNIST npz sources keep their official splits). ``dropped`` lists ``{"file", "reason"}``."""
    if mode == "ignore" or not records:
        return records, []
    groups = cross_split_duplicates(records)
    if not groups:
        return records, []
    first = groups[0]
    example = f"{_name(first[0])} ({first[0]['split']}) = {_name(first[-1])} ({first[-1]['split']})"
    if mode == "error":
        raise DataError(f"{len(groups)} group(s) of byte-identical images span two splits, e.g. {example}; "
                        "set data.duplicates=drop to drop the later copies, or remove them")
    in_memory = all(isinstance(r.get("image"), np.ndarray) for g in groups for r in g)
    if mode == "auto" and in_memory:
        log.warning("%d group(s) of byte-identical images span two splits (e.g. %s); kept, as data.duplicates="
                    "auto keeps in-memory (npz) splits as published; data.duplicates=drop drops them",
                    len(groups), example)
        return records, []
    drop: dict[int, dict] = {}
    for g in groups:
        keep_split = g[0]["split"]
        for r in g:
            if r["split"] != keep_split:
                drop[id(r)] = {"file": _name(r), "reason": f"byte-identical to {_name(g[0])} ({keep_split}); "
                               f"dropped from {r['split']}", "split": r["split"]}
    kept = [r for r in records if id(r) not in drop]
    dropped = list(drop.values())
    counts = Counter(d["split"] for d in dropped)
    log.warning("dropped %d image(s) byte-identical to an image of an earlier split (%s; data.duplicates=%s), e.g. %s",
                len(dropped), ", ".join(f"{n} from {s}" for s, n in sorted(counts.items())), mode, example)
    return kept, dropped
