"""medmim's readers against independent readers on real and constructed files:

* every CT/MR DICOM file with pixel data in pydicom's test data and pydicom-data: values and
  geometry equal SimpleITK's, unless refused with a reason (bench/bench_readers.py records the table);
* JPEG-LS, JPEG-lossless and JPEG 2000 compressed DICOM decode (pylibjpeg plugins) to SimpleITK's values;
* enhanced CT: the rescale intercept from the shared functional groups (air at about -1024 HU);
* pictures: CMYK, palette, RGBA, LA, 1-bit become grey exactly as PIL ``convert("L")``; masks keep palette indices;
* NIfTI through the chain's orientation step equals ``nibabel.as_closest_canonical``; the
  sform/qform policy is nibabel's, with a warning naming the file when they disagree.
"""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from medmim.config import load_config
from medmim.data.readers import NiftiAffineWarning, read_image

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import bench_readers  # noqa: E402


def _testdata(name: str) -> Path:
    from pydicom.data import get_testdata_file

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        path = get_testdata_file(name)
    if path is None:
        pytest.skip(f"pydicom test file {name} not installed")
    return Path(path)


def test_every_real_ct_mr_dicom_equals_simpleitk_or_is_refused_with_a_reason():
    files = bench_readers.real_dicom_files()
    assert len(files) >= 25, "pydicom test data and pydicom-data should hold ~29 CT/MR files"
    rows = bench_readers.sweep(files)
    different = [r for r in rows if r["status"] == "different"]
    assert not different, different
    equal = [r for r in rows if r["status"] == "equal"]
    assert len(equal) >= 20
    assert all(r["reason"] for r in rows if r["status"] == "refused")


@pytest.mark.parametrize("compressed,reference", [
    ("MR_small_jpeg_ls_lossless.dcm", "MR_small.dcm"),       # JPEG-LS lossless
    ("MR_small_jp2klossless.dcm", "MR_small.dcm"),           # JPEG 2000 lossless
    ("bad_sequence.dcm", None),                               # JPEG lossless (process 14, SV1), CT
    ("JPEG-LL.dcm", None),                                    # JPEG lossless, 16-bit (pydicom-data)
])
def test_compressed_dicom_decodes_like_simpleitk(compressed, reference):
    import pydicom
    import SimpleITK as sitk

    path = _testdata(compressed)
    ts = pydicom.dcmread(path, stop_before_pixels=True).file_meta.TransferSyntaxUID
    assert ts.is_compressed
    ours = read_image(path).numpy()
    ref = sitk.GetArrayFromImage(sitk.ReadImage(str(path)))[0]
    np.testing.assert_array_equal(ours, ref.astype(np.float32))
    if reference:  # the same pixels as the uncompressed original
        np.testing.assert_array_equal(ours, read_image(_testdata(reference)).numpy())


def test_enhanced_ct_rescale_from_shared_functional_groups():
    import pydicom

    from medmim.data.dicom import read_series, rescale_of

    path = _testdata("eCT_Supplemental.dcm")
    ds = pydicom.dcmread(path)
    assert "RescaleIntercept" not in ds  # only in the shared functional groups
    shared = ds.SharedFunctionalGroupsSequence[0].PixelValueTransformationSequence[0]
    assert rescale_of(ds, 0) == (float(shared.RescaleSlope), float(shared.RescaleIntercept)) == (1.0, -1024.0)
    vol, _aff, _meta = read_series([path])
    raw = ds.pixel_array.astype(np.float64)
    assert vol.min() == raw.min() - 1024  # air at about -1024 HU, not 0
    np.testing.assert_array_equal(np.sort(vol.ravel()), np.sort(raw.ravel() - 1024))


@pytest.mark.parametrize("mode", ["CMYK", "P", "RGBA", "LA", "1", "RGB"])
def test_pictures_become_grey_as_pil_convert_L(tmp_path, mode):
    from PIL import Image

    rng = np.random.default_rng(0)
    rgb = Image.fromarray((rng.random((13, 21, 3)) * 255).astype(np.uint8))
    img = rgb.convert(mode) if mode != "P" else rgb.quantize(17)
    suffix = ".jpg" if mode == "CMYK" else ".png"
    path = tmp_path / f"pic_{mode}{suffix}"
    img.save(path)
    with Image.open(path) as check:
        assert check.mode == mode
        expected = np.asarray(check.convert("L"), dtype=np.float32)
    got = read_image(path).numpy()
    assert got.shape == (13, 21)
    np.testing.assert_array_equal(got.astype(np.float32), expected)


def test_palette_mask_keeps_its_label_indices(tmp_path):
    from PIL import Image

    labels = np.zeros((9, 12), np.uint8)
    labels[2:5, 3:9] = 1
    labels[6:8, 1:4] = 2
    img = Image.fromarray(labels, mode="L").convert("P")
    img.putpalette([0, 0, 0, 255, 0, 0, 0, 255, 0] + [0] * (253 * 3))
    img.save(tmp_path / "mask.png")
    np.testing.assert_array_equal(read_image(tmp_path / "mask.png", key="mask").numpy(), labels)


def _chain_volume(path: Path, image_size: int = 32):
    """The deterministic chain's geometry steps on ``path`` (no resizing; uint8 preset)."""
    from medmim.data.dataset import deterministic_transforms

    cfg = load_config(None, ["data.spatial_dims=3", f"data.image_size={image_size}", "data.resize=none"])
    out = deterministic_transforms(cfg.data, "uint8", with_mask=False, track_meta=True)({"image": str(path)})["image"]
    return out[0].numpy() * 255.0, np.asarray(out.affine, dtype=np.float64)


def _save(path: Path, data: np.ndarray, affine: np.ndarray, qform: np.ndarray | None = None,
          sform_code: int = 1, qform_code: int = 1) -> Path:
    img = nib.Nifti1Image(data, affine)
    img.set_qform(affine if qform is None else qform, code=qform_code)
    img.set_sform(affine, code=sform_code)
    nib.save(img, str(path))
    return path


def _affines() -> dict[str, np.ndarray]:
    base = np.diag([0.9, 1.2, 2.5, 1.0])
    base[:3, 3] = [-30, 12, 40]
    lps = base @ np.array([[-1, 0, 0, 9], [0, -1, 0, 10], [0, 0, 1, 0], [0, 0, 0, 1.0]])
    sra = np.zeros((4, 4))
    sra[:3, :3] = np.array([[0, 0, 1.1], [0, -0.8, 0], [2.0, 0, 0]])  # i -> S, j -> P, k -> R... (SPR)
    sra[:3, 3] = [5, 6, 7]
    sra[3, 3] = 1
    t = np.deg2rad(25)
    rot = np.eye(4)
    rot[[0, 0, 2, 2], [0, 2, 0, 2]] = [np.cos(t), np.sin(t), -np.sin(t), np.cos(t)]
    return {"ras": base, "lps": lps, "spr": sra, "oblique": rot @ lps}


@pytest.mark.parametrize("name", ["ras", "lps", "spr", "oblique"])
def test_nifti_through_the_chain_equals_nibabel_closest_canonical(tmp_path, name):
    rng = np.random.default_rng(1)
    data = rng.integers(0, 256, (10, 7, 5)).astype(np.uint8)
    path = _save(tmp_path / f"{name}.nii.gz", data, _affines()[name])
    ours, affine = _chain_volume(path)
    ref = nib.as_closest_canonical(nib.load(str(path)))
    np.testing.assert_allclose(ours, np.asarray(ref.dataobj, dtype=np.float64), atol=1e-4)
    np.testing.assert_allclose(affine, ref.affine, atol=1e-5)
    assert nib.aff2axcodes(affine) == ("R", "A", "S")


def test_sform_qform_policy_is_nibabels_and_a_disagreement_is_named(tmp_path, caplog):
    data = np.arange(60, dtype=np.int16).reshape(5, 4, 3)
    sform = np.diag([1.0, 1.0, 3.0, 1.0])
    qform = np.diag([-1.0, 1.0, 3.0, 1.0])  # flipped x: the two disagree
    path = _save(tmp_path / "mixed.nii.gz", data, sform, qform=qform)
    with pytest.warns(NiftiAffineWarning, match="mixed.nii.gz: sform and qform disagree"):
        img = read_image(path)
    np.testing.assert_allclose(np.asarray(img.affine), nib.load(str(path)).affine)  # nibabel's: the sform
    np.testing.assert_allclose(np.asarray(img.affine), sform)
    # sform_code 0: the qform (as nibabel), and nothing to warn about
    path2 = _save(tmp_path / "qonly.nii.gz", data, sform, qform=qform, sform_code=0)
    with warnings.catch_warnings():
        warnings.simplefilter("error", NiftiAffineWarning)
        img2 = read_image(path2)
    np.testing.assert_allclose(np.asarray(img2.affine), nib.load(str(path2)).affine)
    np.testing.assert_allclose(np.asarray(img2.affine), qform)
    # agreeing forms: no warning
    with warnings.catch_warnings():
        warnings.simplefilter("error", NiftiAffineWarning)
        read_image(_save(tmp_path / "same.nii.gz", data, sform))


def test_colour_dicom_becomes_grey_as_pil_convert_L():
    """A real colour ultrasound DICOM (JPEG 2000, YBR_RCT): grey levels equal PIL's convert("L") of
    the RGB pixels pydicom decodes."""
    import pydicom
    from PIL import Image

    path = _testdata("US1_J2KR.dcm")
    rgb = pydicom.dcmread(path).pixel_array
    assert rgb.ndim == 3 and rgb.shape[-1] == 3 and rgb.dtype == np.uint8
    expected = np.asarray(Image.fromarray(rgb, mode="RGB").convert("L"), dtype=np.float32)
    np.testing.assert_array_equal(read_image(path).numpy(), expected)
