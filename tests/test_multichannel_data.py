"""Multi-channel inputs on the data side (data.channels): manifest forms, reading C files / one 4D file /
a DICOM study into (C, *spatial), resampling onto the first channel's grid, per-channel presets, and
everything keyed on a record's image (hashes, cache keys, reports). References: nibabel, PIL,
SimpleITK, pydicom and MONAI's own transforms applied channel by channel."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from monai import transforms as mt
from PIL import Image

from medmim.config import load_config
from medmim.data.dataset import LoadRecordd, deterministic_transforms, prepare_data
from medmim.data.manifest import read_manifest, write_manifest
from medmim.errors import DataError


def _dc(*overrides):
    return load_config(None, list(overrides)).data


def _png(path, arr):
    Image.fromarray(arr.astype(np.uint8)).save(path)
    return str(path)


def _nifti(path, arr, affine):
    import nibabel as nib

    nib.save(nib.Nifti1Image(arr, affine), str(path))
    return str(path)


@pytest.fixture()
def pngs(tmp_path):
    rng = np.random.default_rng(0)
    out = {}
    for case in ("a", "b", "c"):
        for ch in ("t1", "flair"):
            out[case, ch] = _png(tmp_path / f"{case}_{ch}.png", rng.random((24, 30)) * 255)
    return tmp_path, out


# ---- manifests ------------------------------------------------------------------------------------
def test_manifest_channel_columns_and_lists(pngs):
    root, f = pngs
    (root / "cols.csv").write_text("image_t1,image_flair,label\na_t1.png,a_flair.png,1\nb_t1.png,b_flair.png,0\n")
    (root / "list.jsonl").write_text(json.dumps({"image": ["a_t1.png", "a_flair.png"], "label": 1}) + "\n")
    (root / "list.csv").write_text('image,label\n"[""a_t1.png"", ""a_flair.png""]",1\n')
    for name in ("cols.csv", "list.jsonl", "list.csv"):
        recs = read_manifest(root / name, ["t1", "flair"])
        assert recs[0]["image"] == [f["a", "t1"], f["a", "flair"]], name
        assert recs[0]["patient_id"] == "a_t1"  # from the first channel's file
        assert not any(k.startswith("image_") for k in recs[0])
    # one multi-channel file (or study folder) stays a single reference
    (root / "one.csv").write_text("image\nvol4d.nii.gz\n")
    assert read_manifest(root / "one.csv", ["t1", "flair"])[0]["image"] == str(root / "vol4d.nii.gz")


def test_manifest_missing_channel_named(pngs):
    root, _ = pngs
    (root / "m.csv").write_text("image_t1,image_flair\na_t1.png,a_flair.png\nb_t1.png,\n")
    with pytest.raises(DataError, match=r"m\.csv: row 3: no file for channel 'flair'") as err:
        read_manifest(root / "m.csv", ["t1", "flair"])
    assert "\n" not in str(err.value)
    skipped = []
    recs = read_manifest(root / "m.csv", ["t1", "flair"], skipped=skipped)
    assert len(recs) == 1 and len(skipped) == 1
    assert skipped[0]["file"].endswith("m.csv row 3") and "channel 'flair'" in skipped[0]["reason"]
    (root / "short.jsonl").write_text(json.dumps({"image": ["a_t1.png"]}) + "\n")
    with pytest.raises(DataError, match=r"line 1: 'image' lists 1 file\(s\), data.channels declares 2"):
        read_manifest(root / "short.jsonl", ["t1", "flair"])
    (root / "nocol.csv").write_text("image_t1,label\na_t1.png,1\n")
    with pytest.raises(DataError, match="no column for channel.*image_flair"):
        read_manifest(root / "nocol.csv", ["t1", "flair"])
    # a list without declared channels is refused, naming data.channels
    (root / "list.jsonl").write_text(json.dumps({"image": ["a_t1.png", "a_flair.png"]}) + "\n")
    with pytest.raises(DataError, match="data.channels is not declared"):
        read_manifest(root / "list.jsonl")


@pytest.mark.parametrize("suffix", [".csv", ".jsonl"])
def test_write_manifest_round_trips_channel_lists(pngs, suffix):
    root, f = pngs
    (root / "m.csv").write_text("image_t1,image_flair,label,split\na_t1.png,a_flair.png,1,train\n"
                                "b_t1.png,b_flair.png,0,test\n")
    recs = read_manifest(root / "m.csv", ["t1", "flair"])
    out = root / f"again{suffix}"
    write_manifest(recs, out, relative_to=out.parent)
    text = out.read_text()
    assert "a_t1.png" in text and str(root) not in text  # written relative to the manifest's folder
    back = read_manifest(out, ["t1", "flair"])
    assert [r["image"] for r in back] == [r["image"] for r in recs]
    assert [(r["label"], r["split"]) for r in back] == [(1, "train"), (0, "test")]


# ---- reading C files ------------------------------------------------------------------------------
def test_two_pictures_read_as_channels_equal_pil(pngs):
    _root, f = pngs
    load = LoadRecordd.of(_dc("data.channels=[t1,flair]"), ["image"])
    out = load({"image": [f["a", "t1"], f["a", "flair"]]})["image"]
    assert out.shape == (2, 24, 30) and out.dtype == torch.float32
    for c, ch in enumerate(("t1", "flair")):
        np.testing.assert_array_equal(out[c].numpy(), np.asarray(Image.open(f["a", ch]), dtype=np.float32))


def test_pictures_of_different_shapes_refused(tmp_path):
    a = _png(tmp_path / "p_t1.png", np.arange(20 * 20).reshape(20, 20) % 200)
    b = _png(tmp_path / "p_flair.png", np.arange(20 * 24).reshape(20, 24) % 200)
    load = LoadRecordd.of(_dc("data.channels=[t1,flair]"), ["image"])
    with pytest.raises(DataError) as err:
        load({"image": [a, b]})
    msg = str(err.value)
    assert msg.startswith(f"{a}: channel 'flair'") and "different geometry (shape (20, 24) vs (20, 20))" in msg
    assert "\n" not in msg


def test_missing_channel_file_is_skipped_and_reported(pngs):
    root, f = pngs
    os.remove(f["b", "flair"])
    (root / "m.csv").write_text("image_t1,image_flair,label\n" + "".join(
        f"{c}_t1.png,{c}_flair.png,{i % 2}\n" for i, c in enumerate("abc")) + "d_t1.png,,1\n")
    cfg = load_config(None, ["data.source=manifest", f"data.path={root / 'm.csv'}", "data.channels=[t1,flair]",
                             "data.val_fraction=0", "data.test_fraction=0", "data.image_size=16"])
    bundle = prepare_data(cfg)
    assert len(bundle.split("train")) == 3  # the row without a flair file is left out, and listed
    assert any("row 5" in s["file"] and "channel 'flair'" in s["reason"] for s in bundle.skipped)
    from medmim.data.dataset import materialize

    items = materialize(bundle.split("train"), cfg.data, bundle.preset, skipped=bundle.skipped)
    assert len(items) == 2 and items[0]["image"].shape == (2, 16, 16)
    assert any(s["file"] == f["b", "flair"] and "not found" in s["reason"] for s in bundle.skipped)
    strict = cfg.model_copy(update={"data": cfg.data.model_copy(update={"strict": True})})
    with pytest.raises(DataError, match="row 5: no file for channel 'flair'"):
        prepare_data(strict)


# ---- per-channel presets ----------------------------------------------------------------------------
def _volumes(tmp_path, n=2, shape=(12, 14, 10)):
    rng = np.random.default_rng(3)
    affine = np.diag([1.5, 1.2, 2.0, 1.0])
    files, arrays = [], []
    for c in range(n):
        arr = (rng.gamma(2.0 + c, 50.0 * (c + 1), shape)).astype(np.float32)
        arr[:2] = 0  # background zeros (z-score uses the non-zero voxels)
        files.append(_nifti(tmp_path / f"v_{c}.nii.gz", arr, affine))
        arrays.append(arr)
    return files, arrays


def test_presets_applied_per_channel_equal_monai_per_channel(tmp_path):
    files, arrays = _volumes(tmp_path)
    dc = _dc("data.spatial_dims=3", "data.resize=none", "data.image_size=16",
             'data.channels=[{"name": "t1", "preset": "mri_zscore"}, {"name": "flair"}]')
    out = deterministic_transforms(dc, "mri_percentile", with_mask=False)({"image": files})["image"]
    ref_t1 = mt.NormalizeIntensity(nonzero=True)(torch.as_tensor(arrays[0])[None])
    ref_flair = mt.ScaleIntensityRangePercentiles(lower=1, upper=99, b_min=0.0, b_max=1.0, clip=True)(
        torch.as_tensor(arrays[1])[None])
    np.testing.assert_allclose(out[0].numpy(), np.asarray(ref_t1[0]), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(out[1].numpy(), np.asarray(ref_flair[0]), rtol=1e-5, atol=1e-6)
    # never pooled: the channel-pooled z-score differs
    pooled = mt.NormalizeIntensity(nonzero=True)(torch.as_tensor(np.stack(arrays)))
    assert not np.allclose(out[0].numpy(), np.asarray(pooled[0]), atol=1e-3)


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_one_declared_channel_gives_the_grayscale_numbers(tmp_path, pngs, spatial_dims):
    _root, f = pngs
    ref = f["a", "t1"] if spatial_dims == 2 else _volumes(tmp_path, n=1)[0][0]
    base = [f"data.spatial_dims={spatial_dims}", "data.image_size=16"]
    plain = deterministic_transforms(_dc(*base), "mri_zscore", with_mask=False)
    named = deterministic_transforms(_dc(*base, "data.channels=[t1]"), "mri_zscore", with_mask=False)
    as_list = named({"image": [ref]})["image"]  # a one-entry list takes the multi-channel reader
    expected = plain.reference({"image": ref})["image"]
    assert torch.equal(named({"image": ref})["image"], plain({"image": ref})["image"])
    assert torch.equal(as_list, expected)
