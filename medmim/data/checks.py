"""Checks on what a reader returned: one clear reason per kind of bad input.

Every failure is a DataError whose message is ``<file>: <reason>``; the dataset code catches it,
skips the record and lists it in the run's ``skipped`` report (unless ``data.strict``).
"""

from __future__ import annotations

import torch

from medmim.errors import DataError


def channel_first(arr: torch.Tensor, spatial_dims: int, key: str, where: str) -> torch.Tensor:
    """Add the channel axis: grayscale -> 1 channel; RGB(A) 2D images -> luminance (masks: first channel)."""
    if arr.ndim == spatial_dims:
        return arr.unsqueeze(0)
    if spatial_dims == 2 and arr.ndim == 3 and arr.shape[-1] in (3, 4):
        if key == "image":
            return arr[..., :3].float().mean(-1, keepdim=True).movedim(-1, 0)
        return arr[..., :1].movedim(-1, 0)
    if arr.ndim == spatial_dims + 1 and arr.shape[0] == 1:
        return arr
    raise DataError(f"{where}: wrong dimensionality: expected a {spatial_dims}D {key}, got shape "
                    f"{tuple(arr.shape)}" + (" (a 4D series: pick a time point with the 'frame' column, or declare its channels in "
                                                "data.channels)"
                                             if spatial_dims == 3 and arr.ndim == 4 else ""))


def validate(arr: torch.Tensor, key: str, where: str) -> None:
    """Empty, NaN/Inf and blank images are refused. Integer images cannot hold NaN/Inf, so the scan
    runs on floating-point images only (on a plain tensor: MetaTensor bookkeeping is not needed here)."""
    if arr.numel() == 0 or min(arr.shape) == 0:
        raise DataError(f"{where}: empty {key} (shape {tuple(arr.shape)})")
    arr = arr.as_subclass(torch.Tensor) if type(arr) is not torch.Tensor else arr
    if arr.is_floating_point() or arr.is_complex():
        finite = torch.isfinite(arr)
        if not bool(finite.all()):
            bad = int((~finite).sum())
            raise DataError(f"{where}: {key} holds NaN/Inf values ({bad} of {arr.numel()} voxels)")
    if key == "image":
        flat = arr.reshape(-1)
        if bool((flat == flat[0]).all()):
            raise DataError(f"{where}: empty image (every voxel is {float(flat[0]):g})")


def check_pair(image: torch.Tensor, mask: torch.Tensor, where: str) -> None:
    if tuple(image.shape[1:]) != tuple(mask.shape[1:]):
        raise DataError(f"{where}: image/mask shape mismatch: image {tuple(image.shape[1:])}, "
                        f"mask {tuple(mask.shape[1:])}")
