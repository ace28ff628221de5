"""medmim.models.patches and medmim.models.protocols, against independent references: a per-cell
loop over the image, F.interpolate (nearest), NumPy's variance, and the encoders' own classes."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from medmim.models import build_encoder
from medmim.models.patches import normalise_patches, patchify, unpatchify, upsample_mask
from medmim.models.protocols import Encoder, MaskedCNN, TokenEncoder, accepts_generator, is_vit


def _patches_by_loop(x: torch.Tensor, p: int) -> torch.Tensor:
    """Reference: cut each grid cell out in row-major order and flatten it as (p.., C)."""
    b, c, *spatial = x.shape
    grid = [s // p for s in spatial]
    out = []
    for cell in itertools.product(*[range(g) for g in grid]):
        sl = x[(slice(None), slice(None), *[slice(i * p, (i + 1) * p) for i in cell])]
        out.append(sl.movedim(1, -1).reshape(b, -1))  # (B, p.., C) flattened
    return torch.stack(out, 1)


@pytest.mark.parametrize("d,c,p,size", [(2, 1, 4, 12), (2, 3, 2, 8), (3, 1, 4, 8), (3, 2, 2, 6)])
def test_patchify_matches_a_per_cell_loop_and_unpatchify_inverts_it(d, c, p, size):
    x = torch.randn(2, c, *([size] * d))
    got = patchify(x, p)
    assert torch.equal(got, _patches_by_loop(x, p))
    assert torch.equal(unpatchify(got, p, (size // p,) * d, c), x)


def test_patchify_refuses_a_size_not_divisible_by_the_patch():
    with pytest.raises(ValueError, match="not divisible"):
        patchify(torch.zeros(1, 1, 10, 8), 4)


@pytest.mark.parametrize("d", [2, 3])
def test_upsample_mask_is_nearest_neighbour_upsampling(d):
    mask = torch.rand(3, *([4] * d)) > 0.5
    ref = F.interpolate(mask[:, None].float(), scale_factor=4, mode="nearest")[:, 0].bool()
    assert torch.equal(upsample_mask(mask, 4), ref)


def test_normalise_patches_uses_the_unbiased_variance_of_each_patch():
    t = torch.randn(2, 5, 16, dtype=torch.float64) * 3 + 1
    normed, mean, std = normalise_patches(t)
    a = t.numpy()
    ref_std = np.sqrt(a.var(-1, ddof=1, keepdims=True) + 1e-6)
    np.testing.assert_allclose(std.numpy(), ref_std, rtol=1e-12)
    np.testing.assert_allclose(normed.numpy(), (a - a.mean(-1, keepdims=True)) / ref_std, rtol=1e-12)
    torch.testing.assert_close(normed * std + mean, t)


def test_spark_and_mae_share_the_per_patch_normalisation():
    """Both pretexts use normalise_patches: SparK's recon of the hidden cells is pred * std + mean."""
    from medmim.models import mae, spark

    assert mae.normalise_patches is normalise_patches and spark.normalise_patches is normalise_patches


@pytest.mark.parametrize("name", ["vit_tiny", "resnet18", "convnext_tiny"])
@pytest.mark.parametrize("d", [2, 3])
def test_one_is_vit_and_the_protocols_match_the_encoders(name, d):
    enc = build_encoder(name, spatial_dims=d, in_channels=1, img_size=32)
    vit = name.startswith("vit")
    assert isinstance(enc, Encoder)
    assert is_vit(enc) is vit and isinstance(enc, TokenEncoder) is vit
    assert isinstance(enc, MaskedCNN) is (not vit)


def test_accepts_generator():
    class A(torch.nn.Module):
        def forward(self, x, generator=None):
            return x

    class B(torch.nn.Module):
        def forward(self, x):
            return x

    assert accepts_generator(A()) and not accepts_generator(B())


@pytest.mark.parametrize("grid,dim", [((4, 6), 32), ((3, 4, 5), 48)])
def test_sincos_position_embedding_is_monais_with_the_axis_blocks_in_grid_order(grid, dim):
    """medmim's fixed sin-cos embedding equals MONAI's build_sincos_position_embedding up to the
    order of the per-axis channel blocks: MONAI writes axis 1 first, then axis 0 (then axis 2);
    medmim writes the axes in grid order, and also serves dims MONAI refuses (zero-padded)."""
    from monai.networks.blocks.pos_embed_utils import build_sincos_position_embedding

    from medmim.models.vit import sincos_position_embedding

    d = len(grid)
    ref = build_sincos_position_embedding(list(grid), dim, spatial_dims=d).detach()[0].double()
    k = dim // (2 * d)  # channels per (axis, sin|cos)
    blocks = ref.split(2 * k, dim=1)  # MONAI: [axis1, axis0, axis2]
    ref_grid_order = torch.cat([blocks[1], blocks[0], *blocks[2:]], 1)
    torch.testing.assert_close(sincos_position_embedding(grid, dim).double(), ref_grid_order, rtol=0, atol=1e-6)
    assert sincos_position_embedding((4, 4, 4), 128)[:, 126:].abs().max() == 0  # 128 % 6 != 0: padded
