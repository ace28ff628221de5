"""Shared pieces of every mask generator: ratio checks, exact top-k selection, noise on a generator.

The mask contract (docs/contracts.md): a ``torch.bool`` tensor of shape ``(B, *grid)`` over the patch
grid, ``True`` = hidden, with exactly ``round(ratio * prod(grid))`` hidden cells in every sample.
Every generator here builds a real-valued *score* per cell and hides the ``k`` highest scores, which
makes the count exact by construction whatever the scores look like.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch

Grid = Sequence[int]


def num_masked(grid: Grid, ratio: float) -> int:
    """Number of hidden cells for a grid: ``round(ratio * prod(grid))`` (Python rounding)."""
    return int(round(ratio * math.prod(grid)))


def check_ratio(ratio: float) -> float:
    ratio = float(ratio)
    if not 0.0 < ratio < 1.0:
        raise ValueError(f"mask ratio must be in (0, 1), got {ratio}")
    return ratio


def check_grid(grid: Grid) -> tuple[int, ...]:
    grid = tuple(int(g) for g in grid)
    if len(grid) not in (2, 3) or min(grid) < 1:
        raise ValueError(f"grid must be 2 or 3 positive sizes, got {grid}")
    return grid


def rand(shape: Sequence[int], generator: torch.Generator | None, device=None,
         normal: bool = False) -> torch.Tensor:
    """Uniform (or standard normal) noise drawn on the generator's device, then moved to ``device``.

    Drawing on the generator's own device keeps masks reproducible for a given seed whatever
    device the model runs on.
    """
    draw_device = generator.device if generator is not None else device
    fn = torch.randn if normal else torch.rand
    out = fn(tuple(shape), generator=generator, device=draw_device)
    return out.to(device) if device is not None else out


def mask_from_scores(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Hide the ``k`` highest-scoring cells of each sample.

    ``scores`` has shape ``(B, *grid)``; the result is a bool tensor of the same shape with exactly
    ``k`` True per sample (ties are broken by ``topk``'s order, so add noise to scores that tie).
    """
    flat = scores.reshape(scores.shape[0], -1)
    idx = flat.topk(k, dim=1).indices
    mask = torch.zeros_like(flat, dtype=torch.bool)
    mask.scatter_(1, idx, True)
    return mask.reshape(scores.shape)


def visible_indices(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Flat indices of the visible and hidden cells, each ascending, as ``(ids_keep, ids_hidden)``.

    Every sample must hide the same number of cells (the mask contract guarantees it), so the
    indices form rectangular ``(B, N_visible)`` and ``(B, N_hidden)`` tensors.
    """
    flat = mask.reshape(mask.shape[0], -1)
    counts = flat.sum(1)
    if counts.numel() and bool((counts != counts[0]).any()):
        raise ValueError(f"every sample must hide the same number of patches, got {counts.tolist()}")
    n_hidden = int(counts[0]) if counts.numel() else 0
    # stable sort of 0 (visible) before 1 (hidden) keeps each group in ascending index order
    order = torch.argsort(flat.to(torch.uint8), dim=1, stable=True)
    n_keep = flat.shape[1] - n_hidden
    return order[:, :n_keep], order[:, n_keep:]


class MaskGenerator:
    """Base class: ``gen(batch_size, grid, *, generator=None, device=None) -> (B, *grid) bool``."""

    name = "base"

    def __init__(self, ratio: float = 0.75):
        self.ratio = check_ratio(ratio)

    def scores(self, batch_size: int, grid: tuple[int, ...], generator, device) -> torch.Tensor:
        raise NotImplementedError

    def __call__(self, batch_size: int, grid: Grid, *, generator: torch.Generator | None = None,
                 device=None) -> torch.Tensor:
        grid = check_grid(grid)
        k = num_masked(grid, self.ratio)
        return mask_from_scores(self.scores(batch_size, grid, generator, device), k)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(ratio={self.ratio})"
