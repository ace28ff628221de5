"""Deterministic phantoms: the embedded default data of medmim.

Two families, both written as real files (PNG / NIfTI) plus a manifest, so that they take the same
reader path as user data:

* 2D chest-radiograph-like images (uint8 PNG, bright = dense): thorax, lungs, heart, spine and ribs;
  an "abnormal" patient has a nodule or consolidation in one lung.
* 3D CT-like volumes in Hounsfield units (int16 NIfTI with a real affine): body with a fat layer,
  lungs, liver, kidneys, spine, aorta; an "abnormal" patient has a hypodense liver lesion.

Each image has a label (0 normal, 1 abnormal) and an organ/lesion segmentation mask. Patients hold
several images (studies) with the same anatomy, so that patient-level splits matter. The same seed
gives byte-identical files.
"""

from __future__ import annotations

import csv
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from medmim.io import atomic_path, write_json

# segmentation label values
LABELS_2D = {"background": 0, "lung": 1, "heart": 2, "lesion": 3}
LABELS_3D = {"background": 0, "liver": 1, "kidney": 2, "lung": 3, "spine": 4, "lesion": 5}
SPACING_3D = (1.5, 1.5, 2.5)  # mm, (x, y, z)


@dataclass(frozen=True)
class PhantomSpec:
    n_patients: int = 120
    images_per_patient: int = 2
    size_2d: int = 64
    size_3d: int = 32
    abnormal_fraction: float = 0.5
    seed: int = 1234


def _ellipse(coords: tuple[np.ndarray, ...], center, radii) -> np.ndarray:
    return sum(((c - m) / r) ** 2 for c, m, r in zip(coords, center, radii)) <= 1.0


def _blob(coords: tuple[np.ndarray, ...], center, radius: float) -> np.ndarray:
    d2 = sum((c - m) ** 2 for c, m in zip(coords, center))
    return np.exp(-d2 / (2 * radius**2))


def chest_xray(rng: np.random.Generator, anatomy: dict, size: int, abnormal: bool,
               lesion: dict | None) -> tuple[np.ndarray, np.ndarray]:
    """One chest-radiograph-like image in [0, 1] and its mask (LABELS_2D)."""
    y, x = np.mgrid[-1:1:complex(size), -1:1:complex(size)]
    # small per-study positioning jitter
    dx, dy = rng.normal(0, 0.02, 2)
    x, y = x - dx, y - dy
    img = np.full((size, size), 0.05)
    mask = np.zeros((size, size), np.uint8)
    body = _ellipse((x, y), (0, 0.05), (anatomy["body_w"], 0.95))
    img[body] = 0.45
    lung_l = _ellipse((x, y), (-anatomy["lung_dx"], -0.05), (anatomy["lung_w"], anatomy["lung_h"]))
    lung_r = _ellipse((x, y), (anatomy["lung_dx"], -0.05), (anatomy["lung_w"], anatomy["lung_h"]))
    lungs = lung_l | lung_r
    img[lungs] = 0.16
    mask[lungs] = LABELS_2D["lung"]
    # ribs: horizontal arcs crossing the lungs
    ribs = np.zeros_like(img)
    for k in range(6):
        yc = -0.6 + 0.22 * k + 0.08 * x**2
        ribs += np.exp(-((y - yc) ** 2) / (2 * 0.018**2))
    img += 0.12 * np.clip(ribs, 0, 1) * body
    heart = _ellipse((x, y), (anatomy["heart_x"], 0.28), (anatomy["heart_r"], anatomy["heart_r"] * 0.85))
    img[heart] = 0.62
    mask[heart] = LABELS_2D["heart"]
    spine = (np.abs(x) < 0.07) & body
    img[spine] = np.maximum(img[spine], 0.72)
    if abnormal and lesion is not None:
        side = -1 if lesion["left"] else 1
        cx, cy = side * anatomy["lung_dx"] + lesion["ox"], -0.05 + lesion["oy"]
        blob = _blob((x, y), (cx, cy), lesion["r"])
        img += lesion["contrast"] * blob * lungs
        mask[(blob > 0.5) & lungs] = LABELS_2D["lesion"]
    img = img ** anatomy["gamma"]
    img += rng.normal(0, 0.02, img.shape)
    return np.clip(img, 0, 1), mask


def ct_volume(rng: np.random.Generator, anatomy: dict, size: int, abnormal: bool,
              lesion: dict | None) -> tuple[np.ndarray, np.ndarray]:
    """One CT-like volume in HU (x, y, z order, RAS) and its mask (LABELS_3D)."""
    x, y, z = np.mgrid[-1:1:complex(size), -1:1:complex(size), -1:1:complex(size)]
    hu = np.full((size,) * 3, -1000.0)
    mask = np.zeros((size,) * 3, np.uint8)
    body = _ellipse((x, y), (0, 0), (anatomy["body_w"], anatomy["body_h"])) & (np.abs(z) < 0.98)
    inner = _ellipse((x, y), (0, 0), (anatomy["body_w"] - 0.08, anatomy["body_h"] - 0.08))
    hu[body] = -100.0  # subcutaneous fat
    hu[body & inner] = 40.0  # soft tissue
    lungs = (_ellipse((x, y, z), (-0.38, 0.0, 0.6), (0.28, 0.45, 0.5))
             | _ellipse((x, y, z), (0.38, 0.0, 0.6), (0.28, 0.45, 0.5))) & inner
    hu[lungs] = -850.0
    mask[lungs] = LABELS_3D["lung"]
    # RAS: -x is the patient's right; the liver lies on the patient's right
    liver = _ellipse((x, y, z), (-0.3, 0.05, -0.05), (anatomy["liver_r"], 0.4, 0.35)) & inner & ~lungs
    hu[liver] = 60.0
    mask[liver] = LABELS_3D["liver"]
    kidneys = (_ellipse((x, y, z), (-0.4, -0.4, -0.45), (0.12, 0.12, 0.2))
               | _ellipse((x, y, z), (0.4, -0.4, -0.45), (0.12, 0.12, 0.2))) & inner
    hu[kidneys] = 30.0
    mask[kidneys] = LABELS_3D["kidney"]
    spine = _ellipse((x, y), (0, -0.62), (0.11, 0.11)) & body
    hu[spine] = 700.0
    mask[spine] = LABELS_3D["spine"]
    aorta = _ellipse((x, y), (0.1, -0.4), (0.06, 0.06)) & body & (z < 0.9)
    hu[aorta] = 150.0
    if abnormal and lesion is not None:
        c = (-0.3 + lesion["ox"], 0.05 + lesion["oy"], -0.05 + lesion["oz"])
        sphere = _ellipse((x, y, z), c, (lesion["r"],) * 3) & liver
        hu[sphere] = 60.0 - lesion["contrast"]
        mask[sphere] = LABELS_3D["lesion"]
    hu += rng.normal(0, 12.0, hu.shape)
    hu = np.round(hu).clip(-1024, 3071)
    return hu.astype(np.int16), mask


def _patient_params(rng: np.random.Generator, spatial_dims: int) -> dict:
    if spatial_dims == 2:
        return {"body_w": rng.uniform(0.78, 0.92), "lung_dx": rng.uniform(0.36, 0.44),
                "lung_w": rng.uniform(0.24, 0.3), "lung_h": rng.uniform(0.5, 0.62),
                "heart_x": rng.uniform(0.05, 0.15), "heart_r": rng.uniform(0.2, 0.27),
                "gamma": rng.uniform(0.85, 1.15)}
    return {"body_w": rng.uniform(0.8, 0.92), "body_h": rng.uniform(0.7, 0.82),
            "liver_r": rng.uniform(0.3, 0.38)}


def _lesion_params(rng: np.random.Generator, spatial_dims: int) -> dict:
    if spatial_dims == 2:
        return {"left": bool(rng.integers(2)), "ox": rng.uniform(-0.1, 0.1), "oy": rng.uniform(-0.25, 0.25),
                "r": rng.uniform(0.1, 0.18), "contrast": rng.uniform(0.35, 0.55)}
    return {"ox": rng.uniform(-0.08, 0.08), "oy": rng.uniform(-0.1, 0.1), "oz": rng.uniform(-0.1, 0.1),
            "r": rng.uniform(0.1, 0.16), "contrast": rng.uniform(40, 70)}


def _save_png(path: Path, arr01: np.ndarray) -> None:
    from PIL import Image

    with atomic_path(path) as tmp:
        # rows = y; PNG stored as a normal picture (row 0 = top)
        Image.fromarray(np.round(arr01 * 255).astype(np.uint8)).save(tmp, format="PNG")


def _save_mask_png(path: Path, mask: np.ndarray) -> None:
    from PIL import Image

    with atomic_path(path) as tmp:
        Image.fromarray(mask.astype(np.uint8)).save(tmp, format="PNG")


def _save_nifti(path: Path, arr: np.ndarray) -> None:
    import nibabel as nib

    affine = np.diag([*SPACING_3D, 1.0])
    affine[:3, 3] = [-(s - 1) * sp / 2 for s, sp in zip(arr.shape, SPACING_3D)]
    img = nib.Nifti1Image(arr, affine)
    img.header.set_xyzt_units("mm")
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    # nibabel picks the format from the suffix, so the temporary file keeps ".nii"
    tmp = path.with_name(f".{path.stem}.part.nii")
    nib.save(img, str(tmp))
    with open(tmp, "rb") as fh:
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def generate(out_dir: str | Path, spatial_dims: int, spec: PhantomSpec = PhantomSpec()) -> Path:
    """Write the phantom set for ``spatial_dims`` under ``out_dir/{2d,3d}/`` and return its manifest.

    Regenerates only when the folder is missing or was made with other parameters.
    """
    root = Path(out_dir) / f"{spatial_dims}d"
    params = {"spatial_dims": spatial_dims, **asdict(spec), "version": 2}
    return _write_set(root, spatial_dims, spec, params, seed=spec.seed, n_patients=spec.n_patients,
                      prefix="P", labelled=True)


def generate_pool(out_dir: str | Path, spatial_dims: int, spec: PhantomSpec, n_patients: int,
                  seed: int) -> Path:
    """An unlabelled pretraining pool: ``n_patients`` more patients drawn from the same distribution
    as ``spec`` (same anatomy ranges, same share of abnormal patients), with their own ``seed`` and
    patient ids (``U0000``...), written under ``out_dir/{2d,3d}_pool/`` with a manifest that holds
    no labels and no masks. Returns the manifest.

    The pool never overlaps the labelled set: the seed must differ from ``spec.seed`` (the patient
    random streams are ``(seed, spatial_dims, p)``) and the pretraining leakage guard also checks
    content hashes against val and test (medmim.data.pool).
    """
    if seed == spec.seed:
        raise ValueError(f"data.phantoms.pool_seed ({seed}) must differ from data.phantoms.seed: the pool "
                         "would repeat the labelled patients")
    if n_patients < 1:
        raise ValueError(f"data.phantoms.pool_patients must be >= 1, got {n_patients}")
    root = Path(out_dir) / f"{spatial_dims}d_pool"
    pool_spec = PhantomSpec(n_patients=n_patients, images_per_patient=spec.images_per_patient,
                            size_2d=spec.size_2d, size_3d=spec.size_3d, abnormal_fraction=spec.abnormal_fraction,
                            seed=seed)
    params = {"spatial_dims": spatial_dims, **asdict(pool_spec), "version": 2, "pool": True}
    return _write_set(root, spatial_dims, pool_spec, params, seed=seed, n_patients=n_patients, prefix="U",
                      labelled=False)


def _write_set(root: Path, spatial_dims: int, spec: PhantomSpec, params: dict, *, seed: int, n_patients: int,
               prefix: str, labelled: bool) -> Path:
    manifest = root / "manifest.csv"
    params_file = root / "phantom_params.json"
    if manifest.exists() and params_file.exists() and json.loads(params_file.read_text()) == params:
        return manifest
    (root / "images").mkdir(parents=True, exist_ok=True)
    if labelled:
        (root / "masks").mkdir(parents=True, exist_ok=True)
    rows = []
    ext = "png" if spatial_dims == 2 else "nii"
    n_abnormal = int(round(spec.abnormal_fraction * n_patients))
    order = np.random.default_rng(seed).permutation(n_patients)
    abnormal_ids = set(order[:n_abnormal].tolist())
    for p in range(n_patients):
        rng = np.random.default_rng([seed, spatial_dims, p])
        anatomy = _patient_params(rng, spatial_dims)
        abnormal = p in abnormal_ids
        lesion = _lesion_params(rng, spatial_dims) if abnormal else None
        for s in range(spec.images_per_patient):
            name = f"{prefix}{p:04d}_S{s}"
            if spatial_dims == 2:
                img, mask = chest_xray(rng, anatomy, spec.size_2d, abnormal, lesion)
                _save_png(root / "images" / f"{name}.{ext}", img)
                if labelled:
                    _save_mask_png(root / "masks" / f"{name}.{ext}", mask)
            else:
                img, mask = ct_volume(rng, anatomy, spec.size_3d, abnormal, lesion)
                _save_nifti(root / "images" / f"{name}.{ext}", img)
                if labelled:
                    _save_nifti(root / "masks" / f"{name}.{ext}", mask)
            row = {"image": f"images/{name}.{ext}", "mask": f"masks/{name}.{ext}", "label": int(abnormal),
                   "patient_id": f"{prefix}{p:04d}", "study_id": f"S{s}",
                   "modality": "xray" if spatial_dims == 2 else "ct"}
            if not labelled:  # the pool carries neither labels nor masks
                row = {k: v for k, v in row.items() if k not in ("mask", "label")}
            rows.append(row)
    with atomic_path(manifest) as tmp:
        with open(tmp, "w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    write_json(params_file, params)
    return manifest
