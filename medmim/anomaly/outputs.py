"""What ``medmim anomaly score`` writes: a per-image CSV, PNG overlays (2D), NIfTI maps (3D).

Geometry: images reach the network through MONAI's loader and a resize to ``data.image_size``. A 3D
map goes back to the source volume's voxel grid (trilinear resize to the source shape, the same
axis order, since the loader does not reorient) and is written with the source image's affine, so
it overlays the source in any viewer. Sources without geometry (MedMNIST arrays) get an identity
affine. 2D PNG sources are read by MONAI as (width, height); the overlays are transposed back so
they look like the source picture.
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from medmim.io import atomic_path


def write_scores_csv(path: str | Path, rows: Sequence[dict]) -> Path:
    path = Path(path)
    fields = list(rows[0]) if rows else ["index"]
    with atomic_path(path) as tmp:
        with open(tmp, "w", newline="") as fh:
            w = csv.DictWriter(fh, fieldnames=fields)
            w.writeheader()
            w.writerows(rows)
    return path


def _display(arr: np.ndarray, transpose: bool) -> np.ndarray:
    return arr.T if transpose else arr


def save_overlay_png(path: str | Path, image: np.ndarray, amap: np.ndarray, *, lesion: np.ndarray | None = None,
                     title: str = "", vmax: float | None = None, transpose: bool = False) -> Path:
    """Three panels: the input, the anomaly map over it, and (if given) the true lesion outline."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    img, m = _display(np.asarray(image, np.float32), transpose), _display(np.asarray(amap, np.float32), transpose)
    fig, axes = plt.subplots(1, 2, figsize=(5.2, 2.8), dpi=100)
    axes[0].imshow(img, cmap="gray", vmin=0, vmax=1)
    axes[0].set_title("input", fontsize=8)
    axes[1].imshow(img, cmap="gray", vmin=0, vmax=1)
    hm = axes[1].imshow(m, cmap="jet", alpha=0.45, vmin=0, vmax=vmax if vmax is not None else float(m.max()) or 1.0)
    if lesion is not None and np.any(lesion):
        axes[1].contour(_display(np.asarray(lesion, np.float32), transpose), levels=[0.5], colors="white",
                        linewidths=0.8)
    axes[1].set_title("anomaly map" + (" + lesion" if lesion is not None and np.any(lesion) else ""), fontsize=8)
    fig.colorbar(hm, ax=axes[1], fraction=0.046, pad=0.04)
    for ax in axes:
        ax.axis("off")
    if title:
        fig.suptitle(title, fontsize=8)
    fig.tight_layout()
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
    return path


def source_geometry(source) -> tuple[tuple[int, ...] | None, np.ndarray]:
    """``(shape, affine)`` of a NIfTI source file, or ``(None, identity)`` for in-memory arrays."""
    if isinstance(source, (str, Path)) and str(source).endswith((".nii", ".nii.gz")):
        import nibabel as nib

        img = nib.load(str(source))
        return tuple(int(s) for s in img.shape[:3]), np.asarray(img.affine, dtype=np.float64)
    return None, np.eye(4)


def map_to_source(amap: torch.Tensor | np.ndarray, shape: Sequence[int] | None) -> np.ndarray:
    """A network-space map ``(*spatial)`` resized (trilinear / bilinear) to the source ``shape``."""
    t = torch.as_tensor(np.asarray(amap), dtype=torch.float32)
    if shape is not None and tuple(t.shape) != tuple(shape):
        mode = "trilinear" if t.ndim == 3 else "bilinear"
        t = F.interpolate(t[None, None], size=tuple(shape), mode=mode, align_corners=False)[0, 0]
    return t.numpy()


def save_nifti_map(path: str | Path, amap: torch.Tensor | np.ndarray, source) -> Path:
    """Write a 3D map in the source volume's geometry (its voxel grid and affine) as NIfTI."""
    import nibabel as nib

    shape, affine = source_geometry(source)
    data = map_to_source(amap, shape).astype(np.float32)
    img = nib.Nifti1Image(data, affine)
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    img.header.set_xyzt_units("mm")
    path = Path(path)
    # nibabel picks the format from the suffix: the temporary name keeps it
    suffix = ".nii.gz" if path.name.endswith(".nii.gz") else ".nii"
    with atomic_path(path) as tmp:
        real_tmp = tmp.with_name(tmp.name + suffix)
        try:
            nib.save(img, str(real_tmp))
            real_tmp.replace(tmp)
        finally:
            if real_tmp.exists():
                real_tmp.unlink()
    return path
