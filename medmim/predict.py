"""`medmim predict`: run a fine-tuned model on image files or folders.

* Classification writes ``predictions.csv``: one row per image with the class probabilities and
  the predicted class (multi-label: the labels with probability >= 0.5).
* Segmentation writes one mask per image: NIfTI (``<stem>_seg.nii.gz``) with the source image's
  affine, header and voxel grid (so it overlays the input voxel for voxel, whatever its
  orientation), or PNG for PNG/JPEG inputs (same pixel grid).

Images are read the way training read them (MONAI ``LoadImage``, the run's intensity preset, the
training image size). Segmentation logits are computed on the training grid (with sliding windows
when the model was trained on patches) and resampled back to the input's own grid before the
argmax; ``native=True`` skips the resize and slides the training-size window over the native grid.

A file that cannot be used (unreadable, wrong dimensionality or channel count for the model) gets
one error line and is listed in ``errors.csv``; the other files still get their predictions.
"""

from __future__ import annotations

import csv
import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import torch
import torch.nn.functional as F

from medmim.config import Config, load_config
from medmim.errors import DataError, MedmimError
from medmim.io import atomic_path

IMAGE_SUFFIXES = (".nii.gz", ".nii", ".mha", ".mhd", ".nrrd", ".nhdr", ".png", ".jpg", ".jpeg", ".bmp",
                  ".tif", ".tiff", ".dcm", ".npy")
NIFTI_SUFFIXES = (".nii.gz", ".nii")
PICTURE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")


def _suffix(path: Path) -> str:
    name = path.name.lower()
    for s in IMAGE_SUFFIXES:
        if name.endswith(s):
            return s
    return path.suffix.lower()


def _stem(path: Path) -> str:
    s = _suffix(path)
    return path.name[: -len(s)] if s and path.name.lower().endswith(s) else path.stem


def collect_inputs(paths: Iterable[str | Path]) -> list[Path]:
    """Files as given (any suffix: a bad one fails for that file only), folders searched
    recursively for image suffixes, in sorted order without duplicates."""
    out: list[Path] = []
    for p in paths:
        p = Path(p)
        if p.is_dir():
            out += sorted(q for q in p.rglob("*") if q.is_file() and _suffix(q) in IMAGE_SUFFIXES
                          and not q.name.startswith("."))
        else:
            out.append(p)
    seen, unique = set(), []
    for p in out:
        key = str(p.resolve()) if p.exists() else str(p)
        if key not in seen:
            seen.add(key)
            unique.append(p)
    return unique


def find_run(run_dir: str | Path) -> tuple[Path, Config, str | None]:
    """``(checkpoint, config, preset)`` of a fine-tuning run directory (``runs/<name>/finetune``,
    ``runs/<name>/segment``, a study cell, or ``runs/<name>`` itself)."""
    run_dir = Path(run_dir)
    cands = [run_dir, run_dir / "finetune", run_dir / "segment"]
    ckpt = next((c / "checkpoints" / "best.pt" for c in cands if (c / "checkpoints" / "best.pt").exists()), None)
    if ckpt is None:
        raise MedmimError(f"{run_dir}: no fine-tuned model here (looked for checkpoints/best.pt in "
                          f"{', '.join(str(c) for c in cands)})")
    stage_dir = ckpt.parent.parent
    cfg_file = next((d / "config.yaml" for d in (stage_dir, stage_dir.parent, stage_dir.parent.parent)
                     if (d / "config.yaml").exists()), None)
    if cfg_file is None:
        raise MedmimError(f"{stage_dir}: no config.yaml in the run directory or above it")
    cfg = load_config(cfg_file)
    preset = None
    env = cfg_file.parent / "environment.json"
    if env.exists():
        try:
            preset = json.loads(env.read_text()).get("data", {}).get("preset")
        except (ValueError, AttributeError):
            preset = None
    return ckpt, cfg, preset


def default_preset(cfg: Config) -> str:
    from medmim.data.presets import DEFAULT_FOR_MODALITY

    dc = cfg.data
    if dc.preset:
        return dc.preset
    if dc.source == "phantoms":
        return "uint8" if dc.spatial_dims == 2 else "ct_soft_tissue"
    if dc.source == "medmnist":
        return "uint8"
    return DEFAULT_FOR_MODALITY.get(dc.modality, "xray")


@dataclass
class PredictResult:
    outputs: list[str] = field(default_factory=list)
    failures: list[dict] = field(default_factory=list)  # {"file", "reason"}
    table: Path | None = None

    @property
    def ok(self) -> bool:
        return not self.failures


class Predictor:
    """A fine-tuned classifier or segmenter with the preprocessing of its training run."""

    def __init__(self, model: torch.nn.Module, cfg: Config, preset: str, device: str | torch.device = "cpu"):
        self.cfg = cfg
        self.head = cfg.finetune.head
        self.spatial_dims = cfg.data.spatial_dims
        self.in_channels = int(getattr(model.encoder, "in_channels", 1))
        self.image_size = (cfg.data.image_size,) * self.spatial_dims
        patch = cfg.finetune.seg_patch_size
        self.roi = (patch,) * self.spatial_dims if patch and patch < cfg.data.image_size else self.image_size
        self.preset = preset
        # MedMNIST arrays are (row, column); MONAI reads picture files as (x, y) = (column, row).
        # A model trained on npz arrays gets pictures in the npz layout.
        self.rowcol_pictures = cfg.data.source == "medmnist"
        self.device = torch.device(device)
        self.model = model.to(self.device).eval()
        from monai import transforms as mt

        from medmim.data.presets import intensity_transform

        self._loader = mt.LoadImage(image_only=False, ensure_channel_first=False)
        self._intensity = intensity_transform(preset, keys=["image"])

    @classmethod
    def from_run(cls, run_dir: str | Path, device: str = "cpu") -> "Predictor":
        from medmim.models import encoder_from_config
        from medmim.train.checkpoint import safe_torch_load

        ckpt_path, cfg, preset = find_run(run_dir)
        state = safe_torch_load(ckpt_path)["model"]
        encoder = encoder_from_config(cfg.encoder, cfg.data.spatial_dims, cfg.data.image_size)
        if cfg.finetune.head == "segment":
            from medmim.models.segmentation import Segmenter

            model = Segmenter(encoder, cfg.finetune.num_seg_classes, decoder=cfg.finetune.seg_decoder,
                              feature_size=cfg.finetune.seg_feature_size)
        else:
            from medmim.models.heads import Classifier

            # the head's layout says which mode trained it (study cells override finetune.mode)
            mode = "linear" if "head.0.running_mean" in state else "full"
            model = Classifier(encoder, cfg.data.num_classes, mode=mode)
        missing, unexpected = model.load_state_dict(state, strict=False)
        missing = [k for k in missing if not k.endswith("encoder_frozen")]
        if missing or unexpected:
            raise MedmimError(f"{ckpt_path}: checkpoint does not fit the model of its config "
                              f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
        return cls(model, cfg, preset or default_preset(cfg), device)

    # ---- reading ---------------------------------------------------------------------------------
    def read(self, path: Path) -> tuple[torch.Tensor, dict[str, Any]]:
        """``(image (C, *spatial) float after the intensity preset, meta)``; DataError when the file
        is unreadable or does not fit the model."""
        if not path.exists():
            raise DataError("file not found")
        try:
            if _suffix(path) == ".npy":
                arr, meta = torch.as_tensor(np.load(path, allow_pickle=False)), {}
            else:
                arr, meta = self._loader(str(path))
                meta = dict(getattr(arr, "meta", {}) or meta or {})
                arr = torch.as_tensor(np.asarray(arr))
        except Exception as exc:  # noqa: BLE001 - readers raise many types
            reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise DataError(f"not a readable image ({reason[:200]})") from None
        d, c = self.spatial_dims, self.in_channels
        shape = tuple(arr.shape)
        if arr.ndim == d:
            arr = arr.unsqueeze(0)
        elif arr.ndim == d + 1 and d == 2 and arr.shape[-1] in (3, 4) and c == 1:
            arr = arr[..., :3].float().mean(-1, keepdim=True).movedim(-1, 0)  # RGB picture -> gray, as in training
        elif arr.ndim == d + 1:
            arr = arr.movedim(-1, 0)  # NIfTI / ITK keep channels (or time) last
        else:
            raise DataError(f"expected a {d}D image for this {d}D model, got an array of shape {shape}")
        if arr.shape[0] != c:
            raise DataError(f"the model takes {c} channel(s), this image has {arr.shape[0]} (array shape {shape})")
        arr = arr.float()
        meta["rowcol"] = False
        if self.rowcol_pictures and d == 2 and _suffix(path) in PICTURE_SUFFIXES:
            arr = arr.transpose(1, 2)
            meta["rowcol"] = True
        if not torch.isfinite(arr).all():
            raise DataError("image holds NaN or Inf values")
        arr = torch.as_tensor(np.asarray(self._intensity({"image": arr})["image"]), dtype=torch.float32)
        return arr, meta

    def _resize(self, x: torch.Tensor, size, image: bool = True) -> torch.Tensor:
        if tuple(x.shape[2:]) == tuple(size):
            return x
        if image and self.spatial_dims == 2:
            return F.interpolate(x, size=size, mode="area")
        return F.interpolate(x, size=size, mode="bilinear" if self.spatial_dims == 2 else "trilinear",
                             align_corners=False)

    # ---- inference -------------------------------------------------------------------------------
    @torch.no_grad()
    def classify(self, image: torch.Tensor) -> np.ndarray:
        x = self._resize(image[None].to(self.device), self.image_size)
        logits = self.model(x).float()
        probs = torch.sigmoid(logits) if self.cfg.finetune.multilabel else logits.softmax(1)
        return probs[0].cpu().numpy()

    @torch.no_grad()
    def segment(self, image: torch.Tensor, native: bool = False) -> np.ndarray:
        """Integer label map on the image's own grid ``(*spatial)``."""
        from medmim.train.segment import sliding_window_logits

        x = image[None].to(self.device)
        size = tuple(x.shape[2:])
        if native:
            logits = sliding_window_logits(self.model, x, self.roi if size != self.roi else None,
                                           self.cfg.finetune.sw_overlap)
        else:
            xr = self._resize(x, self.image_size)
            roi = self.roi if self.roi != self.image_size else None
            logits = sliding_window_logits(self.model, xr, roi, self.cfg.finetune.sw_overlap)
            logits = self._resize(logits.float(), size, image=False)
        return logits.argmax(1)[0].cpu().numpy().astype(np.uint8)


# ---- writing ---------------------------------------------------------------------------------------

def write_mask(mask: np.ndarray, source: Path, meta: dict, out_path: Path) -> Path:
    """Write ``mask`` (on the source image's voxel grid, as read by MONAI) next to its geometry.

    NIfTI source: the source header (affine, qform/sform codes, units) is copied. Other volumes:
    MONAI's affine (RAS world coordinates) is used. PNG/JPEG source: a PNG with the same pixels.
    """
    import nibabel as nib

    suffix = _suffix(source)
    if suffix in PICTURE_SUFFIXES and mask.ndim == 2:
        from PIL import Image

        out_path = out_path.with_name(out_path.name.replace(".nii.gz", ".png"))
        with atomic_path(out_path) as tmp:
            # MONAI's PIL reader indexes (x, y); a picture is stored (row, column)
            rows_cols = mask if meta.get("rowcol") else mask.T
            Image.fromarray(np.ascontiguousarray(rows_cols)).save(tmp, format="PNG")
        return out_path
    if suffix in NIFTI_SUFFIXES:
        src = nib.load(str(source))
        if tuple(src.shape[: mask.ndim]) != tuple(mask.shape):
            raise DataError(f"internal: mask shape {mask.shape} != image shape {src.shape}")
        header = src.header.copy()
        header.set_data_dtype(np.uint8)
        img = nib.Nifti1Image(mask, src.affine, header)
        img.set_qform(src.get_qform(), code=int(src.header["qform_code"]))
        img.set_sform(src.get_sform(), code=int(src.header["sform_code"]))
    else:
        affine = meta.get("original_affine", meta.get("affine"))
        affine = np.asarray(affine, dtype=np.float64) if affine is not None else np.eye(4)
        if affine.shape != (4, 4):  # 2D affines (3x3) -> 4x4
            full = np.eye(4)
            full[:2, :2], full[:2, 3] = affine[:2, :2], affine[:2, 2]
            affine = full
        img = nib.Nifti1Image(mask, affine)
        img.set_qform(affine, code=1)
        img.set_sform(affine, code=1)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_path.with_name(f".{out_path.name}.part.nii.gz")
    try:
        nib.save(img, str(tmp))
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, out_path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return out_path


def _unique(path: Path, used: set[str]) -> Path:
    base, n = path, 1
    while str(path) in used:
        n += 1
        path = base.with_name(base.name.replace("_seg.", f"_seg{n}.", 1))
    used.add(str(path))
    return path


def predict(run_dir: str | Path, inputs: Iterable[str | Path], out_dir: str | Path, *, native: bool = False,
            device: str = "cpu", progress: bool = True, err=None, predictor: Predictor | None = None) -> PredictResult:
    """Predict every input file; one error line per unusable file, the others go on."""
    err = err or sys.stderr
    pred = predictor or Predictor.from_run(run_dir, device=device)
    files = collect_inputs(inputs)
    if not files:
        raise MedmimError("no input images (give files, or folders holding " + ", ".join(IMAGE_SUFFIXES) + ")")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    result = PredictResult()
    rows: list[dict] = []
    used: set[str] = set()
    k = pred.cfg.data.num_classes

    def run_one(path: Path) -> None:
        image, meta = pred.read(path)
        if pred.head == "segment":
            mask = pred.segment(image, native=native)
            out = _unique(out_dir / f"{_stem(path)}_seg.nii.gz", used)
            result.outputs.append(str(write_mask(mask, path, meta, out)))
        else:
            probs = pred.classify(image)
            row = {"file": str(path), **{f"prob_{c}": f"{probs[c]:.6f}" for c in range(len(probs))}}
            if pred.cfg.finetune.multilabel:
                row["predicted"] = ";".join(str(c) for c in range(len(probs)) if probs[c] >= 0.5)
            else:
                row["predicted"] = int(np.argmax(probs))
            rows.append(row)
            result.outputs.append(str(path))

    bar = None
    if progress:
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        bar = Progress(TextColumn("predict"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                       console=Console(file=err), transient=False)
    ctx = bar if bar is not None else _Null()
    with ctx:
        task = bar.add_task("predict", total=len(files)) if bar is not None else None
        for path in files:
            try:
                run_one(path)
            except (MedmimError, RuntimeError, ValueError, OSError) as exc:
                reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
                result.failures.append({"file": str(path), "reason": reason})
                line = f"medmim predict: {path}: {reason}"
                if bar is not None:
                    bar.console.print(line, markup=False, highlight=False, soft_wrap=True)
                else:
                    print(line, file=err)
            if bar is not None:
                bar.advance(task)
    if pred.head != "segment":
        cols = ["file"] + [f"prob_{c}" for c in range(k)] + ["predicted"]
        result.table = out_dir / "predictions.csv"
        _write_csv(result.table, rows, cols)
    if result.failures:
        _write_csv(out_dir / "errors.csv", result.failures, ["file", "reason"])
    return result


def _write_csv(path: Path, rows: list[dict], cols: list[str]) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "w", newline="") as fh:
            w = csv.DictWriter(fh, fieldnames=cols, extrasaction="ignore")
            w.writeheader()
            w.writerows(rows)


class _Null:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False
