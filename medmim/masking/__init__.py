"""Mask generators over the patch grid (2D and 3D).

Every generator is a callable ``gen(batch_size, grid, *, generator=None, device=None)`` returning a
bool tensor ``(B, *grid)``, True = hidden, with exactly ``round(ratio * prod(grid))`` hidden cells
per sample, different per sample and reproducible from a ``torch.Generator``.

=============  ===========================================================================
name           strategy
=============  ===========================================================================
random         uniform random cells (MAE)
block          random rectangles / cuboids (BEiT, SimMIM), topped up to the exact count
noise_low      low-pass filtered noise, thresholded: blobs (ColorMAE "red")
noise_high     high-pass filtered noise: scattered, evenly spread cells ("blue")
noise_band     band-pass filtered noise: clusters at a characteristic spacing ("green")
loss_guided    HPM: a head predicts per-patch difficulty; hide the hardest, easy-to-hard schedule
=============  ===========================================================================
"""

from __future__ import annotations

from medmim.masking.base import MaskGenerator, mask_from_scores, num_masked, visible_indices
from medmim.masking.block import BlockMask
from medmim.masking.loss_guided import DifficultyPredictor, LossGuidedMask, difficulty_loss
from medmim.masking.noise import NoiseFilteredMask
from medmim.masking.random import RandomMask, random_mask

MASK_GENERATORS = ("random", "block", "noise_low", "noise_high", "noise_band", "loss_guided")


def build_mask_generator(name: str, ratio: float = 0.75, **kw) -> MaskGenerator:
    """Build a mask generator by name (see the table above); ``kw`` go to its constructor."""
    if name == "random":
        return RandomMask(ratio, **kw)
    if name == "block":
        return BlockMask(ratio, **kw)
    if name in ("noise_low", "noise_high", "noise_band"):
        return NoiseFilteredMask(ratio, kind=name.split("_", 1)[1], **kw)
    if name == "loss_guided":
        return LossGuidedMask(ratio, **kw)
    raise ValueError(f"unknown masking {name!r}; choose one of {', '.join(MASK_GENERATORS)}")


__all__ = [
    "MASK_GENERATORS", "BlockMask", "DifficultyPredictor", "LossGuidedMask", "MaskGenerator",
    "NoiseFilteredMask", "RandomMask", "build_mask_generator", "difficulty_loss", "mask_from_scores",
    "num_masked", "random_mask", "visible_indices",
]
