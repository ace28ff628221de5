"""DICOM: scan a folder into series, read one series as a volume, scan headers for identifiers.

Conventions (the same as the rest of medmim/data):

* a series of several slices is returned as ``(x, y, z)`` or ``(x, y, z, t)`` voxels with a 4×4
  affine in RAS+ millimetres (NIfTI / MONAI convention), re-oriented to the closest canonical RAS
  order, so it lines up with any NIfTI reader's ``as_closest_canonical`` output;
* a single 2D image (X-ray, one slice) is returned as ``(H, W)``: row 0 at the top, as displayed;
* rescale slope/intercept are applied; MONOCHROME1 images are inverted (bright = dense).

Series grouping: files are grouped by SeriesInstanceUID; slices by their position along the slice
normal (ImagePositionPatient · (row × col)). A position that repeats (fMRI, perfusion, multi-echo)
holds several time points, ordered by TemporalPositionIdentifier, AcquisitionNumber, TriggerTime,
InstanceNumber. Enhanced multi-frame files expand into one slice per frame (per-frame
PlanePositionSequence). A series with a missing slice, a gap, unequal time points per position, or
mixed orientations is refused with a DataError naming the series folder and the reason.

PHI: nothing here returns or logs PatientName/PatientID/BirthDate values. ``patient_ref`` gives a
salted hash; ``phi_scan`` reports which identifying tags are filled, never their values.
"""

from __future__ import annotations

import hashlib
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

import numpy as np

from medmim.errors import DataError

# Tags that hold (or may hold) identifiers. The PHI scan reports which are non-empty, not values.
PHI_TAGS = (
    "PatientName", "PatientID", "PatientBirthDate", "PatientBirthTime", "OtherPatientIDs",
    "OtherPatientIDsSequence", "OtherPatientNames", "PatientBirthName", "PatientMotherBirthName",
    "PatientAddress", "PatientTelephoneNumbers", "MedicalRecordLocator", "IssuerOfPatientID",
    "PatientComments", "ReferringPhysicianName", "PerformingPhysicianName", "OperatorsName",
    "PhysiciansOfRecord", "RequestingPhysician", "InstitutionName", "InstitutionAddress",
    "AccessionNumber", "StudyID", "DeviceSerialNumber", "StationName",
)
POSITION_TOL_MM = 0.01
ORIENTATION_TOL = 1e-3


@dataclass
class Slice:
    """One 2D image of a series: a single-frame file or one frame of a multi-frame file."""

    path: Path
    frame: int | None  # index into a multi-frame file, None for single-frame
    position: np.ndarray | None  # ImagePositionPatient (LPS, mm)
    orientation: np.ndarray | None  # 6 direction cosines (row dir, col dir)
    spacing: tuple[float, float]  # (row spacing, column spacing) = PixelSpacing
    order: tuple  # sort key among slices at the same position (time)
    rows: int
    cols: int


@dataclass
class SeriesInfo:
    uid: str
    folder: Path
    files: list[Path] = field(default_factory=list)
    modality: str = ""
    description: str = ""
    patient: str = ""  # salted hash
    study_uid_hash: str = ""
    n_frames: int = 0
    headers: list = field(default_factory=list, repr=False)


def _pydicom():
    import pydicom

    return pydicom


def _float_list(value, n: int | None = None) -> np.ndarray | None:
    if value is None:
        return None
    try:
        arr = np.array([float(v) for v in value], dtype=np.float64)
    except (TypeError, ValueError):
        return None
    if n is not None and arr.size != n:
        return None
    return arr


def _num(value, default=0.0) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return default


def patient_ref(ds, salt: str) -> str:
    """A salted hash standing for the patient: stable for one salt, not reversible to the ID."""
    parts = [str(ds.get(t, "") or "") for t in ("PatientID", "PatientName", "PatientBirthDate")]
    if not any(parts):
        parts = [str(ds.get("StudyInstanceUID", "") or "")]
    return "pt-" + hashlib.sha256(("\x1f".join([salt, *parts])).encode()).hexdigest()[:12]


def _short_hash(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def read_header(path: str | Path):
    """Read a DICOM header (large values deferred); DataError for non-DICOM or broken files."""
    pydicom = _pydicom()
    try:
        return pydicom.dcmread(str(path), defer_size="4 KB")
    except pydicom.errors.InvalidDicomError:
        raise DataError(f"{path}: not a DICOM file") from None
    except Exception as exc:  # noqa: BLE001 - truncated files raise several types
        raise DataError(f"{path}: unreadable DICOM header ({type(exc).__name__})") from None


def has_pixels(ds) -> bool:
    return any(k in ds for k in ("PixelData", "FloatPixelData", "DoubleFloatPixelData"))


def scan_folder(folder: str | Path, salt: str, skipped: list[dict] | None = None,
                files: Iterable[Path] | None = None) -> dict[str, SeriesInfo]:
    """Group every DICOM file under ``folder`` by SeriesInstanceUID.

    Files that are not DICOM, or DICOM without pixel data (DICOMDIR, reports, ...), are listed in
    ``skipped`` (file + reason) and left out.
    """
    folder = Path(folder)
    if not folder.exists():
        raise DataError(f"{folder}: DICOM folder not found")
    paths = sorted(files) if files is not None else sorted(p for p in folder.rglob("*") if p.is_file())
    series: dict[str, SeriesInfo] = {}
    for p in paths:
        if p.name.startswith("."):
            continue
        try:
            ds = read_header(p)
            if not has_pixels(ds):
                raise DataError(f"{p}: DICOM file without pixel data")
            uid = str(ds.get("SeriesInstanceUID", "") or "")
            if not uid:
                raise DataError(f"{p}: DICOM file without SeriesInstanceUID")
        except DataError as exc:
            if skipped is None:
                raise
            skipped.append({"file": str(p), "reason": str(exc).split(": ", 1)[-1]})
            continue
        info = series.get(uid)
        if info is None:
            info = series[uid] = SeriesInfo(uid=uid, folder=p.parent, modality=str(ds.get("Modality", "") or ""),
                                            description=str(ds.get("SeriesDescription", "") or ""),
                                            patient=patient_ref(ds, salt),
                                            study_uid_hash=_short_hash(str(ds.get("StudyInstanceUID", ""))))
        info.files.append(p)
        info.n_frames += int(_num(ds.get("NumberOfFrames", 1), 1) or 1)
    for info in series.values():
        # the folder holding the series: the deepest common parent of its files
        common = info.files[0].parent
        while not all(common in f.parents for f in info.files):
            common = common.parent
        info.folder = common
    return series


def _frame_geometry(ds, frame: int):
    """(position, orientation, pixel spacing) of one frame of an enhanced multi-frame file."""
    pos = ori = sp = None
    for seq_name in ("PerFrameFunctionalGroupsSequence", "SharedFunctionalGroupsSequence"):
        seq = ds.get(seq_name)
        if not seq:
            continue
        item = seq[frame] if seq_name.startswith("PerFrame") and len(seq) > frame else seq[0]
        if pos is None and item.get("PlanePositionSequence"):
            pos = _float_list(item.PlanePositionSequence[0].get("ImagePositionPatient"), 3)
        if ori is None and item.get("PlaneOrientationSequence"):
            ori = _float_list(item.PlaneOrientationSequence[0].get("ImageOrientationPatient"), 6)
        if sp is None and item.get("PixelMeasuresSequence"):
            sp = _float_list(item.PixelMeasuresSequence[0].get("PixelSpacing"), 2)
    return pos, ori, sp


def _slices_of(path: Path, ds) -> list[Slice]:
    n_frames = int(_num(ds.get("NumberOfFrames", 1), 1) or 1)
    rows, cols = int(ds.get("Rows", 0) or 0), int(ds.get("Columns", 0) or 0)
    base_sp = _float_list(ds.get("PixelSpacing") or ds.get("ImagerPixelSpacing"), 2)
    base_pos = _float_list(ds.get("ImagePositionPatient"), 3)
    base_ori = _float_list(ds.get("ImageOrientationPatient"), 6)
    time_key = (_num(ds.get("TemporalPositionIdentifier")), _num(ds.get("AcquisitionNumber")),
                _num(ds.get("TriggerTime")), _num(ds.get("InstanceNumber")))
    if n_frames == 1:
        sp = base_sp if base_sp is not None else np.ones(2)
        return [Slice(path, None, base_pos, base_ori, (float(sp[0]), float(sp[1])), (*time_key, 0), rows, cols)]
    out = []
    step = _num(ds.get("SpacingBetweenSlices") or ds.get("SliceThickness"), 1.0) or 1.0
    for f in range(n_frames):
        pos, ori, sp = _frame_geometry(ds, f)
        ori = ori if ori is not None else base_ori
        sp = sp if sp is not None else (base_sp if base_sp is not None else np.ones(2))
        if pos is None and ori is None and base_pos is None:
            raise DataError(f"{path}: multi-frame image without any plane position or orientation (per-frame, "
                            "shared or top-level): its voxel geometry is undefined, refused rather than guessed")
        if pos is None:  # legacy multi-frame without per-frame positions: frames along the normal
            o = ori if ori is not None else np.array([1.0, 0, 0, 0, 1, 0])
            origin = base_pos if base_pos is not None else np.zeros(3)
            pos = origin + f * step * np.cross(o[:3], o[3:])
            ori = o
        out.append(Slice(path, f, pos, ori, (float(sp[0]), float(sp[1])), (*time_key, f), rows, cols))
    return out


def grey_from_rgb(rgb: np.ndarray) -> np.ndarray:
    """Grey levels of an RGB array ``(..., 3)``: for 8-bit data exactly PIL's ``convert("L")``
    (ITU-R 601-2 luma, L = (19595 R + 38470 G + 7471 B + 2**15) >> 16); other depths the same
    weights in floating point."""
    if rgb.dtype == np.uint8:
        r, g, b = (rgb[..., i].astype(np.uint32) for i in range(3))
        return ((r * 19595 + g * 38470 + b * 7471 + 0x8000) >> 16).astype(np.uint8)
    return rgb.astype(np.float64) @ np.array([0.299, 0.587, 0.114])


def rescale_of(ds, frame: int | None = None) -> tuple[float, float]:
    """(slope, intercept) of one frame: the per-frame PixelValueTransformationSequence, else the
    shared functional groups' one (enhanced CT/MR keep it there), else the top-level
    RescaleSlope/RescaleIntercept, else (1, 0)."""
    slope = _num(ds.get("RescaleSlope"), 1.0) or 1.0
    inter = _num(ds.get("RescaleIntercept"), 0.0)
    groups = []
    shared = ds.get("SharedFunctionalGroupsSequence")
    if shared:
        groups.append(shared[0])
    per_frame = ds.get("PerFrameFunctionalGroupsSequence")
    if per_frame and frame is None and len(per_frame) == 1:
        frame = 0
    if per_frame and frame is not None and frame < len(per_frame):
        groups.append(per_frame[frame])
    for item in groups:  # later (per-frame) entries win
        seq = item.get("PixelValueTransformationSequence")
        if seq:
            t = seq[0]
            if t.get("RescaleSlope") is not None:
                slope = _num(t.get("RescaleSlope"), slope) or slope
            if t.get("RescaleIntercept") is not None:
                inter = _num(t.get("RescaleIntercept"), inter)
    return slope, inter


def _pixels(ds, frame: int | None, path: Path) -> np.ndarray:
    try:
        arr = ds.pixel_array
    except Exception as exc:  # noqa: BLE001 - truncated data, unsupported codecs, ...
        raise DataError(f"{path}: cannot decode pixel data ({type(exc).__name__}: "
                        f"{str(exc).splitlines()[0][:120] if str(exc) else ''})") from None
    if frame is not None:
        arr = arr[frame]
    if arr.ndim == 3 and arr.shape[-1] in (3, 4):  # colour (ultrasound, photos): grey as PIL convert("L")
        arr = grey_from_rgb(arr[..., :3])
    if arr.ndim != 2:
        raise DataError(f"{path}: unexpected pixel array shape {arr.shape}")
    slope, inter = rescale_of(ds, frame)
    if slope != 1.0 or inter != 0.0:  # float64 arithmetic, like SimpleITK / GDCM, then float32
        arr = arr.astype(np.float64) * slope + inter
    arr = arr.astype(np.float32)
    if str(ds.get("PhotometricInterpretation", "")).upper() == "MONOCHROME1":
        arr = (arr.max() + arr.min()) - arr  # bright = dense, like MONOCHROME2
    return arr


def _layout(files: list[Path], where: str):
    """Headers, slices grouped by position (each group sorted in time), time points, meta."""
    if not files:
        raise DataError(f"{where}: empty DICOM series")
    headers = {}
    slices: list[Slice] = []
    for p in files:
        ds = read_header(p)
        if not has_pixels(ds):
            raise DataError(f"{p}: DICOM file without pixel data")
        headers[p] = ds
        slices.extend(_slices_of(p, ds))
    first = headers[files[0]]
    meta = {"modality": str(first.get("Modality", "") or ""),
            "photometric": str(first.get("PhotometricInterpretation", "") or "")}
    sizes = {(s.rows, s.cols) for s in slices}
    if len(sizes) > 1:
        raise DataError(f"{where}: series mixes image sizes {sorted(sizes)}")
    if len(slices) == 1:
        return headers, [[slices[0]]], 1, meta, None
    oris = [s.orientation for s in slices]
    if any(o is None for o in oris) or any(s.position is None for s in slices):
        raise DataError(f"{where}: series without ImagePositionPatient/ImageOrientationPatient: "
                        "cannot order its slices")
    ori0 = oris[0]
    if any(np.abs(o - ori0).max() > ORIENTATION_TOL for o in oris):
        n_ori = len({tuple(np.round(o, 3)) for o in oris})
        raise DataError(f"{where}: series mixes {n_ori} slice orientations (localisers or several stacks in one "
                        "series); split it before use")
    normal = np.cross(ori0[:3], ori0[3:])
    dist = np.array([float(np.dot(s.position, normal)) for s in slices])
    order = np.argsort(dist, kind="stable")
    groups: list[list[Slice]] = []
    last = None
    for i in order:
        if last is None or dist[i] - last > POSITION_TOL_MM:
            groups.append([])
        groups[-1].append(slices[i])
        last = dist[i]
    counts = {len(g) for g in groups}
    if len(counts) > 1:
        raise DataError(f"{where}: slice positions hold unequal numbers of images ({min(counts)}..{max(counts)}): "
                        "missing slices in some time points")
    n_t = counts.pop()
    pos_d = np.array([float(np.dot(g[0].position, normal)) for g in groups])
    if len(groups) > 2:
        steps = np.diff(pos_d)
        med = float(np.median(steps))
        bad = np.where(np.abs(steps - med) > max(0.1 * med, 0.05))[0]
        if bad.size:
            k = int(bad[0])
            raise DataError(f"{where}: missing slice(s): gap of {steps[k]:.2f} mm between slices {k} and {k + 1} "
                            f"(expected {med:.2f} mm)")
    for g in groups:
        g.sort(key=lambda s: s.order)
    return headers, groups, n_t, meta, normal


def series_layout(files: Iterable[str | Path], name: str | None = None) -> dict:
    """Checks a series from its headers alone: ``{"n_slices", "n_timepoints", "modality", "is_2d"}``.

    Raises the same DataError as ``read_series`` for mixed orientations or missing slices.
    """
    files = [Path(f) for f in files]
    where = name or (str(files[0].parent) if files else "?")
    _h, groups, n_t, meta, normal = _layout(files, where)
    return {"n_slices": len(groups), "n_timepoints": n_t, "modality": meta["modality"], "is_2d": normal is None}


def read_series(files: Iterable[str | Path], *, frame: int | None = None,
                name: str | None = None) -> tuple[np.ndarray, np.ndarray | None, dict]:
    """Read a series (or one file) into ``(array, affine, meta)``.

    ``array``: ``(H, W)`` for a single 2D image (affine None), else ``(x, y, z)`` or ``(x, y, z, t)``
    in canonical RAS order with ``affine`` (4×4, RAS mm). ``frame`` picks one time point of a 4D
    series (then the result is 3D). ``meta`` has spacing, shape, n_timepoints, modality.
    """
    files = [Path(f) for f in files]
    where = name or (str(files[0].parent) if len(files) > 1 else str(files[0]) if files else "?")
    headers, groups, n_t, meta, normal = _layout(files, where)
    first = headers[files[0]]

    def load(s: Slice) -> np.ndarray:
        return _pixels(headers[s.path], s.frame, s.path)

    if normal is None:
        arr = load(groups[0][0])
        meta.update(spacing=list(groups[0][0].spacing), shape=list(arr.shape), n_timepoints=1)
        return arr, None, meta
    if frame is not None and not 0 <= frame < n_t:
        raise DataError(f"{where}: time point {frame} requested, series has {n_t}")
    t_sel = [frame] if frame is not None else list(range(n_t))
    vol = np.stack([np.stack([load(g[t]).T for g in groups], axis=-1) for t in t_sel], axis=-1)
    if vol.shape[-1] == 1:
        vol = vol[..., 0]
    s0 = groups[0][0]
    row_sp, col_sp = s0.spacing
    row_dir, col_dir = s0.orientation[:3], s0.orientation[3:]
    p0 = s0.position
    if len(groups) > 1:
        step_vec = (groups[-1][0].position - p0) / (len(groups) - 1)
    else:
        step_vec = normal * (_num(first.get("SpacingBetweenSlices") or first.get("SliceThickness"), 1.0) or 1.0)
    lps = np.eye(4)
    lps[:3, 0] = row_dir * col_sp  # x index = column: moves along the row direction
    lps[:3, 1] = col_dir * row_sp  # y index = row: moves along the column direction
    lps[:3, 2] = step_vec
    lps[:3, 3] = p0
    affine = np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps  # LPS -> RAS
    vol, affine = to_canonical(vol, affine)
    meta.update(spacing=[float(v) for v in np.linalg.norm(affine[:3, :3], axis=0)], shape=list(vol.shape),
                n_timepoints=n_t)
    return vol, affine, meta


def to_canonical(arr: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Flip/permute the first three axes to the closest canonical RAS order (like nibabel)."""
    from nibabel import orientations as no

    ornt = no.io_orientation(affine)
    if np.array_equal(ornt, [[0, 1], [1, 1], [2, 1]]):
        return arr, affine
    out = no.apply_orientation(arr, ornt)
    return np.ascontiguousarray(out), affine @ no.inv_ornt_aff(ornt, arr.shape[:3])


def select_series(series: dict[str, SeriesInfo], where: str | Path, *, uid: str | None = None,
                  pattern: str | None = None, channel: str | None = None) -> SeriesInfo:
    """The one series-selection rule: by SeriesInstanceUID (``uid``), by a SeriesDescription pattern
    (``pattern``: fnmatch, case-insensitive; a data.channels entry's ``series``), or the only series.
    No match, or several, is a one-line DataError listing the descriptions found."""
    from fnmatch import fnmatchcase

    if not series:
        raise DataError(f"{where}: no DICOM series with pixel data")
    if uid:
        if uid not in series:
            raise DataError(f"{where}: series {uid[-12:]}… not found")
        return series[uid]
    found = ", ".join(repr(d) for d in sorted(s.description for s in series.values()))
    if pattern is not None:
        hits = [s for s in series.values() if fnmatchcase(s.description.lower(), pattern.lower())]
        who = f" for channel '{channel}'" if channel else ""
        if len(hits) == 1:
            return hits[0]
        if not hits:
            raise DataError(f"{where}: no series matches SeriesDescription pattern '{pattern}'{who} "
                            f"(series found: {found})")
        raise DataError(f"{where}: {len(hits)} series match SeriesDescription pattern '{pattern}'{who}: "
                        f"{', '.join(repr(s.description) for s in hits)}; make the pattern specific "
                        f"(series found: {found})")
    if len(series) > 1:
        raise DataError(f"{where}: holds {len(series)} series ({found}); name one in the manifest's series_id "
                        "column, or declare data.channels with SeriesDescription patterns")
    return next(iter(series.values()))


def series_files(folder: str | Path, series_uid: str | None, pattern: str | None = None,
                 channel: str | None = None) -> list[Path]:
    """The files of one series under ``folder`` (``select_series``: by uid, description pattern, or the
    only series)."""
    series = scan_folder(folder, salt="", skipped=[])
    return select_series(series, folder, uid=series_uid, pattern=pattern, channel=channel).files


def series_pattern(channel) -> str:
    """The SeriesDescription pattern of a ``data.channels`` entry: its ``series``, default ``*<name>*``."""
    return channel.series if channel.series is not None else f"*{channel.name}*"


def study_series_files(folder: str | Path, channels, series: dict[str, SeriesInfo] | None = None) -> list[list[Path]]:
    """A DICOM study folder as channels: for each ``data.channels`` entry, the files of the series whose
    SeriesDescription matches its ``series`` pattern (default ``*<name>*``); see ``select_series``.
    ``series``: the folder's ``scan_folder`` result, when the caller has it."""
    series = scan_folder(folder, salt="", skipped=[]) if series is None else series
    out = []
    for c in channels:
        out.append(select_series(series, folder, pattern=series_pattern(c), channel=c.name).files)
    return out


def phi_scan(paths: Iterable[str | Path]) -> dict[str, int]:
    """For each identifying tag, the number of files in which it is present and non-empty.

    Only tag names and counts are returned: never values.
    """
    counts: dict[str, int] = defaultdict(int)
    for p in paths:
        try:
            ds = read_header(p)
        except DataError:
            continue
        for tag in PHI_TAGS:
            value = ds.get(tag)
            if value is not None and str(value).strip() not in ("", "[]"):
                counts[tag] += 1
    return dict(sorted(counts.items()))


def header_summary(path: str | Path) -> dict:
    """Non-identifying geometry of a DICOM file: modality, rows/cols, spacing, photometric."""
    ds = read_header(path)
    sp = _float_list(ds.get("PixelSpacing") or ds.get("ImagerPixelSpacing"), 2)
    return {"modality": str(ds.get("Modality", "") or ""), "rows": int(ds.get("Rows", 0) or 0),
            "cols": int(ds.get("Columns", 0) or 0), "frames": int(_num(ds.get("NumberOfFrames", 1), 1) or 1),
            "spacing": [float(v) for v in sp] if sp is not None else None,
            "slice_thickness": _num(ds.get("SliceThickness"), 0.0) or None}

