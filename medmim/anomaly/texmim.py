"""Masked texture modelling: predict how much fine detail a hidden region should carry.

The texture atlas (``texture.py``) knows how much detail normal images carry at each place on
average. This model learns it *for this image*: from normal images only, a small network sees the
image with some cells hidden and predicts the detail energy of the hidden cells from what is
around them. Where an image carries less detail than predicted, it is anomalous.

1. Targets: the atlas's log band energies ``e = log_band_energy(x, sigmas, pool)``
   ``(B, bands, *grid)``, standardised with their mean and std over the normal training images.
2. Input: the image blurred with a Gaussian of ``input_sigma`` pixels, so the detail the model must
   predict is not in its input (only the anatomy's coarse layout is), with a random share
   ``mask_ratio`` of ``cell``-pixel cells set to 0, and a second channel marking them.
3. Network (:class:`TextureNet`): convolutions at full resolution, then dilated ones on the region
   grid; the loss is the squared error of the standardised energies on hidden regions only (MIM).
4. Scoring: ``num_masks`` covering masks (``scoring.covering_masks``; more where the mask ratio
   needs them) hide every cell at least once;
   each region's prediction is the mean over the masks that hid it. The residual ``r = e - e_hat``
   gets a per-region centre and scale over the normal training images (``texture.centre_and_scale``,
   mean / std or median / MAD); the region map is ``relu(-z)^2`` averaged over bands (less detail
   than predicted), the image score the mean of its ``top`` share of regions (``texture.top_mean``).

2D and 3D; trains in about half a minute on 1200 PneumoniaMNIST images on one CPU core.
``epochs=0`` keeps the network at its random initialisation and learns only the residual statistics:
the sanity baseline "the same model untrained". (On PneumoniaMNIST it ranks images exactly as the
atlas does: an untrained network's prediction hardly varies between images.)
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from medmim.anomaly.scoring import covering_masks, gaussian_filter, min_masks
from medmim.anomaly.texture import (STATS, RegionDetector, centre_and_scale, log_band_energy, region_grid,
                                    regions_to_pixels)

FORMAT = "medmim-texture-mim-v1"


class TextureNet(nn.Module):
    """Blurred, masked image + mask channel ``(B, 2, *spatial)`` -> standardised band energies on the
    region grid ``(B, bands, *grid)``: two convolutions at full resolution, average pooling onto the
    region grid, three dilated convolutions there (a receptive field of about 15 regions), a 1x1 head."""

    def __init__(self, spatial_dims: int, bands: int, width: int = 32):
        super().__init__()
        conv = nn.Conv2d if spatial_dims == 2 else nn.Conv3d
        self.pixels = nn.Sequential(conv(2, width, 3, padding=1), nn.GELU(),
                                    conv(width, width, 3, padding=2, dilation=2), nn.GELU())
        self.regions = nn.Sequential(conv(width, width, 3, padding=2, dilation=2), nn.GELU(),
                                     conv(width, width, 3, padding=4, dilation=4), nn.GELU(),
                                     conv(width, width, 3, padding=1), nn.GELU(), conv(width, bands, 1))
        self.spatial_dims = spatial_dims

    def forward(self, x: torch.Tensor, grid: Sequence[int]) -> torch.Tensor:
        pool = F.adaptive_avg_pool2d if self.spatial_dims == 2 else F.adaptive_avg_pool3d
        return self.regions(pool(self.pixels(x), tuple(grid)))


class TextureMIM(RegionDetector):
    """Train on normal images (:meth:`fit`), then :meth:`score_items` / :meth:`maps` like the atlas."""

    name = "texmim"

    def __init__(self, sigmas: Sequence[float] = (1.0, 2.0), pool: int = 2, *, input_sigma: float = 2.0,
                 mask_ratio: float = 0.5, cell: int = 4, num_masks: int = 4, width: int = 32, epochs: int = 30,
                 batch_size: int = 64, lr: float = 2e-3, stats: str = "median_mad", top: float = 1.0, seed: int = 0):
        if stats not in STATS:
            raise ValueError(f"texture stats {stats!r}: choose one of {', '.join(STATS)}")
        if not 0 < mask_ratio < 1:
            raise ValueError(f"texmim mask ratio must be in (0, 1), got {mask_ratio}")
        if cell < 1 or cell % pool:
            raise ValueError(f"texmim cell ({cell} px) must be a positive multiple of the region size ({pool} px)")
        if not 0 < top <= 1:
            raise ValueError(f"texture top must be in (0, 1], got {top}")
        self.sigmas, self.pool, self.input_sigma = [float(s) for s in sigmas], int(pool), float(input_sigma)
        self.mask_ratio, self.cell, self.num_masks, self.width = float(mask_ratio), int(cell), int(num_masks), int(width)
        self.epochs, self.batch_size, self.lr, self.stats, self.top, self.seed = \
            int(epochs), int(batch_size), float(lr), stats, float(top), int(seed)
        self.net: TextureNet | None = None
        self.buffers: dict[str, torch.Tensor] = {}  # e_mean, e_std (scalars); r_centre, r_scale (per region)

    # ---- pieces ---------------------------------------------------------------------------------
    def _blur(self, x: torch.Tensor) -> torch.Tensor:
        """The network's view of an image: its channel mean blurred at ``input_sigma``."""
        return gaussian_filter(x.float().mean(1, keepdim=True), self.input_sigma)

    def _inputs(self, blurred: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
        """The blurred image with the hidden cells zeroed, plus the mask channel."""
        m = regions_to_pixels(hidden.float(), self.cell, blurred.shape[2:]).unsqueeze(1)
        return torch.cat([blurred * (1 - m), m], 1)

    def _region_mask(self, hidden: torch.Tensor, spatial: Sequence[int]) -> torch.Tensor:
        """Cell mask ``(B, *cells)`` -> region mask ``(B, 1, *regions)``."""
        return regions_to_pixels(hidden.float(), self.cell // self.pool, region_grid(spatial, self.pool)).unsqueeze(1)

    def _energies(self, x: torch.Tensor) -> torch.Tensor:
        return log_band_energy(x, self.sigmas, self.pool)

    @torch.no_grad()
    def residuals(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, C, *spatial)`` -> actual minus predicted log band energy ``(B, bands, *regions)``."""
        if self.net is None:
            raise RuntimeError("TextureMIM used before fit/load")
        self.net.eval()
        spatial = x.shape[2:]
        e = self._energies(x)
        grid = region_grid(spatial, self.cell)
        blurred = self._blur(x)  # the same for every mask
        k_masks = max(self.num_masks, min_masks(grid, self.mask_ratio))  # enough masks to hide every cell
        masks = covering_masks(x.shape[0], grid, self.mask_ratio, k_masks,
                               generator=torch.Generator().manual_seed(self.seed))
        pred = torch.zeros_like(e)
        count = torch.zeros(x.shape[0], 1, *e.shape[2:])
        for k in range(k_masks):
            h = self._region_mask(masks[:, k], spatial)
            out = self.net(self._inputs(blurred, masks[:, k]), e.shape[2:])
            pred += (out * self.buffers["e_std"] + self.buffers["e_mean"]) * h
            count += h
        return e - pred / count.clamp_min(1)

    # ---- training -------------------------------------------------------------------------------
    def fit(self, items: Sequence[dict], log=None) -> "TextureMIM":
        """Train on normal images (``{"image": (C, *spatial)}``, all the same size), then learn the
        residuals' per-region centre and scale on the same images."""
        if len(items) < 2:
            raise ValueError("masked texture modelling needs at least 2 normal images")
        x = torch.stack([it["image"] for it in items]).float()
        spatial, d = x.shape[2:], x.ndim - 2
        e = self._energies(x)
        self.buffers = {"e_mean": e.mean(), "e_std": e.std().clamp_min(1e-6)}
        target = (e - self.buffers["e_mean"]) / self.buffers["e_std"]
        gen = torch.Generator().manual_seed(self.seed)
        torch.manual_seed(self.seed)
        self.net = TextureNet(d, len(self.sigmas), self.width)
        opt = torch.optim.AdamW(self.net.parameters(), lr=self.lr, weight_decay=1e-4)
        grid = region_grid(spatial, self.cell)
        n_cells, n_hidden = math.prod(grid), max(1, round(self.mask_ratio * math.prod(grid)))
        self.net.train()
        for epoch in range(self.epochs):
            order = torch.randperm(len(x), generator=gen)
            total = 0.0
            for i in range(0, len(x), self.batch_size):
                b = order[i:i + self.batch_size]
                hidden = (torch.rand(len(b), n_cells, generator=gen).argsort(1) < n_hidden).reshape(len(b), *grid)
                h = self._region_mask(hidden, spatial)
                pred = self.net(self._inputs(self._blur(x[b]), hidden), e.shape[2:])
                loss = ((pred - target[b]) ** 2 * h).sum() / (h.sum() * e.shape[1]).clamp_min(1)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                total += loss.item() * len(b)
            if log is not None and (epoch + 1) % 10 == 0:
                log(f"[anomaly] masked texture model: epoch {epoch + 1}/{self.epochs}, loss {total / len(x):.4f}")
        r = torch.cat([self.residuals(x[i:i + 256]) for i in range(0, len(x), 256)])
        centre, scale = centre_and_scale(r.double(), self.stats)
        self.buffers.update(r_centre=centre.float(), r_scale=scale.clamp_min(1e-6).float())
        return self

    # ---- scoring --------------------------------------------------------------------------------
    def region_maps(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, C, *spatial)`` -> ``(B, *regions)``: squared one-sided deficit, averaged over bands."""
        r = self.residuals(x)
        if r.shape[1:] != self.buffers["r_centre"].shape:
            raise ValueError(f"images of shape {tuple(x.shape[2:])} do not fit the masked texture model "
                             f"(learned on regions {tuple(self.buffers['r_centre'].shape[1:])} of {self.pool} pixels)")
        z = (r - self.buffers["r_centre"]) / self.buffers["r_scale"]
        return F.relu(-z).pow(2).mean(1)


    # ---- files ----------------------------------------------------------------------------------
    def settings(self) -> dict:
        return {"sigmas": self.sigmas, "pool": self.pool, "input_sigma": self.input_sigma,
                "mask_ratio": self.mask_ratio, "cell": self.cell, "num_masks": self.num_masks, "width": self.width,
                "epochs": self.epochs, "batch_size": self.batch_size, "lr": self.lr, "stats": self.stats,
                "seed": self.seed}

    def save(self, path: str | Path) -> Path:
        import json

        from safetensors.torch import save_file

        from medmim.io import atomic_path

        path = Path(path)
        tensors = {f"net.{k}": v.detach().contiguous() for k, v in self.net.state_dict().items()}
        tensors.update({f"buf.{k}": v.contiguous() for k, v in self.buffers.items()})
        meta = {"format": FORMAT, "settings": json.dumps(self.settings()),
                "spatial_dims": str(self.net.spatial_dims)}
        with atomic_path(path) as tmp:
            save_file(tensors, str(tmp), metadata=meta)
        return path

    @classmethod
    def load(cls, path: str | Path, top: float = 1.0) -> "TextureMIM":
        import json

        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as fh:
            meta = fh.metadata() or {}
            if meta.get("format") != FORMAT:
                raise ValueError(f"{path}: not a medmim masked texture model (format {meta.get('format')!r})")
            s = json.loads(meta["settings"])
            model = cls(s.pop("sigmas"), s.pop("pool"), top=top, **s)
            tensors = {k: fh.get_tensor(k) for k in fh.keys()}
        model.net = TextureNet(int(meta["spatial_dims"]), len(model.sigmas), model.width)
        model.net.load_state_dict({k[4:]: v for k, v in tensors.items() if k.startswith("net.")})
        model.buffers = {k[4:]: v for k, v in tensors.items() if k.startswith("buf.")}
        return model
