"""Block-wise masking (BEiT / SimMIM style) in 2D and 3D.

Rectangular (2D) or cuboid (3D) blocks of random size and aspect ratio are hidden one after another
until the target count is reached. A block is only accepted when it does not overshoot the target
(BEiT's rule), so the mask is at most a few cells short; those are topped up with random single
cells, which gives exactly ``round(ratio * N)`` hidden cells.
"""

from __future__ import annotations

import math
import random as _pyrandom

import torch

from medmim.masking.base import MaskGenerator, check_grid, mask_from_scores, num_masked, rand


class BlockMask(MaskGenerator):
    """Hide random blocks, then top up to the exact ratio.

    Args:
        ratio: fraction of hidden cells.
        min_block: smallest block, in cells (BEiT uses 16 on a 14x14 grid; the default 4 suits the
            small grids of medical images and 3D volumes).
        max_block: largest block, in cells; ``None`` = a quarter of the grid.
        aspect: range of aspect ratios between block sides (log-uniform), e.g. ``(0.3, 1/0.3)``.
        max_attempts: tries per block before giving up and topping up with random cells.
    """

    name = "block"

    def __init__(self, ratio: float = 0.75, min_block: int = 4, max_block: int | None = None,
                 aspect: tuple[float, float] = (0.3, 1 / 0.3), max_attempts: int = 10):
        super().__init__(ratio)
        if min_block < 1:
            raise ValueError(f"min_block must be >= 1, got {min_block}")
        self.min_block = int(min_block)
        self.max_block = max_block
        self.log_aspect = (math.log(aspect[0]), math.log(aspect[1]))
        self.max_attempts = int(max_attempts)

    def _one(self, grid: tuple[int, ...], k: int, rng: _pyrandom.Random) -> torch.Tensor:
        cells = torch.zeros(grid, dtype=torch.bool)
        max_block = self.max_block or max(self.min_block, math.prod(grid) // 4)
        count = 0
        while count < k:
            remaining = k - count
            placed = False
            for _ in range(self.max_attempts):
                area = rng.uniform(min(self.min_block, remaining), min(max_block, remaining))
                # one log-aspect per axis, centred so that the product of the sides is ~area
                logs = [rng.uniform(*self.log_aspect) for _ in grid[:-1]] + [0.0]
                centre = sum(logs) / len(logs)
                sides = [min(g, max(1, round(area ** (1 / len(grid)) * math.exp(l - centre))))
                         for g, l in zip(grid, logs)]
                starts = [rng.randint(0, g - s) for g, s in zip(grid, sides)]
                region = tuple(slice(a, a + s) for a, s in zip(starts, sides))
                new = int((~cells[region]).sum())
                if 0 < new <= remaining:
                    cells[region] = True
                    count += new
                    placed = True
                    break
            if not placed:
                break
        return cells

    def __call__(self, batch_size, grid, *, generator=None, device=None):
        grid = check_grid(grid)
        k = num_masked(grid, self.ratio)
        # one draw from the torch generator seeds a Python RNG: reproducible and fast per-cell logic
        seed = int(torch.randint(0, 2**62, (1,), generator=generator,
                                 device=generator.device if generator is not None else None))
        rng = _pyrandom.Random(seed)
        blocks = torch.stack([self._one(grid, k, rng) for _ in range(batch_size)])
        # blocks first (score >= 2), then random cells (score in [0, 1)) fill any shortfall
        scores = blocks.float() * 2 + rand((batch_size, *grid), generator, None)
        mask = mask_from_scores(scores, k)
        return mask.to(device) if device is not None else mask

    def __repr__(self):
        return f"BlockMask(ratio={self.ratio}, min_block={self.min_block}, max_block={self.max_block})"
