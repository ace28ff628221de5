"""The 2D deterministic chain without MONAI's per-item overhead: the same numbers, faster.

The MONAI chain built by ``medmim.data.dataset.deterministic_transforms`` (LoadRecordd -> preset
intensity -> size) *defines* what an item is. For 2D pictures most of its time goes into MetaTensor
bookkeeping around tiny operations and into ``torch.quantile`` (a full sort) for the percentile
presets. ``FastChain2D`` computes the same thing on plain arrays:

* reading: ``medmim.data.readers.read_picture`` (the one picture reader), in-memory arrays and npz entries as they are;
* checks: the functions of ``medmim.data.checks`` (integer images skip the NaN/Inf scan);
* percentiles: exact order statistics (a 256/65536-bin histogram for integer images, else
  ``np.partition``), interpolated exactly as ``torch.quantile`` does (MONAI's ``percentile``; above
  1e6 voxels MONAI switches to ``np.percentile``, and so does this);
* intensity, resize (``F.interpolate``, area / nearest), symmetric zero pad and centre crop: the
  same torch operations MONAI runs, on plain tensors.

Multi-channel cases (``data.channels``) given as one picture / npz entry / array per channel take the
same steps per channel (each its own preset; equal shapes, as the MONAI chain requires), then one
resize of the stacked channels. A single multi-channel file, and anything else it does not handle
(3D, DICOM, a file PIL cannot open, a ``frame`` column, unusual shapes, a bad channel), returns ``None`` and the caller runs the MONAI chain, so error messages and rare cases stay MONAI's.
``tests/test_data_fast.py`` checks the two paths agree to 1e-6 on every preset and size mode.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from medmim.data.checks import channel_first, check_pair, validate
from medmim.data.presets import CT_WINDOWS

_RASTER = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff"}
_TORCH_NATIVE = {np.dtype(t) for t in (np.uint8, np.int8, np.int16, np.int32, np.int64, np.bool_, np.float16,
                                        np.float32, np.float64)}
_PERCENTILES = {"xray": (0.5, 99.5), "mri_percentile": (1.0, 99.0)}
_MONAI_NUMPY_ABOVE = 1_000_000  # monai.transforms.utils_pytorch_numpy_unification.percentile


def order_statistics(arr: np.ndarray, ks: Sequence[int]) -> np.ndarray:
    """Values at sorted positions ``ks`` of ``arr`` (flattened), without a full sort."""
    flat = arr.reshape(-1)
    ks = np.asarray(ks, dtype=np.int64)
    if flat.dtype.kind in "ub" and flat.dtype.itemsize <= 2:
        counts = np.bincount(flat.astype(np.intp, copy=False), minlength=1)
        return np.searchsorted(np.cumsum(counts), ks, side="right").astype(np.float64)
    if flat.dtype.kind in "iu" and flat.size:
        lo = int(flat.min())
        hi = int(flat.max())
        if hi - lo < 1 << 17:
            counts = np.bincount((flat - lo).astype(np.intp, copy=False), minlength=1)
            return (np.searchsorted(np.cumsum(counts), ks, side="right") + lo).astype(np.float64)
    part = np.partition(flat, np.unique(ks))
    return part[ks].astype(np.float64)


def torch_quantile(arr: np.ndarray, qs: Sequence[float]) -> list[torch.Tensor]:
    """``torch.quantile(torch.as_tensor(arr, float32), q)`` (linear interpolation) for each q, as
    float32 0-dim tensors, from exact order statistics (``arr`` keeps its own dtype)."""
    n = arr.size
    q = torch.as_tensor(np.asarray(qs, dtype=np.float64), dtype=torch.float32)
    ranks = q * (n - 1)
    below = ranks.to(torch.long)
    above = ranks.ceil().to(torch.long)
    vals = order_statistics(arr, [*below.tolist(), *above.tolist()])
    v = torch.as_tensor(vals, dtype=torch.float32)
    k = len(qs)
    out = v[:k].lerp(v[k:], ranks - below.to(torch.float32))
    return [out[i] for i in range(k)]


def monai_percentiles(arr: np.ndarray, qs: Sequence[float]) -> list[torch.Tensor]:
    """What ``monai...percentile(img, q)`` returns for a float32 image of these values."""
    if arr.size > _MONAI_NUMPY_ABOVE:
        res = np.percentile(arr.astype(np.float32, copy=False), np.asarray(qs, dtype=np.float64))
        return [torch.as_tensor(r, dtype=torch.float32) for r in res]
    return torch_quantile(arr, [q / 100.0 for q in qs])


def _scale_range(img: torch.Tensor, a_min, a_max, b_min: float, b_max: float) -> torch.Tensor:
    """monai ScaleIntensityRange(a_min, a_max, b_min, b_max, clip=True) on a plain float32 tensor."""
    if bool(a_max - a_min == 0.0):
        return img - a_min + b_min
    img = (img - a_min) / (a_max - a_min)
    img = img * (b_max - b_min) + b_min
    return torch.clamp(img, b_min, b_max).to(torch.float32)


def intensity(img: torch.Tensor, raw: np.ndarray, preset: str) -> torch.Tensor:
    """The preset of ``medmim.data.presets.intensity_transform``; ``raw`` is the image before the
    float conversion (its integer dtype makes the percentiles cheap)."""
    if preset == "uint8":
        return _scale_range(img, 0, 255, 0.0, 1.0)
    if preset in CT_WINDOWS:
        level, width = CT_WINDOWS[preset]
        return _scale_range(img, level - width / 2, level + width / 2, 0.0, 1.0)
    if preset in _PERCENTILES:
        a_min, a_max = monai_percentiles(raw, _PERCENTILES[preset])
        return _scale_range(img, a_min, a_max, 0.0, 1.0)
    if preset == "mri_zscore":  # NormalizeIntensity(nonzero=True): mean/std of the non-zero voxels
        nz = img != 0
        if not bool(nz.any()):
            return img.clone()
        masked = torch.from_numpy(img.numpy()[nz.numpy()])  # numpy's boolean gather: same values, same order
        sub = torch.mean(masked).item()
        div = torch.std(masked, unbiased=False).item()
        if div == 0.0:
            div = 1.0
        return torch.where(nz, (img - sub) / div, img)
    raise KeyError(preset)


def resize(img: torch.Tensor, size: tuple[int, ...], mode: str) -> torch.Tensor:
    """monai Resize (no anti-aliasing) on a plain channel-first tensor."""
    if tuple(img.shape[1:]) == tuple(size):
        return img.to(torch.float32)
    out = F.interpolate(img.to(torch.float32).unsqueeze(0), size=size, mode=mode)
    return out.squeeze(0).to(torch.float32)


def pad_or_crop(img: torch.Tensor, size: tuple[int, ...]) -> torch.Tensor:
    """monai SpatialPad(method="symmetric", mode="constant") then CenterSpatialCrop to ``size``."""
    shape = img.shape[1:]
    pads: list[int] = []
    for d, s in zip(reversed(shape), reversed(size)):
        w = max(s - d, 0)
        pads += [w // 2, w - w // 2]
    if any(pads):
        img = F.pad(img, pads, mode="constant", value=0.0)
    shape = img.shape[1:]
    if any(d > s for d, s in zip(shape, size)):
        sl = [slice(None)]
        for d, s in zip(shape, size):
            a = d // 2 - s // 2 if d > s else 0
            sl.append(slice(a, a + min(s, d)))
        img = img[tuple(sl)]
    return img


class FastChain2D:
    """The 2D deterministic chain on plain arrays; ``__call__`` returns None for what it leaves to MONAI."""

    def __init__(self, preset: str, keys: Sequence[str], image_size: int, resize_mode: str,
                 presets: Sequence[str] | None = None):
        self.preset, self.keys = preset, tuple(keys)
        self.image_size, self.resize_mode = image_size, resize_mode
        self.presets = list(presets) if presets else [preset]  # one per input channel (data.channels)

    @staticmethod
    def _read(value, key: str = "image") -> tuple[np.ndarray, str, bool] | None:
        """(array as read, where, from a picture file) or None when this path does not read it."""
        if isinstance(value, np.ndarray):
            return value, "", False
        if not isinstance(value, (str, Path)):
            return None
        text = str(value)
        if text.split("#", 1)[0].endswith(".npz") and "#" in text:
            from medmim.data.readers import NPZ_REF, npz_entry

            if not NPZ_REF.match(text):
                return None
            try:
                return npz_entry(text), text, False
            except Exception:  # noqa: BLE001 - the MONAI path reports it
                return None
        if Path(text).suffix.lower() not in _RASTER:
            return None
        try:  # the one picture reader (grey as PIL convert("L")), shared with the MONAI path
            from medmim.data.readers import read_picture

            arr = read_picture(text, key)
        except Exception:  # noqa: BLE001 - unreadable here: the MONAI path gives the reason
            return None
        if arr.dtype == object or arr.size == 0 or arr.dtype.kind not in "biuf":
            return None
        return arr, text, True

    def _size(self, img: torch.Tensor, mode: str) -> torch.Tensor:
        n = self.image_size
        if self.resize_mode == "none":
            return img
        if self.resize_mode == "stretch":
            return resize(img, (n, n), mode)
        shape = img.shape[1:]
        scale = n / max(shape)
        img = resize(img, tuple(int(round(s * scale)) for s in shape), mode)
        return pad_or_crop(img, (n, n))

    def __call__(self, data: dict) -> dict | None:
        if data.get("frame") not in (None, "") or data.get("series_id") not in (None, ""):
            return None
        out = {k: v for k, v in data.items() if k not in ("series_id", "frame")}
        if isinstance(data.get("image"), (list, tuple)) or len(self.presets) > 1:
            return self._channels(data, out)
        raws: dict[str, tuple[np.ndarray, torch.Tensor]] = {}
        for key in self.keys:
            if key not in data:
                continue
            got = self._plane(data[key], key, quiet=False)
            if got is None:
                return None
            raws[key] = got
        if "image" in raws and "mask" in raws:
            check_pair(raws["image"][1], raws["mask"][1], str(data.get("mask")))
        for key, (raw, t) in raws.items():
            if key == "image":
                t = intensity(t, raw, self.preset)
            out[key] = self._size(t, "area" if key == "image" else "nearest").contiguous()
        return out

    def _plane(self, value, key: str, quiet: bool = True) -> tuple[np.ndarray, torch.Tensor] | None:
        """(raw array, (1, H, W) float32) of one grayscale picture / npz entry / array, checked; None when
        the MONAI path should handle it. A failed check raises (``quiet=False``) or gives None, so that
        the MONAI path reports it naming the channel (``quiet``)."""
        got = self._read(value, key)
        if got is None:
            return None
        arr, where, from_file = got
        where = where or f"<array {key}>"
        native = torch.from_numpy(np.require(arr, requirements=["C", "W"])) if arr.dtype in _TORCH_NATIVE else None
        if from_file:  # monai LoadImage(dtype=float32): the file's values as float32
            t = torch.from_numpy(np.ascontiguousarray(arr, dtype=np.float32))
        else:  # arrays keep their dtype up to the checks (medmim.data.readers.read_image)
            t = native if native is not None else torch.as_tensor(arr)
        try:
            t = channel_first(t, 2, key, where)
            # the checks do not depend on the channel axis; on the integer array they skip the NaN scan
            validate(native if (native is not None and native.dim() == 2) else t, key, where)
        except Exception:  # noqa: BLE001
            if not quiet:
                raise
            return None
        t = t.float()
        return (arr if (arr.ndim == 2 and arr.dtype.kind in "iub") else t.numpy()), t

    def _channels(self, data: dict, out: dict) -> dict | None:
        """One file (picture, npz entry, array) per channel: per-channel intensity, one resize."""
        refs = data.get("image")
        if not isinstance(refs, (list, tuple)) or len(refs) != len(self.presets):
            return None
        planes = [self._plane(r, "image") for r in refs]
        if any(p is None for p in planes) or len({tuple(t.shape) for _r, t in planes}) != 1:
            return None  # unreadable, bad or unequal channels: the MONAI chain says which
        img = torch.cat([intensity(t, raw, preset) for (raw, t), preset in zip(planes, self.presets)], 0)
        if "mask" in self.keys and "mask" in data:
            mask = self._plane(data["mask"], "mask")
            if mask is None:
                return None
            check_pair(img, mask[1], str(data.get("mask")))
            out["mask"] = self._size(mask[1], "nearest").contiguous()
        out["image"] = self._size(img, "area").contiguous()
        return out
