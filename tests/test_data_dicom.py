"""DICOM series reading: the real GE EPI series against its dcm2niix reference, synthetic series
(ordering, 4D, missing slices, mixed orientations, no pixel data, MONOCHROME1), PHI handling."""

from pathlib import Path

import numpy as np
import pytest

from medmim.data.builders import from_dicom
from medmim.data.dicom import phi_scan, read_series, scan_folder
from medmim.data.manifest import read_manifest, write_manifest
from medmim.data.readers import read_image
from medmim.data.synthetic import ct_like_volume, write_dicom_series, write_dicom_slice
from medmim.errors import DataError

GE = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "dicom_mr_ge_epi"


@pytest.mark.skipif(not GE.exists(), reason="../shared/datasets/dicom_mr_ge_epi not present")
def test_ge_epi_series_matches_dcm2niix_reference():
    """Compared in canonical RAS voxel order (the reference through nibabel.as_closest_canonical):
    voxel values exactly (both int16 without rescale), affine (orientation, spacing, origin) to 1e-3 mm."""
    import nibabel as nib

    series = scan_folder(GE / "series", salt="t", skipped=[])
    assert len(series) == 1
    files = next(iter(series.values())).files
    assert len(files) == 150
    vol, affine, meta = read_series(files)
    ref = nib.as_closest_canonical(nib.load(str(GE / "reference" / "dcm2niix_series5.nii")))
    ref_data = np.asarray(ref.dataobj)
    assert vol.shape == ref_data.shape == (64, 64, 15, 10)
    assert meta["n_timepoints"] == 10
    np.testing.assert_array_equal(vol, ref_data)
    np.testing.assert_allclose(affine, ref.affine, atol=1e-3)
    np.testing.assert_allclose(meta["spacing"], [3.75, 3.75, 5.0], atol=1e-4)
    # one time point through the manifest reader path (folder + frame)
    t3 = read_image(GE / "series", frame=3)
    np.testing.assert_array_equal(t3.numpy(), ref_data[..., 3])


def _expected_ras(vol_rows_cols_slices):
    # synthetic series: identity orientation (LPS); x = column, y = row; RAS flips x and y
    return vol_rows_cols_slices.transpose(1, 0, 2)[::-1, ::-1, :]


def test_synthetic_4d_series_order_from_headers(tmp_path):
    vol = ct_like_volume((10, 12, 6))
    folder, uid = write_dicom_series(tmp_path / "s", vol, spacing=(0.5, 0.8, 2.0), timepoints=3)
    arr, affine, meta = read_series(sorted(folder.iterdir()))
    assert arr.shape == (12, 10, 6, 3)
    for t in range(3):
        np.testing.assert_array_equal(arr[..., t], _expected_ras(vol) + 100 * t)
    np.testing.assert_allclose(np.abs(np.diag(affine)[:3]), [0.8, 0.5, 2.0])
    rows = from_dicom(tmp_path, salt="s")
    assert [r["frame"] for r in rows] == [0, 1, 2] and {r["series_id"] for r in rows} == {uid}


@pytest.mark.parametrize("kind,needle", [("missing", "missing slice"), ("tilted", "orientations")])
def test_broken_series_refused(tmp_path, kind, needle):
    vol = ct_like_volume((8, 8, 8))
    kw = {"skip": [4]} if kind == "missing" else {"tilt": [2]}
    folder, _ = write_dicom_series(tmp_path / kind, vol, **kw)
    with pytest.raises(DataError, match=needle) as err:
        read_series(sorted(folder.iterdir()))
    assert str(folder) in str(err.value)
    skipped = []
    with pytest.raises(DataError, match="no usable DICOM series"):
        from_dicom(tmp_path, salt="s", skipped=skipped)
    assert len(skipped) == 1 and needle in skipped[0]["reason"]


def test_missing_timepoint_refused(tmp_path):
    vol = ct_like_volume((8, 8, 5))
    folder, uid = write_dicom_series(tmp_path / "s", vol, timepoints=2)
    sorted(folder.iterdir())[0].unlink()
    with pytest.raises(DataError, match="unequal numbers"):
        read_series(sorted(folder.iterdir()))


def test_no_pixel_data_and_non_dicom_are_skipped(tmp_path):
    vol = ct_like_volume((8, 8, 4))
    write_dicom_series(tmp_path / "good", vol)
    write_dicom_slice(tmp_path / "nopix" / "a.dcm", None, series_uid="1.2.3", study_uid="1.2.4")
    (tmp_path / "notes.txt").write_text("not dicom")
    skipped = []
    series = scan_folder(tmp_path, salt="s", skipped=skipped)
    assert len(series) == 1
    reasons = {Path(s["file"]).name: s["reason"] for s in skipped}
    assert reasons == {"a.dcm": "DICOM file without pixel data", "notes.txt": "not a DICOM file"}
    with pytest.raises(DataError, match="without pixel data"):
        read_series([tmp_path / "nopix" / "a.dcm"])


def test_monochrome1_inverted(tmp_path):
    img = np.arange(64, dtype=np.int16).reshape(8, 8)
    p1 = write_dicom_slice(tmp_path / "m1.dcm", img, series_uid="1.2.9", study_uid="1.2.8", modality="CR",
                           photometric="MONOCHROME1")
    p2 = write_dicom_slice(tmp_path / "m2.dcm", img, series_uid="1.2.7", study_uid="1.2.8", modality="CR")
    a1 = read_image(p1).numpy()
    a2 = read_image(p2).numpy()
    assert a1.shape == a2.shape == (8, 8)  # 2D: (H, W) as displayed
    np.testing.assert_array_equal(a2, img)
    np.testing.assert_array_equal(a1, 63 - img)


def test_multiframe_enhanced_ct():
    from pydicom.data import get_testdata_file

    path = get_testdata_file("eCT_Supplemental.dcm")
    if path is None:
        pytest.skip("pydicom test file missing")
    arr, affine, meta = read_series([path])
    assert arr.shape == (512, 512, 2) and affine is not None
    assert meta["spacing"][2] > 0


def test_phi_never_written(tmp_path):
    vol = ct_like_volume((8, 8, 4))
    write_dicom_series(tmp_path / "d", vol, patient_id="SECRET-4711")
    rows = from_dicom(tmp_path / "d", salt="pepper")
    assert rows[0]["patient_id"].startswith("pt-") and "SECRET" not in rows[0]["patient_id"]
    assert from_dicom(tmp_path / "d", salt="other")[0]["patient_id"] != rows[0]["patient_id"]
    out = write_manifest(rows, tmp_path / "m.csv", relative_to=tmp_path)
    text = out.read_text()
    assert "SECRET" not in text and "Synthetic" not in text and "19000101" not in text
    tags = phi_scan(sorted((tmp_path / "d").iterdir()))
    assert tags["PatientID"] == 4 and tags["PatientName"] == 4 and tags["PatientBirthDate"] == 4
    assert all(isinstance(v, int) for v in tags.values())
    # the manifest reads back and loads
    rec = read_manifest(out)[0]
    assert read_image(rec["image"], series_id=rec["series_id"]).shape == (8, 8, 4)
