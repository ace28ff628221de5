"""What ``medmim anomaly score`` writes besides its CSVs (``medmim.io.write_csv``): PNG overlays (2D),
NIfTI maps (3D).

Geometry: images reach the network through the deterministic data chain (3D: reorientation to
``data.orientation``, optional resampling to ``data.target_spacing``, resize/pad to
``data.image_size``). A 3D map goes back through the inverse of each of those steps (MONAI's
transform tracking) onto the source volume's voxel grid, and is written with the source's affine,
so it overlays the source in any viewer. Sources without geometry (MedMNIST arrays) get an identity
affine. 2D images arrive as (rows, columns) -- medmim's reader keeps PNG/JPEG in picture order --
so a 2D overlay is drawn as it is and looks like the source picture.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from medmim.io import atomic_path


def save_overlay_png(path: str | Path, image: np.ndarray, amap: np.ndarray, *, lesion: np.ndarray | None = None,
                     title: str = "", vmax: float | None = None) -> Path:
    """Three panels: the input, the anomaly map over it, and (if given) the true lesion outline."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from medmim.eval.plots import save_figure

    img, m = np.asarray(image, np.float32), np.asarray(amap, np.float32)
    fig, axes = plt.subplots(1, 2, figsize=(5.2, 2.8), dpi=100)
    axes[0].imshow(img, cmap="gray", vmin=0, vmax=1)
    axes[0].set_title("input", fontsize=8)
    axes[1].imshow(img, cmap="gray", vmin=0, vmax=1)
    hm = axes[1].imshow(m, cmap="jet", alpha=0.45, vmin=0, vmax=vmax if vmax is not None else float(m.max()) or 1.0)
    if lesion is not None and np.any(lesion):
        axes[1].contour(np.asarray(lesion, np.float32), levels=[0.5], colors="white",
                        linewidths=0.8)
    axes[1].set_title("anomaly map" + (" + lesion" if lesion is not None and np.any(lesion) else ""), fontsize=8)
    fig.colorbar(hm, ax=axes[1], fraction=0.046, pad=0.04)
    for ax in axes:
        ax.axis("off")
    if title:
        fig.suptitle(title, fontsize=8)
    fig.tight_layout()
    return save_figure(fig, path)


def map_to_source(amap: torch.Tensor | np.ndarray, source: dict | None, dc, preset: str) -> tuple[np.ndarray, np.ndarray]:
    """A network-space map ``(*spatial)`` -> ``(map on the source voxel grid, source affine)``.

    ``source`` is the record's loader input (``{"image": path, ...}``). The source is read again
    through the same deterministic chain (with MONAI's transform tracking), and the map is pushed
    back through the inverse of every geometric step: size (resize, pad, crop), spacing and
    orientation. Sources without geometry (``None``, or arrays) give the map as it is and an
    identity affine.
    """
    from monai.data import MetaTensor

    t = torch.as_tensor(np.asarray(amap), dtype=torch.float32)
    if source is None:
        return t.numpy(), np.eye(4)
    from medmim.data.dataset import deterministic_transforms

    chain = deterministic_transforms(dc, preset, with_mask=False, track_meta=True)  # training's chain, tracked
    ref = chain(dict(source))["image"]
    if not isinstance(ref, MetaTensor) or tuple(ref.shape[1:]) != tuple(t.shape):
        raise ValueError(f"map shape {tuple(t.shape)} does not match the network-space source "
                         f"{tuple(ref.shape[1:])}")
    m = MetaTensor(t[None], affine=ref.affine.clone(), meta=dict(ref.meta))
    m.applied_operations = list(ref.applied_operations)
    back = chain.inverse({"image": m})["image"]
    affine = back.affine if isinstance(back, MetaTensor) else torch.eye(4)
    return np.asarray(back.as_tensor()[0] if isinstance(back, MetaTensor) else back[0], np.float32), \
        np.asarray(affine, dtype=np.float64)


def save_nifti_map(path: str | Path, amap: torch.Tensor | np.ndarray, source: dict | None, dc, preset: str) -> Path:
    """Write a 3D map in the source volume's geometry (its voxel grid and affine) as NIfTI."""
    import nibabel as nib

    data, affine = map_to_source(amap, source, dc, preset)
    img = nib.Nifti1Image(data.astype(np.float32), affine)
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
