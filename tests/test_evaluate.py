"""`medmim evaluate` and `medmim predict` replay the run's own chain: the per-image probabilities of
predict equal evaluate's on the same split (1e-5), for non-square PNG, JPEG, DICOM (MONOCHROME1
and 2), NIfTI stored RAS / LPS / oblique, and a DICOM series folder given as one volume. Evaluate
reads the run's config, never writes into the run, and writes per-image predictions with class
names, a confusion matrix, per-class metrics with CIs (checked against scikit-learn); segmentation
runs get Dice / HD95 per class."""

from __future__ import annotations

import csv
import hashlib
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from medmim.cli import main
from medmim.config import dump_config, load_config

TINY_VIT = ["encoder.embed_dim=16", "encoder.depth=1", "encoder.num_heads=2", "encoder.patch_size=4"]


def _tree_digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _make_run(tmp_path: Path, overrides: list[str], preset: str, name: str = "clf", seed: int = 0) -> Path:
    """A classification run as `medmim finetune` leaves it: config.yaml + environment.json (preset)
    at the run root, finetune/checkpoints/best.pt (a randomly initialised model)."""
    import torch

    from medmim.models import encoder_from_config
    from medmim.models.heads import Classifier
    from medmim.train.checkpoint import save_checkpoint

    if not any(o.startswith("data.num_classes=") for o in overrides):
        overrides = [*overrides, "data.num_classes=2"]  # as the trained run's config.yaml records it
    cfg = load_config(None, [*overrides, *TINY_VIT, f"run.name={name}", f"run.out_dir={tmp_path / 'runs'}",
                             "run.device=cpu", "run.num_threads=1", "finetune.bootstrap=50",
                             *([] if any(o.startswith("data.num_classes=") for o in overrides) else
                               ["data.num_classes=2"])])  # a real run's config.yaml has it filled from the data
    run = tmp_path / "runs" / name
    (run / "finetune" / "checkpoints").mkdir(parents=True)
    (run / "config.yaml").write_text(dump_config(cfg))
    (run / "environment.json").write_text(json.dumps({"data": {"preset": preset}}))
    torch.manual_seed(seed)
    model = Classifier(encoder_from_config(cfg.encoder, cfg.data.spatial_dims, cfg.data.image_size),
                       cfg.data.num_classes, mode="full")
    save_checkpoint({"model": model.state_dict(), "epoch": 0}, run / "finetune" / "checkpoints" / "best.pt")
    return run


def _write_manifest(path: Path, rows: list[dict]) -> Path:
    cols = ["image", "label", "patient_id", "split", "series_id"]
    with open(path, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=cols, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({"series_id": "", **r})
    return path


def _probs(table: Path, names: list[str]) -> dict[str, np.ndarray]:
    with open(table) as fh:
        rows = list(csv.DictReader(fh))
    return {str(Path(r["file"]).resolve()): np.array([float(r[f"prob_{n}"]) for n in names]) for r in rows}


def _assert_same_probabilities(run: Path, inputs: list[Path], tmp_path: Path, names: list[str]) -> dict:
    before = _tree_digest(run)
    assert main(["evaluate", str(run), "run.num_threads=1", "--split", "test", "-o", str(tmp_path / "ev")]) == 0
    assert _tree_digest(run) == before, "evaluate wrote into the run it evaluates"
    assert main(["predict", str(run), *map(str, inputs), "-o", str(tmp_path / "pr")]) == 0
    ev, pr = _probs(tmp_path / "ev" / "predictions.csv", names), _probs(tmp_path / "pr" / "predictions.csv", names)
    assert set(ev) == set(pr) and len(ev) == len(inputs)
    for key in ev:
        np.testing.assert_allclose(pr[key], ev[key], atol=1e-5, err_msg=key)
    return ev


def test_2d_pictures_and_dicom_predict_equals_evaluate(tmp_path):
    from PIL import Image

    from medmim.data.synthetic import write_dicom_slice

    rng = np.random.default_rng(0)
    img = tmp_path / "img"
    img.mkdir()
    files = []
    for i in range(3):  # non-square grey PNGs with a bright off-centre block: transposing would move it
        a = (rng.random((24, 40)) * 60).astype(np.uint8)
        a[2:10, 25 + i:37] = 230
        Image.fromarray(a).save(img / f"wide{i}.png")
        files.append(img / f"wide{i}.png")
    rgb = (rng.random((30, 20, 3)) * 255).astype(np.uint8)
    Image.fromarray(rgb).save(img / "photo.jpg", quality=90)
    files.append(img / "photo.jpg")
    cr = (rng.random((36, 28)) * 1000).astype(np.int16)
    cr[5:12, 3:20] = 3000
    # the same picture stored both ways: MONOCHROME1 stores max + min - v for displayed value v
    for photometric, stored in (("MONOCHROME1", (cr.max() + cr.min() - cr).astype(np.int16)), ("MONOCHROME2", cr)):
        p = write_dicom_slice(img / f"cr_{photometric}.dcm", stored, series_uid=f"1.2.3.{photometric[-1]}",
                              study_uid="1.2.3", modality="CR", photometric=photometric)
        files.append(p)
    rows = [{"image": str(f), "label": i % 2, "patient_id": f"p{i}", "split": "test"} for i, f in enumerate(files)]
    Image.fromarray((rng.random((24, 40)) * 255).astype(np.uint8)).save(tmp_path / "train.png")
    rows += [{"image": str(tmp_path / "train.png"), "label": 0, "patient_id": "q", "split": "train"}]
    manifest = _write_manifest(tmp_path / "m.csv", rows)
    run = _make_run(tmp_path, ["data.source=manifest", f"data.path={manifest}", "data.image_size=16",
                               "data.modality=xray"], preset="xray")
    ev = _assert_same_probabilities(run, files, tmp_path, ["0", "1"])
    spread = np.ptp(np.stack(list(ev.values()))[:, 1])
    assert spread > 1e-4  # the model's output depends on the image: equality is not trivial
    # MONOCHROME1 is inverted on reading: both storages of one picture reach the model alike
    np.testing.assert_allclose(ev[str(files[-2].resolve())], ev[str(files[-1].resolve())], atol=1e-5)


def _oblique(affine: np.ndarray, degrees: float = 20) -> np.ndarray:
    t = np.deg2rad(degrees)
    rot = np.eye(4)
    rot[:2, :2] = [[np.cos(t), -np.sin(t)], [np.sin(t), np.cos(t)]]
    return rot @ affine


def test_3d_nifti_orientations_and_dicom_series_predict_equals_evaluate(tmp_path):
    from medmim.data.synthetic import ct_like_volume, write_dicom_series

    rng = np.random.default_rng(1)
    vol = ct_like_volume((20, 16, 12), seed=3).astype(np.int16)  # RAS voxel order, 1 x 1.5 x 2 mm
    vol[2:6, 10:14, 1:5] = 900  # an asymmetric block: a flipped or transposed read moves it
    ras = np.diag([1.0, 1.5, 2.0, 1.0])
    ras[:3, 3] = [-10, 20, 5]
    folder = tmp_path / "vols"
    folder.mkdir()
    flip = np.diag([-1.0, -1.0, 1.0, 1.0])  # LPS voxel order: i runs to the left, j to the posterior
    lps_affine = ras @ np.array([[-1, 0, 0, 19], [0, -1, 0, 15], [0, 0, 1, 0], [0, 0, 0, 1.0]])
    lps_data = vol[::-1, ::-1, :]
    for name, data, aff in (("ras", vol, ras), ("lps", lps_data, lps_affine), ("oblique", vol, _oblique(ras))):
        img = nib.Nifti1Image(np.ascontiguousarray(data), aff)
        img.set_qform(aff, code=1)
        img.set_sform(aff, code=1)
        nib.save(img, str(folder / f"{name}.nii.gz"))
    assert nib.aff2axcodes(lps_affine) == ("L", "P", "S") and np.allclose(flip @ flip, np.eye(4))
    other = ct_like_volume((20, 16, 12), seed=4).astype(np.int16)
    series, uid = write_dicom_series(tmp_path / "dicom" / "s1", other.transpose(1, 0, 2), spacing=(1.5, 1.0, 2.0))
    files = [folder / f"{n}.nii.gz" for n in ("ras", "lps", "oblique")]
    rows = [{"image": str(f), "label": i % 2, "patient_id": f"p{i}", "split": "test"} for i, f in enumerate(files)]
    rows.append({"image": str(series), "label": 1, "patient_id": "pd", "split": "test", "series_id": uid})
    nib.save(nib.Nifti1Image(other, ras), str(tmp_path / "train.nii.gz"))
    rows.append({"image": str(tmp_path / "train.nii.gz"), "label": 0, "patient_id": "q", "split": "train"})
    manifest = _write_manifest(tmp_path / "m.csv", rows)
    run = _make_run(tmp_path, ["data.source=manifest", f"data.path={manifest}", "data.spatial_dims=3",
                               "data.image_size=16", "data.modality=ct"], preset="ct_soft_tissue")
    ev = _assert_same_probabilities(run, [*files, tmp_path / "dicom"], tmp_path, ["0", "1"])
    p = {n: ev[str((folder / f"{n}.nii.gz").resolve())] for n in ("ras", "lps", "oblique")}
    # one anatomy stored three ways: the RAS chain gives one model input, so one answer
    np.testing.assert_allclose(p["lps"], p["ras"], atol=1e-5)
    np.testing.assert_allclose(p["oblique"], p["ras"], atol=1e-5)
    assert abs(ev[str(series.resolve())][1] - p["ras"][1]) > 1e-6  # a different volume, a different answer
    del rng


def test_evaluate_tables_match_sklearn(tmp_path):
    from sklearn.metrics import confusion_matrix, precision_recall_fscore_support

    from medmim.data.synthetic import write_png

    rng = np.random.default_rng(2)
    rows = []
    for i in range(24):
        a = (rng.random((20, 20)) * 255).astype(np.uint8)
        rows.append({"image": str(write_png(tmp_path / "img" / f"im{i}.png", a)), "label": i % 3,
                     "patient_id": f"p{i}", "split": "test" if i < 18 else "train"})
    manifest = _write_manifest(tmp_path / "m.csv", rows)
    run = _make_run(tmp_path, ["data.source=manifest", f"data.path={manifest}", "data.image_size=16",
                               "data.num_classes=3"], preset="uint8", seed=5)
    out = tmp_path / "ev"
    assert main(["evaluate", str(run / "finetune"), "-o", str(out)]) == 0
    with open(out / "predictions.csv") as fh:
        pred = list(csv.DictReader(fh))
    assert len(pred) == 18 and {"file", "label", "predicted", "prob_0", "prob_1", "prob_2"} <= set(pred[0])
    y = np.array([int(r["label"]) for r in pred])
    yhat = np.array([int(r["predicted"]) for r in pred])
    cm = np.loadtxt(out / "confusion_matrix.csv", delimiter=",", skiprows=1, usecols=(1, 2, 3))
    np.testing.assert_array_equal(cm, confusion_matrix(y, yhat, labels=[0, 1, 2]))
    assert (out / "confusion_matrix.png").read_bytes()[:4] == b"\x89PNG"
    prec, rec, f1, _ = precision_recall_fscore_support(y, yhat, labels=[0, 1, 2], zero_division=np.nan)
    metrics = json.loads((out / "metrics.json").read_text())
    for c, row in enumerate(metrics["per_class"]):
        for name, ref in (("sensitivity", rec[c]), ("precision", prec[c]), ("f1", f1[c])):
            assert (np.isnan(ref) and np.isnan(row[name])) or row[name] == pytest.approx(ref), (c, name)
        spec = ((y != c) & (yhat != c)).sum() / (y != c).sum()
        assert row["specificity"] == pytest.approx(spec)
        if np.isfinite(row["sensitivity"]):
            assert row["sensitivity_ci_low"] <= row["sensitivity"] <= row["sensitivity_ci_high"]
    assert metrics["n"] == 18 and "auroc_ci_low" in metrics


def test_evaluate_refuses_to_write_into_the_run_and_needs_a_run(tmp_path, capsys, monkeypatch):
    from medmim.data.synthetic import write_png

    monkeypatch.chdir(tmp_path)
    rows = [{"image": str(write_png(tmp_path / f"i{i}.png", np.arange(64, dtype=np.uint8).reshape(8, 8) * (i + 1))), "label": i % 2,
             "patient_id": f"p{i}", "split": "test" if i < 4 else "train"} for i in range(6)]
    manifest = _write_manifest(tmp_path / "m.csv", rows)
    run = _make_run(tmp_path, ["data.source=manifest", f"data.path={manifest}", "data.image_size=16"], "uint8")
    before = _tree_digest(run)
    assert main(["evaluate", str(run), "-o", str(run / "finetune" / "eval")]) == 2
    assert "never writes into a run" in capsys.readouterr().err
    assert _tree_digest(run) == before
    cwd_before = sorted(p.name for p in tmp_path.iterdir())
    assert main(["evaluate"]) == 2  # no run, no -c: a one-line error, no phantoms, no run folder
    assert "name the fine-tuning run directory" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == cwd_before
    # overrides change this evaluation only; the run's config.yaml stays as training wrote it
    assert main(["evaluate", str(run), "finetune.epochs=99", "-o", str(tmp_path / "ev")]) == 0
    assert _tree_digest(run) == before
    assert "epochs: 99" in (tmp_path / "ev" / "config.yaml").read_text()


def test_segmentation_run_evaluates_dice_and_hd95(tmp_path):
    import torch

    from medmim.data.synthetic import write_png
    from medmim.models import encoder_from_config
    from medmim.models.segmentation import Segmenter
    from medmim.train.checkpoint import save_checkpoint

    rng = np.random.default_rng(3)
    rows = []
    for i in range(8):
        a = (rng.random((16, 16)) * 50).astype(np.uint8)
        m = np.zeros((16, 16), np.uint8)
        m[3:9, 4:12] = 1
        a[m > 0] += 150
        rows.append({"image": str(write_png(tmp_path / f"i{i}.png", a)), "mask": str(write_png(tmp_path / f"m{i}.png", m)),
                     "label": 0, "patient_id": f"p{i}", "split": "test" if i < 6 else "train"})
    with open(tmp_path / "m.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    cfg = load_config(None, ["data.source=manifest", f"data.path={tmp_path / 'm.csv'}", "data.image_size=16",
                             "finetune.head=segment", "finetune.num_seg_classes=2", "finetune.bootstrap=30",
                             *TINY_VIT, "run.name=seg", f"run.out_dir={tmp_path / 'runs'}", "run.device=cpu"])
    run = tmp_path / "runs" / "seg"
    (run / "segment" / "checkpoints").mkdir(parents=True)
    (run / "segment" / "config.yaml").write_text(dump_config(cfg))
    (run / "environment.json").write_text(json.dumps({"data": {"preset": "uint8"}}))  # at the root, as written
    torch.manual_seed(0)
    model = Segmenter(encoder_from_config(cfg.encoder, 2, 16), 2, decoder=cfg.finetune.seg_decoder,
                      feature_size=cfg.finetune.seg_feature_size)
    save_checkpoint({"model": model.state_dict(), "epoch": 0}, run / "segment" / "checkpoints" / "best.pt")
    out = tmp_path / "ev"
    assert main(["evaluate", str(run), "-o", str(out)]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["n"] == 6 and len(metrics["per_class"]) == 1
    row = metrics["per_class"][0]
    assert {"dice", "dice_ci_low", "dice_ci_high", "hd95", "hd95_ci_low", "hd95_ci_high"} <= set(row)
    with open(out / "cases.csv") as fh:
        cases = list(csv.DictReader(fh))
    dice = np.array([float(c["dice_class1"]) for c in cases])
    assert row["dice"] == pytest.approx(dice.mean())
    assert 0 <= row["dice_ci_low"] <= row["dice"] <= row["dice_ci_high"] <= 1


def test_pneumoniamnist_pngs_predict_like_the_npz_arrays_evaluate(tmp_path):
    """Real data: a run trained on the PneumoniaMNIST npz; test images saved as PNG files through PIL
    reach `medmim predict` with the probabilities `medmim evaluate` gives their npz arrays."""
    from PIL import Image

    from conftest import require_shared

    npz = require_shared("pneumoniamnist", "pneumoniamnist_28.npz")
    run = _make_run(tmp_path, ["data.source=medmnist", f"data.path={npz}", "data.image_size=28"], preset="uint8",
                    seed=7)
    out = tmp_path / "ev"
    assert main(["evaluate", str(run), "-o", str(out)]) == 0
    with open(out / "predictions.csv") as fh:
        ev = {r["file"]: r for r in csv.DictReader(fh)}
    assert len(ev) == 624
    test_images = np.load(npz)["test_images"]
    pngs = []
    for i in (0, 1, 2, 3, 100, 623):
        pngs.append(tmp_path / "png" / f"test{i:03d}.png")
        pngs[-1].parent.mkdir(exist_ok=True)
        Image.fromarray(test_images[i]).save(pngs[-1])
    assert main(["predict", str(run), str(tmp_path / "png"), "-o", str(tmp_path / "pr")]) == 0
    with open(tmp_path / "pr" / "predictions.csv") as fh:
        pr = list(csv.DictReader(fh))
    assert len(pr) == 6
    probs = []
    for row in pr:
        i = int(Path(row["file"]).stem[4:])
        ref = ev[f"{npz.name}:test_images[{i}]"]
        for c in ("prob_0", "prob_1"):
            assert float(row[c]) == pytest.approx(float(ref[c]), abs=1e-5), (i, c)
        probs.append(float(row["prob_1"]))
    assert np.ptp(probs) > 1e-4


def test_class_names_label_every_table(tmp_path):
    """With data.class_names, predictions, the confusion matrix and the per-class table use the names."""
    from medmim.data.synthetic import write_png
    from medmim.data.labels import class_names

    if "class_names" not in type(load_config(None).data).model_fields:
        pytest.skip("this config has no data.class_names")
    rng = np.random.default_rng(4)
    rows = [{"image": str(write_png(tmp_path / f"im{i}.png", (rng.random((12, 12)) * 255).astype(np.uint8))),
             "label": i % 2, "patient_id": f"p{i}", "split": "test" if i < 6 else "train"} for i in range(8)]
    manifest = _write_manifest(tmp_path / "m.csv", rows)
    run = _make_run(tmp_path, ["data.source=manifest", f"data.path={manifest}", "data.image_size=16",
                               "data.num_classes=2", "data.class_names=[normal,tumour]"], preset="uint8")
    assert class_names(load_config(run / "config.yaml")) == ["normal", "tumour"]
    out = tmp_path / "ev"
    assert main(["evaluate", str(run), "-o", str(out)]) == 0
    with open(out / "predictions.csv") as fh:
        pred = list(csv.DictReader(fh))
    assert {"prob_normal", "prob_tumour"} <= set(pred[0]) and {r["label"] for r in pred} == {"normal", "tumour"}
    assert (out / "confusion_matrix.csv").read_text().splitlines()[0].endswith("normal,tumour")
    assert [r["name"] for r in json.loads((out / "metrics.json").read_text())["per_class"]] == ["normal", "tumour"]


def test_multilabel_run_per_label_tables_match_sklearn(tmp_path):
    from sklearn.metrics import multilabel_confusion_matrix

    from medmim.data.synthetic import write_png

    rng = np.random.default_rng(6)
    rows = []
    for i in range(20):
        a = (rng.random((12, 12)) * 255).astype(np.uint8)
        rows.append({"image": str(write_png(tmp_path / f"im{i}.png", a)), "label": json.dumps([i % 2, (i // 2) % 2, 1]),
                     "patient_id": f"p{i}", "split": "test" if i < 16 else "train"})
    manifest = _write_manifest(tmp_path / "m.csv", rows)
    run = _make_run(tmp_path, ["data.source=manifest", f"data.path={manifest}", "data.image_size=16",
                               "data.num_classes=3", "finetune.multilabel=true"], preset="uint8", seed=2)
    out = tmp_path / "ev"
    assert main(["evaluate", str(run), "-o", str(out)]) == 0
    with open(out / "predictions.csv") as fh:
        pred = list(csv.DictReader(fh))
    probs = np.array([[float(r[f"prob_{c}"]) for c in range(3)] for r in pred])
    y = np.array([json.loads(rows[int(Path(r["file"]).stem[2:])]["label"]) for r in pred])
    ref = multilabel_confusion_matrix(y, (probs >= 0.5).astype(int))  # (K, 2, 2): [[tn, fp], [fn, tp]]
    with open(out / "confusion_matrix.csv") as fh:
        cm = list(csv.DictReader(fh))
    for c in range(3):
        (tn, fp), (fn, tp) = ref[c]
        assert [int(cm[c][k]) for k in ("TP", "FP", "FN", "TN")] == [tp, fp, fn, tn]
        row = json.loads((out / "metrics.json").read_text())["per_class"][c]
        if tp + fn:
            assert row["sensitivity"] == pytest.approx(tp / (tp + fn))
        if tn + fp:
            assert row["specificity"] == pytest.approx(tn / (tn + fp))


def test_a_real_finetune_run_replays_in_evaluate_and_predict(tmp_path):
    """`medmim finetune` (tiny, 2D phantoms) writes a run that `evaluate` and `predict` replay: the
    per-image probabilities on the test split agree to 1e-5, and the run is left untouched."""
    from conftest import TINY

    from medmim.data.manifest import read_manifest

    common = [f"run.out_dir={tmp_path / 'runs'}", f"data.phantoms.out_dir={tmp_path / 'data'}", "run.name=e2e",
              "run.device=cpu", "run.num_threads=1", "finetune.bootstrap=20", "finetune.epochs=1", *TINY]
    assert main(["finetune", "--init", "scratch", *common]) == 0
    run = tmp_path / "runs" / "e2e"
    before = _tree_digest(run)
    assert main(["evaluate", str(run / "finetune"), "-o", str(tmp_path / "ev")]) == 0
    assert _tree_digest(run) == before
    ev = _probs(tmp_path / "ev" / "predictions.csv", ["0", "1"])
    test_files = [Path(r["image"]) for r in read_manifest(next((tmp_path / "data").rglob("manifest.csv")))
                  if str(Path(r["image"]).resolve()) in ev]
    assert len(test_files) == len(ev) > 0
    assert main(["predict", str(run), *map(str, test_files[:8]), "-o", str(tmp_path / "pr")]) == 0
    pr = _probs(tmp_path / "pr" / "predictions.csv", ["0", "1"])
    assert len(pr) == min(8, len(test_files))
    for key, p in pr.items():
        np.testing.assert_allclose(p, ev[key], atol=1e-5, err_msg=key)
