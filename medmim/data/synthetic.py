"""Small generated files for tests, benchmarks and examples: DICOM series (good and broken),
NIfTI volumes, PNG images, and files broken in one specific way each.

Nothing here is real patient data; patient names are placeholders.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np


def write_dicom_slice(path: str | Path, pixels: np.ndarray | None, *, series_uid: str, study_uid: str,
                      position=(0.0, 0.0, 0.0), orientation=(1, 0, 0, 0, 1, 0), spacing=(1.0, 1.0),
                      instance: int = 1, modality: str = "CT", photometric: str = "MONOCHROME2",
                      patient_id: str = "SYNTH-001", patient_name: str = "Synthetic^Patient",
                      rescale=(1.0, 0.0), acquisition: int = 1, rows_cols: tuple[int, int] | None = None) -> Path:
    """One single-frame DICOM file (int16). ``pixels=None`` writes a header without pixel data."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    sop_class = {"CT": "1.2.840.10008.5.1.4.1.1.2", "MR": "1.2.840.10008.5.1.4.1.1.4",
                 "CR": "1.2.840.10008.5.1.4.1.1.1"}.get(modality, "1.2.840.10008.5.1.4.1.1.7")
    sop_uid = generate_uid()
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = sop_class, sop_uid
    ds.PatientName, ds.PatientID, ds.PatientBirthDate = patient_name, patient_id, "19000101"
    ds.StudyInstanceUID, ds.SeriesInstanceUID = study_uid, series_uid
    ds.Modality = modality
    ds.InstanceNumber = instance
    ds.AcquisitionNumber = acquisition
    ds.ImagePositionPatient = [float(v) for v in position]
    ds.ImageOrientationPatient = [float(v) for v in orientation]
    ds.PixelSpacing = [float(v) for v in spacing]
    ds.SliceThickness = 1.0
    ds.RescaleSlope, ds.RescaleIntercept = rescale
    rows, cols = rows_cols or (pixels.shape if pixels is not None else (8, 8))
    ds.Rows, ds.Columns = int(rows), int(cols)
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
    if pixels is not None:
        ds.PixelData = np.ascontiguousarray(pixels.astype(np.int16)).tobytes()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(str(path), enforce_file_format=True)
    return path


def write_dicom_series(folder: str | Path, volume: np.ndarray, *, spacing=(1.0, 1.0, 2.0), origin=(0.0, 0.0, 0.0),
                       modality: str = "CT", skip: Sequence[int] = (), tilt: Sequence[int] = (),
                       timepoints: int = 1, patient_id: str = "SYNTH-001", shuffle_seed: int | None = 0,
                       series_uid: str | None = None) -> tuple[Path, str]:
    """Write ``volume`` ((rows, cols, slices), int16) as an axial series; returns (folder, SeriesInstanceUID).

    ``skip``: slice indices left out (a series with missing slices); ``tilt``: slices written with
    another orientation (mixed orientations); ``timepoints`` > 1 repeats every position (4D: the
    value of time point t is volume + 100 t). File names are shuffled so that order must come from
    the headers.
    """
    from pydicom.uid import generate_uid

    folder = Path(folder)
    series_uid = series_uid or generate_uid()
    study_uid = generate_uid()
    n = volume.shape[2]
    entries = []
    inst = 1
    for t in range(timepoints):
        for k in range(n):
            if k in skip:
                continue
            ori = (1, 0, 0, 0, 0.8, 0.6) if k in tilt else (1, 0, 0, 0, 1, 0)
            pos = (origin[0], origin[1], origin[2] + k * spacing[2])
            entries.append((inst, t, k, pos, ori))
            inst += 1
    order = list(range(len(entries)))
    if shuffle_seed is not None:
        np.random.default_rng(shuffle_seed).shuffle(order)
    for file_no, e in enumerate(order):
        inst, t, k, pos, ori = entries[e]
        write_dicom_slice(folder / f"IM{file_no:05d}", volume[:, :, k] + 100 * t, series_uid=series_uid,
                          study_uid=study_uid, position=pos, orientation=ori, spacing=spacing[:2], instance=inst,
                          modality=modality, patient_id=patient_id, acquisition=t + 1)
    return folder, series_uid


def write_nifti(path: str | Path, arr: np.ndarray, spacing=(1.0, 1.0, 1.0)) -> Path:
    import nibabel as nib

    affine = np.diag([*spacing[:3], 1.0])
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(arr, affine), str(path))
    return path


def write_png(path: str | Path, arr: np.ndarray) -> Path:
    from PIL import Image

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr.astype(np.uint8)).save(path)
    return path


def ct_like_volume(shape=(32, 32, 24), seed: int = 0) -> np.ndarray:
    """A body-shaped blob in HU (air -1000, tissue ~40, bone ~700) with noise."""
    rng = np.random.default_rng(seed)
    x, y, z = np.meshgrid(*[np.linspace(-1, 1, s) for s in shape], indexing="ij")
    vol = np.full(shape, -1000.0)
    vol[(x / 0.8) ** 2 + (y / 0.7) ** 2 < 1] = 40.0
    vol[(x / 0.12) ** 2 + ((y + 0.45) / 0.12) ** 2 < 1] = 700.0
    vol[((x - 0.3) / 0.25) ** 2 + (y / 0.3) ** 2 + (z / 0.5) ** 2 < 1] = 60 + 30 * rng.standard_normal()
    vol += rng.normal(0, 10, shape)
    return vol.astype(np.int16)
