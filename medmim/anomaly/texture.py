"""A learned atlas of normal texture: where normal images carry how much fine detail.

Some anomalies remove detail rather than add it (pneumonia's opacities hide ribs and vessels; the
images are smoother). A global statistic (the Laplacian energy of the whole image) already sees
that, so a detector has learned something only if it knows *where* normal images carry *how much*
detail. The atlas learns that from the normal training images alone:

1. band energies: ``b_0 = x - G(s_1)``, ``b_i = G(s_i) - G(s_{i+1})`` for the Gaussian blurs
   ``G(s)`` at ``sigmas = (s_1, s_2, ...)`` (pixels; MONAI's Gaussian filter), squared;
2. averaged over regions of ``pool`` pixels per axis and log-transformed: ``e (B, bands, *grid)``;
3. per region and band, the mean and standard deviation over the normal training images;
4. an image's z-scores ``z = (e - mean) / std``; the anomaly map is ``relu(-z)^2`` (``deficit``:
   less detail than normal there), ``relu(z)^2`` (``excess``) or ``z^2`` (``both``), averaged over
   the bands and repeated back to pixels; the image score is its mean.

It has no network and trains in seconds; 2D and 3D alike.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F

from medmim.anomaly.scoring import gaussian_filter

SIDES = ("deficit", "excess", "both")
EPS = 1e-6  # added to the region energies before the log (images are scaled to about [0, 1])


def region_grid(spatial: Sequence[int], pool: int) -> tuple[int, ...]:
    return tuple(math.ceil(s / pool) for s in spatial)


def log_band_energy(x: torch.Tensor, sigmas: Sequence[float], pool: int) -> torch.Tensor:
    """``(B, C, *spatial)`` -> ``(B, len(sigmas), *grid)``: log of the regional mean band energy."""
    if not sigmas or any(b <= a for a, b in zip(sigmas, sigmas[1:])) or sigmas[0] <= 0:
        raise ValueError(f"texture sigmas must be positive and increasing, got {list(sigmas)}")
    d = x.ndim - 2
    x = x.float()
    blurs = [x] + [gaussian_filter(x, float(s)) for s in sigmas]
    bands = torch.stack([(blurs[i] - blurs[i + 1]).pow(2).mean(1) for i in range(len(sigmas))], 1)
    pool_fn = F.adaptive_avg_pool2d if d == 2 else F.adaptive_avg_pool3d
    return torch.log(pool_fn(bands, region_grid(x.shape[2:], pool)) + EPS)


class TextureAtlas:
    """Per-region, per-band mean and std of :func:`log_band_energy` over normal images."""

    def __init__(self, sigmas: Sequence[float] = (1.0, 2.0), pool: int = 2, side: str = "deficit"):
        if side not in SIDES:
            raise ValueError(f"texture side {side!r}: choose one of {', '.join(SIDES)}")
        if pool < 1:
            raise ValueError(f"texture pool must be >= 1, got {pool}")
        self.sigmas, self.pool, self.side = [float(s) for s in sigmas], int(pool), side
        self.mean: torch.Tensor | None = None
        self.std: torch.Tensor | None = None

    def _energies(self, items: Sequence[dict], batch_size: int) -> torch.Tensor:
        return torch.cat([log_band_energy(torch.stack([it["image"] for it in items[i:i + batch_size]]),
                                          self.sigmas, self.pool) for i in range(0, len(items), batch_size)])

    def fit(self, items: Sequence[dict], batch_size: int = 256) -> "TextureAtlas":
        """Learn the atlas from normal images (``{"image": (C, *spatial)}``, all the same size)."""
        if len(items) < 2:
            raise ValueError("the texture atlas needs at least 2 normal images")
        e = self._energies(items, batch_size).double()
        self.mean, self.std = e.mean(0).float(), e.std(0).clamp_min(1e-6).float()
        return self

    def maps(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, C, *spatial)`` -> anomaly maps ``(B, *spatial)``."""
        if self.mean is None:
            raise RuntimeError("TextureAtlas.maps before fit/load")
        e = log_band_energy(x, self.sigmas, self.pool)
        if e.shape[1:] != self.mean.shape:
            raise ValueError(f"images of shape {tuple(x.shape[2:])} do not fit the atlas (learned on regions "
                             f"{tuple(self.mean.shape[1:])} of {self.pool} pixels)")
        z = (e - self.mean.to(e.device)) / self.std.to(e.device)
        err = {"deficit": F.relu(-z), "excess": F.relu(z), "both": z.abs()}[self.side].pow(2).mean(1)
        up = err
        for axis in range(1, up.ndim):
            up = up.repeat_interleave(self.pool, dim=axis)
        return up[(slice(None), *[slice(0, s) for s in x.shape[2:]])]

    def score_items(self, items: Sequence[dict], batch_size: int = 256, keep_maps: bool = True) -> dict:
        """``{"texture_score": (N,), "texture": maps (N, *spatial)}`` (maps only when ``keep_maps``)."""
        scores, maps = [], []
        for i in range(0, len(items), batch_size):
            m = self.maps(torch.stack([it["image"] for it in items[i:i + batch_size]]))
            scores.append(m.flatten(1).mean(1))
            if keep_maps:
                maps.append(m)
        out = {"texture_score": torch.cat(scores)}
        if keep_maps:
            out["texture"] = torch.cat(maps)
        return out

    # ---- files ----------------------------------------------------------------------------------
    def save(self, path: str | Path) -> Path:
        from safetensors.torch import save_file

        from medmim.io import atomic_path

        path = Path(path)
        meta = {"format": "medmim-texture-atlas-v1", "sigmas": ",".join(map(str, self.sigmas)),
                "pool": str(self.pool), "side": self.side}
        with atomic_path(path) as tmp:
            save_file({"mean": self.mean.contiguous(), "std": self.std.contiguous()}, str(tmp), metadata=meta)
        return path

    @classmethod
    def load(cls, path: str | Path, side: str | None = None) -> "TextureAtlas":
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as fh:
            meta = fh.metadata() or {}
            if meta.get("format") != "medmim-texture-atlas-v1":
                raise ValueError(f"{path}: not a medmim texture atlas (format {meta.get('format')!r})")
            atlas = cls([float(s) for s in meta["sigmas"].split(",")], int(meta["pool"]), side or meta["side"])
            atlas.mean, atlas.std = fh.get_tensor("mean"), fh.get_tensor("std")
        return atlas
