"""Intensity presets per modality, as MONAI dict transforms. Grayscale stays single-channel."""

from __future__ import annotations

from monai import transforms as mt

from medmim.errors import ConfigError

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
    """Map raw intensities to roughly [0, 1] (z-scores for ``mri_zscore``)."""
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
