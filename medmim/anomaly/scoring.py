"""Anomaly maps from a masked-reconstruction model: covering masks, error maps, smoothing, scores.

For one image:

1. ``K`` masks over the patch grid whose union covers every patch (:func:`covering_masks`): a random
   permutation of the patches is laid on a ring, mask ``k`` hides the ``h = round(ratio * N)``
   consecutive ring positions starting at ``floor(k * N / K)``. Consecutive starts are at most
   ``ceil(N / K) <= h`` apart, so the windows leave no gap; every mask hides exactly ``h`` cells
   (the mask contract). Each patch is hidden ``floor(K*h/N)`` or ``ceil(K*h/N)`` times.
2. The model reconstructs the image under each mask (visible patches pasted back: the Pretext
   contract's ``recon``); the per-pixel error (L2, L1 or 1 - SSIM) of each reconstruction is
   averaged over the masks under which that pixel was hidden. A visible pixel never contributes:
   the model copied it.
3. The map is smoothed with a Gaussian and reduced to an image score (mean, max, or the mean of
   the top-k fraction of pixels).

Everything works on ``(B, C, *spatial)`` tensors, 2D or 3D.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F

from medmim.masking.base import check_grid, num_masked, rand
from medmim.models.patches import upsample_mask

ERRORS = ("l2", "l1", "ssim")
IMAGE_SCORES = ("mean", "max", "topk")


# ---- covering masks -----------------------------------------------------------------------------
def min_masks(grid: Sequence[int], ratio: float) -> int:
    """Smallest K for which K masks at ``ratio`` can cover the grid: ``ceil(N / h)``."""
    n, h = math.prod(grid), num_masked(grid, ratio)
    return math.ceil(n / max(h, 1))


def covering_masks(batch_size: int, grid: Sequence[int], ratio: float, num_masks: int, *,
                   generator: torch.Generator | None = None, device=None) -> torch.Tensor:
    """``(B, K, *grid)`` bool, True = hidden: K masks per sample, each hiding ``round(ratio * N)``
    cells, whose union is the whole grid (a cyclic scheme over a random permutation, see above)."""
    grid = check_grid(grid)
    n, h = math.prod(grid), num_masked(grid, ratio)
    if h < 1:
        raise ValueError(f"mask ratio {ratio} hides no patch of a {grid} grid")
    if num_masks * h < n:
        raise ValueError(f"{num_masks} masks hiding {h} of {n} patches each cannot cover the grid; "
                         f"use num_masks >= {min_masks(grid, ratio)} or a higher mask ratio")
    perm = rand((batch_size, n), generator, None).argsort(dim=1)  # (B, N) random order of patches
    starts = torch.tensor([(k * n) // num_masks for k in range(num_masks)])
    ring = (starts[:, None] + torch.arange(h)[None, :]) % n  # (K, h) ring positions hidden by mask k
    cells = perm[:, ring]  # (B, K, h) patch indices
    masks = torch.zeros(batch_size, num_masks, n, dtype=torch.bool)
    masks.scatter_(2, cells, True)
    masks = masks.reshape(batch_size, num_masks, *grid)
    return masks.to(device) if device is not None else masks


# ---- Gaussian filtering and SSIM (MONAI's) ------------------------------------------------------
def _pad_mode(x: torch.Tensor, radius: int) -> str:
    """Reflect padding, or edge replication where an axis is too short to reflect ``radius``."""
    return "reflect" if min(x.shape[2:]) > radius else "replicate"


def gaussian_kernel1d(sigma: float, truncate: float = 3.5, dtype=torch.float32) -> torch.Tensor:
    """The sampled, normalised Gaussian of radius ``int(truncate * sigma + 0.5)`` (MONAI's gaussian_1d)."""
    from monai.networks.layers.convutils import gaussian_1d

    return gaussian_1d(torch.tensor(float(sigma)), truncated=truncate, approx="sampled", normalize=True).to(dtype)


def gaussian_filter(x: torch.Tensor, sigma: float, truncate: float = 3.5) -> torch.Tensor:
    """Separable Gaussian blur of ``(B, C, *spatial)`` (2D or 3D), reflect-padded: same size out
    (MONAI's ``separable_filtering``; scipy's ``gaussian_filter(mode="mirror", truncate=3.5)``)."""
    if sigma <= 0:
        return x
    from monai.networks.layers import separable_filtering

    k = gaussian_kernel1d(sigma, truncate, x.dtype).to(x.device)
    return separable_filtering(x, k, mode=_pad_mode(x, k.numel() // 2))


def ssim_map(x: torch.Tensor, y: torch.Tensor, sigma: float = 1.5, data_range: float = 1.0,
             k1: float = 0.01, k2: float = 0.03) -> torch.Tensor:
    """Per-pixel SSIM (Wang et al. 2004) with a Gaussian window, ``(B, C, *spatial)`` -> same shape.

    MONAI's ``compute_ssim_and_cs`` (Gaussian-weighted local means, variances and covariance, as
    ``skimage.metrics.structural_similarity(..., gaussian_weights=True)``) on inputs reflect-padded
    by the window radius ``int(3.5 sigma + 0.5)``, so the map has the image's size.
    """
    from monai.metrics.regression import compute_ssim_and_cs

    d = x.ndim - 2
    r = max(1, int(3.5 * sigma + 0.5))
    mode = _pad_mode(x, r)
    x, y = (F.pad(t.float(), [r, r] * d, mode=mode) for t in (x, y))
    ssim, _ = compute_ssim_and_cs(x, y, spatial_dims=d, kernel_size=[2 * r + 1] * d, kernel_sigma=[float(sigma)] * d,
                                  data_range=data_range, k1=k1, k2=k2)
    return ssim


def error_map(x: torch.Tensor, recon: torch.Tensor, kind: str = "l2", *, ssim_sigma: float = 1.5,
              data_range: float = 1.0) -> torch.Tensor:
    """Per-pixel reconstruction error ``(B, *spatial)`` (channel mean)."""
    if kind == "l2":
        e = (x.float() - recon.float()) ** 2
    elif kind == "l1":
        e = (x.float() - recon.float()).abs()
    elif kind == "ssim":
        e = 1.0 - ssim_map(x, recon, ssim_sigma, data_range)
    else:
        raise ValueError(f"unknown error {kind!r}; choose one of {', '.join(ERRORS)}")
    return e.mean(1)


def image_scores(maps: torch.Tensor, how: str = "mean", topk_fraction: float = 0.05) -> torch.Tensor:
    """``(B, *spatial)`` maps -> ``(B,)`` scores: mean, max, or mean of the top ``topk_fraction``."""
    flat = maps.reshape(maps.shape[0], -1)
    if how == "mean":
        return flat.mean(1)
    if how == "max":
        return flat.amax(1)
    if how == "topk":
        k = max(1, int(round(topk_fraction * flat.shape[1])))
        return flat.topk(k, dim=1).values.mean(1)
    raise ValueError(f"unknown image score {how!r}; choose one of {', '.join(IMAGE_SCORES)}")


# ---- the scorer ---------------------------------------------------------------------------------
@dataclass
class ScoreSettings:
    num_masks: int = 4
    mask_ratio: float = 0.75
    error: str = "ssim"
    ssim_sigma: float = 1.5
    data_range: float = 1.0
    smooth_sigma: float = 1.0
    image_score: str = "mean"
    topk_fraction: float = 0.05
    seed: int = 0

    @classmethod
    def from_config(cls, cfg) -> "ScoreSettings":
        a = cfg.anomaly
        return cls(num_masks=a.num_masks, mask_ratio=a.mask_ratio or cfg.pretrain.mask_ratio,
                   error=a.error, ssim_sigma=a.ssim_sigma, data_range=a.ssim_data_range,
                   smooth_sigma=a.smooth_sigma, image_score=a.image_score,
                   topk_fraction=a.topk_fraction, seed=cfg.run.seed)


def patch_size_of(model) -> int:
    enc = model.encoder
    return int(getattr(model, "patch_size", None) or enc.downsample_ratio)


def grid_of(model, x: torch.Tensor) -> tuple[int, ...]:
    p = patch_size_of(model)
    if any(s % p for s in x.shape[2:]):
        raise ValueError(f"image shape {tuple(x.shape[2:])} is not divisible by the patch size {p}")
    return tuple(s // p for s in x.shape[2:])


@torch.no_grad()
def reconstruct(model, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The model's reconstruction of ``x`` under ``mask`` with the visible patches pasted back."""
    return model(x, mask=mask)["recon"].float()


@torch.no_grad()
def anomaly_maps(model, x: torch.Tensor, settings: ScoreSettings, *, generator: torch.Generator | None = None,
                 errors: Sequence[str] | None = None) -> dict[str, torch.Tensor]:
    """Smoothed anomaly maps ``(B, *spatial)`` for ``x`` ``(B, C, *spatial)``, one per error kind.

    ``errors`` defaults to ``(settings.error,)``; asking for several costs the reconstructions once.
    Also returns ``"hidden_count"`` (how often each pixel was hidden) and ``"recon"`` (the mean of
    the K reconstructions at hidden pixels).
    """
    errors = tuple(errors or (settings.error,))
    b, k = x.shape[0], settings.num_masks
    grid = grid_of(model, x)
    p = patch_size_of(model)
    masks = covering_masks(b, grid, settings.mask_ratio, k, generator=generator, device=x.device)
    xs = x.unsqueeze(1).expand(b, k, *x.shape[1:]).reshape(b * k, *x.shape[1:])
    recon = reconstruct(model, xs, masks.reshape(b * k, *grid))
    hidden = upsample_mask(masks.reshape(b * k, *grid), p).float()  # (B*K, *spatial)
    count = hidden.reshape(b, k, *x.shape[2:]).sum(1)  # >= 1 everywhere by construction
    out: dict[str, torch.Tensor] = {"hidden_count": count}
    for kind in errors:
        err = error_map(xs, recon, kind, ssim_sigma=settings.ssim_sigma, data_range=settings.data_range)
        m = (err * hidden).reshape(b, k, *x.shape[2:]).sum(1) / count.clamp_min(1)
        out[kind] = gaussian_filter(m.unsqueeze(1), settings.smooth_sigma).squeeze(1)
    rc = (recon * hidden.unsqueeze(1)).reshape(b, k, *x.shape[1:]).sum(1) / count.unsqueeze(1).clamp_min(1)
    out["recon"] = rc
    return out


@torch.no_grad()
def score_items(model, items: list[dict], settings: ScoreSettings, *, batch_size: int = 64,
                device: torch.device | str = "cpu", errors: Sequence[str] | None = None,
                keep_maps: bool = True) -> dict[str, torch.Tensor]:
    """Maps and image scores for a list of materialised items (``{"image": (C, *spatial)}``).

    Returns ``{"<error>": maps (N, *spatial), "<error>_score": (N,), "recon": (N, C, *spatial)}``
    (maps and recon only when ``keep_maps``). Masks are drawn from one generator seeded with
    ``settings.seed``: the same items give the same numbers.
    """
    errors = tuple(errors or (settings.error,))
    model.eval()
    gen = torch.Generator().manual_seed(settings.seed)
    parts: dict[str, list[torch.Tensor]] = {}
    for start in range(0, len(items), batch_size):
        x = torch.stack([it["image"] for it in items[start:start + batch_size]]).float().to(device)
        out = anomaly_maps(model, x, settings, generator=gen, errors=errors)
        for kind in errors:
            parts.setdefault(f"{kind}_score", []).append(
                image_scores(out[kind], settings.image_score, settings.topk_fraction).cpu())
            if keep_maps:
                parts.setdefault(kind, []).append(out[kind].cpu())
        if keep_maps:
            parts.setdefault("recon", []).append(out["recon"].cpu())
    return {k: torch.cat(v) for k, v in parts.items()}
