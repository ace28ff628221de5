"""The unlabelled pretraining pool: extra images that only pretraining sees (``data.unlabelled``).

A hospital has far more scans than labels. Each ``data.unlabelled`` entry names one source:

* ``folder``: every image file under a folder, recursively (PNG/JPEG/TIFF, NIfTI, MHA/NRRD, .dcm, .npy);
* ``dicom``: a DICOM folder (e.g. a PACS export), grouped into series (one image per series, or per
  time point of a 4D series); patient ids are salted hashes (the salt of ``medmim data manifest``:
  ``$MEDMIM_SALT``, else ``.medmim_salt`` beside the labelled manifest);
* ``manifest``: a medmim manifest (CSV/JSONL); its labels, masks and split column are ignored;
* ``npz``: a MedMNIST-layout npz (every ``*_images`` array unless ``keys`` names some) or a plain one
  (every array that is not a label array);
* ``auto`` (default): decided from the path (``.npz``, ``.csv``/``.jsonl``/``.json``, a folder holding
  DICOM files and no other images, else a folder).

Each source may carry its own intensity ``preset`` (or ``modality``, whose default preset is used);
without either, it gets the labelled data's preset. With ``data.channels`` declared, a channel's own
``preset`` wins over the source's; a manifest source gives every channel per row (as the labelled
manifest does), and a folder, DICOM or npz source (single images) is refused when more than one
channel is declared. ``fraction`` keeps a seeded, nested subset
(10% ⊂ 30% ⊂ 100% for one ``run.seed``), for pool-size curves. The phantom source can also generate
a pool (``data.phantoms.pool_patients``: more patients of the same distribution, labels dropped).

Leakage guard: every pool image is content-hashed (``content_hash``: the file's bytes; the pixel
array's bytes for npz entries and in-memory arrays; all files of a DICOM series) and compared with
the val and test images of the labelled data. Matches are dropped and counted, and so are pool
images whose patient id (where the source has one) is a val or test patient. The counts are
printed and kept in ``DataBundle.pool_info`` (data card, environment record, study report). No
identifier is ever printed: only counts and source names.
"""

from __future__ import annotations

import csv
import hashlib
import json
import math
import os
from pathlib import Path
from typing import Any, Callable

import numpy as np

from medmim.config import Config, UnlabelledSource
from medmim.data.presets import DEFAULT_FOR_MODALITY
from medmim.data.readers import NPZ_REF, _is_dicom, _suffix
from medmim.errors import DataError

__all__ = ["content_hash", "detect_kind", "source_records", "build_pool", "attach_pool", "preset_groups",
           "PRESET_KEY", "format_pool"]

PRESET_KEY = "_preset"  # per-record preset: materialize() groups records by it (medmim.data.dataset)
SALT_ENV = "MEDMIM_SALT"


# ---- content hashing ---------------------------------------------------------------------------------
# One hash for every caller: medmim.data.splits.content_hash (a file's bytes; an array's shape, dtype
# and bytes), which the cross-split duplicate check uses too; extended here to DICOM series folders
# and to time points of 4D files.
def content_hash(ref, *, series_id: str | None = None, frame: int | str | None = None) -> str:
    """The content hash of an image reference: a file's bytes; an npz entry's (or an in-memory
    array's) pixels with dtype and shape (``medmim.data.splits.content_hash``); for a DICOM series
    folder, the hashes of its files (sorted by name); plus the time point when one is given. Two
    references with the same hash hold the same image, wherever they live."""
    from medmim.data.splits import content_hash as record_content_hash

    if isinstance(ref, (list, tuple)):  # one reference per channel (data.channels): each hashed, in order
        parts = [content_hash(r, series_id=series_id) for r in ref]
        digest = hashlib.sha256(f"channels={len(parts)}|{'|'.join(parts)}".encode()).hexdigest()
        return digest if frame in (None, "") else hashlib.sha256(f"{digest}|frame={int(frame)}".encode()).hexdigest()
    if isinstance(ref, np.ndarray) or type(ref).__module__.startswith("torch"):
        return record_content_hash({"image": np.asarray(ref)})
    text = str(ref)
    if NPZ_REF.match(text):
        return record_content_hash({"image": text})
    path = Path(text)
    if not path.exists():
        raise DataError(f"{path}: file not found")
    if path.is_dir():  # a DICOM series, or (no series_id) every series of the folder: a study's channels
        from medmim.data.dicom import scan_folder, select_series

        series = scan_folder(path, salt="", skipped=[])
        if series_id or len(series) <= 1:
            files = select_series(series, path, uid=series_id or None).files
        else:
            files = [f for info in series.values() for f in info.files]
        files = sorted(files, key=lambda p: (p.name, str(p)))
        digest = hashlib.sha256("".join(record_content_hash({"image": str(f)}) for f in files).encode()).hexdigest()
    else:
        digest = record_content_hash({"image": text})
    if frame not in (None, ""):
        digest = hashlib.sha256(f"{digest}|frame={int(frame)}".encode()).hexdigest()
    return digest


def record_hash(r: dict) -> str:
    return content_hash(r["image"], series_id=r.get("series_id") or None, frame=r.get("frame"))


# ---- sources -----------------------------------------------------------------------------------------
def detect_kind(path: str | Path) -> str:
    """``npz``, ``manifest``, ``dicom`` or ``folder`` from the path (see module doc)."""
    from medmim.data.builders import IMAGE_SUFFIXES

    p = Path(path)
    if not p.exists():
        raise DataError(f"{p}: unlabelled source not found")
    if p.is_file():
        suffix = _suffix(p)
        if suffix == ".npz":
            return "npz"
        if suffix in (".csv", ".jsonl", ".json"):
            return "manifest"
        raise DataError(f"{p}: an unlabelled source file must be an .npz or a manifest (.csv/.jsonl), "
                        f"not '{suffix or p.name}'")
    has_dicom = has_other = False
    for q in p.rglob("*"):
        if not q.is_file() or q.name.startswith("."):
            continue
        if _suffix(q) == ".dcm" or (_suffix(q) not in IMAGE_SUFFIXES and _is_dicom(q)):
            has_dicom = True
        elif _suffix(q) in IMAGE_SUFFIXES:
            has_other = True
        if has_dicom and has_other:
            break
    return "dicom" if has_dicom and not has_other else "folder"


def _folder_records(root: Path, skipped: list[dict]) -> list[dict]:
    from medmim.data.builders import IMAGE_SUFFIXES

    rows = []
    for p in sorted(root.rglob("*")):
        if not p.is_file() or p.name.startswith("."):
            continue
        if _suffix(p) not in IMAGE_SUFFIXES:
            skipped.append({"file": str(p), "reason": f"not an image file (suffix '{_suffix(p)}')"})
            continue
        rows.append({"image": str(p), "patient_id": ""})
    return rows


def _salt(labelled_path: str | None) -> tuple[str, bool]:
    """(salt, shared): the salt medmim data manifest used for the labelled data, when findable."""
    if os.environ.get(SALT_ENV):
        return os.environ[SALT_ENV], True
    if labelled_path:
        f = Path(labelled_path).parent / ".medmim_salt"
        if f.is_file():
            return f.read_text().strip(), True
    import secrets

    return secrets.token_hex(16), False


def _dicom_records(root: Path, labelled_path: str | None, skipped: list[dict]) -> tuple[list[dict], bool]:
    from medmim.data.builders import from_dicom

    salt, shared = _salt(labelled_path)
    rows = from_dicom(root, salt=salt, skipped=skipped)
    if not shared:  # ids from a fresh salt cannot match the labelled ones: keep them for counting only
        for r in rows:
            r["_ids_local"] = True
    return rows, shared


def _has_column(path: Path, column: str) -> bool:
    if path.suffix in (".jsonl", ".json"):
        for line in path.read_text().splitlines():
            if line.strip():
                try:
                    if json.loads(line).get(column) not in (None, ""):
                        return True
                except (ValueError, AttributeError):
                    return False
        return False
    with open(path, newline="") as fh:
        return column in (csv.DictReader(fh).fieldnames or [])


def _manifest_records(path: Path, channels=None, skipped: list[dict] | None = None) -> list[dict]:
    from medmim.data.manifest import read_manifest

    rows = read_manifest(path, channels, skipped if channels else None)  # rows missing a channel: skipped
    with_ids = _has_column(path, "patient_id")
    out = []
    for r in rows:
        keep = {k: r[k] for k in ("image", "series_id", "frame", "modality", "study_id") if r.get(k) not in (None, "")}
        keep["patient_id"] = str(r.get("patient_id") or "") if with_ids else ""
        out.append(keep)
    return out


def _npz_records(path: Path, keys: list[str] | None) -> list[dict]:
    path = path.resolve()
    try:
        npz = np.load(path, allow_pickle=False)
    except Exception as exc:  # noqa: BLE001 - numpy raises several types for bad files
        raise DataError(f"{path}: not a readable npz file ({type(exc).__name__})") from None
    with npz:
        names = list(npz.files)
        if keys:
            missing = [k for k in keys if k not in names]
            if missing:
                raise DataError(f"{path}: no array(s) {missing} (arrays: {', '.join(names)})")
            chosen = list(keys)
        else:
            chosen = [k for k in names if k.endswith("_images")] or \
                [k for k in names if not k.endswith("labels")]
        rows = []
        for k in chosen:
            if not NPZ_REF.match(f"{path}#{k}/0"):
                raise DataError(f"{path}: array name '{k}' cannot be referenced (letters, digits and _ only)")
            n = len(npz[k])
            rows.extend({"image": f"{path}#{k}/{i}", "patient_id": ""} for i in range(n))
    if not rows:
        raise DataError(f"{path}: no image arrays")
    return rows


def source_records(src: UnlabelledSource, *, labelled_path: str | None = None,
                   skipped: list[dict] | None = None, channels=None) -> tuple[list[dict], str]:
    """The records of one unlabelled source (no labels, masks or splits) and its resolved kind.

    ``channels`` (``data.channels``): a manifest source is read with them (its rows give every
    channel, as the labelled manifest's do); a folder, DICOM or npz source holds single images, which
    cannot make a case of several channels, so it is refused when more than one channel is declared."""
    skipped = skipped if skipped is not None else []
    path = Path(src.path)
    kind = detect_kind(path) if src.kind == "auto" else src.kind
    if not path.exists():
        raise DataError(f"{path}: unlabelled source not found")
    if channels and len(channels) > 1 and kind != "manifest":
        names = ", ".join(c.name for c in channels)
        raise DataError(f"{path}: a '{kind}' unlabelled source holds single images, but data.channels declares "
                        f"{len(channels)} ({names}); give the pool as a manifest with one file per channel")
    if kind == "folder":
        if not path.is_dir():
            raise DataError(f"{path}: kind 'folder' needs a folder")
        rows = _folder_records(path, skipped)
    elif kind == "dicom":
        rows, _shared = _dicom_records(path, labelled_path, skipped)
    elif kind == "manifest":
        rows = _manifest_records(path, channels, skipped)
    elif kind == "npz":
        rows = _npz_records(path, src.keys)
    else:  # pragma: no cover - the config forbids other kinds
        raise DataError(f"{path}: unknown source kind '{kind}'")
    if not rows:
        raise DataError(f"{path}: no images in this unlabelled source")
    return rows, kind


def _subset(rows: list[dict], fraction: float, seed: int, index: int) -> list[dict]:
    """A seeded prefix of one fixed permutation: nested across fractions for one seed."""
    if fraction >= 1:
        return rows
    n = max(1, math.ceil(fraction * len(rows) - 1e-9))
    order = np.random.default_rng([seed, index, 0x9001]).permutation(len(rows))
    return [rows[i] for i in sorted(order[:n])]


def _source_preset(src: UnlabelledSource, default: str) -> str:
    if src.preset:
        return src.preset
    if src.modality:
        return DEFAULT_FOR_MODALITY[src.modality]
    return default


# ---- the pool and its guard --------------------------------------------------------------------------
def build_pool(cfg: Config, labelled: dict[str, list[dict]], default_preset: str,
               skipped: list[dict] | None = None) -> tuple[list[dict], dict[str, Any]]:
    """Pool records (``split`` = "pool", no label, ``_preset`` set) and a JSON-safe summary.

    ``labelled``: split -> records of the labelled data; its val and test images are the guard's
    reference (content hashes and patient ids).
    """
    dc = cfg.data
    skipped = skipped if skipped is not None else []
    sources: list[tuple[UnlabelledSource, str]] = []
    if dc.source == "phantoms" and dc.phantoms.pool_patients > 0:
        from medmim.data.phantoms import generate_pool, phantom_spec

        p = dc.phantoms
        spec = phantom_spec(p, [c.name for c in dc.channels])  # multi-sequence MRI when data.channels is declared
        manifest = generate_pool(p.out_dir, dc.spatial_dims, spec, p.pool_patients, p.pool_seed)
        sources.append((UnlabelledSource(path=str(manifest), kind="manifest", preset=default_preset,
                                         name=f"phantom pool (seed {p.pool_seed})"), default_preset))
    for src in dc.unlabelled:
        sources.append((src, _source_preset(src, default_preset)))

    # the guard's reference: content hashes and patient ids of the val and test images
    ref_hash: dict[str, str] = {}
    ref_patients: dict[str, str] = {}
    for split in ("test", "val"):  # test first: an image in both counts as a test match
        for r in labelled.get(split, []):
            try:
                ref_hash.setdefault(record_hash(r), split)
            except DataError:
                continue  # unreadable labelled files are reported by their own stage
            pid = str(r.get("patient_id") or "")
            if pid:
                ref_patients.setdefault(pid, split)

    pool: list[dict] = []
    reports = []
    seen: dict[str, int] = {}
    for index, (src, preset) in enumerate(sources):
        name = src.name or f"{Path(src.path).name}"
        n_skipped = len(skipped)
        rows, kind = source_records(src, labelled_path=dc.path, skipped=skipped, channels=dc.channels)
        found = len(rows)
        rows = _subset(rows, src.fraction, cfg.run.seed, index)
        rep = {"name": name, "kind": kind, "preset": preset, "found": found, "sampled": len(rows),
               "dropped_val": 0, "dropped_test": 0, "dropped_id_val": 0, "dropped_id_test": 0,
               "duplicates_in_pool": 0, "unreadable": 0, "images": 0, "patients": None,
               "fraction": src.fraction}
        patients: set[str] = set()
        for r in rows:
            try:
                h = record_hash(r)
            except DataError as exc:
                text = str(exc)
                file, _, reason = text.partition(": ")
                skipped.append({"file": file or str(r.get("image")), "reason": reason or text})
                rep["unreadable"] += 1
                continue
            split = ref_hash.get(h)
            if split:
                rep[f"dropped_{split}"] += 1
                continue
            pid = str(r.get("patient_id") or "")
            if pid and not r.get("_ids_local") and pid in ref_patients:
                rep[f"dropped_id_{ref_patients[pid]}"] += 1
                continue
            if h in seen:  # the same image twice in the pool (two sources, or a copy): once is enough
                rep["duplicates_in_pool"] += 1
                continue
            seen[h] = 1
            if pid:
                patients.add(pid)
            rec = {k: v for k, v in r.items() if k in ("image", "series_id", "frame")}
            rec.update({"split": "pool", "patient_id": pid, PRESET_KEY: preset, "pool_source": name})
            pool.append(rec)
            rep["images"] += 1
        rep["patients"] = len(patients) if patients else None
        rep["not_images"] = len(skipped) - n_skipped - rep["unreadable"]
        reports.append(rep)

    labelled_pretrain = (len(labelled.get("train", [])) + len(labelled.get("val", []))) \
        if dc.pretrain_on_labelled else 0
    if dc.pretrain_on_labelled and dc.pretrain_on_test:
        labelled_pretrain += len(labelled.get("test", []))
    fp = hashlib.sha256("".join(sorted(seen)).encode()).hexdigest()[:16] if seen else ""
    info = {
        "sources": reports,
        "images": len(pool),
        "dropped": {"val": sum(r["dropped_val"] for r in reports), "test": sum(r["dropped_test"] for r in reports),
                    "id_val": sum(r["dropped_id_val"] for r in reports),
                    "id_test": sum(r["dropped_id_test"] for r in reports),
                    "in_pool": sum(r["duplicates_in_pool"] for r in reports)},
        "patients": sum(r["patients"] or 0 for r in reports) or None,
        "labelled_images": labelled_pretrain,
        "pretraining_images": labelled_pretrain + len(pool),
        "pretrain_on_labelled": dc.pretrain_on_labelled,
        "fingerprint": fp,
    }
    return pool, info


def format_pool(info: dict) -> str:
    """One line for logs: pool size per source and what the guard dropped (counts only)."""
    d = info["dropped"]
    per = ", ".join(f"{s['name']} {s['images']}" for s in info["sources"])
    return (f"[pool] pretraining sees {info['pretraining_images']} images: {info['labelled_images']} labelled "
            f"train+val + {info['images']} unlabelled ({per}); leakage guard dropped {d['val']} duplicate(s) "
            f"of val and {d['test']} of test images (content hash), {d['id_val'] + d['id_test']} "
            f"image(s) of val/test patients; {d['in_pool']} repeated pool image(s) dropped")


def attach_pool(bundle, cfg: Config, log: Callable[[str], None] = print) -> None:
    """Build the pool for ``bundle`` (a DataBundle) and attach it (``bundle.pool``, ``bundle.pool_info``)."""
    pool, info = build_pool(cfg, bundle.records, bundle.preset, skipped=bundle.skipped)
    if not pool and not cfg.data.pretrain_on_labelled:
        raise DataError("data.unlabelled: no pool images left after the leakage guard, and "
                        "data.pretrain_on_labelled is false: pretraining would see nothing")
    bundle.pool = pool
    bundle.pool_info = info
    log(format_pool(info))


def preset_groups(records: list[dict], default: str) -> list[tuple[str, list[dict]]]:
    """Records grouped by their own preset (``_preset``; else ``default``), first-seen order."""
    groups: dict[str, list[dict]] = {}
    for r in records:
        groups.setdefault(r.get(PRESET_KEY) or default, []).append(r)
    return list(groups.items())
