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
    noise = torch.randn(busy[region].shape, generator=torch.Generator().manual_seed(2))
    busy[region] = busy[region] + 0.3 * noise  # more texture than normal
    out = atlas.score_items([{"image": im} for im in torch.cat([test, smooth, busy])])
    s, maps = out["texture_score"], out["texture"]
    assert maps.shape == (9, *(size,) * dims)
    assert (s[3:6] > 5 * s[:3].max()).all()  # the smooth region is found
    # "deficit" ignores extra texture: nothing where it was added, far below the smoothed images
    assert float(maps[6:9][(slice(None), *region[2:])].abs().max()) == 0.0
    assert (s[6:9] < 0.2 * s[3:6].min()).all()
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


def test_robust_statistics_match_numpy_and_scipy():
    from scipy import stats

    from medmim.anomaly.texture import centre_and_scale, median, top_mean

    rng = np.random.default_rng(1)
    for n in (7, 8):  # odd and even counts: numpy averages the two middle values
        e = rng.standard_normal((n, 2, 3, 3))
        assert np.allclose(median(torch.tensor(e)).numpy(), np.median(e, axis=0))
        c, s = centre_and_scale(torch.tensor(e), "median_mad")
        assert np.allclose(c.numpy(), np.median(e, axis=0))
        assert np.allclose(s.numpy(), stats.median_abs_deviation(e, axis=0, scale="normal"))
        c, s = centre_and_scale(torch.tensor(e), "mean_std")
        assert np.allclose(c.numpy(), e.mean(0)) and np.allclose(s.numpy(), e.std(0, ddof=1))
    v = rng.random((4, 10))
    for top, k in ((1.0, 10), (0.25, 3), (0.2, 2), (0.01, 1)):
        ref = np.sort(v, axis=1)[:, ::-1][:, :k].mean(1)
        assert np.allclose(top_mean(torch.tensor(v), top).numpy(), ref)
    with pytest.raises(ValueError, match="stats"):
        centre_and_scale(torch.tensor(v), "mode")


def test_median_mad_atlas_resists_unusual_normals():
    """A tenth of the 'normal' training images carry a strong artefact (a bright wire) in the region
    that is smoothed later: mean / std widen their scale there and see the lost texture less than
    median / MAD do, which ignore the few unusual images."""
    size = 16
    normal = _textured(60, size, 0)
    normal[:6, :, 4:8, 4:8] += 0.8 * torch.randn(6, 1, 4, 4, generator=torch.Generator().manual_seed(3))
    items = [{"image": im} for im in normal]
    test = _textured(4, size, 1)
    smooth = test.clone()
    smooth[:, :, 4:8, 4:8] = 0.45
    x = [{"image": im} for im in torch.cat([test, smooth])]
    s = {st: TextureAtlas((1.0,), pool=4, stats=st).fit(items).score_items(x, keep_maps=False)["texture_score"]
         for st in ("mean_std", "median_mad")}
    assert (s["median_mad"][4:] > s["median_mad"][:4].max()).all()  # every smoothed image ranked first
    assert not (s["mean_std"][4:] > s["mean_std"][:4].max()).all()  # the widened scale misses some
    gap = {k: float(v[4:].min() - v[:4].max()) for k, v in s.items()}
    assert gap["median_mad"] > gap["mean_std"]


def test_top_share_scores_the_worst_regions(tmp_path):
    normal = [{"image": im} for im in _textured(40, 16, 0)]
    test = _textured(2, 16, 1)
    test[:, :, 4:8, 4:8] = 0.45  # one of the 16 regions loses its texture
    whole = TextureAtlas((1.0,), pool=4).fit(normal)
    worst = TextureAtlas((1.0,), pool=4, top=1 / 16).fit(normal)
    regions = whole.region_maps(test)
    assert regions.shape == (2, 4, 4)
    s_whole = whole.score_items([{"image": im} for im in test], keep_maps=False)["texture_score"]
    s_worst = worst.score_items([{"image": im} for im in test], keep_maps=False)["texture_score"]
    assert torch.allclose(s_whole, regions.flatten(1).mean(1))
    assert torch.allclose(s_worst, regions[:, 1, 1])  # the one smoothed region
    # saved and loaded with its statistics and top share; files from before them read as mean / std
    path = TextureAtlas((1.0,), pool=4, stats="median_mad", top=0.25).fit(normal).save(tmp_path / "a.safetensors")
    back = TextureAtlas.load(path)
    assert (back.stats, back.top) == ("median_mad", 0.25)
    assert TextureAtlas.load(path, top=1.0).top == 1.0
    from safetensors.torch import save_file

    save_file({"mean": whole.mean, "std": whole.std}, str(tmp_path / "old.safetensors"),
              metadata={"format": "medmim-texture-atlas-v1", "sigmas": "1.0", "pool": "4", "side": "deficit"})
    old = TextureAtlas.load(tmp_path / "old.safetensors")
    assert (old.stats, old.top) == ("mean_std", 1.0)
    assert torch.equal(old.maps(test), whole.maps(test))
