"""`medmim predict`: masks overlay their input voxel for voxel; bad files are reported and skipped;
classification writes a CSV of probabilities."""

from __future__ import annotations

import csv
import io

import nibabel as nib
import numpy as np
import pytest
import torch
from torch import nn

from medmim.cli import main
from medmim.config import dump_config, load_config
from medmim.predict import Predictor, predict


class Thresholder(nn.Module):
    """A pointwise 'segmenter': foreground where the (preset-scaled) intensity exceeds 0.5."""

    def __init__(self, in_channels: int = 1):
        super().__init__()
        self.encoder = nn.Identity()
        self.encoder.in_channels = in_channels

    def forward(self, x):
        fg = (x[:, :1] - 0.5) * 10
        return torch.cat([torch.zeros_like(fg), fg], 1)


def seg_predictor(d: int, image_size: int = 16, extra: tuple[str, ...] = ()) -> Predictor:
    cfg = load_config(None, [f"data.spatial_dims={d}", f"data.image_size={image_size}", "finetune.head=segment",
                             "finetune.num_seg_classes=2", *extra])
    return Predictor(Thresholder(), cfg, preset="uint8")


def oblique_lps_affine() -> np.ndarray:
    """Anisotropic voxels, axes flipped (LPS-like: i -> left, j -> posterior) and rotated 20 deg."""
    t = np.deg2rad(20)
    rot = np.array([[np.cos(t), -np.sin(t), 0], [np.sin(t), np.cos(t), 0], [0, 0, 1]])
    aff = np.eye(4)
    aff[:3, :3] = rot @ np.diag([-0.8, -1.2, 2.5])
    aff[:3, 3] = [31.5, -12.25, 80.0]
    return aff


def write_nifti(path, arr, affine):
    img = nib.Nifti1Image(arr, affine)
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=2)
    nib.save(img, str(path))
    return path


def cube_volume(shape=(20, 24, 16)):
    vol = np.zeros(shape, np.uint8)
    vol[5:9, 10:15, 3:7] = 255
    return vol


@pytest.mark.parametrize("native", [True, False])
def test_nifti_mask_roundtrip_geometry(tmp_path, native):
    affine = oblique_lps_affine()
    shape = (20, 24, 16) if native else (16, 16, 16)  # resize mode is exact when sizes agree
    src = write_nifti(tmp_path / "ct.nii.gz", cube_volume(shape), affine)
    res = predict(None, [src], tmp_path / "out", native=native, predictor=seg_predictor(3), progress=False)
    assert res.ok and len(res.outputs) == 1
    mask_img = nib.load(res.outputs[0])
    src_img = nib.load(str(src))
    assert mask_img.shape == src_img.shape
    np.testing.assert_allclose(mask_img.affine, src_img.affine, atol=1e-5)
    assert nib.aff2axcodes(mask_img.affine) == nib.aff2axcodes(src_img.affine)
    assert int(mask_img.header["sform_code"]) == 2 and int(mask_img.header["qform_code"]) == 1
    mask = np.asarray(mask_img.dataobj)
    np.testing.assert_array_equal(np.argwhere(mask == 1), np.argwhere(np.asarray(src_img.dataobj) == 255))


@pytest.mark.parametrize("extra", [(), ("data.target_spacing=[1.5,1.5,1.5]",)])
def test_nifti_mask_resized_inference_stays_in_place(tmp_path, extra):
    """Inference on the training grid (16^3) of a 20x24x16 oblique LPS volume (reoriented to RAS,
    optionally resampled to 1.5 mm, padded, resized), taken back through the chain: the cube stays put."""
    src = write_nifti(tmp_path / "ct.nii", cube_volume(), oblique_lps_affine())
    from scipy import ndimage

    res = predict(None, [src], tmp_path / "out", predictor=seg_predictor(3, 32, extra=extra), progress=False)
    mask = np.asarray(nib.load(res.outputs[0]).dataobj)
    truth = cube_volume() > 0
    dice = 2 * (mask.astype(bool) & truth).sum() / (mask.astype(bool).sum() + truth.sum())
    assert dice > 0.85  # below 1 only by the resampling's partial volumes
    np.testing.assert_allclose(ndimage.center_of_mass(mask), ndimage.center_of_mass(truth), atol=0.5)
    assert mask[7, 12, 5] == 1 and mask[0, 0, 0] == 0


def test_png_mask_roundtrip(tmp_path):
    from PIL import Image

    pic = np.zeros((20, 28), np.uint8)  # rows x columns, not square
    pic[3:8, 10:21] = 255
    Image.fromarray(pic).save(tmp_path / "xray.png")
    res = predict(None, [tmp_path / "xray.png"], tmp_path / "out", native=True, predictor=seg_predictor(2),
                  progress=False)
    out = np.array(Image.open(res.outputs[0]))
    assert res.outputs[0].endswith("xray_seg.png")
    np.testing.assert_array_equal(out, (pic > 0).astype(np.uint8))


def test_pictures_reach_the_model_as_rows_and_columns(tmp_path):
    """A non-square picture reaches the model as (rows, columns), the layout PIL (an independent
    reader) gives, whatever the training source was; the mask lands on the picture."""
    from PIL import Image

    pic = np.zeros((20, 28), np.uint8)
    pic[3:8, 10:21] = 255
    Image.fromarray(pic).save(tmp_path / "xray.png")
    reference = np.asarray(Image.open(tmp_path / "xray.png"), dtype=np.float32) / 255.0  # (20, 28)
    for source in (["data.source=medmnist", "data.path=x.npz"], []):
        cfg = load_config(None, [*source, "data.image_size=28", "data.resize=none", "finetune.head=segment"])
        model = Predictor(Thresholder(), cfg, preset="uint8")
        image = model.read(tmp_path / "xray.png")
        assert tuple(image.shape) == (1, 20, 28)
        np.testing.assert_array_equal(image[0].numpy(), reference)
        res = predict(None, [tmp_path / "xray.png"], tmp_path / "out", native=True, predictor=model, progress=False)
        np.testing.assert_array_equal(np.array(Image.open(res.outputs[0])), (pic > 0).astype(np.uint8))


def test_padded_picture_keeps_its_aspect_and_mask_returns_to_source_grid(tmp_path):
    """Default (resize=pad) on a 20x28 picture: the model input is the training-size square with the
    picture scaled by its longest side and padded (not stretched); the mask comes back at 20x28."""
    from PIL import Image

    pic = np.full((20, 28), 40, np.uint8)  # a grey background, so the padding (0) is told apart
    pic[4:16, 6:22] = 255
    Image.fromarray(pic).save(tmp_path / "wide.png")
    model = seg_predictor(2, image_size=16)
    image = model.read(tmp_path / "wide.png")
    assert tuple(image.shape) == (1, 16, 16)
    rows_with_picture = np.where(image[0].numpy().max(1) > 0)[0]
    # 28 -> 16 columns, 20 -> round(11.4) = 11 rows, padded symmetrically (2 above, 3 below)
    np.testing.assert_array_equal(rows_with_picture, np.arange(2, 13))
    assert image[0].numpy()[2:13].min() > 0  # every column holds picture: the width is not padded
    res = predict(None, [tmp_path / "wide.png"], tmp_path / "out", predictor=model, progress=False)
    mask = np.array(Image.open(res.outputs[0]))
    assert mask.shape == (20, 28)
    truth = pic > 128
    assert 2 * (mask.astype(bool) & truth).sum() / (mask.astype(bool).sum() + truth.sum()) > 0.9


def test_predict_goes_on_past_bad_files(tmp_path):
    good = write_nifti(tmp_path / "good.nii.gz", cube_volume(), np.eye(4))
    corrupt = tmp_path / "corrupt.nii.gz"
    corrupt.write_bytes(b"this is not a nifti file" * 10)
    flat = write_nifti(tmp_path / "slice.nii.gz", np.zeros((16, 16), np.uint8), np.eye(4))
    two_ch = write_nifti(tmp_path / "twochannel.nii.gz", np.zeros((16, 16, 16, 2), np.uint8), np.eye(4))
    good2 = write_nifti(tmp_path / "good2.nii.gz", cube_volume(), np.eye(4))
    err = io.StringIO()
    files = [good, corrupt, flat, tmp_path / "missing.nii.gz", two_ch, good2]
    res = predict(None, files, tmp_path / "out", predictor=seg_predictor(3), err=err, progress=False)
    assert len(res.outputs) == 2
    reasons = {f["file"].split("/")[-1]: f["reason"] for f in res.failures}
    assert set(reasons) == {"corrupt.nii.gz", "slice.nii.gz", "missing.nii.gz", "twochannel.nii.gz"}
    assert "unreadable or truncated image" in reasons["corrupt.nii.gz"]
    assert "expected a 3D image" in reasons["slice.nii.gz"]
    assert "expected a 3D image" in reasons["twochannel.nii.gz"] and "(16, 16, 16, 2)" in reasons["twochannel.nii.gz"]
    assert "not found" in reasons["missing.nii.gz"]
    lines = err.getvalue().strip().splitlines()
    assert len(lines) == 4 and all(line.startswith("medmim predict: ") for line in lines)
    with open(tmp_path / "out" / "errors.csv") as fh:
        assert len(list(csv.DictReader(fh))) == 4


def test_classification_predict_cli(tmp_path, capsys):
    """A run directory as finetune writes it -> `medmim predict` -> predictions.csv."""
    from PIL import Image

    from medmim.models import encoder_from_config
    from medmim.models.heads import Classifier
    from medmim.train.checkpoint import save_checkpoint

    cfg = load_config(None, ["data.image_size=16", "data.num_classes=3", "encoder.embed_dim=16", "encoder.depth=1",
                             "encoder.num_heads=2", "encoder.patch_size=4"])
    run = tmp_path / "runs" / "clf"
    (run / "finetune" / "checkpoints").mkdir(parents=True)
    (run / "config.yaml").write_text(dump_config(cfg))
    (run / "environment.json").write_text('{"data": {"preset": "uint8"}}')  # as finetune records it
    model = Classifier(encoder_from_config(cfg.encoder, 2, 16), 3, mode="linear")
    save_checkpoint({"model": model.state_dict(), "epoch": 0}, run / "finetune" / "checkpoints" / "best.pt")
    images = tmp_path / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    for i in range(3):
        Image.fromarray(rng.integers(0, 255, (28, 28), dtype=np.uint8)).save(images / f"img{i}.png")
    (images / "broken.png").write_bytes(b"\x89PNG not really")
    rc = main(["predict", str(run), str(images), "-o", str(tmp_path / "pred")])
    captured = capsys.readouterr()
    assert rc == 1  # one file failed
    assert "broken.png" in captured.err and "predicted 3 file(s)" in captured.out
    with open(tmp_path / "pred" / "predictions.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert [r["file"].split("/")[-1] for r in rows] == ["img0.png", "img1.png", "img2.png"]
    for r in rows:
        probs = [float(r[f"prob_{c}"]) for c in range(3)]
        assert sum(probs) == pytest.approx(1.0, abs=1e-4)
        assert int(r["predicted"]) == int(np.argmax(probs))


def test_dicom_series_folder_is_one_volume_and_its_mask_overlays_it(tmp_path):
    """A folder of DICOM slices is one input; the mask (NIfTI) has the series' voxel grid and RAS
    affine as an independent reading (SimpleITK's series reader) gives them."""
    import SimpleITK as sitk

    from medmim.data.synthetic import write_dicom_series

    vol = np.full((18, 14, 10), -1000, np.int16)  # rows, columns, slices (HU)
    vol[3:8, 4:11, 2:6] = 400
    folder, _uid = write_dicom_series(tmp_path / "scan" / "series1", vol, spacing=(0.8, 1.1, 2.0))
    pred = seg_predictor(3, extra=("data.modality=ct",))
    res = predict(None, [tmp_path / "scan"], tmp_path / "out", native=True, predictor=pred, progress=False)
    assert res.ok and len(res.outputs) == 1
    mask_img = nib.load(res.outputs[0])
    reader = sitk.ImageSeriesReader()
    ref = reader.Execute() if reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(folder))) is None else None
    ref_arr = np.transpose(sitk.GetArrayFromImage(ref), (2, 1, 0))  # (x, y, z), LPS
    lps = np.eye(4)
    lps[:3, :3] = np.array(ref.GetDirection()).reshape(3, 3) @ np.diag(ref.GetSpacing())
    lps[:3, 3] = ref.GetOrigin()
    ref_img = nib.as_closest_canonical(nib.Nifti1Image(ref_arr, np.diag([-1.0, -1, 1, 1]) @ lps))
    assert mask_img.shape == ref_img.shape
    np.testing.assert_allclose(mask_img.affine, ref_img.affine, atol=1e-4)
    np.testing.assert_array_equal(np.asarray(mask_img.dataobj) == 1, np.asarray(ref_img.dataobj) > 255)


def test_a_manifest_row_predicts_its_own_time_point_of_a_4d_file(tmp_path):
    """A manifest given to predict keeps each row's ``frame``: two rows naming two time points of one
    4D NIfTI are two inputs, each mask is its own time point's foreground (the array written)."""
    vol = np.zeros((12, 14, 8, 2), np.uint8)
    vol[2:5, 3:7, 1:4, 0] = 255
    vol[6:10, 8:12, 4:7, 1] = 255
    write_nifti(tmp_path / "cine.nii.gz", vol, np.eye(4))
    (tmp_path / "cases.csv").write_text("image,frame\ncine.nii.gz,0\ncine.nii.gz,1\n")
    res = predict(None, [tmp_path / "cases.csv"], tmp_path / "out", native=True, predictor=seg_predictor(3),
                  progress=False)
    assert res.ok, res.failures
    assert sorted(p.rsplit("/", 1)[-1] for p in res.outputs) == ["cine_t0_seg.nii.gz", "cine_t1_seg.nii.gz"]
    for t in (0, 1):
        out = nib.load(str(tmp_path / "out" / f"cine_t{t}_seg.nii.gz"))
        np.testing.assert_array_equal(np.asanyarray(out.dataobj), (vol[..., t] > 0).astype(np.uint8))
