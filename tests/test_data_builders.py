"""Manifest builders (folder, CSV, Decathlon, DICOM, npz), the `medmim data` verbs and data cards."""

import json
from pathlib import Path

import numpy as np
import pytest

from medmim.cli import main
from medmim.config import load_config
from medmim.data.builders import from_csv, from_decathlon, from_folder, from_npz
from medmim.data.dataset import materialize, prepare_data
from medmim.data.manifest import read_manifest, write_manifest
from medmim.data.synthetic import ct_like_volume, write_dicom_series, write_nifti, write_png
from medmim.errors import DataError

RNG = np.random.default_rng(0)


def _png(path, h=20, w=30):
    return write_png(path, RNG.integers(0, 255, (h, w)))


def test_from_folder_one_class_per_subfolder(tmp_path):
    for cls in ("normal", "pneumonia"):
        for i in range(3):
            _png(tmp_path / cls / f"pat{i}_img{cls[0]}.png")
    (tmp_path / "normal" / "readme.txt").write_text("x")
    skipped = []
    rows = from_folder(tmp_path, patient_regex=r"^(pat\d+)_", skipped=skipped)
    assert len(rows) == 6 and {r["label"] for r in rows} == {0, 1}
    assert {r["label_name"] for r in rows if r["label"] == 1} == {"pneumonia"}
    assert rows[0]["patient_id"] == "pat0"
    assert len(skipped) == 1 and "not an image file" in skipped[0]["reason"]


def test_from_csv_maps_columns_and_roundtrips(tmp_path):
    _png(tmp_path / "imgs" / "a.png")
    _png(tmp_path / "imgs" / "b.png")
    (tmp_path / "list.csv").write_text("file,dx,subject,site\nimgs/a.png,1,S1,x\nimgs/b.png,0,S2,y\n")
    rows = from_csv(tmp_path / "list.csv", image_col="file", label_col="dx", patient_col="subject")
    assert rows[0]["image"] == str(tmp_path / "imgs" / "a.png") and rows[0]["patient_id"] == "S1"
    assert rows[1]["site"] == "y"
    out = write_manifest(rows, tmp_path / "out" / "manifest.csv", relative_to=tmp_path / "out")
    back = read_manifest(out)
    assert Path(back[0]["image"]).resolve() == (tmp_path / "imgs" / "a.png").resolve()
    assert back[0]["label"] == 1 and back[1]["site"] == "y"
    with pytest.raises(DataError, match="no column 'path'"):
        from_csv(tmp_path / "list.csv", image_col="path")


def test_from_decathlon(tmp_path):
    for i in range(2):
        write_nifti(tmp_path / "imagesTr" / f"liver_{i}.nii.gz", ct_like_volume((12, 12, 8), seed=i))
        write_nifti(tmp_path / "labelsTr" / f"liver_{i}.nii.gz", (ct_like_volume((12, 12, 8), seed=i) > 0).astype(np.uint8))
    write_nifti(tmp_path / "imagesTs" / "liver_9.nii.gz", ct_like_volume((12, 12, 8)))
    (tmp_path / "dataset.json").write_text(json.dumps({
        "name": "Liver", "modality": {"0": "CT"},
        "training": [{"image": f"./imagesTr/liver_{i}.nii.gz", "label": f"./labelsTr/liver_{i}.nii.gz"} for i in range(2)],
        "test": ["./imagesTs/liver_9.nii.gz"]}))
    rows = from_decathlon(tmp_path / "dataset.json")
    assert len(rows) == 3 and rows[0]["modality"] == "ct" and rows[0]["mask"].endswith("labelsTr/liver_0.nii.gz")
    assert rows[2]["split"] == "test" and rows[0]["patient_id"] == "liver_0"
    cfg = load_config(None, ["data.spatial_dims=3", "data.image_size=8"])
    items = materialize(rows[:2], cfg.data, "ct_soft_tissue", with_mask=True)
    assert items[0]["image"].shape == items[0]["mask"].shape == (1, 8, 8, 8)


def test_from_npz_references(tmp_path):
    npz = tmp_path / "tiny.npz"
    np.savez(npz, train_images=RNG.integers(0, 255, (6, 28, 28), dtype=np.uint8), train_labels=np.array([[0], [1]] * 3),
             val_images=RNG.integers(0, 255, (2, 28, 28), dtype=np.uint8), val_labels=np.array([0, 1]),
             test_images=RNG.integers(0, 255, (2, 28, 28), dtype=np.uint8), test_labels=np.array([0, 1]))
    rows = from_npz(npz)
    assert len(rows) == 10 and rows[0]["image"].endswith("tiny.npz#train_images/0") and rows[1]["label"] == 1
    out = write_manifest(rows, tmp_path / "m.csv", relative_to=tmp_path)
    assert "tiny.npz#train_images/0" in out.read_text().splitlines()[1]
    back = read_manifest(out)
    cfg = load_config(None, ["data.image_size=28"])
    items = materialize(back, cfg.data, "uint8")
    with np.load(npz) as z:
        np.testing.assert_allclose(items[1]["image"][0].numpy(), z["train_images"][1] / 255.0, atol=1e-6)


def test_cli_manifest_dicom_and_card(tmp_path, capsys):
    write_dicom_series(tmp_path / "dcm" / "a", ct_like_volume((8, 8, 4)), patient_id="SECRET-1")
    write_dicom_series(tmp_path / "dcm" / "b", ct_like_volume((8, 8, 4), seed=3), patient_id="SECRET-2")
    (tmp_path / "dcm" / "junk.bin").write_bytes(b"\x00" * 10)
    out = tmp_path / "m" / "manifest.csv"
    assert main(["data", "manifest", "--from", "dicom", str(tmp_path / "dcm"), "--out", str(out)]) == 0
    assert (out.parent / ".medmim_salt").exists()
    assert "junk.bin" in (out.parent / "manifest.skipped.csv").read_text()
    rows = read_manifest(out)
    assert len(rows) == 2 and rows[0]["modality"] == "ct" and "SECRET" not in out.read_text()
    card_out = tmp_path / "cards" / "dcm"
    assert main(["data", "card", "--manifest", str(out), "--out", str(card_out), "--licence", "CC0"]) == 0
    card = json.loads((tmp_path / "cards" / "dcm.json").read_text())
    assert card["phi_scan"]["tags_with_values"]["PatientID"] == 8
    assert card["size_histogram"] == {"8×8×4": 2} and card["licence"] == "CC0"
    md = (tmp_path / "cards" / "dcm.md").read_text()
    both = md + json.dumps(card)
    assert "PatientID" in md and "SECRET" not in both and "Synthetic" not in both and "19000101" not in both
    # a bad source is one line and exit code 2
    assert main(["data", "manifest", "--from", "csv", str(tmp_path / "nope.csv"), "--out", str(tmp_path / "m2.csv")]) == 2
    assert "CSV not found" in capsys.readouterr().err


def test_card_from_config_phantoms(tmp_path):
    cfg_over = [f"data.phantoms.out_dir={tmp_path}", "data.phantoms.n_patients=10"]
    assert main(["data", "card", *cfg_over, "--out", str(tmp_path / "card")]) == 0
    card = json.loads((tmp_path / "card.json").read_text())
    assert sum(s["images"] for s in card["splits"].values()) == 20
    assert card["size_histogram"] == {"64×64": 20} and card["phi_scan"] is None
    assert set(card["splits"]) == {"train", "val", "test"}


def test_manifest_source_runs_through_prepare(tmp_path):
    for cls in ("a", "b"):
        for i in range(6):
            _png(tmp_path / "src" / cls / f"{cls}{i}.png")
    out = tmp_path / "manifest.csv"
    assert main(["data", "manifest", "--from", "folder", str(tmp_path / "src"), "--out", str(out),
                 "--modality", "xray"]) == 0
    cfg = load_config(None, ["data.source=manifest", f"data.path={out}", "data.val_fraction=0.2",
                             "data.test_fraction=0.2"])
    bundle = prepare_data(cfg)
    assert bundle.preset == "xray" and sum(len(v) for v in bundle.records.values()) == 12
    items = materialize(bundle.split("train"), cfg.data, bundle.preset)
    assert items[0]["image"].shape == (1, 32, 32)


def test_fingerprint_tells_npz_entries_apart(tmp_path):
    from medmim.data.manifest import records_fingerprint

    npz = tmp_path / "t.npz"
    z = np.zeros((2, 4, 4), np.uint8)
    np.savez(npz, train_images=z, train_labels=np.array([0, 1]), val_images=z, val_labels=np.array([0, 1]),
             test_images=z, test_labels=np.array([0, 1]))
    rows = from_npz(npz)
    assert records_fingerprint(rows) == records_fingerprint(from_npz(npz))
    swapped = [dict(rows[0], image=rows[1]["image"])] + rows[1:]
    assert records_fingerprint(swapped) != records_fingerprint(rows)


def test_cli_check_lists_skipped(tmp_path):
    for cls in ("a", "b"):
        for i in range(4):
            _png(tmp_path / "src" / cls / f"{cls}{i}.png")
    (tmp_path / "src" / "a" / "a0.png").write_bytes(b"\x89PNG broken")
    out = tmp_path / "manifest.csv"
    assert main(["data", "manifest", "--from", "folder", str(tmp_path / "src"), "--out", str(out)]) == 0
    report = tmp_path / "skipped.csv"
    assert main(["data", "check", "data.source=manifest", f"data.path={out}", "--out", str(report)]) == 0
    text = report.read_text()
    assert "a0.png" in text and "unreadable or truncated" in text
