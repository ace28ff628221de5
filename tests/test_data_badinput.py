"""Bad input, one case per kind: each is skipped with one clear message (file + reason) and listed
in the run's skipped report; a run fails only when nothing usable is left, or with data.strict."""

import csv

import numpy as np
import pytest

from medmim.config import load_config
from medmim.data.dataset import materialize, write_skipped
from medmim.data.synthetic import ct_like_volume, write_dicom_series, write_dicom_slice, write_nifti, write_png
from medmim.errors import DataError


def _cfg(*over):
    return load_config(None, ["data.spatial_dims=3", "data.image_size=8", *over]).data


def _good(tmp_path, name="good.nii.gz"):
    return write_nifti(tmp_path / name, ct_like_volume((10, 10, 6)))


def _truncated(tmp_path):
    p = write_nifti(tmp_path / "trunc.nii", ct_like_volume((10, 10, 6)))
    p.write_bytes(p.read_bytes()[:400])
    return {"image": str(p)}, "truncated"


def _corrupt_gz(tmp_path):
    p = tmp_path / "corrupt.nii.gz"
    p.write_bytes(b"\x1f\x8b" + bytes(range(200)))
    return {"image": str(p)}, "unreadable or truncated"


def _non_image(tmp_path):
    p = tmp_path / "notes.txt"
    p.write_text("hello")
    return {"image": str(p)}, "not an image file"


def _nan(tmp_path):
    v = ct_like_volume((10, 10, 6)).astype(np.float32)
    v[2, 3, 1] = np.nan
    v[1, 1, 1] = np.inf
    return {"image": str(write_nifti(tmp_path / "nan.nii.gz", v))}, "NaN/Inf values (2 of 600"


def _empty(tmp_path):
    return {"image": str(write_nifti(tmp_path / "zeros.nii.gz", np.zeros((10, 10, 6), np.int16)))}, "empty image"


def _zero_bytes(tmp_path):
    p = tmp_path / "zero.nii.gz"
    p.write_bytes(b"")
    return {"image": str(p)}, "empty file"


def _wrong_dims(tmp_path):
    return {"image": str(write_png(tmp_path / "flat.png", np.full((10, 12), 7) + np.eye(10, 12) * 9))}, \
        "wrong dimensionality: expected a 3D image, got shape (10, 12)"


def _shape_mismatch(tmp_path):
    img = _good(tmp_path, "img.nii.gz")
    mask = write_nifti(tmp_path / "mask.nii.gz", np.zeros((10, 10, 5), np.uint8))
    return {"image": str(img), "mask": str(mask)}, "image/mask shape mismatch"


def _dicom_no_pixels(tmp_path):
    p = write_dicom_slice(tmp_path / "nopix.dcm", None, series_uid="1.2.3", study_uid="1.2.4")
    return {"image": str(p)}, "without pixel data"


def _missing_slices(tmp_path):
    folder, uid = write_dicom_series(tmp_path / "gap", ct_like_volume((8, 8, 8)), skip=[3])
    return {"image": str(folder), "series_id": uid}, "missing slice"


def _mixed_orientation(tmp_path):
    folder, uid = write_dicom_series(tmp_path / "tilt", ct_like_volume((8, 8, 8)), tilt=[5])
    return {"image": str(folder), "series_id": uid}, "orientations"


def _missing_file(tmp_path):
    return {"image": str(tmp_path / "gone.nii.gz")}, "file not found"


KINDS = {f.__name__[1:]: f for f in (_truncated, _corrupt_gz, _non_image, _nan, _empty, _zero_bytes, _wrong_dims,
                                     _shape_mismatch, _dicom_no_pixels, _missing_slices, _mixed_orientation,
                                     _missing_file)}


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_bad_input_skipped_with_reason(tmp_path, kind):
    bad, needle = KINDS[kind](tmp_path)
    with_mask = "mask" in bad
    good = {"image": str(_good(tmp_path, "ok.nii.gz")), "label": 0}
    if with_mask:
        good["mask"] = str(write_nifti(tmp_path / "ok_mask.nii.gz", np.ones((10, 10, 6), np.uint8)))
    skipped = []
    items = materialize([good, {**bad, "label": 1}], _cfg(), "ct_soft_tissue", with_mask=with_mask, skipped=skipped)
    assert len(items) == 1 and len(skipped) == 1
    info = skipped[0]
    assert needle in info["reason"], info
    assert info["file"].startswith(str(tmp_path)) and "\n" not in info["reason"]
    # strict: the same input stops the run with one line naming the file
    with pytest.raises(DataError, match="data.strict") as err:
        materialize([good, bad], _cfg("data.strict=true"), "ct_soft_tissue", with_mask=with_mask)
    assert needle in str(err.value) and str(tmp_path) in str(err.value)


def test_nothing_usable_fails_and_report_written(tmp_path):
    bads = [KINDS[k](tmp_path)[0] for k in ("non_image", "empty", "missing_file")]
    skipped = []
    with pytest.raises(DataError, match="no usable images left"):
        materialize(bads, _cfg(), "ct_soft_tissue", skipped=skipped)
    assert len(skipped) == 3
    path = write_skipped(skipped + skipped[:1], tmp_path / "run" / "skipped.csv")
    rows = list(csv.DictReader(open(path)))
    assert [r["file"] for r in rows] == [s["file"] for s in skipped] and all(r["reason"] for r in rows)
    assert write_skipped([], tmp_path / "none.csv") is None


@pytest.mark.parametrize("cache", ["none", "disk"])
def test_bad_input_skipped_under_every_cache_mode(tmp_path, cache):
    good = {"image": str(_good(tmp_path)), "label": 0}
    bad, needle = _nan(tmp_path)
    skipped = []
    items = materialize([good, bad], _cfg(f"data.cache={cache}", f"data.cache_dir={tmp_path / 'c'}"),
                        "ct_soft_tissue", skipped=skipped)
    assert len(items) == 1 and needle in skipped[0]["reason"]
    assert items[0]["image"].shape == (1, 8, 8, 8)
