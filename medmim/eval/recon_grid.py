"""A PNG grid to eyeball masked-image-modelling reconstructions (MAE, SimMIM, SparK).

Three rows per input channel, one column per sample: the input, the masked input (hidden patches
greyed), and the reconstruction with the visible patches pasted back. 3D volumes show their middle
slice along the last spatial axis (the axial slice for volumes in MONAI's (H, W, D) RAS layout). Each
channel of each column is scaled to its input's 1st-99th percentile, so that its three rows share one
grey scale (an MRI sequence keeps its own contrast). Multi-channel inputs (MRI sequences) show at most
``MAX_CHANNELS`` channels, each named.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from medmim.eval.plots import save_figure  # noqa: E402
from medmim.models.patches import upsample_mask  # noqa: E402


MAX_CHANNELS = 4


def _to_slices(t: torch.Tensor, spatial_dims: int, channel: int = 0) -> np.ndarray:
    """``(B, C, *spatial)`` or ``(B, *spatial)`` -> ``(B, H, W)`` numpy: one channel, mid slice in 3D."""
    t = t.detach().float().cpu()
    if t.ndim == spatial_dims + 2:
        t = t[:, channel]
    if spatial_dims == 3:
        t = t[..., t.shape[-1] // 2]
    return t.numpy()


def save_recon_grid(path: str | Path, images: torch.Tensor, recon: torch.Tensor, mask: torch.Tensor,
                    patch_size: int, spatial_dims: int, max_items: int = 8,
                    channel_names: list[str] | None = None) -> Path:
    """Write the input / masked / reconstruction grid to ``path`` (PNG, atomically).

    Args:
        images, recon: ``(B, C, *spatial)`` input and reconstruction (visible patches pasted back).
        mask: ``(B, *grid)`` bool, True = hidden.
        patch_size: edge of a grid cell in pixels (the encoder's ``downsample_ratio``).
        spatial_dims: 2 or 3.
        max_items: at most this many samples (columns).
        channel_names: names of the input channels (row labels; default: none for one channel,
            "ch0", "ch1", ... for several).
    """
    n = min(int(images.shape[0]), max_items)
    c = min(int(images.shape[1]) if images.ndim == spatial_dims + 2 else 1, MAX_CHANNELS)
    names = list(channel_names or [])[:c] if channel_names else ([""] if c == 1 else [f"ch{k}" for k in range(c)])
    hid = _to_slices(upsample_mask(mask[:n].bool(), patch_size), spatial_dims).astype(bool)

    fig, axes = plt.subplots(3 * c, n, figsize=(1.8 * n, 1.8 * 3 * c), squeeze=False)
    for k in range(c):
        img = _to_slices(images[:n], spatial_dims, k)
        rec = _to_slices(recon[:n], spatial_dims, k)
        for j in range(n):
            lo, hi = np.percentile(img[j], [1, 99])
            hi = hi if hi > lo else lo + 1.0
            scale = lambda a: np.clip((a - lo) / (hi - lo), 0.0, 1.0)  # noqa: E731
            masked = np.where(hid[j], 0.5, scale(img[j]))
            for i, (panel, title) in enumerate(((scale(img[j]), "input"), (masked, "masked"),
                                                (scale(rec[j]), "reconstruction"))):
                ax = axes[3 * k + i, j]
                ax.imshow(panel, cmap="gray", vmin=0.0, vmax=1.0, interpolation="nearest")
                ax.set_xticks([])
                ax.set_yticks([])
                if j == 0:
                    ax.set_ylabel(f"{names[k]} {title}".strip(), fontsize=8)
    fig.tight_layout()
    return save_figure(fig, path, dpi=100)
