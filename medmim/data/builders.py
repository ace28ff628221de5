"""Manifest builders: turn a source into rows (one per image/volume) for ``write_manifest``.

* ``from_folder``: one class per sub-folder (labels 0..K-1 in sorted folder-name order);
* ``from_csv``: any CSV, with its column names mapped onto the manifest columns;
* ``from_decathlon``: a Medical Segmentation Decathlon ``dataset.json`` (imagesTr/labelsTr; imagesTs
  as the test split);
* ``from_dicom``: a DICOM folder, grouped into series (one row per series, or per time point of a
  4D series); patient ids are salted hashes, never the DICOM PatientID;
* ``from_npz``: a MedMNIST-layout npz, rows referencing ``file.npz#<split>_images/<i>``.

Builders never read pixels except where needed to validate (DICOM headers); files they cannot use
are appended to ``skipped`` as ``{"file", "reason"}``.
"""

from __future__ import annotations

import csv
import json
import os
import re
from pathlib import Path

from medmim.data.readers import NIFTI, RASTER, SITK, _suffix
from medmim.errors import DataError

IMAGE_SUFFIXES = set(RASTER) | set(NIFTI) | SITK | {".dcm", ".npy"}
DICOM_MODALITY = {"CT": "ct", "MR": "mri", "CR": "xray", "DX": "xray", "DR": "xray", "MG": "xray",
                  "RF": "xray", "XA": "xray", "PT": "generic", "US": "generic", "NM": "generic"}


def _patient_of(path: Path, patient_regex: str | None, root: Path | None = None) -> str:
    """The regex's first group on the file name; else the file name without suffix -- taken relative
    to ``root`` when given, so that ``a/1.png`` and ``b/1.png`` are two patients, not one."""
    if patient_regex:
        m = re.search(patient_regex, path.name)
        if m:
            return m.group(1) if m.groups() else m.group(0)
    name = path.name if root is None else path.relative_to(root).as_posix()
    suffix = _suffix(path)
    return name[: -len(suffix)] if suffix and name.lower().endswith(suffix) else name


# folder names read as a split when every top-level folder is one of them (case-insensitive)
SPLIT_ALIASES = {"train": "train", "training": "train", "tr": "train",
                 "val": "val", "valid": "val", "validation": "val", "dev": "val",
                 "test": "test", "testing": "test", "ts": "test"}


def parse_split_dirs(text: str | None) -> dict[str, str] | None:
    """``"Training=train,Testing=test"`` -> ``{"Training": "train", "Testing": "test"}``; ``"none"``
    -> ``{}`` (no split folders: top-level folders are classes); None/"" -> None (detect)."""
    if text is None or not text.strip():
        return None
    if text.strip().lower() == "none":
        return {}
    out: dict[str, str] = {}
    for part in text.split(","):
        folder, sep, split = part.partition("=")
        folder, split = folder.strip(), split.strip().lower()
        if not sep or not folder or split not in ("train", "val", "test"):
            raise DataError(f"--split-dirs: '{part.strip()}' should look like FOLDER=train|val|test "
                            "(e.g. Training=train,Testing=test)")
        out[folder] = split
    return out


def _visible_dirs(folder: Path) -> list[Path]:
    return sorted((p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")),
                  key=lambda p: os.fsencode(p.name))


def folder_splits(root: Path, split_dirs: dict[str, str] | None) -> dict[str, str]:
    """{top-level folder name: split} for a tree with split folders; {} when the top level holds classes."""
    top = [p.name for p in _visible_dirs(root)]
    if split_dirs is None:  # detect: every top-level folder is a split name
        if top and all(name.lower() in SPLIT_ALIASES for name in top):
            return {name: SPLIT_ALIASES[name.lower()] for name in top}
        return {}
    if not split_dirs:
        return {}
    missing = [f for f in split_dirs if not (root / f).is_dir()]
    if missing:
        raise DataError(f"{root / missing[0]}: split folder not found (top-level folders: "
                        f"{', '.join(top) or 'none'})")
    return dict(split_dirs)


def from_folder(root: str | Path, *, modality: str = "", patient_regex: str | None = None,
                skipped: list[dict] | None = None, split_dirs: dict[str, str] | None = None) -> list[dict]:
    """``root/<class>/**/<image>`` or ``root/<split>/<class>/**/<image>``; files that are not images
    are skipped.

    Classes: one per sub-folder name; labels 0..K-1 in sorted name order over every split (the
    ``label_name`` column keeps the folder name). Split folders: ``split_dirs`` maps top-level folder
    names to train/val/test (``{}``: none, the top level holds classes); by default a tree whose
    top-level folders are all split names (train/training, val/valid/validation, test/testing, any
    case) is read as split folders. Top-level folders that are not mapped are left out and listed in
    ``skipped``. Images directly inside a split folder are unlabelled rows of that split.

    ``patient_regex``: a regular expression on the file name whose first group is the patient id
    (default: the file name without suffix, i.e. every image its own patient).
    """
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{root}: folder not found" if not root.exists() else f"{root}: not a folder")
    if patient_regex:
        try:
            re.compile(patient_regex)
        except re.error as exc:
            raise DataError(f"--patient-regex: not a valid regular expression ({exc})") from None
    splits = folder_splits(root, split_dirs)
    groups: list[tuple[Path, str]] = [(root / name, split) for name, split in splits.items()] if splits \
        else [(root, "")]
    if splits:
        for p in _visible_dirs(root):
            if p.name not in splits and skipped is not None:
                skipped.append({"file": str(p), "reason": "top-level folder not mapped to a split (--split-dirs)"})
    classes = sorted({p.name for base, _ in groups for p in _visible_dirs(base)}, key=os.fsencode)
    loose = splits and any(p.is_file() for base, _ in groups for p in base.iterdir())
    if not classes and not loose:  # (split folders of loose images: unlabelled rows, e.g. for pretraining)
        where = f"{groups[0][0]}/<class name>/<images>" if splits else f"{root}/<class name>/<images>"
        raise DataError(f"{root}: no class sub-folders (expected {where})")
    label_of = {name: i for i, name in enumerate(classes)}

    def is_image(p: Path) -> bool:
        if not p.is_file() or p.name.startswith("."):
            return False
        if _suffix(p) not in IMAGE_SUFFIXES:
            if skipped is not None:
                skipped.append({"file": str(p), "reason": f"not an image file (suffix '{_suffix(p)}')"})
            return False
        return True

    rows = []
    for base, split in groups:
        for p in sorted(base.iterdir(), key=lambda q: os.fsencode(q.name)):
            if p.is_dir() or not is_image(p):
                continue
            if not split:  # loose image at the root of a class tree: no class to give it
                if skipped is not None:
                    skipped.append({"file": str(p), "reason": "not inside a class folder"})
                continue
            rows.append({"image": str(p), "label": "", "label_name": "",
                         "patient_id": _patient_of(p, patient_regex, root), "split": split, "modality": modality})
        for cls_dir in _visible_dirs(base):
            name = cls_dir.name
            for p in sorted(cls_dir.rglob("*"), key=lambda q: os.fsencode(str(q))):
                if is_image(p):
                    rows.append({"image": str(p), "label": label_of[name], "label_name": name,
                                 "patient_id": _patient_of(p, patient_regex, root), "split": split,
                                 "modality": modality})
    if not rows:
        raise DataError(f"{root}: no image files under the class folders")
    return rows


def from_csv(path: str | Path, *, image_col: str = "image", label_col: str | None = "label",
             patient_col: str | None = "patient_id", split_col: str | None = "split", mask_col: str | None = "mask",
             modality: str = "") -> list[dict]:
    """Rows of any CSV; ``*_col`` name its columns (missing optional columns are fine).

    Relative paths are taken relative to the CSV's folder. Other columns are kept.
    """
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: CSV not found")
    from medmim.data.manifest import check_text_file
    from medmim.io import TEXT_ENCODING

    check_text_file(path, "CSV")
    try:
        with open(path, newline="", **TEXT_ENCODING) as fh:
            data = list(csv.DictReader(fh))
    except (csv.Error, IsADirectoryError) as exc:
        raise DataError(f"{path}: not a readable CSV ({exc})") from None
    if not data:
        raise DataError(f"{path}: CSV has no rows")
    if image_col not in data[0]:
        hint = ("; columns image_<channel> already make a multi-channel manifest: give this CSV as data.path with "
                "data.channels" if any(str(k).startswith("image_") for k in data[0]) else "")
        raise DataError(f"{path}: no column '{image_col}' (found: {', '.join(data[0])}){hint}")
    from medmim.data.manifest import _parse_image_list
    rows = []
    mapping = {image_col: "image", label_col: "label", patient_col: "patient_id", split_col: "split",
               mask_col: "mask"}
    for n, src in enumerate(data, 2):
        row = {}
        for k, v in src.items():
            row[mapping.get(k, k) if k is not None else "extra"] = v
        if not row.get("image"):
            raise DataError(f"{path}: row {n} has an empty '{image_col}'")
        listed = _parse_image_list(row["image"])  # one file per channel (a JSON-list string)
        if listed is not None:
            if not listed or any(v in (None, "") for v in listed):
                raise DataError(f"{path}: row {n}: the '{image_col}' list has an empty entry")
            row["image"] = [str(q if (q := Path(str(v))).is_absolute() else path.parent / q) for v in listed]
        for col in ("image", "mask"):
            if row.get(col) and not isinstance(row[col], list):
                p = Path(row[col])
                row[col] = str(p if p.is_absolute() else path.parent / p)
        if not row.get("patient_id"):
            first = row["image"][0] if isinstance(row["image"], list) else row["image"]
            row["patient_id"] = _patient_of(Path(first), None)
        if row.get("split") and row["split"] not in ("train", "val", "test"):
            raise DataError(f"{path}: row {n}: split '{row['split']}' is not train/val/test")
        row.setdefault("modality", modality)
        rows.append(row)
    return rows


def from_decathlon(dataset_json: str | Path) -> list[dict]:
    """A Decathlon ``dataset.json``: training pairs become image + mask rows (split left to the
    patient split), ``test`` images become split ``test`` rows without masks."""
    dataset_json = Path(dataset_json)
    if dataset_json.is_dir():  # the task folder: its dataset.json
        dataset_json = dataset_json / "dataset.json"
    if not dataset_json.exists():
        raise DataError(f"{dataset_json}: dataset.json not found")
    try:
        meta = json.loads(dataset_json.read_text())
    except ValueError as exc:
        raise DataError(f"{dataset_json}: not valid JSON ({exc})") from None
    if "training" not in meta:
        raise DataError(f"{dataset_json}: no 'training' list (not a Decathlon dataset.json)")
    base = dataset_json.parent
    mod = " ".join(str(v) for v in (meta.get("modality") or {}).values()).lower()
    modality = "ct" if "ct" in mod.split() else "mri" if any(k in mod for k in ("mri", "t1", "t2", "flair", "adc")) \
        else ""
    name = str(meta.get("name", base.name))

    def rel(p: str) -> str:
        q = Path(p)
        return str(q if q.is_absolute() else (base / q).resolve())

    rows = []
    for item in meta["training"]:
        img = rel(item["image"])
        rows.append({"image": img, "mask": rel(item["label"]) if item.get("label") else "", "label": "",
                     "patient_id": _patient_of(Path(img), None), "split": "", "modality": modality,
                     "dataset": name})
    for item in meta.get("test", []):
        img = rel(item if isinstance(item, str) else item["image"])
        rows.append({"image": img, "mask": "", "label": "", "patient_id": _patient_of(Path(img), None),
                     "split": "test", "modality": modality, "dataset": name})
    return rows


def decathlon_channels(dataset_json: str | Path) -> list[str]:
    """Channel names of a Decathlon task from its ``modality`` map (``{"0": "FLAIR", "1": "T1w", ...}``),
    in index order, made into data.channels names (lower case; other characters become '_'). A
    multi-modality task's images are 4D (channels last): declare these in data.channels."""
    import re

    dataset_json = Path(dataset_json)
    if dataset_json.is_dir():
        dataset_json = dataset_json / "dataset.json"
    try:
        modality = json.loads(dataset_json.read_text()).get("modality") or {}
    except (OSError, ValueError, AttributeError):
        return []
    items = sorted(modality.items(), key=lambda kv: int(kv[0]) if str(kv[0]).isdigit() else 0)
    names = [re.sub(r"[^a-z0-9_.-]", "_", str(v).strip().lower()).strip("_") or f"ch{k}" for k, v in items]
    return names if len(set(names)) == len(names) else [f"ch{k}" for k, _ in items]


def _study_rows(series: dict, skipped: list[dict]) -> list[dict]:
    """One row per study (multi-sequence input, ``data.channels`` with SeriesDescription patterns):
    ``image`` = the deepest folder holding all its series. A study whose folder also holds another
    study's series cannot be read as a study folder: it is listed in ``skipped``."""
    by_study: dict[str, list] = {}
    for info in series.values():
        by_study.setdefault(info.study_uid_hash, []).append(info)
    rows = []
    for study, infos in by_study.items():
        common = infos[0].folder
        while not all(common == i.folder or common in i.folder.parents for i in infos):
            common = common.parent
        others = [i for i in series.values() if i.study_uid_hash != study
                  and (i.folder == common or common in i.folder.parents)]
        if others:
            skipped.append({"file": str(common), "reason": f"the study's folder also holds {len(others)} series of "
                            "other studies; give its series as image_<name> columns instead"})
            continue
        mods = {i.modality for i in infos}
        mod = mods.pop() if len(mods) == 1 else ""
        rows.append({"image": str(common), "label": "", "patient_id": infos[0].patient, "study_id": "st-" + study,
                     "split": "", "modality": DICOM_MODALITY.get(mod, "generic"), "n_series": len(infos),
                     "series_descriptions": "; ".join(sorted(i.description for i in infos))})
    return sorted(rows, key=lambda r: r["image"])


def from_dicom(folder: str | Path, *, salt: str, split_time: bool = True,
               skipped: list[dict] | None = None, by_study: bool = False) -> list[dict]:
    """One row per DICOM series under ``folder`` (``image`` = the series folder, ``series_id`` =
    SeriesInstanceUID); a 4D series gives one row per time point (``frame``) when ``split_time``.
    ``by_study``: one row per study instead (``image`` = the study's folder; its series become the
    channels of ``data.channels`` by SeriesDescription pattern; ``series_descriptions`` lists them).

    ``patient_id``/``study_id`` are salted hashes. Series that fail the geometry checks (mixed
    orientations, missing slices) and non-DICOM files are listed in ``skipped``.
    """
    from medmim.data.dicom import scan_folder, series_layout

    if not salt:
        raise DataError("from_dicom needs a salt for hashing patient ids")
    skipped = skipped if skipped is not None else []
    series = scan_folder(folder, salt, skipped=skipped)
    if by_study:
        rows = _study_rows(series, skipped)
        if not rows:
            raise DataError(f"{folder}: no DICOM study in a folder of its own"
                            + (f" (first problem: {skipped[0]['file']}: {skipped[0]['reason']})" if skipped else ""))
        return rows
    rows = []
    for uid, info in sorted(series.items(), key=lambda kv: (str(kv[1].folder), kv[0])):
        try:
            layout = series_layout(info.files, name=str(info.folder))
        except DataError as exc:
            text = str(exc)
            skipped.append({"file": str(info.folder), "reason": text.split(": ", 1)[-1]})
            continue
        base = {"image": str(info.folder), "label": "", "patient_id": info.patient,
                "study_id": "st-" + info.study_uid_hash, "series_id": uid, "split": "",
                "modality": DICOM_MODALITY.get(info.modality, "generic"), "dicom_modality": info.modality,
                "n_files": len(info.files), "n_slices": layout["n_slices"], "n_timepoints": layout["n_timepoints"]}
        if split_time and layout["n_timepoints"] > 1:
            rows.extend({**base, "frame": t} for t in range(layout["n_timepoints"]))
        else:
            rows.append({**base, "frame": ""})
    if not rows:
        raise DataError(f"{folder}: no usable DICOM series"
                        + (f" (first problem: {skipped[0]['file']}: {skipped[0]['reason']})" if skipped else ""))
    return rows


def from_npz(path: str | Path, *, modality: str = "") -> list[dict]:
    """A MedMNIST npz: one row per image, referencing ``<file>#<split>_images/<i>``; official split kept;
    each image is its own patient (MedMNIST carries no patient ids)."""
    from medmim.data.medmnist import load_npz

    path = Path(path).resolve()
    rows = []
    for split, (images, labels) in load_npz(path).items():
        for i, lab in enumerate(labels):
            rows.append({"image": f"{path}#{split}_images/{i}", "label": lab.tolist() if lab.ndim else int(lab),
                         "patient_id": f"{path.stem}-{split}-{i}", "split": split, "modality": modality})
    return rows


BUILDERS = {"folder": from_folder, "csv": from_csv, "decathlon": from_decathlon, "dicom": from_dicom, "npz": from_npz}
