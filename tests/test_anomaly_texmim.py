"""Masked texture modelling: it learns where detail belongs from the image's coarse layout (which a
fixed atlas cannot), finds the missing detail there, and its file round trip."""

from __future__ import annotations

import pytest
import torch
from sklearn.metrics import roc_auc_score

from medmim.anomaly.texmim import TextureMIM
from medmim.anomaly.texture import TextureAtlas

torch.set_num_threads(1)


def _scene(n: int, seed: int, textured: bool, size: int = 24, dims: int = 2) -> list[dict]:
    """A faint background with one bright 8-pixel square at a random place on a 4-pixel lattice; in
    normal images the square carries fine texture, in anomalous ones it is smooth. Blurred at
    sigma 2, both look alike: only the square's place says where detail belongs."""
    g = torch.Generator().manual_seed(seed)
    x = 0.3 + 0.01 * torch.randn(n, 1, *(size,) * dims, generator=g)
    corners = torch.randint(0, (size - 8) // 4 + 1, (n, dims), generator=g) * 4
    for i, c in enumerate(corners.tolist()):
        sq = (i, 0, *[slice(v, v + 8) for v in c])
        x[sq] = 0.7 + (0.08 if textured else 0.01) * torch.randn((8,) * dims, generator=g)
    return [{"image": im} for im in x]


def test_texmim_finds_missing_detail_where_the_layout_says_it_belongs():
    normal = _scene(80, 0, True)
    test = _scene(20, 1, True) + _scene(20, 2, False)
    y = [0] * 20 + [1] * 20
    model = TextureMIM((1.0,), 2, input_sigma=2.0, mask_ratio=0.5, cell=4, width=16, epochs=40, seed=1).fit(normal)
    out = model.score_items(test)
    atlas = TextureAtlas((1.0,), 2).fit(normal).score_items(test, keep_maps=False)["texture_score"]
    auc_mim, auc_atlas = roc_auc_score(y, out["texmim_score"]), roc_auc_score(y, atlas)
    assert auc_mim >= 0.95, auc_mim
    assert auc_mim > auc_atlas + 0.1, (auc_mim, auc_atlas)  # the place-averaged atlas cannot know it
    # the map is highest inside the smooth square
    maps = out["texmim"]
    assert maps.shape == (40, 24, 24)
    inside = []
    for i in range(20, 40):
        square = test[i]["image"][0] > 0.5
        inside.append(float(maps[i][square].mean()) > 3 * float(maps[i][~square].mean()))
    assert sum(inside) >= 16


def test_texmim_runs_in_3d_and_round_trips(tmp_path):
    normal = _scene(12, 0, True, size=16, dims=3)
    model = TextureMIM((1.0, 2.0), 2, cell=4, width=8, epochs=2, top=0.25, seed=0).fit(normal)
    x = torch.stack([it["image"] for it in _scene(3, 1, False, size=16, dims=3)])
    maps = model.maps(x)
    assert maps.shape == (3, 16, 16, 16) and (maps >= 0).all()
    path = model.save(tmp_path / "texmim.safetensors")
    back = TextureMIM.load(path, top=0.25)
    assert back.settings() == model.settings()
    assert torch.equal(back.maps(x), maps)
    s = back.score_items([{"image": im} for im in x], keep_maps=False)["texmim_score"]
    assert torch.allclose(s, model.region_maps(x).flatten(1).topk(128, dim=1).values.mean(1))  # 512 regions / 4
    with pytest.raises(ValueError, match="do not fit"):
        model.maps(torch.zeros(1, 1, 8, 8, 8))


def test_texmim_refuses_bad_settings(tmp_path):
    with pytest.raises(ValueError, match="multiple of the region size"):
        TextureMIM(pool=4, cell=6)
    with pytest.raises(ValueError, match="mask ratio"):
        TextureMIM(mask_ratio=1.0)
    with pytest.raises(RuntimeError, match="before fit"):
        TextureMIM().maps(torch.zeros(1, 1, 8, 8))
    (tmp_path / "x.safetensors").write_bytes(b"")
    from safetensors.torch import save_file

    save_file({"a": torch.zeros(1)}, str(tmp_path / "x.safetensors"), metadata={"format": "other"})
    with pytest.raises(ValueError, match="not a medmim masked texture model"):
        TextureMIM.load(tmp_path / "x.safetensors")
