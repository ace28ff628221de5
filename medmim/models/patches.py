"""Patch-grid helpers shared by every masked-modelling pretext (MAE, SimMIM, SparK), the
reconstruction grids and the anomaly scorer: one argument order, one convention.

* :func:`patchify` ``(B, C, *spatial) -> (B, N, p**d * C)``: cells in row-major grid order, each
  flattened as ``(p, p[, p], C)``; :func:`unpatchify` ``(patches, p, grid, channels)`` is its exact
  inverse.
* :func:`upsample_mask` ``(B, *grid) -> (B, *finer)``: each cell repeated ``factor`` times per axis.
* :func:`normalise_patches`: per-patch targets for ``norm_pix_loss``, ``(t - mean) / sqrt(var + 1e-6)``
  with the *unbiased* variance over each patch's values -- the convention of the reference
  implementations (facebookresearch/mae ``forward_loss`` and keyu-tian/SparK both call
  ``Tensor.var`` with its default ``unbiased=True``). With ``channels=C > 1`` (multi-sequence
  inputs) the statistics are taken per channel of each patch, never pooled over channels: a T1
  value and an ADC value live on different scales, and pooling would let the brightest sequence set
  every channel's target.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch

NORM_PIX_EPS = 1e-6


def patchify(x: torch.Tensor, patch_size: int) -> torch.Tensor:
    """``(B, C, *spatial)`` -> ``(B, N, p**d * C)``; the inverse of :func:`unpatchify`."""
    b, c, *spatial = x.shape
    d, p = len(spatial), int(patch_size)
    if any(s % p for s in spatial):
        raise ValueError(f"spatial shape {tuple(spatial)} is not divisible by patch size {p}")
    grid = [s // p for s in spatial]
    x = x.reshape(b, c, *[v for g in grid for v in (g, p)])
    # (B, C, g1, p, g2, p, ...) -> (B, g1, g2, ..., p, p, ..., C)
    x = x.permute(0, *[2 + 2 * i for i in range(d)], *[3 + 2 * i for i in range(d)], 1)
    return x.reshape(b, math.prod(grid), p**d * c)


def unpatchify(patches: torch.Tensor, patch_size: int, grid: Sequence[int], channels: int) -> torch.Tensor:
    """``(B, N, p**d * C)`` -> ``(B, C, *spatial)``; the exact inverse of :func:`patchify`."""
    b, d, p = patches.shape[0], len(grid), int(patch_size)
    x = patches.reshape(b, *grid, *([p] * d), channels)
    # (B, g1.., p.., C) -> (B, C, g1, p, g2, p, ...)
    order = [0, 2 * d + 1]
    for i in range(d):
        order += [1 + i, 1 + d + i]
    return x.permute(*order).reshape(b, channels, *[g * p for g in grid])


def upsample_mask(mask: torch.Tensor, factor: int) -> torch.Tensor:
    """Grid mask ``(B, *grid)`` -> ``(B, *(g * factor))``: every cell repeated ``factor`` times per axis."""
    for dim in range(1, mask.dim()):
        mask = mask.repeat_interleave(int(factor), dim=dim)
    return mask


def normalise_patches(target: torch.Tensor, channels: int = 1, eps: float = NORM_PIX_EPS
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(normalised, mean, std)`` of patches ``(..., p**d * C)`` laid out as :func:`patchify` lays
    them (channel last within a patch): ``std = sqrt(var + eps)`` with the unbiased variance (see the
    module docstring), over each patch's values of one channel. ``normalised * std + mean == target``;
    ``mean`` and ``std`` are ``(..., 1)`` for one channel and broadcast to ``target``'s shape for C."""
    channels = int(channels)
    if channels == 1:
        mean = target.mean(-1, keepdim=True)
        std = (target.var(-1, keepdim=True) + eps).sqrt()
        return (target - mean) / std, mean, std
    if target.shape[-1] % channels:
        raise ValueError(f"patch length {target.shape[-1]} is not a multiple of {channels} channels")
    per = target.reshape(*target.shape[:-1], target.shape[-1] // channels, channels)  # (..., p**d, C)
    mean = per.mean(-2, keepdim=True)
    std = (per.var(-2, keepdim=True) + eps).sqrt()
    normed = ((per - mean) / std).reshape(target.shape)
    return normed, mean.expand_as(per).reshape(target.shape), std.expand_as(per).reshape(target.shape)
