"""The learned normal-texture atlas: band energies against scipy, where a texture loss is found,
deficit vs excess, 2D and 3D, and the file round trip."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import ndimage

from medmim.anomaly.texture import TextureAtlas, log_band_energy

torch.set_num_threads(1)


def test_log_band_energy_matches_scipy():
    rng = np.random.default_rng(0)
    x = rng.random((2, 1, 16, 20))
    ours = log_band_energy(torch.tensor(x), (1.0, 2.0), 4).numpy()
    assert ours.shape == (2, 2, 4, 5)
    for b in range(2):
        g1 = ndimage.gaussian_filter(x[b, 0], 1.0, mode="mirror", truncate=3.5)
        g2 = ndimage.gaussian_filter(x[b, 0], 2.0, mode="mirror", truncate=3.5)
        for i, band in enumerate([(x[b, 0] - g1) ** 2, (g1 - g2) ** 2]):
            ref = np.log(band.reshape(4, 4, 5, 4).mean((1, 3)) + 1e-6)
            assert np.allclose(ours[b, i], ref, atol=1e-4)


def _textured(n: int, size: int, seed: int, dims: int = 2) -> torch.Tensor:
    """'Normal' images: a smooth level plus fine noise texture everywhere."""
    g = torch.Generator().manual_seed(seed)
    shape = (n, 1) + (size,) * dims
    return 0.4 + 0.1 * torch.rand(n, 1, *([1] * dims), generator=g) + 0.05 * torch.randn(shape, generator=g)


@pytest.mark.parametrize("dims", [2, 3])
def test_atlas_finds_where_texture_is_missing(dims):
    size = 16 if dims == 2 else 12
    normal = [{"image": im} for im in _textured(40, size, 0, dims)]
    atlas = TextureAtlas((1.0,), pool=4, side="deficit").fit(normal)
    test = _textured(3, size, 1, dims)
    region = (slice(None), slice(None), *[slice(4, 8)] * dims)
    smooth = test.clone()
    smooth[region] = 0.45  # texture removed in one region
    busy = test.clone()
    busy[region] = busy[region] + 0.3 * torch.randn_like(busy[region])  # more texture than normal
    out = atlas.score_items([{"image": im} for im in torch.cat([test, smooth, busy])])
    s, maps = out["texture_score"], out["texture"]
    assert maps.shape == (9, *(size,) * dims)
    assert (s[3:6] > 5 * s[:3].max()).all()  # the smooth region is found
    assert (s[6:9] <= s[:3].max() + 1e-6).all()  # "deficit" ignores extra texture
    for i in range(3, 6):  # the map peaks inside the smoothed region
        peak = np.unravel_index(int(maps[i].argmax()), maps[i].shape)
        assert all(4 <= p < 8 for p in peak)
    excess = TextureAtlas((1.0,), pool=4, side="excess").fit(normal)
    se = excess.score_items([{"image": im} for im in torch.cat([test, busy])], keep_maps=False)["texture_score"]
    assert (se[3:] > 5 * se[:3].max()).all()


def test_atlas_file_round_trip_and_shape_check(tmp_path):
    normal = [{"image": im} for im in _textured(10, 16, 0)]
    atlas = TextureAtlas((1.0, 2.0), pool=2).fit(normal)
    path = atlas.save(tmp_path / "atlas.safetensors")
    back = TextureAtlas.load(path)
    assert back.sigmas == [1.0, 2.0] and back.pool == 2 and back.side == "deficit"
    x = _textured(2, 16, 5)
    assert torch.equal(back.maps(x), atlas.maps(x))
    assert TextureAtlas.load(path, side="both").side == "both"
    with pytest.raises(ValueError, match="do not fit the atlas"):
        atlas.maps(_textured(1, 20, 0))
    with pytest.raises(ValueError, match="increasing"):
        TextureAtlas((2.0, 1.0)).fit(normal)
