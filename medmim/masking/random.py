"""Uniform random masking (MAE): per-sample argsort of uniform noise."""

from __future__ import annotations

import torch

from medmim.masking.base import Grid, MaskGenerator, check_grid, check_ratio, rand


class RandomMask(MaskGenerator):
    """Hide a uniformly random subset of exactly ``round(ratio * N)`` cells per sample."""

    name = "random"

    def scores(self, batch_size, grid, generator, device):
        return rand((batch_size, *grid), generator, device)


def random_mask(batch_size: int, grid: Grid, ratio: float, generator: torch.Generator | None = None,
                device=None) -> torch.Tensor:
    """Functional form of :class:`RandomMask`: ``(B, *grid)`` bool, True = hidden."""
    return RandomMask(check_ratio(ratio))(batch_size, check_grid(grid), generator=generator,
                                          device=device)
