"""Modality presets, geometry (RAS, spacing), size (pad keeps aspect), 2D reader convention,
pretraining crops, and the disk cache keyed by the transform config."""

import numpy as np
import pytest
import torch

from medmim.config import load_config
from medmim.data import dataset as ds_mod
from medmim.data.cache import transform_key
from medmim.data.dataset import make_loader, materialize, pretrain_transforms, set_loader_epoch
from medmim.data.presets import RandResizedCropd, intensity_transform
from medmim.data.synthetic import ct_like_volume, write_nifti, write_png


def _cfg(*over):
    return load_config(None, list(over)).data


@pytest.mark.parametrize("preset,level,width", [("ct_soft_tissue", 40, 400), ("ct_lung", -600, 1500),
                                                 ("ct_bone", 400, 1800), ("ct_brain", 40, 80)])
def test_ct_windows(preset, level, width):
    hu = torch.tensor([[level - width / 2 - 50, level - width / 2, level, level + width / 2, 3000.0]])
    out = intensity_transform(preset)({"image": hu})["image"]
    np.testing.assert_allclose(out.numpy()[0], [0, 0, 0.5, 1, 1], atol=1e-6)


def test_mri_per_volume_normalisation():
    rng = np.random.default_rng(0)
    v = torch.tensor(rng.gamma(2.0, 50.0, (1, 10, 10, 10)), dtype=torch.float32)
    a = intensity_transform("mri_percentile")({"image": v})["image"]
    b = intensity_transform("mri_percentile")({"image": v * 7 + 3})["image"]  # another scanner scale
    np.testing.assert_allclose(a.numpy(), b.numpy(), atol=1e-5)
    assert float(a.min()) == 0 and float(a.max()) == 1
    z = intensity_transform("mri_zscore")({"image": v})["image"]
    assert abs(float(z.mean())) < 1e-4 and abs(float(z.std()) - 1) < 1e-2


def test_xray_keeps_aspect_and_single_channel(tmp_path):
    img = np.zeros((20, 40), np.uint8)
    img[:, :20] = 200  # left half bright
    p = write_png(tmp_path / "wide.png", img)
    rgb = write_png(tmp_path / "rgb.png", np.stack([img] * 3, -1))
    items = materialize([{"image": str(p)}, {"image": str(rgb)}], _cfg("data.image_size=32"), "xray")
    x = items[0]["image"]
    assert x.shape == (1, 32, 32) and items[1]["image"].shape == (1, 32, 32)
    # 20x40 -> 16x32 content, padded with 8 rows above and below; left half bright (not transposed)
    assert float(x[0, :8].abs().max()) == 0 and float(x[0, 24:].abs().max()) == 0
    assert float(x[0, 12, 4]) > 0.9 and float(x[0, 12, 28]) < 0.1
    stretched = materialize([{"image": str(p)}], _cfg("data.image_size=32", "data.resize=stretch"), "xray")
    assert float(stretched[0]["image"][0, 2, 4]) > 0.9


def test_png_and_array_share_the_2d_convention(tmp_path):
    img = np.random.default_rng(1).integers(0, 255, (28, 28)).astype(np.uint8)
    p = write_png(tmp_path / "a.png", img)
    a, b = materialize([{"image": str(p)}, {"image": img}], _cfg("data.image_size=28"), "uint8")
    torch.testing.assert_close(a["image"], b["image"])


def test_ras_orientation_and_target_spacing(tmp_path):
    import nibabel as nib

    vol = ct_like_volume((16, 12, 8)).astype(np.int16)
    nib.save(nib.Nifti1Image(vol, np.diag([1.0, 1.0, 2.0, 1])), str(tmp_path / "ras.nii.gz"))
    nib.save(nib.Nifti1Image(vol[::-1, ::-1].copy(), np.diag([-1.0, -1.0, 2.0, 1])), str(tmp_path / "lps.nii.gz"))
    cfg = _cfg("data.spatial_dims=3", "data.resize=none", "data.target_spacing=[2.0,2.0,2.0]")
    a, b = materialize([{"image": str(tmp_path / "ras.nii.gz")}, {"image": str(tmp_path / "lps.nii.gz")}],
                       cfg, "ct_soft_tissue")
    assert a["image"].shape == (1, 8, 6, 8)
    torch.testing.assert_close(a["image"], b["image"], atol=1e-5, rtol=0)


def test_random_resized_crop_scale_and_determinism():
    x = torch.arange(64 * 64, dtype=torch.float32).reshape(1, 64, 64)
    t = RandResizedCropd(["image"], (32, 32), scale=(0.5, 0.5))
    t.set_random_state(seed=0)
    out = t({"image": x})["image"]
    assert out.shape == (1, 32, 32)
    fr = t._fracs
    assert abs(fr[0] * fr[1] - 0.5) < 0.02  # the crop holds half the image area
    t.set_random_state(seed=0)
    torch.testing.assert_close(t({"image": x})["image"], out)


def test_pretraining_crops_switch_on_from_config(tmp_path):
    paths = [write_nifti(tmp_path / f"v{i}.nii.gz", ct_like_volume((20, 20, 20), seed=i)) for i in range(3)]
    assert pretrain_transforms(_cfg("data.spatial_dims=3")) is None
    cfg = _cfg("data.spatial_dims=3", "data.image_size=8", "data.resize=none", "data.patch_samples=4",
               "data.random_resized_crop=true")
    items = materialize([{"image": str(p)} for p in paths], cfg, "ct_soft_tissue")
    assert items[0]["image"].shape == (1, 20, 20, 20)
    loader = make_loader(items, 2, shuffle=True, seed=0, augment=pretrain_transforms(cfg))
    set_loader_epoch(loader, 0)
    batch = next(iter(loader))
    assert batch["image"].shape == (8, 1, 8, 8, 8)  # 2 volumes x 4 patches


def _cached_items(folder) -> int:
    """Items in the shard cache folder (medmim.data.cache: shards/<name>.json indices)."""
    import json

    return sum(len(json.loads(p.read_text())["keys"]) for p in (folder / "shards").glob("*.json"))


def test_disk_cache_keyed_by_transform_config(tmp_path, monkeypatch):
    paths = [write_nifti(tmp_path / f"v{i}.nii.gz", ct_like_volume((12, 12, 8), seed=i)) for i in range(3)]
    recs = [{"image": str(p), "label": i % 2} for i, p in enumerate(paths)]
    over = ["data.spatial_dims=3", "data.image_size=8", "data.cache=disk", f"data.cache_dir={tmp_path / 'cache'}"]
    cfg = _cfg(*over)
    first = materialize(recs, cfg, "ct_soft_tissue")
    key = transform_key(cfg, "ct_soft_tissue", False)
    assert _cached_items(tmp_path / "cache" / key) == 3 and (tmp_path / "cache" / key / "transform_config.json").exists()

    def no_read(*a, **k):
        raise AssertionError("the cache should have been used")

    monkeypatch.setattr(ds_mod, "read_image", no_read)
    again = materialize(recs, cfg, "ct_soft_tissue")  # served from disk, no file read
    for a, b in zip(first, again):
        torch.testing.assert_close(a["image"], b["image"])
        assert int(a["label"]) == int(b["label"])
    monkeypatch.undo()
    # a changed preset or geometry never reuses the stale cache
    assert transform_key(cfg, "ct_lung", False) != key
    assert transform_key(_cfg(*over, "data.target_spacing=[2,2,2]"), "ct_soft_tissue", False) != key
    assert transform_key(_cfg(*over, "data.image_size=16"), "ct_soft_tissue", False) != key
    lung = materialize(recs, cfg, "ct_lung")
    assert not torch.allclose(lung[0]["image"], first[0]["image"])
    # an edited file gets a new entry instead of its stale one
    write_nifti(paths[0], ct_like_volume((12, 12, 8), seed=42).astype(np.int32))
    edited = materialize(recs, cfg, "ct_soft_tissue")
    assert _cached_items(tmp_path / "cache" / key) == 4
    assert not torch.allclose(edited[0]["image"], first[0]["image"])


def test_no_cache_rereads_each_time(tmp_path, monkeypatch):
    p = write_nifti(tmp_path / "v.nii.gz", ct_like_volume((12, 12, 8)))
    items = materialize([{"image": str(p), "label": 1}], _cfg("data.spatial_dims=3", "data.image_size=8",
                                                               "data.cache=none"), "ct_soft_tissue")
    calls = []
    real = ds_mod.read_image
    monkeypatch.setattr(ds_mod, "read_image", lambda *a, **k: calls.append(1) or real(*a, **k))
    assert items[0]["image"].shape == (1, 8, 8, 8) and int(items[0]["label"]) == 1
    items[0]
    assert len(calls) == 3 and len(items) == 1  # one read per access
