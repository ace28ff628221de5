"""PHI hygiene: DICOM identifiers never leave the DICOM files.

Small valid CT and MR files (pydicom, with pixel data) carry recognisable PatientName, PatientID,
BirthDate (and a few other identifying tags). They go through every stage a user would run: a DICOM
manifest, a data card, a data check, pretraining, fine-tuning from the export, evaluation, a study
with its report, and prediction. Then every file those stages wrote (text and binary: .pt zips are
searched member by member, PNG text chunks decompressed) and everything printed or logged is
searched for the identifiers, in several spellings. None may appear.
"""

from __future__ import annotations

import csv
import logging
import re
import struct
import zipfile
import zlib
from pathlib import Path

import numpy as np
import pytest

pydicom = pytest.importorskip("pydicom")
from pydicom.dataset import Dataset, FileMetaDataset  # noqa: E402
from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage, CTImageStorage, generate_uid  # noqa: E402

from medmim.cli import main  # noqa: E402

from conftest import TINY  # noqa: E402

pytestmark = pytest.mark.slow

N_PATIENTS = 16
# recognisable identifiers (per patient i: the same stems with the patient number appended)
NAME_FAMILY, NAME_GIVEN = "Quixotebrandt", "Wilhelmina"
PID_STEM = "PHIMRN7731"
BIRTH_DATES = [f"1937{(i % 12) + 1:02d}{(i % 27) + 1:02d}" for i in range(N_PATIENTS)]
OTHER = {"InstitutionName": "Sanctimony Memorial Clinic", "ReferringPhysicianName": "Drzewiecki^Ottoline",
         "AccessionNumber": "ACC99887766", "PatientAddress": "42 Larkspur Mews"}


def _needles() -> list[str]:
    out = {NAME_FAMILY, NAME_GIVEN, PID_STEM, "Sanctimony", "Drzewiecki", "Ottoline", "ACC99887766", "Larkspur"}
    for i, bd in enumerate(BIRTH_DATES):
        out |= {f"{PID_STEM}{i:02d}", bd, f"{bd[:4]}-{bd[4:6]}-{bd[6:]}", f"{bd[6:]}.{bd[4:6]}.{bd[:4]}",
                f"{bd[4:6]}/{bd[6:]}/{bd[:4]}"}
    return sorted(out)


def write_dicom(path: Path, *, patient: int, modality: str, label: int, series_uid: str, study_uid: str) -> None:
    """One valid single-slice CT or MR image (16-bit, 24x24) with identifying header values."""
    rng = np.random.default_rng(patient * 7 + (modality == "MR"))
    yy, xx = np.mgrid[0:24, 0:24]
    img = 200 + 40 * rng.standard_normal((24, 24))
    img += 600 * (((yy - 12) ** 2 + (xx - 12) ** 2) < (30 if label else 8))  # a bigger blob for label 1
    pixels = img.astype(np.int16)

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage if modality == "CT" else MRImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.PatientName = f"{NAME_FAMILY}{patient:02d}^{NAME_GIVEN}"
    ds.PatientID = f"{PID_STEM}{patient:02d}"
    ds.PatientBirthDate = BIRTH_DATES[patient]
    ds.PatientSex = "O"
    for tag, value in OTHER.items():
        setattr(ds, tag, value)
    ds.StudyInstanceUID, ds.SeriesInstanceUID = study_uid, series_uid
    ds.StudyDate, ds.SeriesNumber, ds.InstanceNumber = "20200101", 1, 1
    ds.Modality = modality
    ds.ImagePositionPatient = [0.0, 0.0, 0.0]
    ds.ImageOrientationPatient = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
    ds.PixelSpacing = [0.8, 0.8]
    ds.SliceThickness = 2.0
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
    ds.RescaleSlope, ds.RescaleIntercept = 1, -1024 if modality == "CT" else 0
    ds.PixelData = pixels.tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)


def _dicom_tree(root: Path) -> None:
    for i in range(N_PATIENTS):
        modality = "CT" if i % 2 == 0 else "MR"
        label = (i // 2) % 2
        study = generate_uid()
        write_dicom(root / f"case{i:02d}" / "s1" / "im1.dcm", patient=i, modality=modality, label=label,
                    series_uid=generate_uid(), study_uid=study)


# ---------------------------------------------------------------------------------------------
# searching outputs


def _png_texts(data: bytes) -> list[bytes]:
    out, pos = [], 8
    while pos + 8 <= len(data):
        (length,), kind = struct.unpack(">I", data[pos:pos + 4]), data[pos + 4:pos + 8]
        body = data[pos + 8:pos + 8 + length]
        if kind == b"tEXt":
            out.append(body)
        elif kind == b"zTXt":
            out.append(zlib.decompress(body[body.index(b"\0") + 2:]))
        elif kind == b"iTXt":
            key, rest = body.split(b"\0", 1)
            compressed = rest[0] == 1
            text = rest[2:].split(b"\0", 2)[-1]
            out.append(zlib.decompress(text) if compressed else text)
        pos += 12 + length
    return out


def _blobs(path: Path) -> list[bytes]:
    data = path.read_bytes()
    blobs = [data, path.as_posix().encode()]
    if zipfile.is_zipfile(path):  # torch .pt checkpoints and the like
        with zipfile.ZipFile(path) as zf:
            blobs += [zf.read(n) for n in zf.namelist()] + [n.encode() for n in zf.namelist()]
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        blobs += _png_texts(data)
    return blobs


def _find(needles: list[str], blob: bytes) -> list[str]:
    hits = []
    low = blob.lower()
    for n in needles:
        for enc in ("utf-8", "utf-16-le"):
            if n.lower().encode(enc) in low:
                hits.append(n)
                break
    return hits


def _leaks(root: Path, needles: list[str], skip: Path) -> dict[str, list[str]]:
    found = {}
    n_files = 0
    for f in sorted(root.rglob("*")):
        if not f.is_file() or skip in f.parents:
            continue
        n_files += 1
        hits = sorted({h for b in _blobs(f) for h in _find(needles, b)})
        if hits:
            found[f.relative_to(root).as_posix()] = hits
    assert n_files > 30  # the stages did write their outputs
    return found


# ---------------------------------------------------------------------------------------------


def test_no_dicom_identifiers_in_any_output(tmp_path, capfd, caplog, monkeypatch):
    caplog.set_level(logging.DEBUG)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MEDMIM_DICOM_SALT", "test-salt-not-secret")
    src = tmp_path / "dicom_in"
    _dicom_tree(src)
    needles = _needles()
    # sanity: the identifiers are really in the inputs (so the search would find them)
    assert _find([f"{PID_STEM}00", NAME_FAMILY, BIRTH_DATES[0]], (src / "case00" / "s1" / "im1.dcm").read_bytes())

    out = tmp_path / "work"
    manifest = out / "manifest.csv"
    assert main(["data", "manifest", "--from", "dicom", str(src), "--out", str(manifest), "--salt",
                 "test-salt-not-secret"]) == 0
    rows = list(csv.DictReader(manifest.open()))
    assert len(rows) == N_PATIENTS
    for r in rows:  # labels come from elsewhere (here: the case folder), as they would in a study
        case = int(re.search(r"case(\d+)", r["image"]).group(1))
        r["label"] = str((case // 2) % 2)
    with manifest.open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)

    cfg = [f"run.out_dir={out / 'runs'}", "run.device=cpu", "data.source=manifest", f"data.path={manifest}",
           "data.val_fraction=0.25", "data.test_fraction=0.25", "data.image_size=16", "finetune.bootstrap=20",
           *[t for t in TINY if not t.startswith("data.phantoms")], "pretrain.recon_every=1"]
    steps = [
        ["data", "card", "--manifest", str(manifest), "--out", str(out / "card")],
        ["data", "card", "--out", str(out / "card_cfg"), *cfg, "run.name=card"],
        ["data", "check", *cfg, "run.name=check"],
        ["pretrain", *cfg, "run.name=phi"],
        ["finetune", *cfg, "run.name=phi"],
        ["evaluate", "--run-dir", str(out / "runs" / "phi" / "finetune"), *cfg, "run.name=phi"],
        ["predict", str(out / "runs" / "phi" / "finetune"), str(src / "case01"), str(src / "case02" / "s1" / "im1.dcm"),
         "-o", str(out / "predictions")],
        ["study", *cfg, "run.name=phi_study", "study.fractions=[1.0]", "study.inits=[mae,scratch]"],
        ["-v", "pretrain", "--resume", *cfg, "run.name=phi"],  # verbose logging, resumed stage
    ]
    for argv in steps:
        try:
            code = main(argv)
        except SystemExit as exc:  # argparse
            code = f"argparse exit {exc.code}"
        assert code in (0, 1), f"{argv[:2]} exited {code}: {capfd.readouterr().err[-2000:]}"
    captured = capfd.readouterr()
    (out / "captured_stdout.txt").write_text(captured.out)
    (out / "captured_stderr.txt").write_text(captured.err)
    (out / "captured_log.txt").write_text(caplog.text)
    assert (out / "runs" / "phi" / "encoder.safetensors").exists()
    assert (out / "runs" / "phi" / "finetune" / "result.json").exists()

    leaks = _leaks(tmp_path, needles, skip=src)
    assert not leaks, f"identifiers found in outputs: {leaks}"
