"""Mask generators: exact ratio, per-sample variety, seeding, and the shape each strategy promises."""

from __future__ import annotations

import math

import pytest
import torch

from medmim.masking import (MASK_GENERATORS, BlockMask, LossGuidedMask, NoiseFilteredMask,
                            build_mask_generator, mask_from_scores, num_masked, random_mask,
                            visible_indices)

GRIDS = [(14, 14), (7, 9), (6, 6, 6), (4, 5, 6)]


def seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def neighbour_agreement(mask: torch.Tensor) -> float:
    """Mean fraction of axis-neighbour pairs with the same state (1 = one blob, ~0.5 = random-ish)."""
    same, total = 0.0, 0
    for axis in range(1, mask.ndim):
        a = mask.narrow(axis, 0, mask.shape[axis] - 1)
        b = mask.narrow(axis, 1, mask.shape[axis] - 1)
        same += float((a == b).sum())
        total += a.numel()
    return same / total


@pytest.mark.parametrize("name", MASK_GENERATORS)
@pytest.mark.parametrize("grid", GRIDS)
def test_contract_exact_count_and_variety(name, grid):
    gen = build_mask_generator(name, 0.75)
    mask = gen(8, grid, generator=seeded(0))
    assert mask.dtype == torch.bool and tuple(mask.shape) == (8, *grid)
    k = round(0.75 * math.prod(grid))
    assert mask.reshape(8, -1).sum(1).tolist() == [k] * 8
    assert len({tuple(m.flatten().tolist()) for m in mask}) == 8, "masks must differ per sample"


@pytest.mark.parametrize("name", MASK_GENERATORS)
@pytest.mark.parametrize("ratio", [0.1, 0.5, 0.6, 0.9])
def test_every_ratio_is_exact(name, ratio):
    gen = build_mask_generator(name, ratio)
    for grid in [(14, 14), (6, 6, 6)]:
        mask = gen(4, grid, generator=seeded(1))
        assert (mask.reshape(4, -1).sum(1) == round(ratio * math.prod(grid))).all()


@pytest.mark.parametrize("name", MASK_GENERATORS)
def test_reproducible_by_seed(name):
    gen = build_mask_generator(name, 0.6)
    for grid in [(8, 8), (4, 4, 4)]:
        a = gen(4, grid, generator=seeded(123))
        b = gen(4, grid, generator=seeded(123))
        c = gen(4, grid, generator=seeded(124))
        assert torch.equal(a, b)
        assert not torch.equal(a, c)


def test_random_mask_function_and_device():
    m = random_mask(3, (4, 4, 4), 0.75, generator=seeded(0), device="cpu")
    assert m.device.type == "cpu" and m.reshape(3, -1).sum(1).tolist() == [48] * 3
    assert torch.equal(m, random_mask(3, (4, 4, 4), 0.75, generator=seeded(0)))


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError):
        build_mask_generator("random", 1.0)
    with pytest.raises(ValueError):
        build_mask_generator("random", 0.0)
    with pytest.raises(ValueError, match="unknown masking"):
        build_mask_generator("checkerboard", 0.5)
    with pytest.raises(ValueError):
        NoiseFilteredMask(0.5, kind="pink")
    with pytest.raises(ValueError):
        build_mask_generator("random", 0.5)(2, (4,))


def test_spatial_structure_of_each_strategy():
    """Blocks and low-pass noise make coherent holes, high-pass noise scatters them."""
    agree = {}
    for name in ("random", "block", "noise_low", "noise_high", "noise_band"):
        for grid in [(14, 14), (8, 8, 8)]:
            m = build_mask_generator(name, 0.5)(32, grid, generator=seeded(7))
            agree[name, len(grid)] = neighbour_agreement(m)
    for d in (2, 3):
        assert agree["block", d] > agree["random", d] + 0.1
        assert agree["noise_low", d] > agree["random", d] + 0.1
        assert agree["noise_high", d] < agree["random", d] - 0.04
        assert agree["noise_low", d] > agree["noise_band", d] > agree["noise_high", d]


def test_block_mask_is_made_of_blocks():
    # with a large minimum block size, most hidden cells come in rectangles, not single cells
    m = BlockMask(0.5, min_block=9)(16, (14, 14), generator=seeded(3))
    hidden = m.float()
    pad = torch.nn.functional.pad(hidden, (1, 1, 1, 1))
    neighbours = pad[:, :-2, 1:-1] + pad[:, 2:, 1:-1] + pad[:, 1:-1, :-2] + pad[:, 1:-1, 2:]
    isolated = ((neighbours == 0) & m).sum() / m.sum()
    assert float(isolated) < 0.02


def test_loss_guided_schedule():
    grid, k = (8, 8), num_masked((8, 8), 0.75)
    scores = torch.randn(4, *grid, generator=seeded(5))
    top = mask_from_scores(scores, k)

    gen = LossGuidedMask(0.75, alpha_start=0.0, alpha_end=1.0)
    # progress 0 (easy): the scores are ignored, identical to plain random masking with that seed
    easy = gen(4, grid, scores=scores, generator=seeded(9))
    assert torch.equal(easy, gen(4, grid, scores=None, generator=seeded(9)))
    assert not torch.equal(easy, top)
    # progress 1 with alpha_end = 1: exactly the predicted-hardest cells
    gen.set_progress(1.0)
    assert torch.equal(gen(4, grid, scores=scores, generator=seeded(9)), top)
    # half-way: alpha = 0.5, so the round(0.5 k) hardest are always hidden, the rest random
    gen.set_progress(0.5)
    mid = gen(4, grid, scores=scores, generator=seeded(9))
    hardest = mask_from_scores(scores, round(0.5 * k))
    assert (mid[hardest]).all() and (mid.reshape(4, -1).sum(1) == k).all()
    assert not torch.equal(mid, top)


def test_visible_indices():
    m = random_mask(3, (4, 4), 0.75, generator=seeded(0))
    keep, hidden = visible_indices(m)
    assert keep.shape == (3, 4) and hidden.shape == (3, 12)
    flat = m.reshape(3, -1)
    assert not flat.gather(1, keep).any() and flat.gather(1, hidden).all()
    assert (keep.diff(dim=1) > 0).all() and (hidden.diff(dim=1) > 0).all()
    bad = m.clone()
    bad[0, 0, 0] = ~bad[0, 0, 0]
    with pytest.raises(ValueError, match="same number"):
        visible_indices(bad)
