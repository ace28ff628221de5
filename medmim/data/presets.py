"""Modality presets and pretraining crops, as MONAI dict transforms. Grayscale stays single-channel.

A preset is a chain: geometry (3D: RAS orientation, optional resampling to ``data.target_spacing``)
→ intensity (CT window, MRI per-volume percentile or z-score, X-ray percentile) → size (pad to a
square/cube keeping the aspect ratio, or stretch, or keep the native size). X-ray MONOCHROME1
inversion happens in the DICOM reader (medmim.data.dicom), so every X-ray arrives bright = dense.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
from monai import transforms as mt

from medmim.errors import ConfigError, DataError

# CT windows as (level, width) in Hounsfield units
CT_WINDOWS = {
    "ct_soft_tissue": (40, 400),
    "ct_lung": (-600, 1500),
    "ct_bone": (400, 1800),
    "ct_brain": (40, 80),
}
PRESETS = ("uint8", "xray", "mri_percentile", "mri_zscore", *CT_WINDOWS)
DEFAULT_FOR_MODALITY = {"ct": "ct_soft_tissue", "mri": "mri_percentile", "xray": "xray", "generic": "xray"}


def intensity_transform(preset: str, keys=("image",)) -> mt.MapTransform:
    """Map raw intensities to roughly [0, 1] (z-scores for ``mri_zscore``); per image/volume."""
    if preset == "uint8":
        return mt.ScaleIntensityRanged(keys, a_min=0, a_max=255, b_min=0.0, b_max=1.0, clip=True)
    if preset in CT_WINDOWS:
        level, width = CT_WINDOWS[preset]
        return mt.ScaleIntensityRanged(keys, a_min=level - width / 2, a_max=level + width / 2,
                                       b_min=0.0, b_max=1.0, clip=True)
    if preset == "xray":
        return mt.ScaleIntensityRangePercentilesd(keys, lower=0.5, upper=99.5, b_min=0.0, b_max=1.0, clip=True)
    if preset == "mri_percentile":
        return mt.ScaleIntensityRangePercentilesd(keys, lower=1, upper=99, b_min=0.0, b_max=1.0, clip=True)
    if preset == "mri_zscore":
        return mt.NormalizeIntensityd(keys, nonzero=True)
    raise ConfigError(f"data.preset: unknown preset '{preset}'; allowed: {', '.join(PRESETS)}")


class ChannelwiseIntensityd(mt.MapTransform):
    """The intensity step channel by channel: channel ``c`` gets ``intensity_transform(presets[c])``
    on its own (percentiles and z-scores per channel, never pooled over channels)."""

    def __init__(self, presets: Sequence[str], keys=("image",)):
        super().__init__(list(keys))
        self.presets = list(presets)
        self.steps = [intensity_transform(p, keys=["image"]) for p in self.presets]

    def __call__(self, data: dict) -> dict:
        import torch

        d = dict(data)
        for key in self.key_iterator(d):
            img = d[key]
            if img.shape[0] != len(self.steps):
                raise DataError(f"<{key}>: {img.shape[0]} channel(s), {len(self.steps)} channel presets")
            d[key] = torch.cat([step({"image": img[c:c + 1]})["image"] for c, step in enumerate(self.steps)], 0)
        return d


def channel_presets(dc, preset: str) -> list[str]:
    """The intensity preset of every input channel: ``ChannelSpec.preset``, else ``preset`` (data.preset
    or the modality's default; a pool source's own). One entry when no channels are declared."""
    return [c.preset or preset for c in dc.channels] or [preset]


def channel_entries(dc, preset: str) -> list[dict]:
    """The declared channels with their resolved presets: ``{"name", "preset", "series"}`` each, in
    order (cache keys, data cards); empty when no channels are declared."""
    return [{"name": c.name, "preset": p, "series": c.series} for c, p in zip(dc.channels, channel_presets(dc, preset))]


def intensity_step(presets: Sequence[str], keys=("image",)) -> mt.MapTransform:
    """One channel: the preset's transform itself (the numbers of a grayscale run); several: per channel."""
    if len(presets) == 1:
        return intensity_transform(presets[0], keys=keys)
    return ChannelwiseIntensityd(presets, keys=keys)


def _modes(keys: Sequence[str], image_mode: str) -> list[str]:
    return [image_mode if k == "image" else "nearest" for k in keys]


def geometry_transforms(keys: Sequence[str], spatial_dims: int, orientation: str | None,
                        target_spacing: Sequence[float] | None) -> list:
    """3D only: reorient to ``orientation`` (e.g. RAS) and resample to ``target_spacing`` (mm)."""
    if spatial_dims != 3:
        return []
    out = []
    if orientation:
        out.append(mt.Orientationd(list(keys), axcodes=orientation, labels=None))
    if target_spacing:
        out.append(mt.Spacingd(list(keys), pixdim=list(target_spacing), mode=_modes(keys, "bilinear"),
                               padding_mode="border", dtype=np.float32))
    return out


def size_transforms(keys: Sequence[str], spatial_dims: int, image_size: int, resize: str) -> list:
    """``pad``: keep the aspect ratio (longest side = image_size), pad to a square/cube;
    ``stretch``: resize every axis to image_size; ``none``: keep the size."""
    size = (image_size,) * spatial_dims
    mode = _modes(keys, "area" if spatial_dims == 2 else "trilinear")
    if resize == "none":
        return []
    if resize == "stretch":
        return [mt.Resized(list(keys), spatial_size=size, mode=mode)]
    if resize == "pad":
        return [mt.Resized(list(keys), spatial_size=image_size, size_mode="longest", mode=mode),
                mt.SpatialPadd(list(keys), spatial_size=size, method="symmetric", mode="constant"),
                mt.ResizeWithPadOrCropd(list(keys), spatial_size=size)]  # guards rounding (e.g. 63 -> 64)
    raise ConfigError(f"data.resize: unknown mode '{resize}'; allowed: pad, stretch, none")


def preset_transforms(preset: str, keys: Sequence[str], *, spatial_dims: int, image_size: int,
                      resize: str = "pad", orientation: str | None = "RAS",
                      target_spacing: Sequence[float] | None = None,
                      channel_presets: Sequence[str] | None = None) -> list:
    """The deterministic modality chain (after reading, channel first). ``channel_presets``: one preset
    per input channel (``channel_presets(dc, preset)``); default: ``preset`` for the one channel."""
    return [*geometry_transforms(keys, spatial_dims, orientation, target_spacing),
            intensity_step(list(channel_presets) if channel_presets else [preset], keys=["image"]),
            *size_transforms(keys, spatial_dims, image_size, resize)]


class RandResizedCropd(mt.RandomizableTransform, mt.MapTransform):
    """Random resized crop with a medical scale range: the crop holds ``scale`` (default 0.5–1.0) of
    the image area/volume, with a mild aspect jitter, and is resized back to ``size``.

    Same crop for every key (image and mask); masks resize with nearest neighbour.
    """

    def __init__(self, keys: Sequence[str], size: Sequence[int], scale=(0.5, 1.0), ratio=(3 / 4, 4 / 3),
                 prob: float = 1.0):
        mt.RandomizableTransform.__init__(self, prob)
        mt.MapTransform.__init__(self, keys, allow_missing_keys=True)
        if not 0 < scale[0] <= scale[1] <= 1:
            raise ConfigError(f"data.crop_scale must satisfy 0 < min <= max <= 1, got {tuple(scale)}")
        self.size, self.scale, self.ratio = tuple(size), tuple(scale), tuple(ratio)
        self._fracs: list[float] = []
        self._starts: list[float] = []

    def randomize(self, spatial_dims: int) -> None:
        super().randomize(None)
        s = self.R.uniform(*self.scale)
        log_r = self.R.uniform(math.log(self.ratio[0]), math.log(self.ratio[1]), size=spatial_dims)
        log_r -= log_r.mean()  # product of the per-axis jitters is 1: the crop keeps fraction s
        fr = np.clip(s ** (1.0 / spatial_dims) * np.exp(log_r / 2), 0.05, 1.0)
        self._fracs = fr.tolist()
        self._starts = self.R.uniform(0, 1, size=spatial_dims).tolist()

    def __call__(self, data: dict) -> dict:
        d = dict(data)
        first = d[self.first_key(d)]
        spatial = tuple(first.shape[1:])
        self.randomize(len(spatial))
        if not self._do_transform:
            return d
        slices = [slice(None)]
        for n, f, st in zip(spatial, self._fracs, self._starts):
            k = max(1, int(round(n * f)))
            a = int(round(st * (n - k)))
            slices.append(slice(a, a + k))
        for key in self.key_iterator(d):
            crop = d[key][tuple(slices)]
            mode = "nearest" if key != "image" else ("bilinear" if len(spatial) == 2 else "trilinear")
            d[key] = mt.Resize(self.size, mode=mode)(crop)
        return d


def crop_transforms(keys: Sequence[str], spatial_dims: int, image_size: int, *, random_resized_crop: bool,
                    crop_scale: Sequence[float], patch_samples: int) -> list:
    """Switchable pretraining crops: random resized crop and/or ``patch_samples`` patches per image."""
    out: list = []
    size = (image_size,) * spatial_dims
    if random_resized_crop:
        out.append(RandResizedCropd(list(keys), size, scale=tuple(crop_scale)))
    if patch_samples:
        out += [mt.SpatialPadd(list(keys), spatial_size=size),
                mt.RandSpatialCropSamplesd(list(keys), roi_size=size, num_samples=patch_samples, random_size=False)]
    return out


