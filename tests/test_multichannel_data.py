"""Multi-channel inputs on the data side (data.channels): manifest forms, reading C files / one 4D file /
a DICOM study into (C, *spatial), resampling onto the first channel's grid, per-channel presets, and
everything keyed on a record's image (hashes, cache keys, reports). References: nibabel, PIL,
SimpleITK, pydicom and MONAI's own transforms applied channel by channel."""

from __future__ import annotations

import json
import os
import re
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


def test_manifest_from_csv_keeps_image_lists(pngs, capsys):
    """``medmim data manifest --from csv``: an ``image`` list (JSON-list string) stays one file per
    channel, each resolved against the CSV's folder (it was taken as one file name)."""
    from medmim.cli import main

    root, f = pngs
    (root / "src").mkdir()
    (root / "src" / "in.csv").write_text('image,label\n"[""../a_t1.png"", ""../a_flair.png""]",1\n')
    out = root / "out" / "m.csv"
    assert main(["data", "manifest", "--from", "csv", str(root / "src" / "in.csv"), "--out", str(out)]) == 0
    rec = read_manifest(out, ["t1", "flair"])[0]
    assert [Path(p).resolve() for p in rec["image"]] == [Path(f["a", "t1"]), Path(f["a", "flair"])]
    assert rec["patient_id"] == "a_t1"
    # image_<channel> columns already make a manifest: the builder says so in its one line
    (root / "src" / "cols.csv").write_text("image_t1,image_flair\n../a_t1.png,../a_flair.png\n")
    capsys.readouterr()
    assert main(["data", "manifest", "--from", "csv", str(root / "src" / "cols.csv"), "--out", str(out),
                 "--force"]) != 0
    assert "give this CSV as data.path with data.channels" in capsys.readouterr().err


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


# ---- one multi-channel file: nibabel's real 4D test image ---------------------------------------------
EXAMPLE4D = Path(__import__("nibabel").__file__).parent / "tests" / "data" / "example4d.nii.gz"


@pytest.mark.skipif(not EXAMPLE4D.exists(), reason="nibabel's test data not installed")
def test_real_4d_nifti_read_as_channels_equals_nibabel():
    import nibabel as nib

    img = nib.load(str(EXAMPLE4D))
    ref = np.asanyarray(img.dataobj)  # (128, 96, 24, 2), int16
    assert ref.shape[-1] == 2
    dc = _dc("data.spatial_dims=3", "data.channels=[t0,t1]", "data.channel_axis=-1")
    out = LoadRecordd.of(dc, ["image"])({"image": str(EXAMPLE4D)})["image"]
    assert out.shape == (2, *ref.shape[:3])
    for c in range(2):
        np.testing.assert_array_equal(out[c].numpy(), ref[..., c].astype(np.float32))  # exact, before presets
    np.testing.assert_allclose(np.asarray(out.affine), img.affine, atol=1e-6)
    # after the preset (file voxel order, native size): MONAI's transform on nibabel's channel
    dc = _dc("data.spatial_dims=3", "data.channels=[t0,t1]", "data.orientation=null", "data.resize=none")
    got = deterministic_transforms(dc, "mri_percentile", with_mask=False)({"image": str(EXAMPLE4D)})["image"]
    for c in range(2):
        want = mt.ScaleIntensityRangePercentiles(lower=1, upper=99, b_min=0.0, b_max=1.0, clip=True)(
            torch.as_tensor(ref[..., c].astype(np.float32))[None])
        np.testing.assert_allclose(got[c].numpy(), np.asarray(want[0]), rtol=1e-6, atol=1e-6)
    # the channel count must match data.channels, and the axis must exist
    with pytest.raises(DataError, match=r"example4d.nii.gz: 2 channel\(s\) on axis -1 .*declares 3"):
        LoadRecordd.of(_dc("data.spatial_dims=3", "data.channels=[a,b,c]"), ["image"])({"image": str(EXAMPLE4D)})
    # without data.channels the 4D file is refused, naming both ways out
    with pytest.raises(DataError, match=r"'frame' column, or declare its channels in data.channels"):
        LoadRecordd.of(_dc("data.spatial_dims=3"), ["image"])({"image": str(EXAMPLE4D)})


# ---- channels on different grids: resampled onto the first (SimpleITK reference) -----------------------
def _rotation_z(deg):
    t = np.deg2rad(deg)
    return np.array([[np.cos(t), -np.sin(t), 0], [np.sin(t), np.cos(t), 0], [0, 0, 1]])


def test_channels_on_different_grids_resampled_like_simpleitk(tmp_path):
    import SimpleITK as sitk

    def smooth(shape, affine):  # a smooth function of world position: both files sample one anatomy
        idx = np.stack(np.meshgrid(*[np.arange(s) for s in shape], indexing="ij"), -1).astype(np.float64)
        w = idx @ affine[:3, :3].T + affine[:3, 3]
        return (100 + 40 * np.sin(w[..., 0] / 7.0) + 30 * np.cos(w[..., 1] / 5.0) + 0.5 * w[..., 2]).astype(np.float32)

    a1 = np.diag([1.5, 1.5, 2.0, 1.0])
    a1[:3, 3] = [-12.0, -10.0, -8.0]
    a2 = np.eye(4)
    a2[:3, :3] = _rotation_z(10) @ np.diag([2.0, 1.8, 2.5])
    a2[:3, 3] = [-9.0, -11.0, -6.0]
    f1 = _nifti(tmp_path / "c_t1.nii.gz", smooth((16, 14, 10), a1), a1)
    f2 = _nifti(tmp_path / "c_flair.nii.gz", smooth((14, 13, 9), a2), a2)
    out = LoadRecordd.of(_dc("data.spatial_dims=3", "data.channels=[t1,flair]"), ["image"])({"image": [f1, f2]})["image"]
    assert out.shape == (2, 16, 14, 10)
    np.testing.assert_allclose(np.asarray(out.affine), a1, atol=1e-6)
    fixed, moving = sitk.ReadImage(f1), sitk.ReadImage(f2)
    res = sitk.Resample(moving, fixed, sitk.Transform(), sitk.sitkLinear, 0.0, sitk.sitkFloat32)
    ref = sitk.GetArrayFromImage(res).transpose(2, 1, 0)  # (z, y, x) -> the file's (x, y, z)
    # compare where the first grid's voxel lies at least one voxel inside the second image (edges:
    # SimpleITK and MONAI treat the last half voxel differently)
    idx = np.stack(np.meshgrid(*[np.arange(s) for s in (16, 14, 10)], indexing="ij"), -1).reshape(-1, 3)
    cont = (np.linalg.inv(a2) @ (a1 @ np.c_[idx, np.ones(len(idx))].T))[:3].T
    inside = np.all((cont >= 1) & (cont <= np.array([14, 13, 9]) - 2), axis=1).reshape(16, 14, 10)
    assert inside.sum() > 500
    np.testing.assert_allclose(out[1].numpy()[inside], ref[inside], rtol=0, atol=1e-3)  # values 60..175; seen 5e-5
    np.testing.assert_array_equal(out[0].numpy(), smooth((16, 14, 10), a1))  # the first channel is untouched


def test_channels_that_do_not_overlap_are_refused(tmp_path):
    a1, a2 = np.eye(4), np.eye(4)
    a2[:3, 3] = [500.0, 0, 0]
    rng = np.random.default_rng(1)
    f1 = _nifti(tmp_path / "x_t1.nii.gz", rng.random((8, 8, 8)).astype(np.float32), a1)
    f2 = _nifti(tmp_path / "x_t2.nii.gz", rng.random((8, 8, 8)).astype(np.float32), a2)
    with pytest.raises(DataError, match=r"x_t1.nii.gz: channel 't2' .* does not overlap the first channel"):
        LoadRecordd.of(_dc("data.spatial_dims=3", "data.channels=[t1,t2]"), ["image"])({"image": [f1, f2]})


# ---- a DICOM study: one series per channel, chosen by SeriesDescription ---------------------------------
def _describe(folder: Path, description: str) -> None:
    import pydicom

    for f in folder.iterdir():
        ds = pydicom.dcmread(str(f))
        ds.SeriesDescription = description
        ds.save_as(str(f))


@pytest.fixture()
def study(tmp_path):
    from medmim.data.synthetic import ct_like_volume, write_dicom_series

    vols = {}
    for name, desc, seed in (("t1", "T1 AX post", 0), ("flair", "FLAIR AX", 1), ("loc", "Localizer", 2)):
        vol = ct_like_volume((10, 12, 6), seed=seed)
        folder, _uid = write_dicom_series(tmp_path / "study" / name, vol, spacing=(0.5, 0.8, 2.0))
        _describe(folder, desc)
        vols[name] = vol
    return tmp_path / "study", vols


def test_dicom_study_series_selected_by_description(study):
    root, vols = study
    dc = _dc("data.spatial_dims=3",
             'data.channels=[{"name": "t1", "series": "t1*"}, {"name": "flair", "series": "FLAIR*"}]')
    out = LoadRecordd.of(dc, ["image"])({"image": str(root)})["image"]
    assert out.shape == (2, 12, 10, 6)
    for c, name in enumerate(("t1", "flair")):  # pydicom-written slices in canonical RAS order
        expected = vols[name].transpose(1, 0, 2)[::-1, ::-1, :].astype(np.float32)
        np.testing.assert_array_equal(out[c].numpy(), expected)
    # default pattern: *<name>*, case-insensitive
    out2 = LoadRecordd.of(_dc("data.spatial_dims=3", "data.channels=[t1,flair]"), ["image"])({"image": str(root)})
    assert torch.equal(out2["image"], out)


@pytest.mark.parametrize("pattern,needle", [("t2*", "no series matches SeriesDescription pattern 't2\\*'"),
                                            ("*ax*", "2 series match SeriesDescription pattern")])
def test_dicom_study_no_or_several_matches_listed(study, pattern, needle):
    root, _ = study
    dc = _dc("data.spatial_dims=3", f'data.channels=[{{"name": "a", "series": "{pattern}"}}, "flair"]')
    with pytest.raises(DataError, match=needle) as err:
        LoadRecordd.of(dc, ["image"])({"image": str(root)})
    msg = str(err.value)
    assert msg.startswith(str(root)) and "'Localizer'" in msg and "'T1 AX post'" in msg and "\n" not in msg


# ---- everything keyed on a record's image -------------------------------------------------------------
def _two_channel_set(root: Path, n: int = 8, split: bool = True):
    """n two-channel PNG cases (one patient each) and their manifest (image_t1, image_flair)."""
    rng = np.random.default_rng(5)
    lines = ["image_t1,image_flair,label,patient_id" + (",split" if split else "")]
    for i in range(n):
        for ch in ("t1", "flair"):
            _png(root / f"p{i}_{ch}.png", rng.random((20, 20)) * 255)
        sp = ["train", "train", "train", "train", "val", "val", "test", "test"][i % 8]
        lines.append(f"p{i}_t1.png,p{i}_flair.png,{i % 2},P{i}" + (f",{sp}" if split else ""))
    (root / "m.csv").write_text("\n".join(lines) + "\n")
    return root / "m.csv"


def _cfg_mc(manifest, *extra):
    return load_config(None, ["data.source=manifest", f"data.path={manifest}", "data.channels=[t1,flair]",
                              "data.image_size=16", *extra])


def test_content_hash_duplicates_and_fingerprint_follow_every_channel(tmp_path):
    import shutil

    from medmim.data.manifest import records_fingerprint
    from medmim.data.splits import content_hash, cross_split_duplicates

    man = _two_channel_set(tmp_path)
    recs = read_manifest(man, ["t1", "flair"])
    h = content_hash(recs[0])
    assert h == content_hash({"image": list(recs[0]["image"])}) and h != content_hash(recs[1])
    # a test case that is a byte copy of a train case (both channels) is found; one channel alone is not
    shutil.copy(tmp_path / "p0_t1.png", tmp_path / "p6_t1.png")
    assert cross_split_duplicates(read_manifest(man, ["t1", "flair"])) == []
    shutil.copy(tmp_path / "p0_flair.png", tmp_path / "p6_flair.png")
    groups = cross_split_duplicates(read_manifest(man, ["t1", "flair"]))
    assert len(groups) == 1 and [r["patient_id"] for r in groups[0]] == ["P0", "P6"]
    bundle = prepare_data(_cfg_mc(man))
    assert [d["split"] for d in bundle.duplicates] == ["test"]
    assert bundle.duplicates[0]["file"] == str(tmp_path / "p6_t1.png")  # the case: its first channel
    # the fingerprint sees every channel's file
    fp = records_fingerprint(recs)
    (tmp_path / "p3_flair.png").write_bytes((tmp_path / "p3_flair.png").read_bytes() + b"\0" * 7)
    assert records_fingerprint(read_manifest(man, ["t1", "flair"])) != fp


def test_disk_cache_keys_include_channels_and_presets(tmp_path):
    from medmim.data.cache import item_key, transform_config, transform_key
    from medmim.data.dataset import materialize

    man = _two_channel_set(tmp_path)
    plain = load_config(None, ["data.image_size=16"]).data
    two = _cfg_mc(man).data
    zs = _cfg_mc(man, 'data.channels=[{"name": "t1", "preset": "mri_zscore"}, "flair"]').data
    assert "channels" not in transform_config(plain, "xray", False)  # grayscale caches keep their folder
    keys = {transform_key(dc, "xray", False) for dc in (plain, two, zs)}
    assert len(keys) == 3
    assert transform_config(zs, "xray", False)["channels"][0] == {"name": "t1", "preset": "mri_zscore", "series": None}
    recs = read_manifest(man, ["t1", "flair"])
    k = item_key({"image": recs[0]["image"]})
    assert k != item_key({"image": recs[0]["image"][:1]}) and k != item_key({"image": recs[0]["image"][::-1]})
    os.utime(recs[0]["image"][1], ns=(1, 1))  # the second channel's file changed: a new entry
    assert item_key({"image": recs[0]["image"]}) != k
    # disk cache round trip equals the memory chain
    dc = _cfg_mc(man, "data.cache=disk", f"data.cache_dir={tmp_path / 'cache'}").data
    disk = materialize(recs[:4], dc, "xray")
    again = materialize(recs[:4], dc, "xray")  # read back from the shards
    mem = materialize(recs[:4], two, "xray")
    for a, b, c in zip(disk, again, mem):
        assert a["image"].shape == (2, 16, 16)
        assert torch.equal(a["image"], c["image"]) and torch.equal(b["image"], c["image"])


def test_grayscale_disk_cache_folders_keep_their_pre_multichannel_keys():
    """Existing grayscale caches stay valid: the folder keys equal the ones computed before
    multi-channel inputs existed (commit 7b64c6c), for a 2D and a 3D config."""
    from medmim.data.cache import transform_key

    d2 = load_config(None, ["data.spatial_dims=2", "data.image_size=16", "data.resize=pad", "data.orientation=RAS",
                            "data.target_spacing=null"]).data
    d3 = load_config(None, ["data.spatial_dims=3", "data.image_size=32", "data.resize=stretch",
                            "data.orientation=RAS", "data.target_spacing=[1.5,1.5,2.0]"]).data
    assert transform_key(d2, "xray", False) == "0be09f2e25560b08"
    assert transform_key(d3, "ct_soft_tissue", True) == "5730a9bb30dee358"


def test_describe_failure_names_the_case_and_channel(tmp_path):
    from medmim.data.dataset import describe_failure

    man = _two_channel_set(tmp_path)
    rec = read_manifest(man, ["t1", "flair"])[0]
    Path(rec["image"][1]).write_bytes(b"not a picture")
    try:
        deterministic_transforms(_cfg_mc(man).data, "xray", with_mask=False)({"image": rec["image"]})
    except Exception as exc:  # noqa: BLE001
        info = describe_failure(rec, exc)
    assert info["file"] == rec["image"][1] and "unreadable" in info["reason"]
    info = describe_failure(rec, RuntimeError("boom"))
    assert info["file"] == rec["image"][0]  # a case is named by its first channel's file


def test_a_bad_label_of_a_multichannel_case_names_its_row_and_first_channel(tmp_path):
    man = _two_channel_set(tmp_path)
    text = man.read_text().replace("p2_t1.png,p2_flair.png,0,", "p2_t1.png,p2_flair.png,oops,")
    man.write_text(text)
    with pytest.raises(DataError) as exc:
        prepare_data(_cfg_mc(man))
    assert str(exc.value).startswith(f"m.csv row 4 ({tmp_path / 'p2_t1.png'}): label 'oops'")


def test_data_card_and_check_record_channels(tmp_path, capsys):
    from medmim.cli import main

    man = _two_channel_set(tmp_path)
    over = ["data.source=manifest", f"data.path={man}", 'data.channels=[{"name": "t1", "preset": "mri_zscore"}, "flair"]',
            "data.image_size=16", f"run.out_dir={tmp_path / 'runs'}", "run.name=mc"]
    assert main(["data", "card", "-c", "configs/demo.yaml" if Path("configs/demo.yaml").exists() else "demo",
                 *over, "--out", str(tmp_path / "card")]) == 0
    card = json.loads((tmp_path / "card.json").read_text())
    assert card["channels"] == [{"name": "t1", "preset": "mri_zscore", "series": None},
                                {"name": "flair", "preset": card["preset"], "series": None}]
    assert "| channels | 2: t1 (mri_zscore); flair (" in (tmp_path / "card.md").read_text()
    assert card["size_histogram"] == {"20×20": 8}
    assert main(["data", "card", "--manifest", str(man), "--channels", "t1,flair", "--out", str(tmp_path / "c2")]) == 0
    assert json.loads((tmp_path / "c2.json").read_text())["channels"][1]["name"] == "flair"
    capsys.readouterr()
    os.remove(tmp_path / "p2_flair.png")
    assert main(["data", "check", "-c", "demo", *over]) == 0
    out = capsys.readouterr().out
    summary = json.loads(out.splitlines()[0])
    assert summary["channels"]["t1"] == "mri_zscore" and summary["skipped"] == 1
    skipped = (tmp_path / "runs" / "mc" / "skipped.csv").read_text()
    assert "p2_flair.png" in skipped and "file not found" in skipped


def test_pool_manifest_follows_channels_and_single_image_sources_refused(tmp_path):
    man = _two_channel_set(tmp_path)
    rng = np.random.default_rng(9)
    pool_lines = ["image_t1,image_flair"]
    for i in range(3):
        for ch in ("t1", "flair"):
            _png(tmp_path / f"u{i}_{ch}.png", rng.random((20, 20)) * 255)
        pool_lines.append(f"u{i}_t1.png,u{i}_flair.png")
    pool_lines.append("p4_t1.png,p4_flair.png")  # a val case: dropped by the leakage guard
    pool_lines.append("u0_t1.png,")  # no flair: skipped and listed
    (tmp_path / "pool.csv").write_text("\n".join(pool_lines) + "\n")
    cfg = _cfg_mc(man, f"data.unlabelled=[{tmp_path / 'pool.csv'}]")
    bundle = prepare_data(cfg)
    assert len(bundle.pool) == 3 and all(isinstance(r["image"], list) for r in bundle.pool)
    assert bundle.pool_info["dropped"]["val"] == 1
    assert any("pool.csv row 6" in s["file"] for s in bundle.skipped)
    from medmim.data.dataset import materialize

    items = materialize(bundle.pool, cfg.data, bundle.preset)
    assert len(items) == 3 and items[0]["image"].shape == (2, 16, 16)
    (tmp_path / "folder").mkdir()
    _png(tmp_path / "folder" / "x.png", rng.random((20, 20)) * 255)
    with pytest.raises(DataError, match=r"folder: a 'folder' unlabelled source holds single images, but "
                                        r"data.channels declares 2 \(t1, flair\)"):
        prepare_data(_cfg_mc(man, f"data.unlabelled=[{tmp_path / 'folder'}]"))


def test_decathlon_multimodality_task_as_channels(tmp_path, capsys):
    """A Decathlon-layout task whose images are 4D (x, y, z, modality), read as channels."""
    import nibabel as nib

    from medmim.cli import main

    rng = np.random.default_rng(2)
    task = tmp_path / "Task01_BrainTumour"
    (task / "imagesTr").mkdir(parents=True)
    (task / "labelsTr").mkdir()
    training = []
    arrays = {}
    for i in range(4):
        vol = rng.gamma(2.0, 30.0, (10, 12, 8, 3)).astype(np.float32)
        arrays[i] = vol
        nib.save(nib.Nifti1Image(vol, np.eye(4)), str(task / "imagesTr" / f"BRATS_{i:03d}.nii.gz"))
        nib.save(nib.Nifti1Image((vol[..., 0] > 80).astype(np.uint8), np.eye(4)),
                 str(task / "labelsTr" / f"BRATS_{i:03d}.nii.gz"))
        training.append({"image": f"./imagesTr/BRATS_{i:03d}.nii.gz", "label": f"./labelsTr/BRATS_{i:03d}.nii.gz"})
    (task / "dataset.json").write_text(json.dumps({"name": "BrainTumour", "modality": {"0": "FLAIR", "1": "T1w",
                                                                                       "2": "T2w"},
                                                   "training": training, "test": []}))
    assert main(["data", "manifest", "--from", "decathlon", str(task), "--out", str(tmp_path / "m.csv")]) == 0
    assert "data.channels=[flair,t1w,t2w]" in capsys.readouterr().out
    dc = _dc("data.spatial_dims=3", "data.channels=[flair,t1w,t2w]", "data.orientation=null", "data.resize=none")
    rec = read_manifest(tmp_path / "m.csv", dc.channels)[0]
    out = deterministic_transforms(dc, "mri_zscore", with_mask=True)({"image": rec["image"], "mask": rec["mask"]})
    assert out["image"].shape == (3, 10, 12, 8) and out["mask"].shape == (1, 10, 12, 8)  # masks stay one channel
    i = int(Path(rec["image"]).name[6:9])
    for c in range(3):
        want = mt.NormalizeIntensity(nonzero=True)(torch.as_tensor(arrays[i][..., c])[None])
        np.testing.assert_allclose(out["image"][c].numpy(), np.asarray(want[0]), rtol=1e-5, atol=1e-5)


# ---- the fast 2D path on one picture per channel equals the MONAI chain ---------------------------------
@pytest.mark.parametrize("resize", ["pad", "stretch", "none"])
def test_fast_path_channels_equal_monai_chain(tmp_path, resize):
    from medmim.data.presets import PRESETS

    rng = np.random.default_rng(11)
    yy, xx = np.mgrid[0:90, 0:70]
    files = []
    for c in range(3):
        img = (120 + 80 * np.sin(xx / (9.0 + c)) * np.cos(yy / 13.0) + rng.normal(0, 20, (90, 70))).clip(0, 255)
        img[:10] = 0
        files.append(_png(tmp_path / f"f{c}.png", img))
    g16 = str(tmp_path / "g16.png")
    Image.fromarray((rng.random((90, 70)) * 4000).astype(np.uint16)).save(g16)
    arr = rng.normal(0, 300, (90, 70)).astype(np.float32)
    presets = list(PRESETS)
    for k in range(len(presets)):  # every preset, each in every channel position once
        chans = [{"name": f"c{i}", "preset": presets[(k + i) % len(presets)]} for i in range(3)]
        dc = _dc("data.image_size=32", f"data.resize={resize}", f"data.channels={json.dumps(chans)}")
        det = deterministic_transforms(dc, "xray", with_mask=False)
        for refs in ([files[0], g16, files[2]], [arr, files[1], files[0]]):
            fast = det.fast({"image": refs})
            assert fast is not None
            ref = det.reference({"image": refs})["image"]
            assert fast["image"].shape == ref.shape == ((3, 32, 32) if resize != "none" else (3, 90, 70))
            torch.testing.assert_close(fast["image"], torch.as_tensor(ref), rtol=1e-6, atol=1e-6)
    # what it does not take (unequal shapes, a bad channel) goes to the MONAI chain and its message
    dc = _dc("data.image_size=32", "data.channels=[a,b]")
    det = deterministic_transforms(dc, "xray", with_mask=False)
    small = _png(tmp_path / "small.png", rng.random((20, 20)) * 255)
    blank = _png(tmp_path / "blank.png", np.zeros((90, 70)))
    assert det.fast({"image": [files[0], small]}) is None
    from medmim.data.dataset import describe_failure

    for refs, needle in (([files[0], small], "channel 'b' .*small.png.* different geometry"),
                         ([files[0], blank], r"^empty image \(every voxel is 0\)")):
        with pytest.raises(Exception) as err:  # MONAI wraps the DataError; describe_failure unwraps it
            det({"image": refs})
        info = describe_failure({"image": refs}, err.value)
        assert re.search(needle, info["reason"]), info
    assert info["file"] == f"{blank} (channel 'b')"


@pytest.mark.skipif(not EXAMPLE4D.exists(), reason="nibabel's test data not installed")
def test_channel_axis_of_a_file_with_an_affine_must_be_the_last():
    with pytest.raises(DataError, match=r"data.channel_axis=0, but the first 3 axes of this file are space"):
        LoadRecordd.of(_dc("data.spatial_dims=3", "data.channels=[a,b]", "data.channel_axis=0"),
                       ["image"])({"image": str(EXAMPLE4D)})
    # an array (no affine) may hold its channels first: (C, H, W)
    arr = np.random.default_rng(0).random((2, 9, 7)).astype(np.float32)
    out = LoadRecordd.of(_dc("data.channels=[a,b]", "data.channel_axis=0"), ["image"])({"image": arr})["image"]
    np.testing.assert_array_equal(out.numpy(), arr)


def test_one_channel_picked_from_a_study_and_study_hash(study):
    from medmim.data.pool import content_hash

    root, vols = study
    dc = _dc("data.spatial_dims=3", 'data.channels=[{"name": "flair", "series": "flair*"}]')
    out = LoadRecordd.of(dc, ["image"])({"image": str(root)})["image"]
    assert out.shape == (1, 12, 10, 6)
    np.testing.assert_array_equal(out[0].numpy(), vols["flair"].transpose(1, 0, 2)[::-1, ::-1, :])
    # the pool's content hash of a study folder covers every series in it
    h = content_hash(str(root))
    f = sorted((root / "loc").iterdir())[0]
    f.write_bytes(f.read_bytes()[:-2] + b"\x01\x02")
    assert content_hash(str(root)) != h


def _set_tags(folder: Path, **tags) -> None:
    import pydicom

    for f in folder.iterdir():
        ds = pydicom.dcmread(str(f))
        for k, v in tags.items():
            setattr(ds, k, v)
        ds.save_as(str(f))


def test_dicom_manifest_by_study_reads_as_channels(tmp_path, capsys):
    from pydicom.uid import generate_uid

    from medmim.cli import main
    from medmim.data.synthetic import ct_like_volume, write_dicom_series

    root = tmp_path / "export"
    vols = {}
    for p in range(2):
        study_uid = generate_uid()
        for k, (name, desc) in enumerate((("t1", "T1 AX"), ("flair", "FLAIR AX"))):
            vol = ct_like_volume((10, 12, 6), seed=10 * p + k)
            folder, _ = write_dicom_series(root / f"pt{p}" / name, vol, patient_id=f"PID-{p}")
            _set_tags(folder, SeriesDescription=desc, StudyInstanceUID=study_uid)
            vols[p, name] = vol
    # a study whose folder also holds another study's series cannot be a study folder: listed, not guessed
    for q, sub in enumerate(("flat", "flat/other")):
        write_dicom_series(root / sub, ct_like_volume((8, 8, 4), seed=50 + q), patient_id=f"F{q}")
    out = tmp_path / "m.csv"
    assert main(["data", "manifest", "--from", "dicom", str(root), "--by-study", "--salt", "s", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "'FLAIR AX' (2)" in printed and "'T1 AX' (2)" in printed
    skipped = (tmp_path / "m.skipped.csv").read_text()
    assert "flat" in skipped and "other studies" in skipped
    dc = _dc("data.spatial_dims=3", 'data.channels=[{"name": "t1", "series": "t1 *"}, {"name": "flair"}]')
    recs = read_manifest(out, dc.channels)
    assert [Path(r["image"]).name for r in recs] == ["other", "pt0", "pt1"]  # flat/other: a folder of its own
    assert all(r["patient_id"].startswith("pt-") for r in recs)
    assert "PID" not in out.read_text()  # salted ids only
    from medmim.data.card import build_card

    card = build_card(recs[1:], name="study", channels=[{"name": c.name, "series": c.series} for c in dc.channels])
    assert card["geometry_sampled"]["unreadable"] == 0 and card["phi_scan"]["files_scanned"] == 24
    assert card["phi_scan"]["tags_with_values"]["PatientID"] == 24  # counted, never copied
    assert "PID-" not in json.dumps(card)
    for r in recs[1:]:
        p = int(Path(r["image"]).name[2:])
        x = LoadRecordd.of(dc, ["image"])({"image": r["image"]})["image"]
        for c, name in enumerate(("t1", "flair")):
            np.testing.assert_array_equal(x[c].numpy(), vols[p, name].transpose(1, 0, 2)[::-1, ::-1, :])


def test_a_channel_file_in_two_splits_is_leakage(tmp_path):
    from medmim.data.splits import check_leakage

    man = _two_channel_set(tmp_path)
    recs = read_manifest(man, ["t1", "flair"])
    check_leakage(recs)
    recs[6]["image"][1] = recs[0]["image"][1]  # a test case reusing a train case's flair file
    with pytest.raises(DataError, match=r"1 image file\(s\) appear in more than one split .*p0_flair.png"):
        check_leakage(recs)


GE = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "dicom_mr_ge_epi"


@pytest.mark.skipif(not GE.exists(), reason="../shared/datasets/dicom_mr_ge_epi not present")
def test_real_4d_dicom_series_time_points_as_channels():
    """Cine/fMRI: the time points of a real 4D series (GE EPI, 64×64×15×10) as channels, equal to the
    dcm2niix reference (through nibabel) per channel."""
    import nibabel as nib

    ref = nib.as_closest_canonical(nib.load(str(GE / "reference" / "dcm2niix_series5.nii")))
    data = np.asarray(ref.dataobj)
    names = ",".join(f"t{i}" for i in range(10))
    out = LoadRecordd.of(_dc("data.spatial_dims=3", f"data.channels=[{names}]"), ["image"])(
        {"image": str(GE / "series")})["image"]
    assert out.shape == (10, 64, 64, 15)
    for c in range(10):
        np.testing.assert_array_equal(out[c].numpy(), data[..., c])
    np.testing.assert_allclose(np.asarray(out.affine), ref.affine, atol=1e-3)
