"""Write a hospital-style folder tree for the bring-your-own-data walkthrough (bench/results/byod.md).

    python bench/make_byod_tree.py OUT [--per-class 150] [--test-per-class 50] [--seed 0]

OUT/Training/<class>/*.{png,jpg} and OUT/Testing/<class>/*.{png,jpg}: real PneumoniaMNIST chest
X-rays (../shared/datasets, train and test splits) upscaled to non-square sizes (e.g. 97x83),
half PNG (8-bit) and half JPEG, with file names like a PACS export. Like real exports it also holds:
a few byte-identical copies of training images in Testing/ (cross-split duplicates), one file
name that is not valid UTF-8, one with spaces and accents, and a stray non-image file.
"""

from __future__ import annotations

import argparse
import os
import shutil
from pathlib import Path

import numpy as np
from PIL import Image

SHARED = Path(__file__).resolve().parents[2] / "shared" / "datasets"
CLASSES = {0: "NORMAL", 1: "PNEUMONIA"}


def write_tree(out: Path, per_class: int, test_per_class: int, seed: int, duplicates: int = 3) -> dict:
    npz = np.load(SHARED / "pneumoniamnist" / "pneumoniamnist_28.npz")
    rng = np.random.default_rng(seed)
    out.mkdir(parents=True, exist_ok=False)
    written = {"Training": 0, "Testing": 0}
    first_train: list[Path] = []
    for folder, split, n in (("Training", "train", per_class), ("Testing", "test", test_per_class)):
        images, labels = npz[f"{split}_images"], npz[f"{split}_labels"].reshape(-1)
        for label, name in CLASSES.items():
            idx = rng.permutation(np.flatnonzero(labels == label))[:n]
            (out / folder / name).mkdir(parents=True)
            for j, i in enumerate(idx):
                h, w = int(rng.integers(72, 128)), int(rng.integers(72, 128))
                img = Image.fromarray(images[i]).resize((w, h), Image.BILINEAR)
                stem = f"IM-{seed:02d}{label}{j:04d}-0001"
                path = out / folder / name / (stem + (".jpeg" if j % 2 else ".png"))
                img.save(path, quality=92) if j % 2 else img.save(path)
                written[folder] += 1
                if folder == "Training" and j < duplicates:
                    first_train.append(path)
    # byte-identical copies of training images in the test folders (a real export's leakage)
    for p in first_train[:duplicates]:
        shutil.copyfile(p, out / "Testing" / p.parent.name / ("copy-" + p.name))
        written["Testing"] += 1
    # odd names: not UTF-8 (Latin-1 bytes), spaces and accents; and a stray file
    normal = out / "Training" / "NORMAL"
    latin1, accents = sorted(normal.glob("IM-*.png"))[-2:]
    os.rename(latin1, os.path.join(os.fsencode(normal), b"r\xe9sum\xe9 scan.png"))
    accents.rename(normal / "Röntgen Thorax 1.png")
    (out / "Training" / "Thumbs.db").write_bytes(b"\x00" * 64)
    (normal / "notes.txt").write_text("exported 2024-01-01\n")
    return written


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out")
    ap.add_argument("--per-class", type=int, default=150)
    ap.add_argument("--test-per-class", type=int, default=50)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    print(write_tree(Path(a.out), a.per_class, a.test_per_class, a.seed))


if __name__ == "__main__":
    main()
