"""Manifests: one row per image or volume (CSV or JSON lines).

Columns: ``image`` (required; path relative to the manifest's folder or absolute; a folder = a
DICOM series; ``file.npz#train_images/3`` = an npz entry), ``label``, ``patient_id``, ``study_id``,
``series_id`` (SeriesInstanceUID when a folder holds several series), ``split`` (train/val/test or
empty), ``mask``, ``modality``, ``frame`` (time point of a 4D series). Extra columns are kept.
Builders for every source are in ``medmim.data.builders``.
"""

from __future__ import annotations

import csv
import hashlib
import json
from pathlib import Path
from typing import Iterable

import numpy as np

from medmim.errors import DataError
from medmim.io import TEXT_ENCODING, atomic_path

COLUMNS = ["image", "label", "patient_id", "study_id", "series_id", "split", "mask", "modality", "frame"]
PATH_COLUMNS = ("image", "mask")


def _parse_label(value):
    if value is None or value == "":
        return None
    if isinstance(value, (int, float, list)):
        return value
    text = str(value).strip()
    if text.startswith("["):
        return json.loads(text)
    try:
        return int(text)
    except ValueError:
        try:
            return float(text)
        except ValueError:
            return text


# manifests are UTF-8; file names that are not (raw bytes on POSIX) round-trip through surrogateescape
ENCODING = TEXT_ENCODING


def check_text_file(path: Path, what: str = "manifest") -> None:
    """Refuse a folder or a binary file (an image, an npz, a spreadsheet) passed where text is expected."""
    if path.is_dir():
        raise DataError(f"{path}: is a folder, not a {what} file")
    with open(path, "rb") as fh:
        head = fh.read(8192)
    if b"\x00" in head or head[:4] in (b"\xff\xd8\xff\xe0", b"\x89PNG", b"PK\x03\x04"):
        raise DataError(f"{path}: not a text {what} (binary content); expected a CSV or JSON-lines file "
                        "with an 'image' column")


def _read_rows(path: Path) -> list[dict]:
    """The raw rows of a CSV or JSON-lines manifest; one-line DataErrors for unusable files."""
    check_text_file(path)
    if path.suffix in (".jsonl", ".json"):
        rows = []
        with open(path, **ENCODING) as fh:
            for n, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise DataError(f"{path}: line {n} is not valid JSON ({exc.msg})") from None
                if not isinstance(row, dict):
                    raise DataError(f"{path}: line {n} is not a JSON object")
                row["_row"] = f"{path.name} line {n}"
                rows.append(row)
        return rows
    try:
        with open(path, newline="", **ENCODING) as fh:
            return list(csv.DictReader(fh))
    except csv.Error as exc:
        raise DataError(f"{path}: not a readable CSV ({exc})") from None


def read_manifest(path: str | Path) -> list[dict]:
    """Read a manifest; paths become absolute; a missing column or file is named in the error."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: manifest not found")
    if path.is_dir():
        raise DataError(f"{path}: is a folder, not a manifest file; build one with "
                        f"'medmim data manifest --from folder {path} --out manifest.csv'")
    rows = _read_rows(path)
    if not rows:
        raise DataError(f"{path}: manifest has no rows")
    if "image" not in rows[0]:
        found = ", ".join(str(k) for k in rows[0] if k is not None)
        raise DataError(f"{path}: manifest needs an 'image' column (found: {found or 'none'})")
    base = path.parent
    for n, row in enumerate(rows, 2):
        row.pop(None, None)  # csv: values beyond the header
        if not row.get("image"):
            raise DataError(f"{path}: row {n} has an empty 'image'")
        for col in PATH_COLUMNS:
            if row.get(col):
                p = Path(row[col])
                row[col] = str(p if p.is_absolute() else (base / p))
        try:
            row["label"] = _parse_label(row.get("label"))
        except ValueError:
            raise DataError(f"{path}: row {n}: label {row.get('label')!r} is not a number or a JSON list") from None
        row.setdefault("_row", f"{path.name} row {n}")  # where the row came from, for error messages
        row.setdefault("patient_id", "")
        if not row["patient_id"]:
            row["patient_id"] = Path(row["image"]).stem
        row["split"] = (row.get("split") or "").strip()
        if row["split"] and row["split"] not in ("train", "val", "test"):
            raise DataError(f"{path}: row {n}: split '{row['split']}' is not train, val or test (or empty)")
    return rows


def write_manifest(rows: Iterable[dict], path: str | Path, relative_to: str | Path | None = None) -> Path:
    """Write rows as CSV (or JSONL by suffix) atomically; paths relative to ``relative_to`` if given."""
    path = Path(path)
    rows = [dict(r) for r in rows]
    base = Path(relative_to) if relative_to else None
    for r in rows:
        for col in PATH_COLUMNS:
            if base is not None and r.get(col):
                try:
                    r[col] = str(Path(r[col]).resolve().relative_to(base.resolve()))
                except ValueError:
                    pass
        if isinstance(r.get("label"), list):
            r["label"] = json.dumps(r["label"])
    for r in rows:
        for k in [k for k in r if str(k).startswith("_")]:  # private keys (e.g. _row) are not data
            del r[k]
    fields = COLUMNS + sorted({k for r in rows for k in r} - set(COLUMNS))
    with atomic_path(path) as tmp:
        if path.suffix == ".jsonl":
            tmp.write_text("".join(json.dumps(r, default=str) + "\n" for r in rows), encoding="utf-8")
        else:
            with open(tmp, "w", newline="", **ENCODING) as fh:
                w = csv.DictWriter(fh, fieldnames=fields, extrasaction="ignore")
                w.writeheader()
                w.writerows(rows)
    return path


def records_fingerprint(records: list[dict]) -> str:
    """A short hash identifying the data: file paths, sizes and labels (or pixel bytes for arrays)."""
    h = hashlib.sha256()
    for r in records:
        img = r["image"]
        if isinstance(img, (str, Path)):
            text = str(img)
            file, _, entry = text.partition("#")  # "data.npz#train_images/3": an npz entry
            p = Path(file)
            h.update((p.name + ("#" + entry if entry else "")).encode("utf-8", "surrogatepass"))
            if p.is_dir():  # a DICOM series: which series / time point, and how many files
                h.update(repr((r.get("series_id"), r.get("frame"), r.get("n_files"))).encode())
            else:
                h.update(str(p.stat().st_size if p.exists() else -1).encode())
        else:
            h.update(memoryview(np.ascontiguousarray(img).tobytes()))
        h.update(repr((r.get("label"), r.get("split"))).encode())
    return h.hexdigest()[:16]
