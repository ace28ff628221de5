"""Deterministic phantoms: the embedded default data of medmim.

Two families, both written as real files (PNG / NIfTI) plus a manifest, so that they take the same
reader path as user data:

* 2D chest-radiograph-like images (uint8 PNG, bright = dense): thorax, lungs, heart, spine and ribs;
  an "abnormal" patient has a nodule or consolidation in one lung.
* 3D CT-like volumes in Hounsfield units (int16 NIfTI with a real affine): body with a fat layer,
  lungs, liver, kidneys, spine, aorta; an "abnormal" patient has a hypodense liver lesion.

* multi-sequence brain MRI (``sequences``: 2-4 named contrasts, T1-, T2-, FLAIR- and ADC-like; 2D
  PNG or 3D float32 NIfTI, one file per sequence, manifest columns ``image_<name>``): the same head,
  tissues, lesion and look-alikes seen through each sequence's contrast (see :func:`mri_case`).

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
LABELS_MRI = {"background": 0, "brain": 1, "csf": 2, "lesion": 3}
SPACING_3D = (1.5, 1.5, 2.5)  # mm, (x, y, z)
SPACING_MRI = (1.5, 1.5, 1.5)  # mm

# Multi-sequence MRI: the signal of each tissue in each contrast (relative, 0-1). The lesion is
# dark on T1, bright on T2 and FLAIR, dark on ADC (restricted diffusion). Each look-alike ("mimic")
# has the lesion's signal in exactly ONE sequence and a clearly different one in the others, so a
# single sequence cannot tell the lesion from its look-alike while any two sequences can.
MRI_CONTRASTS = ("t1", "t2", "flair", "adc")
MRI_TISSUES = {
    #            t1    t2    flair  adc
    "scalp":   (0.90, 0.55, 0.70, 0.15),
    "skull":   (0.08, 0.06, 0.05, 0.05),
    "gm":      (0.55, 0.62, 0.60, 0.50),
    "wm":      (0.75, 0.45, 0.48, 0.42),
    "csf":     (0.12, 0.95, 0.08, 0.95),
    "lesion":  (0.35, 0.88, 0.92, 0.22),
}
MRI_MIMICS = {  # each equals the lesion in one sequence only
    "t1_dark":      (0.35, 0.45, 0.48, 0.60),  # T1-dark spot, unremarkable elsewhere
    "cyst":         (0.12, 0.88, 0.08, 0.95),  # fluid: bright T2 like the lesion, dark FLAIR
    "flair_bright": (0.95, 0.45, 0.92, 0.45),  # fat-like: bright FLAIR (and T1)
    "adc_dark":     (0.75, 0.30, 0.45, 0.22),  # dense tissue: dark ADC
}
# 3D NIfTI values per sequence (arbitrary units; ADC in 1e-6 mm^2/s): sequences live on different
# scales, which is what per-channel presets (z-score per sequence) are for
MRI_SCALES = {"t1": 1000.0, "t2": 1500.0, "flair": 800.0, "adc": 3000.0}


@dataclass(frozen=True)
class PhantomSpec:
    n_patients: int = 120
    images_per_patient: int = 2
    size_2d: int = 64
    size_3d: int = 32
    abnormal_fraction: float = 0.5
    seed: int = 1234
    # multi-sequence MRI phantoms: one name per sequence (empty: the grayscale X-ray / CT phantoms)
    sequences: tuple[str, ...] = ()


def sequence_contrasts(names) -> list[str]:
    """The contrast (one of MRI_CONTRASTS) each named sequence shows: a name starting with a contrast's
    name takes it (``t1``, ``t1ce``, ``flair``, ``adc``...; ``t1`` before ``t2`` is not ambiguous), any
    other name the first contrast not yet taken, in the order t1, t2, flair, adc."""
    names = [str(n) for n in names]
    if not 2 <= len(names) <= 4:
        raise ValueError(f"multi-sequence phantoms take 2 to 4 sequences, got {len(names)}: {names}")
    out: list[str | None] = []
    for n in names:
        low = n.lower()
        out.append(next((c for c in MRI_CONTRASTS if low.startswith(c)), None))
    free = [c for c in MRI_CONTRASTS if c not in out]
    return [c if c is not None else free.pop(0) for c in out]


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


def _brain_coords(size: int, spatial_dims: int, jitter: np.ndarray) -> tuple[np.ndarray, ...]:
    """Normalised coordinates in [-1, 1] (2D: rows y, columns x; 3D: x, y, z), shifted by ``jitter``."""
    axes = [np.linspace(-1, 1, size)] * spatial_dims
    grid = np.meshgrid(*axes, indexing="ij")
    if spatial_dims == 2:
        y, x = grid
        return x - jitter[0], y - jitter[1]
    return tuple(g - j for g, j in zip(grid, jitter))


def mri_case(rng: np.random.Generator, anatomy: dict, size: int, spatial_dims: int, lesion: dict | None,
             mimics: list[dict], contrasts: list[str]) -> tuple[list[np.ndarray], np.ndarray]:
    """One multi-sequence brain-MRI case: a list of images in [0, ~1] (one per contrast, the same
    anatomy) and its mask (LABELS_MRI).

    Head (scalp, skull), grey-matter rim, white matter, two lateral ventricles (CSF); the lesion
    (abnormal patients) and the look-alikes are soft blobs in the white matter with the signal of
    MRI_TISSUES["lesion"] / MRI_MIMICS. Each sequence gets its own smooth bias field and Rician noise.
    """
    d = spatial_dims
    coords = _brain_coords(size, d, rng.normal(0, 0.02, d))
    radii = [anatomy["head_w"], anatomy["head_h"]] + ([anatomy["head_d"]] if d == 3 else [])
    centre = [0.0] * d

    def scaled(k: float) -> list[float]:
        return [r * k for r in radii]

    head = _ellipse(coords, centre, radii)
    inner_skull = _ellipse(coords, centre, scaled(0.9))
    brain = _ellipse(coords, centre, scaled(0.82))
    wm = _ellipse(coords, centre, scaled(0.82 - anatomy["cortex"]))
    vent = np.zeros_like(head)
    for side in (-1, 1):
        c = [side * anatomy["vent_dx"], -0.08] + ([0.05] if d == 3 else [])
        vent |= _ellipse(coords, c, [anatomy["vent_w"], anatomy["vent_h"]] + ([0.25] if d == 3 else []))
    vent &= wm
    labels = np.zeros(head.shape, np.uint8)
    labels[brain] = LABELS_MRI["brain"]
    labels[vent] = LABELS_MRI["csf"]
    tissue = np.zeros(head.shape, np.int8)  # index into the tissue table; -1 background
    tissue[:] = -1
    names = list(MRI_TISSUES)
    for name, region in (("scalp", head), ("skull", inner_skull), ("gm", brain), ("wm", wm), ("csf", vent)):
        tissue[region] = names.index(name)
    blobs = [(MRI_TISSUES["lesion"], lesion)] if lesion is not None else []
    blobs += [(MRI_MIMICS[m["kind"]], m) for m in mimics]
    weights = []
    for _, b in blobs:
        w = _blob(coords, b["centre"], b["r"]) * wm
        weights.append(w)
    if lesion is not None:
        labels[(weights[0] > 0.5) & wm] = LABELS_MRI["lesion"]
    images = []
    for contrast in contrasts:
        k = MRI_CONTRASTS.index(contrast)
        table = np.array([MRI_TISSUES[n][k] for n in names] + [0.0])
        img = table[tissue]  # -1 -> the appended background 0
        for (values, _), w in zip(blobs, weights):
            img = img * (1 - w) + values[k] * w
        bias = 1.0 + sum(rng.uniform(-0.06, 0.06) * c for c in coords)
        img = img * bias
        sigma = 0.025
        img = np.sqrt((img + rng.normal(0, sigma, img.shape)) ** 2 + rng.normal(0, sigma, img.shape) ** 2)
        images.append(img)
    return images, labels


def _mri_patient(rng: np.random.Generator, spatial_dims: int, abnormal: bool) -> tuple[dict, dict | None, list]:
    """Anatomy, lesion (or None) and look-alikes of one patient. Every case holds two white-matter
    blobs: an abnormal patient the lesion and one look-alike, a normal one two look-alikes (so the
    number of blobs says nothing)."""
    d = spatial_dims
    anatomy = {"head_w": rng.uniform(0.78, 0.9), "head_h": rng.uniform(0.85, 0.95), "head_d": rng.uniform(0.8, 0.9),
               "cortex": rng.uniform(0.1, 0.14), "vent_dx": rng.uniform(0.1, 0.14),
               "vent_w": rng.uniform(0.06, 0.09), "vent_h": rng.uniform(0.2, 0.28)}
    angle0 = rng.uniform(0, 2 * np.pi)
    spots = []
    for j in range(2):  # opposite sides of the white matter: the blobs never overlap
        a = angle0 + np.pi * j + rng.uniform(-0.4, 0.4)
        rad = rng.uniform(0.36, 0.46)
        c = [rad * np.cos(a) * anatomy["head_w"], rad * np.sin(a) * anatomy["head_h"]]
        if d == 3:
            c.append(rng.uniform(-0.25, 0.25))
        spots.append({"centre": c, "r": rng.uniform(0.07, 0.11)})
    kinds = list(rng.permutation(list(MRI_MIMICS)))
    if abnormal:
        return anatomy, spots[0], [{**spots[1], "kind": kinds[0]}]
    return anatomy, None, [{**spots[0], "kind": kinds[0]}, {**spots[1], "kind": kinds[1]}]


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


def _save_nifti(path: Path, arr: np.ndarray, spacing=SPACING_3D) -> None:
    import nibabel as nib

    affine = np.diag([*spacing, 1.0])
    affine[:3, 3] = [-(s - 1) * sp / 2 for s, sp in zip(arr.shape, spacing)]
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


def phantom_labels(dc) -> dict[str, int]:
    """The mask labels of the phantom set ``data`` configures (multi-sequence MRI when ``data.channels``
    is declared, else the 2D X-ray or 3D CT set)."""
    if dc.channels:
        return LABELS_MRI
    return LABELS_2D if dc.spatial_dims == 2 else LABELS_3D


def phantom_spec(p, channels=()) -> PhantomSpec:
    """The PhantomSpec of a ``data.phantoms`` section; ``channels`` (``data.channels`` names) make it a
    multi-sequence MRI set with one sequence per channel."""
    return PhantomSpec(n_patients=p.n_patients, images_per_patient=p.images_per_patient, size_2d=p.size_2d,
                       size_3d=p.size_3d, abnormal_fraction=p.abnormal_fraction, seed=p.seed,
                       sequences=tuple(channels))


def phantom_source(dc) -> tuple[Path, str, str]:
    """``(manifest, default preset, description)`` of ``data.source=phantoms``: the grayscale set, or,
    when ``data.channels`` is declared, a multi-sequence MRI set with one sequence per channel."""
    names = [c.name for c in dc.channels]
    if names:
        try:
            sequence_contrasts(names)
        except ValueError as exc:
            from medmim.errors import ConfigError

            raise ConfigError(f"data.channels with data.source=phantoms: {exc} (one sequence per channel)") from None
    manifest = generate(dc.phantoms.out_dir, dc.spatial_dims, phantom_spec(dc.phantoms, names))
    if names:
        kind = f"multi-sequence MRI ({', '.join(names)})"
        return manifest, ("uint8" if dc.spatial_dims == 2 else "mri_zscore"), \
            f"medmim phantoms {dc.spatial_dims}D {kind} (seed {dc.phantoms.seed})"
    return manifest, ("uint8" if dc.spatial_dims == 2 else "ct_soft_tissue"), \
        f"medmim phantoms {dc.spatial_dims}D (seed {dc.phantoms.seed})"


def generate(out_dir: str | Path, spatial_dims: int, spec: PhantomSpec = PhantomSpec()) -> Path:
    """Write the phantom set for ``spatial_dims`` under ``out_dir/{2d,3d}/`` (multi-sequence sets:
    ``out_dir/{2d,3d}_mri_<names>/``) and return its manifest.

    Regenerates only when the folder is missing or was made with other parameters.
    """
    if spec.sequences:
        sequence_contrasts(spec.sequences)  # 2-4 names, or a clear error
        root = Path(out_dir) / f"{spatial_dims}d_mri_{'_'.join(spec.sequences)}"
    else:
        root = Path(out_dir) / f"{spatial_dims}d"
    params = {"spatial_dims": spatial_dims, **asdict(spec), "version": 2}
    params["sequences"] = list(spec.sequences)
    if not spec.sequences:
        del params["sequences"]  # grayscale sets keep the parameters (and files) they had
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
    seqs = "_mri_" + "_".join(spec.sequences) if spec.sequences else ""
    root = Path(out_dir) / f"{spatial_dims}d{seqs}_pool"
    pool_spec = PhantomSpec(n_patients=n_patients, images_per_patient=spec.images_per_patient,
                            size_2d=spec.size_2d, size_3d=spec.size_3d, abnormal_fraction=spec.abnormal_fraction,
                            seed=seed, sequences=spec.sequences)
    params = {"spatial_dims": spatial_dims, **asdict(pool_spec), "version": 2, "pool": True}
    params["sequences"] = list(spec.sequences)
    if not spec.sequences:
        del params["sequences"]  # grayscale pools keep the parameters (and files) they had
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
    if spec.sequences:
        return _write_mri_set(root, spatial_dims, spec, params, seed=seed, n_patients=n_patients, prefix=prefix,
                              labelled=labelled)
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
    _write_rows(manifest, rows)
    write_json(params_file, params)
    return manifest


def _write_rows(manifest: Path, rows: list[dict]) -> None:
    with atomic_path(manifest) as tmp:
        with open(tmp, "w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)


def _write_mri_set(root: Path, spatial_dims: int, spec: PhantomSpec, params: dict, *, seed: int, n_patients: int,
                   prefix: str, labelled: bool = True) -> Path:
    """The multi-sequence MRI set: ``images/<case>_<sequence>.{png,nii}``, ``masks/<case>.{png,nii}`` and
    a manifest with one ``image_<sequence>`` column per sequence (a pool: no masks, no labels)."""
    contrasts = sequence_contrasts(spec.sequences)
    (root / "images").mkdir(parents=True, exist_ok=True)
    if labelled:
        (root / "masks").mkdir(parents=True, exist_ok=True)
    n_abnormal = int(round(spec.abnormal_fraction * n_patients))
    order = np.random.default_rng(seed).permutation(n_patients)
    abnormal_ids = set(order[:n_abnormal].tolist())
    ext = "png" if spatial_dims == 2 else "nii"
    size = spec.size_2d if spatial_dims == 2 else spec.size_3d
    rows = []
    for p in range(n_patients):
        rng = np.random.default_rng([seed, spatial_dims, p, 7])
        abnormal = p in abnormal_ids
        anatomy, lesion, mimics = _mri_patient(rng, spatial_dims, abnormal)
        for s in range(spec.images_per_patient):
            name = f"{prefix}{p:04d}_S{s}"
            images, mask = mri_case(rng, anatomy, size, spatial_dims, lesion, mimics, contrasts)
            row = {}
            for seq, contrast, img in zip(spec.sequences, contrasts, images):
                path = root / "images" / f"{name}_{seq}.{ext}"
                if spatial_dims == 2:
                    _save_png(path, np.clip(img, 0, 1))
                else:
                    _save_nifti(path, (img * MRI_SCALES[contrast]).astype(np.float32), SPACING_MRI)
                row[f"image_{seq}"] = f"images/{path.name}"
            if not labelled:  # the pool carries neither labels nor masks
                rows.append({**row, "patient_id": f"{prefix}{p:04d}", "study_id": f"S{s}", "modality": "mri"})
                continue
            mask_path = root / "masks" / f"{name}.{ext}"
            if spatial_dims == 2:
                _save_mask_png(mask_path, mask)
            else:
                _save_nifti(mask_path, mask, SPACING_MRI)
            rows.append({**row, "mask": f"masks/{mask_path.name}", "label": int(abnormal),
                         "patient_id": f"{prefix}{p:04d}", "study_id": f"S{s}", "modality": "mri"})
    _write_rows(root / "manifest.csv", rows)
    write_json(root / "phantom_params.json", params)
    return root / "manifest.csv"
