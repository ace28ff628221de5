"""A learned atlas of normal texture: where normal images carry how much fine detail.

Some anomalies remove detail rather than add it (pneumonia's opacities hide ribs and vessels; the
images are smoother). A global statistic (the Laplacian energy of the whole image) already sees
that, so a detector has learned something only if it knows *where* normal images carry *how much*
detail. The atlas learns that from the normal training images alone:

1. band energies: ``b_0 = x - G(s_1)``, ``b_i = G(s_i) - G(s_{i+1})`` for the Gaussian blurs
   ``G(s)`` at ``sigmas = (s_1, s_2, ...)`` (pixels; MONAI's Gaussian filter), squared;
2. averaged over regions of ``pool`` pixels per axis and log-transformed: ``e (B, bands, *grid)``;
3. per region and band, a centre and a scale over the normal training images: the mean and the
   standard deviation (``stats="mean_std"``) or the median and the normal-consistent median
   absolute deviation, ``1.4826 * median|e - median|`` (``stats="median_mad"``: a few unusual
   normal images, e.g. one with a wire or a marker, do not widen the scale);
4. an image's z-scores ``z = (e - centre) / scale``; the region map is ``relu(-z)^2`` (``deficit``:
   less detail than normal there), ``relu(z)^2`` (``excess``) or ``z^2`` (``both``), averaged over
   the bands; the anomaly map repeats it back to pixels;
5. the image score is the mean of the ``top`` share of the regions with the highest map (``top=1``:
   the mean of all; ``0.25``: the worst quarter, so a deficit confined to one lung is not diluted).

It has no network and trains in seconds; 2D and 3D alike.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F

from medmim.anomaly.scoring import gaussian_filter
from medmim.models.patches import upsample_mask

SIDES = ("deficit", "excess", "both")
STATS = ("mean_std", "median_mad")
MAD_TO_STD = 1.482602218505602  # 1 / Phi^-1(3/4): the MAD of a normal distribution times this = its std
EPS = 1e-6  # added to the region energies before the log (images are scaled to about [0, 1])


def median(e: torch.Tensor) -> torch.Tensor:
    """Median over dim 0, the mean of the two middle values for an even count (as ``numpy.median``)."""
    s = e.sort(0).values
    n = s.shape[0]
    return (s[(n - 1) // 2] + s[n // 2]) / 2


def centre_and_scale(e: torch.Tensor, stats: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-element centre and scale over dim 0: mean / std, or median / (1.4826 * MAD)."""
    if stats == "mean_std":
        return e.mean(0), e.std(0)
    if stats == "median_mad":
        c = median(e)
        return c, MAD_TO_STD * median((e - c).abs())
    raise ValueError(f"texture stats {stats!r}: choose one of {', '.join(STATS)}")


def top_mean(values: torch.Tensor, top: float) -> torch.Tensor:
    """``(B, M)`` -> ``(B,)``: the mean of the ``ceil(top * M)`` largest values of each row."""
    k = max(1, math.ceil(top * values.shape[1] - 1e-9))
    return values.mean(1) if k >= values.shape[1] else values.topk(k, dim=1).values.mean(1)


def regions_to_pixels(regions: torch.Tensor, pool: int, spatial: Sequence[int]) -> torch.Tensor:
    """Region maps ``(B, *grid)`` -> pixel maps ``(B, *spatial)``: each region's value repeated over
    its ``pool`` pixels per axis, cropped to ``spatial``."""
    return upsample_mask(regions, pool)[(slice(None), *[slice(0, s) for s in spatial])]


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


class RegionDetector:
    """What the region-based detectors share: ``region_maps(x)`` (subclasses) scores regions of
    ``pool`` pixels; the image score is the mean of the worst ``top`` share of regions; maps are the
    region scores spread back over their pixels. ``name`` keys the outputs ("texture", "texmim")."""

    name = "region"
    pool: int
    top: float

    def region_maps(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def to_pixels(self, regions: torch.Tensor, spatial: Sequence[int]) -> torch.Tensor:
        return regions_to_pixels(regions, self.pool, spatial)

    def maps(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, C, *spatial)`` -> anomaly maps ``(B, *spatial)``."""
        return self.to_pixels(self.region_maps(x), x.shape[2:])

    def score_items(self, items: Sequence[dict], batch_size: int = 256, keep_maps: bool = True) -> dict:
        """``{"<name>_score": (N,), "<name>": maps (N, *spatial)}`` (maps only when ``keep_maps``)."""
        scores, maps = [], []
        for i in range(0, len(items), batch_size):
            x = torch.stack([it["image"] for it in items[i:i + batch_size]]).float()
            r = self.region_maps(x)
            scores.append(top_mean(r.flatten(1), self.top))
            if keep_maps:
                maps.append(self.to_pixels(r, x.shape[2:]))
        out = {f"{self.name}_score": torch.cat(scores)}
        if keep_maps:
            out[self.name] = torch.cat(maps)
        return out


class TextureAtlas(RegionDetector):
    """Per-region, per-band centre and scale of :func:`log_band_energy` over normal images."""

    name = "texture"

    def __init__(self, sigmas: Sequence[float] = (1.0, 2.0), pool: int = 2, side: str = "deficit",
                 stats: str = "mean_std", top: float = 1.0):
        if side not in SIDES:
            raise ValueError(f"texture side {side!r}: choose one of {', '.join(SIDES)}")
        if stats not in STATS:
            raise ValueError(f"texture stats {stats!r}: choose one of {', '.join(STATS)}")
        if pool < 1:
            raise ValueError(f"texture pool must be >= 1, got {pool}")
        if not 0 < top <= 1:
            raise ValueError(f"texture top must be in (0, 1], got {top}")
        self.sigmas, self.pool, self.side = [float(s) for s in sigmas], int(pool), side
        self.stats, self.top = stats, float(top)
        self.mean: torch.Tensor | None = None
        self.std: torch.Tensor | None = None

    def _energies(self, items: Sequence[dict], batch_size: int) -> torch.Tensor:
        return torch.cat([log_band_energy(torch.stack([it["image"] for it in items[i:i + batch_size]]),
                                          self.sigmas, self.pool) for i in range(0, len(items), batch_size)])

    def fit(self, items: Sequence[dict], batch_size: int = 256) -> "TextureAtlas":
        """Learn the atlas from normal images (``{"image": (C, *spatial)}``, all the same size)."""
        if len(items) < 2:
            raise ValueError("the texture atlas needs at least 2 normal images")
        centre, scale = centre_and_scale(self._energies(items, batch_size).double(), self.stats)
        # ``mean`` / ``std`` hold the centre and scale whichever statistics learned them
        self.mean, self.std = centre.float(), scale.clamp_min(1e-6).float()
        return self

    def region_maps(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, C, *spatial)`` -> per-region anomaly maps ``(B, *grid)`` (averaged over bands)."""
        if self.mean is None:
            raise RuntimeError("TextureAtlas.maps before fit/load")
        e = log_band_energy(x, self.sigmas, self.pool)
        if e.shape[1:] != self.mean.shape:
            raise ValueError(f"images of shape {tuple(x.shape[2:])} do not fit the atlas (learned on regions "
                             f"{tuple(self.mean.shape[1:])} of {self.pool} pixels)")
        z = (e - self.mean.to(e.device)) / self.std.to(e.device)
        return {"deficit": F.relu(-z), "excess": F.relu(z), "both": z.abs()}[self.side].pow(2).mean(1)


    # ---- files ----------------------------------------------------------------------------------
    def save(self, path: str | Path) -> Path:
        from safetensors.torch import save_file

        from medmim.io import atomic_path

        path = Path(path)
        meta = {"format": "medmim-texture-atlas-v1", "sigmas": ",".join(map(str, self.sigmas)),
                "pool": str(self.pool), "side": self.side, "stats": self.stats, "top": str(self.top)}
        with atomic_path(path) as tmp:
            save_file({"mean": self.mean.contiguous(), "std": self.std.contiguous()}, str(tmp), metadata=meta)
        return path

    @classmethod
    def load(cls, path: str | Path, side: str | None = None, top: float | None = None) -> "TextureAtlas":
        """Read an atlas; ``side`` and ``top`` (score-time choices) may differ from the saved ones.
        Files written before ``stats`` / ``top`` existed hold mean / std and scored the mean."""
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as fh:
            meta = fh.metadata() or {}
            if meta.get("format") != "medmim-texture-atlas-v1":
                raise ValueError(f"{path}: not a medmim texture atlas (format {meta.get('format')!r})")
            atlas = cls([float(s) for s in meta["sigmas"].split(",")], int(meta["pool"]), side or meta["side"],
                        meta.get("stats", "mean_std"), top if top is not None else float(meta.get("top", 1.0)))
            atlas.mean, atlas.std = fh.get_tensor("mean"), fh.get_tensor("std")
        return atlas
