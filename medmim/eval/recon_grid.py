"""A PNG grid to eyeball masked-image-modelling reconstructions (MAE, SimMIM, SparK).

Three rows, one column per sample: the input, the masked input (hidden patches greyed), and the
reconstruction with the visible patches pasted back. 3D volumes show their middle slice along the
last spatial axis (the axial slice for volumes in MONAI's (H, W, D) RAS layout). Each column is
scaled to its input's 1st-99th percentile so that all three rows share one grey scale.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from medmim.io import atomic_path  # noqa: E402
from medmim.models.patches import upsample_mask  # noqa: E402


def _to_slices(t: torch.Tensor, spatial_dims: int) -> np.ndarray:
    """``(B, C, *spatial)`` or ``(B, *spatial)`` -> ``(B, H, W)`` numpy: channel 0, mid slice in 3D."""
    t = t.detach().float().cpu()
    if t.ndim == spatial_dims + 2:
        t = t[:, 0]
    if spatial_dims == 3:
        t = t[..., t.shape[-1] // 2]
    return t.numpy()


def save_recon_grid(path: str | Path, images: torch.Tensor, recon: torch.Tensor, mask: torch.Tensor,
                    patch_size: int, spatial_dims: int, max_items: int = 8) -> Path:
    """Write the input / masked / reconstruction grid to ``path`` (PNG, atomically).

    Args:
        images, recon: ``(B, C, *spatial)`` input and reconstruction (visible patches pasted back).
        mask: ``(B, *grid)`` bool, True = hidden.
        patch_size: edge of a grid cell in pixels (the encoder's ``downsample_ratio``).
        spatial_dims: 2 or 3.
        max_items: at most this many samples (columns).
    """
    n = min(int(images.shape[0]), max_items)
    img = _to_slices(images[:n], spatial_dims)
    rec = _to_slices(recon[:n], spatial_dims)
    hid = _to_slices(upsample_mask(mask[:n].bool(), patch_size), spatial_dims).astype(bool)

    fig, axes = plt.subplots(3, n, figsize=(1.8 * n, 1.8 * 3), squeeze=False)
    for j in range(n):
        lo, hi = np.percentile(img[j], [1, 99])
        hi = hi if hi > lo else lo + 1.0
        scale = lambda a: np.clip((a - lo) / (hi - lo), 0.0, 1.0)  # noqa: E731
        masked = np.where(hid[j], 0.5, scale(img[j]))
        for i, (panel, title) in enumerate(((scale(img[j]), "input"), (masked, "masked"),
                                            (scale(rec[j]), "reconstruction"))):
            ax = axes[i, j]
            ax.imshow(panel, cmap="gray", vmin=0.0, vmax=1.0, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if j == 0:
                ax.set_ylabel(title, fontsize=8)
    fig.tight_layout()
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)
    return path
