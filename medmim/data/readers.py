"""One entry point that reads any supported image reference into a MONAI MetaTensor.

Array conventions (images and masks always read the same way):

* 2D raster images (PNG/JPEG/BMP/TIFF, single DICOM images, MedMNIST arrays): ``(H, W)`` as
  displayed, row 0 at the top. PNGs go through MONAI's ``PILReader(reverse_indexing=False)``; the
  MONAI default (``reverse_indexing=True``) would give ``(W, H)`` and disagree with numpy/npz data.
* 3D volumes (NIfTI, MHA/NRRD, DICOM series): ``(x, y, z)`` voxels with a RAS+ affine in the
  MetaTensor (MONAI's convention), so ``Orientationd``/``Spacingd`` work on every source.

References: a file path; a folder (a DICOM series; ``series_id`` picks one when it holds several);
``file.npz#train_images/12`` (an entry of a MedMNIST npz); or an in-memory numpy array.
"""

from __future__ import annotations

import functools
import re
from pathlib import Path

import numpy as np
import torch
from monai.data import MetaTensor

from medmim.errors import DataError

RASTER = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff"}
NIFTI = (".nii", ".nii.gz")
SITK = {".mha", ".mhd", ".nrrd", ".nhdr"}
NPZ_REF = re.compile(r"^(?P<file>.+\.npz)#(?P<key>[A-Za-z0-9_]+)/(?P<index>\d+)$")


def _suffix(path: Path) -> str:
    name = path.name.lower()
    return ".nii.gz" if name.endswith(".nii.gz") else path.suffix.lower()


@functools.lru_cache(maxsize=2)
def _npz_arrays(path: str, mtime: float) -> dict[str, np.ndarray]:
    with np.load(path, allow_pickle=False) as npz:
        return {k: npz[k] for k in npz.files}


def npz_entry(ref: str) -> np.ndarray:
    m = NPZ_REF.match(ref)
    if not m:
        raise DataError(f"{ref}: not an npz reference (expected file.npz#key/index)")
    path = Path(m["file"])
    if not path.exists():
        raise DataError(f"{path}: file not found")
    try:
        arrays = _npz_arrays(str(path), path.stat().st_mtime)
    except Exception as exc:  # noqa: BLE001
        raise DataError(f"{path}: not a readable npz file ({type(exc).__name__})") from None
    if m["key"] not in arrays:
        raise DataError(f"{path}: no array '{m['key']}'")
    arr, i = arrays[m["key"]], int(m["index"])
    if i >= len(arr):
        raise DataError(f"{path}: {m['key']} has {len(arr)} entries, index {i} requested")
    return arr[i]


def _is_dicom(path: Path) -> bool:
    if _suffix(path) in (".dcm", ".dicom", ".ima"):
        return True
    try:
        with open(path, "rb") as fh:
            head = fh.read(132)
        return len(head) == 132 and head[128:132] == b"DICM"
    except OSError:
        return False


def _sitk_read(path: Path) -> MetaTensor:
    import SimpleITK as sitk

    try:
        img = sitk.ReadImage(str(path))
    except RuntimeError as exc:
        raise DataError(f"{path}: unreadable image ({str(exc).strip().splitlines()[-1][:150]})") from None
    arr = sitk.GetArrayFromImage(img)  # (z, y, x) or (y, x)
    nd = img.GetDimension()
    if img.GetNumberOfComponentsPerPixel() > 1:
        arr = arr.mean(-1)
    arr = np.ascontiguousarray(np.transpose(arr, tuple(range(nd))[::-1]))  # -> (x, y, z)
    direction = np.array(img.GetDirection()).reshape(nd, nd)
    lps = np.eye(4)
    lps[:nd, :nd] = direction @ np.diag(img.GetSpacing())
    lps[:nd, 3] = img.GetOrigin()
    affine = np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps
    if nd == 2:  # 2D: back to (H, W), no affine
        return MetaTensor(torch.as_tensor(arr.T.copy()))
    return MetaTensor(torch.as_tensor(arr), affine=torch.as_tensor(affine))


@functools.lru_cache(maxsize=1)
def _monai_loaders():
    from monai import transforms as mt
    from monai.data import NibabelReader, PILReader

    return {"raster": mt.LoadImage(reader=PILReader(reverse_indexing=False), image_only=True),
            "nifti": mt.LoadImage(reader=NibabelReader(), image_only=True),
            "any": mt.LoadImage(image_only=True)}


def _monai_read(kind: str, path: Path) -> MetaTensor:
    try:
        return _monai_loaders()[kind](str(path))
    except Exception as exc:  # noqa: BLE001 - readers raise many types for broken files
        text = str(exc).strip().splitlines()
        msg = next((ln for ln in reversed(text) if ln.strip()), type(exc).__name__) if text else type(exc).__name__
        if kind == "any":  # no reader claimed the suffix, or the one that did could not parse it
            raise DataError(f"{path}: not an image file (no reader for '{_suffix(path) or path.name}': "
                           f"{type(exc).__name__})") from None
        raise DataError(f"{path}: unreadable or truncated image ({type(exc).__name__}: {msg[:150]})") from None


def read_image(ref, *, series_id: str | None = None, frame: int | None = None) -> MetaTensor:
    """Read ``ref`` (see module doc) into a MetaTensor without a channel dimension."""
    if isinstance(ref, np.ndarray):
        return MetaTensor(torch.as_tensor(ref))
    if isinstance(ref, torch.Tensor):
        return MetaTensor(ref)
    text = str(ref)
    if NPZ_REF.match(text):
        return MetaTensor(torch.as_tensor(npz_entry(text)))
    path = Path(text)
    if not path.exists():
        raise DataError(f"{path}: file not found")
    if path.is_dir() or _is_dicom(path):
        from medmim.data.dicom import read_series, series_files

        files = series_files(path, series_id) if path.is_dir() else [path]
        arr, affine, _meta = read_series(files, frame=frame, name=str(path))
        if affine is None:
            return MetaTensor(torch.as_tensor(arr))
        return MetaTensor(torch.as_tensor(arr), affine=torch.as_tensor(affine))
    suffix = _suffix(path)
    if path.stat().st_size == 0:
        raise DataError(f"{path}: empty file (0 bytes)")
    if suffix in RASTER:
        out = _monai_read("raster", path)
    elif suffix in NIFTI:
        out = _monai_read("nifti", path)
    elif suffix in SITK:
        out = _sitk_read(path)
    else:
        out = _monai_read("any", path)
    if frame is not None and out.ndim == 4:
        if not 0 <= frame < out.shape[-1]:
            raise DataError(f"{path}: time point {frame} requested, file has {out.shape[-1]}")
        out = out[..., frame]
    return out
