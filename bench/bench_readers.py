"""medmim's DICOM reader against SimpleITK on every real CT/MR file with pixel data that ships in
pydicom's test data and the pydicom-data package.

    python bench/bench_readers.py [--out bench/results/readers.md]

For each file: medmim reads it (``medmim.data.readers.read_image``); SimpleITK reads it
(``sitk.ReadImage``, GDCM); both are brought to one convention and compared:

* values: exactly for integer data; float data (non-integer rescale slopes) to 1e-4 relative;
* geometry: a volume (multi-frame file) has its voxels in the closest canonical RAS order and a
  RAS affine (spacing, direction, origin) that must agree to 1e-3 mm; a single 2D image is
  ``(H, W)`` with pixel spacing (row, column) that must agree to 1e-4 mm (the 2D chain uses no
  world position).

Each file ends as ``equal``, ``refused`` (medmim raised a DataError: the reason is recorded),
``reference-failed`` (SimpleITK cannot read it: not counted as compared) or ``different``.
The test ``tests/test_readers_reference.py`` runs the same sweep and fails on any ``different``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import sys
import time
import warnings
from pathlib import Path

import numpy as np

CT_MR = ("CT", "MR")


def real_dicom_files() -> list[Path]:
    """Every CT/MR file with pixel data among pydicom's test files and pydicom-data's (no download)."""
    import pydicom
    from pydicom.data import get_testdata_files

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "download failures": there is no network, by design
        files = sorted(set(get_testdata_files("*")))
    out = []
    for f in files:
        try:
            ds = pydicom.dcmread(f, defer_size="1 KB")
        except Exception:  # noqa: BLE001 - not DICOM (the test data holds other files too)
            continue
        if str(ds.get("Modality", "")) in CT_MR and any(
                k in ds for k in ("PixelData", "FloatPixelData", "DoubleFloatPixelData")):
            out.append(Path(f))
    return out


def sitk_reference(path: Path):
    """SimpleITK's reading in medmim's conventions: ``(array, affine or None, spacing)``."""
    import SimpleITK as sitk

    from medmim.data.dicom import to_canonical

    img = sitk.ReadImage(str(path))
    arr = sitk.GetArrayFromImage(img)  # (z, y, x)
    size = img.GetSize()
    spacing = img.GetSpacing()
    if img.GetDimension() == 3 and size[2] == 1:  # one slice: (H, W) as displayed
        return arr[0], None, (spacing[1], spacing[0])
    if img.GetDimension() == 2:
        return arr, None, (spacing[1], spacing[0])
    vol = np.ascontiguousarray(np.transpose(arr, (2, 1, 0)))  # (x, y, z)
    lps = np.eye(4)
    lps[:3, :3] = np.array(img.GetDirection()).reshape(3, 3) @ np.diag(spacing)
    lps[:3, 3] = img.GetOrigin()
    affine = np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps
    vol, affine = to_canonical(vol, affine)
    return vol, affine, tuple(float(v) for v in np.linalg.norm(affine[:3, :3], axis=0))


def compare_file(path: Path) -> dict:
    """``{"file", "status", "reason"}``, status one of equal / refused / reference-failed / different."""
    from medmim.data.dicom import read_series
    from medmim.errors import DataError

    row = {"file": path.name, "status": "", "reason": ""}
    try:
        ref, ref_affine, ref_spacing = sitk_reference(path)
    except RuntimeError as exc:
        try:
            read_series([path])
            ours = "medmim reads it"
        except DataError as err:
            ours = "medmim refuses it: " + str(err).split(": ", 1)[-1][:100]
        row.update(status="reference-failed", reason=f"SimpleITK: {str(exc).strip().splitlines()[-1][:60]}; {ours}")
        return row
    try:
        arr, affine, meta = read_series([path])
    except DataError as exc:
        row.update(status="refused", reason=str(exc).split(": ", 1)[-1][:160])
        return row
    problems = []
    if arr.shape != ref.shape:
        problems.append(f"shape {arr.shape} vs SimpleITK {ref.shape}")
    else:
        a, r = arr.astype(np.float64), ref.astype(np.float64)
        if np.issubdtype(ref.dtype, np.integer):
            bad = int((a != r).sum())
            if bad:
                problems.append(f"{bad} voxels differ (max {np.abs(a - r).max():g})")
        elif not np.allclose(a, r, rtol=1e-4, atol=1e-4 * max(1.0, float(np.abs(r).max()))):
            problems.append(f"values differ (max {np.abs(a - r).max():g})")
    if (affine is None) != (ref_affine is None):
        problems.append("one reader sees a volume, the other a 2D image")
    elif affine is not None:
        if not np.allclose(affine, ref_affine, atol=1e-3):
            problems.append(f"affine differs (max {np.abs(affine - ref_affine).max():.4g})")
    elif not np.allclose(meta["spacing"], ref_spacing, atol=1e-4):
        problems.append(f"pixel spacing {meta['spacing']} vs SimpleITK {list(ref_spacing)}")
    row.update(status="different" if problems else "equal", reason="; ".join(problems))
    return row


def sweep(files: list[Path] | None = None) -> list[dict]:
    import SimpleITK as sitk

    sitk.ProcessObject_SetGlobalWarningDisplay(False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return [compare_file(f) for f in (files if files is not None else real_dicom_files())]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=None, help="write a markdown table here")
    args = ap.parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    t0 = time.perf_counter()
    rows = sweep()
    secs = time.perf_counter() - t0
    counts = {s: sum(r["status"] == s for r in rows) for s in ("equal", "refused", "reference-failed", "different")}
    compared = len(rows) - counts["reference-failed"]
    lines = [f"files: {len(rows)} CT/MR with pixel data; compared {compared}: equal {counts['equal']}, "
             f"refused {counts['refused']}, different {counts['different']}; SimpleITK failed "
             f"{counts['reference-failed']} ({secs:.1f} s)", "", "| file | status | reason |", "|---|---|---|"]
    lines += [f"| {r['file']} | {r['status']} | {r['reason']} |" for r in rows]
    text = "\n".join(lines)
    print(text)
    if args.out:
        import pydicom
        import SimpleITK as sitk

        head = (f"\n## DICOM vs SimpleITK ({dt.date.today().isoformat()}, {platform.processor() or platform.machine()}, "
                f"Python {sys.version.split()[0]}, pydicom {pydicom.__version__}, SimpleITK {sitk.Version_VersionString()})\n\n"
                "`python bench/bench_readers.py --out bench/results/readers.md`\n\n")
        with open(args.out, "a") as fh:
            fh.write(head + text + "\n")
    return 1 if counts["different"] else 0


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    sys.exit(main())
