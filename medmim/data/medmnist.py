"""MedMNIST-layout npz files (train/val/test images and labels) as a data source.

Works with the official files and with the copies in ../shared/datasets: labels may be stored flat
``(N,)`` or ``(N, 1)`` (or ``(N, K)`` for multi-label sets). MedMNIST carries no patient ids, so each
image is its own patient; the official split is kept.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np

from medmim.errors import DataError

SPLITS = ("train", "val", "test")


def load_npz(path: str | Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Return ``{split: (images, labels)}`` with images ``(N, *spatial)`` and labels ``(N,)`` or ``(N, K)``."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: MedMNIST npz file not found")
    try:
        npz = np.load(path, allow_pickle=False)
    except Exception as exc:  # noqa: BLE001 - numpy raises several types for bad files
        raise DataError(f"{path}: not a readable npz file ({exc})") from None
    out = {}
    with npz:
        for split in SPLITS:
            ik, lk = f"{split}_images", f"{split}_labels"
            if ik not in npz.files or lk not in npz.files:
                raise DataError(f"{path}: missing '{ik}' or '{lk}' (keys found: {', '.join(npz.files)})")
            images, labels = npz[ik], npz[lk]
            if labels.ndim == 2 and labels.shape[1] == 1:
                labels = labels[:, 0]
            if len(images) != len(labels):
                raise DataError(f"{path}: {ik} has {len(images)} images but {lk} has {len(labels)} labels")
            if images.ndim == 4 and images.shape[-1] == 3:  # RGB MedMNIST sets: channels first
                images = np.moveaxis(images, -1, 1)
            out[split] = (images, labels.astype(np.int64))
    return out


def npz_records(path: str | Path) -> list[dict]:
    """One record per image, holding the pixel array itself (``image``) rather than a file path."""
    path = Path(path)
    stem = path.stem
    records = []
    for split, (images, labels) in load_npz(path).items():
        for i, (img, lab) in enumerate(zip(images, labels)):
            records.append({
                "image": img,
                "label": lab.tolist() if np.ndim(lab) else int(lab),
                "patient_id": f"{stem}-{split}-{i}",
                "study_id": "",
                "split": split,
                "source": f"{path.name}:{split}_images[{i}]",
            })
    return records


def npz_fingerprint(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(1 << 20):
            h.update(block)
    return h.hexdigest()[:16]
