"""Patient-level splits, cross-validation folds, a reusable split file, a leakage check, and nested
stratified label fractions.

Everything is fixed by seed. Splits group all images of a patient together and stratify by the
patient's (majority) label. Folds (``data.folds = K``) divide the non-test patients into K groups,
stratified by the images' labels the way scikit-learn's ``StratifiedGroupKFold`` does. A split file
(JSON: patient id -> split, and patient id -> fold) makes both permanent: it is written on first use
and reused afterwards, so adding images never moves a patient, and new patients join the folds
that keep the class balance best.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import os
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


def assign_folds(records: list[dict], n_folds: int, seed: int, known: dict[str, int] | None = None) -> dict[str, int]:
    """Give every record a ``fold`` (0..K-1), grouped by patient and stratified by the images' labels;
    return ``{patient_id: fold}`` for the patients of ``records``.

    Patients in ``known`` keep their fold. The others are placed one by one as scikit-learn's
    ``StratifiedGroupKFold`` places groups (seeded shuffle, then the patients whose class counts
    vary most first; each goes to the fold that makes the per-class shares of the folds most even,
    ties to the fold with fewest images), starting from the class counts the known patients already
    give each fold. So a first assignment is a stratified group K-fold, and patients added later
    join the folds where they keep the balance best without moving anyone.
    """
    known = known or {}
    patients = _patients(records)
    if len(patients) < n_folds:
        raise DataError(f"data.folds={n_folds} needs at least {n_folds} patients outside the test split; "
                        f"there are {len(patients)}")
    classes = sorted({_strat_key(r.get("label")) for r in records})
    col = {c: i for i, c in enumerate(classes)}
    counts = {pid: np.bincount([col[_strat_key(r.get("label"))] for r in rows], minlength=len(classes)).astype(float)
              for pid, rows in patients.items()}
    total = np.sum(list(counts.values()), axis=0)
    per_fold = np.zeros((n_folds, len(classes)))
    fold_of: dict[str, int] = {}
    for pid in patients:
        if pid in known:
            fold_of[pid] = int(known[pid])
            per_fold[fold_of[pid]] += counts[pid]
    new = sorted(p for p in patients if p not in known)
    new = [new[i] for i in np.random.default_rng(seed).permutation(len(new))]
    order = np.argsort([-np.std(counts[p]) for p in new], kind="mergesort")  # stable: shuffled order on ties
    for i in order:
        pid = new[i]
        best, best_eval, best_size = 0, np.inf, np.inf
        for f in range(n_folds):
            per_fold[f] += counts[pid]
            evenness = float(np.mean(np.std(per_fold / total, axis=0)))
            per_fold[f] -= counts[pid]
            size = float(per_fold[f].sum())
            if evenness < best_eval and not np.isclose(evenness, best_eval) or \
                    (np.isclose(evenness, best_eval) and size < best_size):
                best, best_eval, best_size = f, evenness, size
        fold_of[pid] = best
        per_fold[best] += counts[pid]
    empty = [f for f in range(n_folds) if not per_fold[f].sum()]
    if empty:
        raise DataError(f"data.folds={n_folds}: fold {empty[0]} holds no patient ({len(patients)} patients outside "
                        "the test split); use fewer folds")
    for pid, rows in patients.items():
        for r in rows:
            r["fold"] = fold_of[pid]
    return fold_of


def apply_fold(records: list[dict], fold: int) -> None:
    """Cross-validation split ``fold``: the records of that fold become the val split, the other
    non-test records train; test stays test. Records need their ``fold`` (:func:`assign_folds`)."""
    for r in records:
        if r.get("split") == "test":
            continue
        if r.get("fold") is None:
            raise DataError(f"record of patient '{r.get('patient_id')}' has no fold (assign_folds first)")
        r["split"] = "val" if r["fold"] == fold else "train"


def _labelled(record: dict) -> bool:
    """A row that can be evaluated (a label or a mask). Named splits of rows without either -- e.g. a
    Decathlon dataset's imagesTs, whose labels are withheld -- do not fix the source's test set."""
    label = record.get("label")
    return (label not in (None, "") and not (isinstance(label, float) and math.isnan(label))) or bool(record.get("mask"))


def check_leakage(records: list[dict]) -> None:
    """Fail loudly when one patient (or one image file) appears in two splits."""
    splits_of: dict[str, set[str]] = defaultdict(set)
    folds_of: dict[str, set] = defaultdict(set)
    files_of: dict[str, set[str]] = defaultdict(set)
    for r in records:
        pid = str(r.get("patient_id", "") or "")
        if not pid:
            raise DataError(f"record without patient_id ({r.get('source') or r.get('image')!s:.80}): "
                            "splits by patient need one")
        split = r.get("split", "") or ""
        splits_of[pid].add(split)
        if r.get("fold") is not None:
            folds_of[pid].add(r["fold"])
        img = r.get("image")
        for ref in (img if isinstance(img, (list, tuple)) else [img]):  # every channel's file (data.channels)
            if isinstance(ref, (str, Path)):
                files_of[f"{ref}|{r.get('series_id') or ''}|{r.get('frame') if r.get('frame') is not None else ''}"].add(split)
    leaking = sorted(p for p, s in splits_of.items() if len(s) > 1)
    if leaking:
        first = leaking[0]
        raise DataError(f"patient-level leakage: {len(leaking)} patient(s) appear in more than one split "
                        f"(e.g. patient '{first}' in {', '.join(sorted(splits_of[first]))})")
    two_folds = sorted(p for p, f in folds_of.items() if len(f) > 1)
    if two_folds:
        raise DataError(f"fold leakage: {len(two_folds)} patient(s) appear in more than one cross-validation fold "
                        f"(e.g. patient '{two_folds[0]}' in folds {sorted(folds_of[two_folds[0]])})")
    dup = sorted(f for f, s in files_of.items() if len(s) > 1)
    if dup:
        raise DataError(f"leakage: {len(dup)} image file(s) appear in more than one split "
                        f"(e.g. {dup[0].split('|')[0]})")


def save_split_file(records: list[dict], path: str | Path, folds: dict[str, int] | None = None,
                    n_folds: int = 0, **info) -> Path:
    """Write ``{"patients": {patient_id: split}, "folds": {patient_id: fold}, "n_folds": K, ...info}``
    atomically (the fold entries only when ``folds`` is given)."""
    mapping = {}
    for r in records:
        mapping[str(r["patient_id"])] = r["split"]
    doc: dict[str, Any] = {"patients": dict(sorted(mapping.items()))}
    if folds:
        doc.update(n_folds=int(n_folds), folds={p: int(f) for p, f in sorted(folds.items())})
    write_json(path, {**doc, **info})
    return Path(path)


def _read_split_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
        if not isinstance(data["patients"], dict):
            raise TypeError
        return data
    except (OSError, ValueError, KeyError, TypeError):
        raise DataError(f"{path}: not a medmim split file (expected JSON with a 'patients' mapping)") from None


def load_split_file(path: str | Path) -> dict[str, str]:
    path = Path(path)
    mapping = _read_split_json(path)["patients"]
    bad = sorted({s for s in mapping.values() if s not in SPLIT_NAMES})
    if bad:
        raise DataError(f"{path}: unknown split name(s) {bad}; allowed: {', '.join(SPLIT_NAMES)}")
    return {str(k): v for k, v in mapping.items()}


def load_fold_file(path: str | Path) -> tuple[int, dict[str, int]]:
    """``(K, {patient_id: fold})`` recorded in a split file; ``(0, {})`` when it holds no folds."""
    path = Path(path)
    data = _read_split_json(path)
    folds = data.get("folds") or {}
    k = data.get("n_folds") or 0
    if not folds:
        return 0, {}
    if not isinstance(folds, dict) or not isinstance(k, int) or k < 2:
        raise DataError(f"{path}: 'folds' must map patient ids to fold numbers and 'n_folds' be >= 2")
    bad = sorted(str(p) for p, f in folds.items() if not isinstance(f, int) or isinstance(f, bool) or not 0 <= f < k)
    if bad:
        raise DataError(f"{path}: patient '{bad[0]}' has fold {folds[bad[0]]!r}; folds are 0..{k - 1} (n_folds={k})")
    return k, {str(p): f for p, f in folds.items()}


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
    st = os.stat(str(img))  # a file is hashed once per process while its size and mtime stay the same
    return _file_hash(str(img), st.st_size, st.st_mtime_ns)


@functools.lru_cache(maxsize=1 << 18)
def _file_hash(path: str, size: int, mtime_ns: int) -> str:
    """blake2b of a file's bytes; cached on (path, size, mtime), so the duplicate check, the pool's
    guard against val/test and the data card read each file once per process."""
    import hashlib

    h = hashlib.blake2b(digest_size=20)
    with open(path, "rb") as fh:
        while block := fh.read(1 << 20):
            h.update(block)
    return h.hexdigest()


def _group_of(record: dict, by_fold: bool) -> tuple[int, str]:
    """(order, name) of the part of the data a record is in: its split, or with ``by_fold`` its
    cross-validation fold (test stays test, after every fold)."""
    if by_fold and record.get("split") != "test" and record.get("fold") is not None:
        return (0, int(record["fold"])), f"fold {record['fold']}"
    split = record["split"]
    return (SPLIT_ORDER.get(split, 3), 0), split


def cross_split_duplicates(records: list[dict], by_fold: bool = False) -> list[list[dict]]:
    """Groups of byte-identical images that span two or more splits (each group sorted train, val,
    test); with ``by_fold``, two or more cross-validation folds or a fold and test (sorted fold 0, 1,
    ..., test). Only images whose size (or array shape) occurs in more than one of them are hashed."""
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
        if len({_group_of(r, by_fold)[1] for r in same_size}) < 2:
            continue
        by_hash: dict[str, list[dict]] = defaultdict(list)
        for r in same_size:
            try:
                by_hash[content_hash(r)].append(r)
            except (OSError, DataError):
                continue
        for group in by_hash.values():
            if len({_group_of(r, by_fold)[1] for r in group}) > 1:
                groups.append(sorted(group, key=lambda r: _group_of(r, by_fold)[0]))
    return groups


def _name(record: dict) -> str:
    ref = record.get("source") or record.get("image")
    if isinstance(ref, (list, tuple)) and ref:  # one file per channel: the case's first channel
        ref = ref[0]
    return str(ref) if isinstance(ref, (str, Path)) else "<array>"


def handle_duplicates(records: list[dict], mode: str, by_fold: bool = False) -> tuple[list[dict], list[dict]]:
    """Apply ``data.duplicates`` to byte-identical images in two splits; return (records kept, dropped).

    ``drop``: keep the copies in the earliest split (train < val < test), drop the others, so that no
    evaluation image was seen in training; ``error``: refuse (one line naming a pair); ``ignore``:
    nothing is hashed; ``auto``: drop when the images are files, only report for in-memory arrays
    (MedMNIST npz sources keep their official splits). ``dropped`` lists ``{"file", "reason"}``.
    ``by_fold`` (cross-validation): copies in two folds count too; the later fold's are dropped."""
    if mode == "ignore" or not records:
        return records, []
    groups = cross_split_duplicates(records, by_fold)
    if not groups:
        return records, []
    first = groups[0]
    part = lambda r: _group_of(r, by_fold)[1]  # noqa: E731
    parts = "folds or splits" if by_fold else "splits"
    example = f"{_name(first[0])} ({part(first[0])}) = {_name(first[-1])} ({part(first[-1])})"
    if mode == "error":
        raise DataError(f"{len(groups)} group(s) of byte-identical images span two {parts}, e.g. {example}; "
                        "set data.duplicates=drop to drop the later copies, or remove them")
    in_memory = all(isinstance(r.get("image"), np.ndarray) for g in groups for r in g)
    if mode == "auto" and in_memory:
        log.warning("%d group(s) of byte-identical images span two %s (e.g. %s); kept, as data.duplicates="
                    "auto keeps in-memory (npz) splits as published; data.duplicates=drop drops them",
                    len(groups), parts, example)
        return records, []
    drop: dict[int, dict] = {}
    for g in groups:
        keep = part(g[0])
        for r in g:
            if part(r) != keep:
                drop[id(r)] = {"file": _name(r), "reason": f"byte-identical to {_name(g[0])} ({keep}); "
                               f"dropped from {part(r)}", "split": r["split"]}
    kept = [r for r in records if id(r) not in drop]
    dropped = list(drop.values())
    counts = Counter(d["split"] for d in dropped)
    log.warning("dropped %d image(s) byte-identical to an image of an earlier split (%s; data.duplicates=%s), e.g. %s",
                len(dropped), ", ".join(f"{n} from {s}" for s, n in sorted(counts.items())), mode, example)
    return kept, dropped
