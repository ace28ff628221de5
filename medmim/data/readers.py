"""One entry point that reads any supported image reference into a MONAI MetaTensor.

Array conventions (images and masks always read the same way):

* 2D raster images (PNG/JPEG/BMP/TIFF, single DICOM images, MedMNIST arrays): ``(H, W)`` as
  displayed, row 0 at the top (numpy/PIL order; MONAI's default picture reader would give
  ``(W, H)`` and disagree with npz data). Colour pictures (RGB, RGBA, CMYK, palette "P", LA, 1-bit)
  become grey exactly as PIL's ``Image.convert("L")`` computes it; 16-bit and float pictures keep
  their values.
* 3D volumes (NIfTI, MHA/NRRD, DICOM series): ``(x, y, z)`` voxels with a RAS+ affine in the
  MetaTensor (MONAI's convention), so ``Orientationd``/``Spacingd`` work on every source. NIfTI
  keeps the file's voxel order (the chain's ``Orientationd`` reorients it); DICOM series arrive in
  the closest canonical RAS order.

NIfTI affine policy (nibabel's, ``header.get_best_affine()``): the sform when ``sform_code > 0``,
else the qform when ``qform_code > 0``, else the voxel sizes alone. When both codes are set and the
two matrices disagree by more than 1e-3 (mm or direction cosine), a warning names the file.

References: a file path; a folder (a DICOM series; ``series_id`` picks one when it holds several);
``file.npz#train_images/12`` (an entry of a MedMNIST npz); or an in-memory numpy array.

Multi-channel cases (``data.channels``): ``read_channels`` reads every channel with ``read_image``
(one file per channel, one multi-channel file whose ``data.channel_axis`` holds the channels, or a
DICOM study whose series are picked by SeriesDescription) and returns ``(C, *spatial)``; channels
after the first are resampled onto the first channel's grid (3D files with an affine: MONAI's
``ResampleToMatch``, bilinear, zeros outside; 2D pictures and arrays: equal shapes are required).
"""

from __future__ import annotations

import functools
import logging
import re
import warnings
from pathlib import Path

import numpy as np
import torch
from monai.data import MetaTensor

from medmim.errors import DataError

log = logging.getLogger("medmim.data")

RASTER = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff"}
NIFTI = (".nii", ".nii.gz")
SITK = {".mha", ".mhd", ".nrrd", ".nhdr"}
GREY_MODES = {"L", "I", "I;16", "I;16B", "I;16L", "I;16N", "F"}
AFFINE_TOL = 1e-3


class NiftiAffineWarning(UserWarning):
    """A NIfTI file whose sform and qform disagree (medmim uses the sform, as nibabel does)."""


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


def read_picture(path: str | Path, key: str = "image") -> np.ndarray:
    """A picture file (PNG/JPEG/BMP/TIFF) as a numpy array ``(H, W)``, row 0 at the top.

    Images: colour modes (RGB, RGBA, CMYK, palette P/PA, LA, 1-bit, YCbCr, ...) become grey exactly
    as PIL's ``convert("L")`` computes it; grey modes (L, I;16, I, F) keep their values (uint16 as
    int32). Masks (``key != "image"``) keep the stored values: palette indices are the labels, and
    a colour mask keeps its channels (the checks take the first one).
    """
    from PIL import Image, UnidentifiedImageError

    path = Path(path)
    try:
        with Image.open(path) as img:
            img.load()
            mode = img.mode
            if mode in GREY_MODES or key != "image":
                arr = np.array(img)
            else:
                arr = np.array(img.convert("L"))
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:
        msg = str(exc).strip().splitlines()[0][:150] if str(exc).strip() else ""
        raise DataError(f"{path}: unreadable or truncated image ({type(exc).__name__}: {msg})") from None
    if arr.ndim != 2 and not (key != "image" and arr.ndim == 3):
        raise DataError(f"{path}: unexpected picture layout {arr.shape} (PIL mode {mode})")
    if arr.dtype == bool:
        arr = arr.astype(np.uint8)
    if arr.dtype == np.uint16 or arr.dtype.byteorder not in ("=", "|"):
        arr = arr.astype(np.int32)  # torch has no uint16 arithmetic; big-endian to native
    return np.ascontiguousarray(arr)


def nifti_affine(img, name: str = "") -> np.ndarray:
    """The affine medmim uses for a NIfTI image: nibabel's ``get_best_affine`` (sform if
    sform_code > 0, else qform if qform_code > 0, else voxel sizes). Warns, naming the file, when
    sform and qform are both set and disagree."""
    header = img.header
    best = np.asarray(header.get_best_affine(), dtype=np.float64)
    try:
        s_code, q_code = int(header["sform_code"]), int(header["qform_code"])
    except (KeyError, ValueError):  # NIfTI-2 / Analyze without codes
        return best
    if s_code > 0 and q_code > 0:
        sform, qform = header.get_sform(), header.get_qform()
        diff = float(np.abs(sform - qform).max())
        if diff > AFFINE_TOL:
            warnings.warn(f"{name}: sform and qform disagree (max difference {diff:.4g}); using the sform "
                          f"(sform_code {s_code}), as nibabel does", NiftiAffineWarning, stacklevel=2)
            log.warning("%s: sform and qform disagree (max difference %.4g); using the sform", name, diff)
    return best


def _nifti_read(path: Path) -> MetaTensor:
    """NIfTI in the file's voxel order, affine by ``nifti_affine``; 4D/5D keep their extra axes last."""
    import nibabel as nib

    try:
        img = nib.load(str(path))
        arr = np.asanyarray(img.dataobj)
    except Exception as exc:  # noqa: BLE001 - nibabel raises many types for broken files
        msg = str(exc).strip().splitlines()[0][:150] if str(exc).strip() else ""
        raise DataError(f"{path}: unreadable or truncated image ({type(exc).__name__}: {msg})") from None
    affine = nifti_affine(img, str(path))
    if arr.dtype == np.uint16 or arr.dtype.byteorder not in ("=", "|"):
        arr = arr.astype(np.int32 if arr.dtype.kind in "ui" else np.float64)
    while arr.ndim > 3 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    if arr.ndim == 5 and arr.shape[3] == 1:  # (x, y, z, 1, c): NIfTI's vector layout
        arr = arr[:, :, :, 0]
    return MetaTensor(torch.as_tensor(np.ascontiguousarray(arr)), affine=torch.as_tensor(affine))


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

    return {"any": mt.LoadImage(image_only=True)}


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


def read_image(ref, *, series_id: str | None = None, frame: int | None = None, key: str = "image") -> MetaTensor:
    """Read ``ref`` (see module doc) into a MetaTensor without a channel dimension. ``key`` is
    "image" or the name of a label map ("mask": pictures keep their stored values, see
    ``read_picture``)."""
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
        out = MetaTensor(torch.as_tensor(read_picture(path, key)))
    elif suffix in NIFTI:
        out = _nifti_read(path)
    elif suffix in SITK:
        out = _sitk_read(path)
    else:
        out = _monai_read("any", path)
    if frame is not None and out.ndim == 4:
        if not 0 <= frame < out.shape[-1]:
            raise DataError(f"{path}: time point {frame} requested, file has {out.shape[-1]}")
        out = out[..., frame]
    return out


# ---- multi-channel cases ---------------------------------------------------------------------------
GRID_TOL = 1e-4  # affines closer than this (mm / direction cosine) are the same grid: no resampling


def has_geometry(ref, spatial_dims: int) -> bool:
    """A 3D reference whose reader gives a real affine (NIfTI, MHA/NRRD, DICOM); pictures and arrays
    have none (their channels must have equal shapes)."""
    if spatial_dims != 3 or not isinstance(ref, (str, Path)) or NPZ_REF.match(str(ref)):
        return False
    path = Path(str(ref))
    return path.is_dir() or _suffix(path) in NIFTI or _suffix(path) in SITK or _is_dicom(path)


def world_extent(img: torch.Tensor, affine) -> tuple[np.ndarray, np.ndarray]:
    """(min, max) corner in world mm of the voxel box of ``img`` (channel first)."""
    shape = np.asarray(img.shape[1:], dtype=np.float64)
    corners = np.array(np.meshgrid(*[[-0.5, n - 0.5] for n in shape], indexing="ij")).reshape(len(shape), -1)
    aff = np.asarray(affine, dtype=np.float64)
    nd = len(shape)
    world = aff[:nd, :nd] @ corners + aff[:nd, -1:]
    return world.min(1), world.max(1)


def onto_grid(img: MetaTensor, ref: MetaTensor, *, spatial_dims: int, geometry: bool, case: str, channel: str,
              file: str) -> torch.Tensor:
    """Channel ``img`` (1, *spatial) on the grid of ``ref`` (the first channel): as it is when the grids
    agree; resampled (bilinear, zeros outside) when both have an affine; else a one-line DataError."""
    same_shape = tuple(img.shape[1:]) == tuple(ref.shape[1:])
    if not geometry:
        if same_shape:
            return img
        raise DataError(f"{case}: channel '{channel}' ({file}) has a different geometry (shape "
                        f"{tuple(img.shape[1:])} vs {tuple(ref.shape[1:])}); without an affine the channels of a "
                        "case must have equal shapes")
    a, b = np.asarray(img.affine, dtype=np.float64), np.asarray(ref.affine, dtype=np.float64)
    if same_shape and np.abs(a - b).max() <= GRID_TOL:
        return img
    lo_a, hi_a = world_extent(img, a)
    lo_b, hi_b = world_extent(ref, b)
    if np.any(hi_a <= lo_b) or np.any(hi_b <= lo_a):
        raise DataError(f"{case}: channel '{channel}' ({file}) does not overlap the first channel in space "
                        f"(extent {np.round(lo_a, 1).tolist()}..{np.round(hi_a, 1).tolist()} mm vs "
                        f"{np.round(lo_b, 1).tolist()}..{np.round(hi_b, 1).tolist()} mm): a different geometry")
    from monai.transforms import ResampleToMatch

    out = ResampleToMatch(mode="bilinear", padding_mode="zeros", dtype=torch.float32)(img, ref)
    return out.as_tensor() if isinstance(out, MetaTensor) else out


def _channel_where(file: str, channel: str) -> str:
    return f"{file} (channel '{channel}')"


def read_channels(ref, channels, *, spatial_dims: int, channel_axis: int = -1, series_id: str | None = None,
                  frame: int | None = None) -> MetaTensor:
    """A multi-channel case as ``(C, *spatial)`` float32 with the first channel's affine.

    ``ref``: a list of C references (one per channel, read each with ``read_image``); one multi-channel
    file or array (``channel_axis`` holds the C channels; a folder holding one 4D DICOM series, when no
    channel names a ``series`` pattern, is such a file: its time points are the channels); or a DICOM
    study folder (per channel the series whose SeriesDescription matches ``ChannelSpec.series``,
    default ``*<name>*``). ``channels``: the ``data.channels`` entries. Each channel is checked
    (``checks.validate``) before it is resampled."""
    from medmim.data.checks import channel_first, validate

    names = [c.name for c in channels]
    n = len(names)
    if isinstance(ref, (list, tuple)):
        case = str(ref[0]) if ref else "?"
        if len(ref) != n:
            raise DataError(f"{case}: {len(ref)} file(s) for {n} channels ({', '.join(names)})")
        parts = []
        for name, r in zip(names, ref):
            where = _channel_where(str(r) if isinstance(r, (str, Path)) else "<array image>", name)
            img = channel_first(read_image(r, series_id=series_id, frame=frame), spatial_dims, "image", where)
            validate(img, "image", where)
            parts.append((name, str(r), img, has_geometry(r, spatial_dims)))
        return _stack(parts, spatial_dims, case)
    text = str(ref) if isinstance(ref, (str, Path)) else None
    study = None
    if text is not None and not NPZ_REF.match(text) and Path(text).is_dir() and not series_id:
        from medmim.data.dicom import scan_folder

        study = scan_folder(text, salt="", skipped=[])
        if len(study) == 1 and not any(c.series for c in channels):
            series_id, study = next(iter(study)), None  # one (4D) series: its extra axis holds the channels
    if study is not None:
        from medmim.data.dicom import read_series, series_pattern, study_series_files

        parts = []
        for c, files in zip(channels, study_series_files(text, channels, study)):
            where = _channel_where(text, c.name)
            arr, affine, _meta = read_series(files, frame=frame, name=where)
            img = MetaTensor(torch.as_tensor(arr)) if affine is None else \
                MetaTensor(torch.as_tensor(arr), affine=torch.as_tensor(affine))
            img = channel_first(img, spatial_dims, "image", where)
            validate(img, "image", where)
            parts.append((c.name, f"{text} series '{series_pattern(c)}'", img, affine is not None))
        return _stack(parts, spatial_dims, text)
    where = text or "<array image>"
    if frame is not None:
        raise DataError(f"{where}: a 'frame' column and a multi-channel file both pick from the extra axis; "
                        "drop the frame column (data.channel_axis names the channel axis)")
    img = read_image(ref, series_id=series_id)
    if img.ndim != spatial_dims + 1:
        raise DataError(f"{where}: expected a {spatial_dims}D image with {n} channels on axis {channel_axis} "
                        f"(data.channels: {', '.join(names)}), got shape {tuple(img.shape)}")
    axis = channel_axis if channel_axis >= 0 else img.ndim + channel_axis
    if not 0 <= axis < img.ndim:
        raise DataError(f"{where}: data.channel_axis={channel_axis} is outside the image's {img.ndim} axes "
                        f"(shape {tuple(img.shape)})")
    if has_geometry(ref, spatial_dims) and axis != spatial_dims:
        raise DataError(f"{where}: data.channel_axis={channel_axis}, but the first {spatial_dims} axes of this file are "
                        f"space (its affine's); its channels are on axis {spatial_dims} (-1)")
    if img.shape[axis] != n:
        raise DataError(f"{where}: {img.shape[axis]} channel(s) on axis {channel_axis} (shape {tuple(img.shape)}), "
                        f"data.channels declares {n} ({', '.join(names)})")
    out = MetaTensor(img.as_tensor().movedim(axis, 0).contiguous(), affine=img.affine)
    for i, name in enumerate(names):
        validate(out[i:i + 1].as_tensor(), "image", _channel_where(where, name))
    return MetaTensor(out.as_tensor().float(), affine=img.affine)


def _stack(parts, spatial_dims: int, case: str) -> MetaTensor:
    """Channels (name, file, (1, *spatial) image, has affine) -> (C, *spatial) on the first one's grid."""
    _name0, _file0, first, geo0 = parts[0]
    first = MetaTensor(first.as_tensor().float(), affine=first.affine)
    out = [first.as_tensor()]
    for name, file, img, geo in parts[1:]:
        img = MetaTensor(img.as_tensor().float(), affine=img.affine)
        moved = onto_grid(img, first, spatial_dims=spatial_dims, geometry=geo0 and geo, case=case, channel=name,
                          file=file)
        out.append((moved.as_tensor() if isinstance(moved, MetaTensor) else moved).float())
    return MetaTensor(torch.cat(out, 0), affine=first.affine)
