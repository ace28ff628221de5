"""Manifests: one row per image or volume (CSV or JSON lines).

Columns: ``image`` (required; path relative to the manifest's folder or absolute; a folder = a
DICOM series; ``file.npz#train_images/3`` = an npz entry), ``label``, ``patient_id``, ``study_id``,
``series_id`` (SeriesInstanceUID when a folder holds several series), ``split`` (train/val/test or
empty), ``mask``, ``modality``, ``frame`` (time point of a 4D series). Extra columns are kept.
Builders for every source are in ``medmim.data.builders``.

Multi-channel inputs (``data.channels`` declared; ``read_manifest(path, channels)``): a row gives its C
files as columns ``image_<name>`` (one per declared channel), or ``image`` as a list (a JSON list in
JSONL, a JSON-list string in CSV), or one file in ``image`` holding every channel (a 4D NIfTI, a
Decathlon multi-modality image) or a DICOM study folder (series picked per channel by
``ChannelSpec.series``). After reading, a record's ``image`` is a list of C absolute paths (in
``data.channels`` order) or a single str (one multi-channel file or a study folder).
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


def channel_names(channels) -> list[str]:
    """Names of ``data.channels`` entries (ChannelSpec objects, dicts or bare names)."""
    out = []
    for c in channels or []:
        out.append(c if isinstance(c, str) else c["name"] if isinstance(c, dict) else c.name)
    return out


def image_refs(record: dict) -> list:
    """The image references of a record: its C channel files, or its one image reference."""
    img = record.get("image")
    return list(img) if isinstance(img, (list, tuple)) else [img]


def case_name(record_or_image) -> str:
    """How messages name a case: its first channel's file (or its one image reference)."""
    img = record_or_image.get("image") if isinstance(record_or_image, dict) else record_or_image
    if isinstance(img, (list, tuple)):
        img = img[0] if img else ""
    return str(img) if isinstance(img, (str, Path)) else "<array image>"


def _parse_image_list(value):
    """``image`` as a list: a JSON list (JSONL) or a JSON-list string (CSV); else None."""
    if isinstance(value, (list, tuple)):
        return list(value)
    text = str(value).strip()
    if text.startswith("[") and text.endswith("]"):
        try:
            parsed = json.loads(text)
        except ValueError:
            return None  # a file name in brackets
        if isinstance(parsed, list):
            return parsed
    return None


def _channel_files(row: dict, names: list[str], where: str) -> list[str] | str:
    """The row's channel files (``image_<name>`` columns or ``image`` as a list), or its one ``image``
    (a multi-channel file / DICOM study folder). DataError naming the row for a missing channel."""
    cols = {n: row.pop(f"image_{n}", None) for n in names}
    given = {n: v for n, v in cols.items() if v not in (None, "")}
    listed = _parse_image_list(row.get("image")) if row.get("image") not in (None, "") else None
    if given:
        missing = [n for n in names if n not in given]
        if missing:
            raise DataError(f"{where}: no file for channel '{missing[0]}' (column image_{missing[0]} is empty"
                            + (f"; also missing: {', '.join(missing[1:])}" if len(missing) > 1 else "") + ")")
        if listed is not None or row.get("image") not in (None, ""):
            raise DataError(f"{where}: gives both 'image' and image_<channel> columns; use one of them")
        return [str(given[n]) for n in names]
    if listed is not None:
        if len(listed) != len(names):
            raise DataError(f"{where}: 'image' lists {len(listed)} file(s), data.channels declares {len(names)} "
                            f"({', '.join(names)})")
        empty = [n for n, v in zip(names, listed) if v in (None, "")]
        if empty:
            raise DataError(f"{where}: no file for channel '{empty[0]}' (empty entry in the 'image' list)")
        return [str(v) for v in listed]
    if row.get("image") in (None, ""):
        raise DataError(f"{where}: no image: give columns {', '.join('image_' + n for n in names)}, or 'image' "
                        "(a list of files, a multi-channel file or a DICOM study folder)")
    return str(row["image"])


def read_manifest(path: str | Path, channels=None, skipped: list[dict] | None = None) -> list[dict]:
    """Read a manifest; paths become absolute; a missing column or file is named in the error.

    ``channels`` (``data.channels``): each row's image becomes a list of C files (``image_<name>``
    columns or an ``image`` list) or stays one reference (a multi-channel file, a DICOM study folder).
    A row without a file for some channel raises a DataError naming the row, or, when ``skipped`` is
    given, is left out and listed there (``{"file": "<manifest> row N", "reason": ...}``)."""
    path = Path(path)
    names = channel_names(channels)
    if not path.exists():
        raise DataError(f"{path}: manifest not found")
    if path.is_dir():
        raise DataError(f"{path}: is a folder, not a manifest file; build one with "
                        f"'medmim data manifest --from folder {path} --out manifest.csv'")
    rows = _read_rows(path)
    if not rows:
        raise DataError(f"{path}: manifest has no rows")
    header = {str(k) for r in rows for k in r} if path.suffix in (".jsonl", ".json") else set(map(str, rows[0]))
    channel_cols = [f"image_{n}" for n in names]
    if "image" not in header and not (names and all(c in header for c in channel_cols)):
        found = ", ".join(sorted(k for k in header if k != "None" and not k.startswith("_")))
        if names and any(c in header for c in channel_cols):
            missing = [c for c in channel_cols if c not in header]
            raise DataError(f"{path}: no column for channel(s) {', '.join(missing)} (data.channels: "
                            f"{', '.join(names)}; found: {found})")
        need = f"an 'image' column or columns {', '.join(channel_cols)}" if names else "an 'image' column"
        raise DataError(f"{path}: manifest needs {need} (found: {found or 'none'})")
    base = path.parent
    kept = []
    for n, row in enumerate(rows, 2):
        row.pop(None, None)  # csv: values beyond the header
        tag = str(row.get("_row") or "")
        loc = tag[len(path.name) + 1:] if tag.startswith(path.name + " ") else f"row {n}"
        where = f"{path}: {loc}"
        if names:
            try:
                row["image"] = _channel_files(row, names, where)
            except DataError as exc:
                if skipped is None:
                    raise
                skipped.append({"file": f"{path} {loc}",
                                "reason": str(exc).split(": ", 2)[-1]})
                continue
        elif not row.get("image"):
            raise DataError(f"{path}: row {n} has an empty 'image'")
        elif _parse_image_list(row["image"]) is not None:
            raise DataError(f"{where}: 'image' is a list of files, but data.channels is not declared; name the "
                            "channels in data.channels (docs/data.md, multi-channel inputs)")
        for col in PATH_COLUMNS:
            value = row.get(col)
            if isinstance(value, list):
                row[col] = [str(q if (q := Path(v)).is_absolute() else (base / q)) for v in value]
            elif value:
                p = Path(value)
                row[col] = str(p if p.is_absolute() else (base / p))
        try:
            row["label"] = _parse_label(row.get("label"))
        except ValueError:
            raise DataError(f"{path}: row {n}: label {row.get('label')!r} is not a number or a JSON list") from None
        row.setdefault("_row", f"{path.name} row {n}")  # where the row came from, for error messages
        row.setdefault("patient_id", "")
        if not row["patient_id"]:
            row["patient_id"] = Path(case_name(row)).stem
        row["split"] = (row.get("split") or "").strip()
        if row["split"] and row["split"] not in ("train", "val", "test"):
            raise DataError(f"{path}: row {n}: split '{row['split']}' is not train, val or test (or empty)")
        kept.append(row)
    if not kept:
        raise DataError(f"{path}: no usable rows" + (f" (first: {skipped[0]['file']}: {skipped[0]['reason']})"
                                                    if skipped else ""))
    return kept


def write_manifest(rows: Iterable[dict], path: str | Path, relative_to: str | Path | None = None) -> Path:
    """Write rows as CSV (or JSONL by suffix) atomically; paths relative to ``relative_to`` if given."""
    path = Path(path)
    rows = [dict(r) for r in rows]
    base = Path(relative_to) if relative_to else None
    def rel(value):
        try:
            return str(Path(value).resolve().relative_to(base.resolve()))
        except ValueError:
            return str(value)

    for r in rows:
        for col in PATH_COLUMNS:
            value = r.get(col)
            if isinstance(value, (list, tuple)):  # one file per channel
                value = [rel(v) if base is not None else str(v) for v in value]
                r[col] = value if path.suffix == ".jsonl" else json.dumps(value)
            elif base is not None and value:
                r[col] = rel(value)
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
        refs = image_refs(r)
        if len(refs) > 1 or isinstance(r.get("image"), (list, tuple)):
            h.update(f"channels={len(refs)}".encode())  # one file per channel (C = 1 lists too)
        for img in refs:
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
