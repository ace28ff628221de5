"""`medmim predict`: run a fine-tuned model on image files, DICOM series folders or folders of them.

Every input goes through the run's own deterministic chain (``medmim.data.dataset.
deterministic_transforms`` with the run's ``config.yaml`` data section and the intensity preset
recorded in its ``environment.json``): the same reader, checks, orientation, spacing, preset and
size as training and ``medmim evaluate``. There is no second loader here.

* Classification writes ``predictions.csv``: one row per image with the class probabilities
  (``prob_<class name>``) and the predicted class (multi-label: the labels with probability >= 0.5).
* Segmentation writes one mask per image on the input's own grid: the logits are taken back
  through the chain's geometry (``Compose.inverse``: size, spacing, orientation) before the argmax.
  NIfTI inputs get a NIfTI mask with the source header (affine, qform/sform codes); other volumes
  (DICOM series, MHA/NRRD) a NIfTI with the RAS affine the reader gave; 2D pictures and 2D DICOM a
  PNG with the picture's rows and columns.

A DICOM series (a folder of slices, or several series in one folder) is one input volume, as in
training. Multi-channel runs (``data.channels``) take one multi-channel file per case (a 4D NIfTI...)
or a manifest (``.csv`` / ``.jsonl``) whose rows give each case's channel files (``image_<name>``
columns or an ``image`` list, read as training reads them), or a DICOM study folder per case (its
series picked per channel by SeriesDescription); an input whose channel count differs from the
model's is refused with one line naming the file. A file that cannot be used gets one error line and
is listed in ``errors.csv``; the other inputs still get their predictions.
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

import numpy as np
import torch

from medmim.config import Config, load_config
from medmim.errors import DataError, MedmimError
from medmim.io import atomic_path, write_csv
from medmim.data.labels import class_names
from medmim.progress import ProgressBar

IMAGE_SUFFIXES = (".nii.gz", ".nii", ".mha", ".mhd", ".nrrd", ".nhdr", ".png", ".jpg", ".jpeg", ".bmp",
                  ".tif", ".tiff", ".dcm", ".npy")
NIFTI_SUFFIXES = (".nii.gz", ".nii")
MANIFEST_SUFFIXES = (".csv", ".jsonl")
DICOM_SUFFIXES = (".dcm", ".dicom", ".ima")


def _suffix(path: Path) -> str:
    name = path.name.lower()
    for s in IMAGE_SUFFIXES:
        if name.endswith(s):
            return s
    return path.suffix.lower()


def _stem(path: Path) -> str:
    s = _suffix(path)
    return path.name[: -len(s)] if s and path.name.lower().endswith(s) else path.stem


@dataclass(frozen=True)
class Input:
    """One model input: a file, or a DICOM series (``path`` = its folder, ``series_id`` = its UID), or
    the channel files of one case (``files``, from a manifest row; ``path`` = the first channel's);
    ``frame``: a manifest row's time point of a 4D file or series."""

    path: Path
    series_id: str | None = None
    files: tuple[str, ...] | None = None
    frame: int | None = None

    def record(self) -> dict:
        """The record the deterministic chain reads (the same keys a manifest row has)."""
        rec = {"image": list(self.files) if self.files else str(self.path)}
        if self.series_id:
            rec["series_id"] = self.series_id
        if self.frame is not None:
            rec["frame"] = self.frame
        return rec

    def paths(self) -> list[Path]:
        return [Path(f) for f in self.files] if self.files else [self.path]

    @property
    def name(self) -> str:
        name = self.path.name if not self.series_id else f"{self.path.name}_{self.series_id[-8:]}"
        return name if self.frame is None else f"{name}_t{self.frame}"


def _looks_dicom(path: Path) -> bool:
    from medmim.data.readers import _is_dicom

    return _suffix(path) in DICOM_SUFFIXES or (path.suffix == "" and _is_dicom(path))


def manifest_inputs(path: Path, channels=None) -> list[Input]:
    """The cases of a manifest (``data.channels``: each row's channel files, as training reads them)."""
    from medmim.data.manifest import read_manifest

    rows = read_manifest(path, channels=channels) if channels else read_manifest(path)
    out = []
    for row in rows:
        image, series = row["image"], str(row.get("series_id") or "") or None
        frame = None if row.get("frame") in (None, "") else int(row["frame"])  # a 4D file's time point
        if isinstance(image, (list, tuple)):
            out.append(Input(Path(image[0]), series, files=tuple(str(f) for f in image), frame=frame))
        else:
            out.append(Input(Path(image), series, frame=frame))
    return out


def collect_inputs(paths: Iterable[str | Path], channels=None) -> list[Input]:
    """Files as given (any suffix: a bad one fails for that file only); manifests (``.csv``,
    ``.jsonl``) one input per row (``channels``: the run's ``data.channels``); folders searched
    recursively: picture/volume files one input each, DICOM files grouped into series (one input
    per series) -- or, for a multi-channel run, the folder's DICOM files as one study (one input,
    its series picked per channel by SeriesDescription). Sorted, without duplicates."""
    from medmim.data.dicom import scan_folder

    out: list[Input] = []
    for p in paths:
        p = Path(p)
        if p.is_file() and p.name.lower().endswith(MANIFEST_SUFFIXES):
            out += manifest_inputs(p, channels)
            continue
        if not p.is_dir():
            out.append(Input(p))
            continue
        files = sorted(q for q in p.rglob("*") if q.is_file() and not q.name.startswith("."))
        dicom = [q for q in files if _looks_dicom(q)]
        is_dicom = set(dicom)
        pictures = [Input(q) for q in files if q not in is_dicom and _suffix(q) in IMAGE_SUFFIXES]
        if channels and dicom:  # a multi-channel run: a folder of DICOM files is one study, its series the channels
            out += [Input(p), *pictures]
            continue
        out += pictures
        if dicom:
            skipped: list[dict] = []
            series = scan_folder(p, salt="", skipped=skipped, files=dicom)
            for uid, info in sorted(series.items(), key=lambda kv: str(kv[1].folder)):
                # a one-file series (an X-ray, an enhanced multi-frame volume) is read as that file:
                # the same reading, without rescanning its folder for every file in it
                out.append(Input(info.files[0]) if len(info.files) == 1 else Input(info.folder, uid))
    seen, unique = set(), []
    for inp in out:
        key = (str(inp.path.resolve()) if inp.path.exists() else str(inp.path), inp.series_id, inp.files, inp.frame)
        if key not in seen:
            seen.add(key)
            unique.append(inp)
    return unique


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def find_run(run_dir: str | Path) -> tuple[Path, Config, str]:
    """``(checkpoint, config, preset)`` of a fine-tuning run directory (``runs/<name>/finetune``,
    ``runs/<name>/segment``, a study cell, or ``runs/<name>`` itself). The config is the nearest
    ``config.yaml`` at or above the stage folder; the intensity preset the nearest
    ``environment.json`` that records one (``data.preset``), as the training run wrote it."""
    run_dir = Path(run_dir)
    if not run_dir.exists():
        raise MedmimError(f"{run_dir}: run directory not found")
    cands = [run_dir, run_dir / "finetune", run_dir / "segment"]
    ckpt = next((c / "checkpoints" / "best.pt" for c in cands if (c / "checkpoints" / "best.pt").exists()), None)
    if ckpt is None:
        raise MedmimError(f"{run_dir}: no fine-tuned model here (looked for checkpoints/best.pt in "
                          f"{', '.join(str(c) for c in cands)})")
    stage_dir = ckpt.parent.parent
    ups = (stage_dir, stage_dir.parent, stage_dir.parent.parent)
    cfg_file = next((d / "config.yaml" for d in ups if (d / "config.yaml").exists()), None)
    if cfg_file is None:
        raise MedmimError(f"{stage_dir}: no config.yaml in the run directory or above it")
    cfg = load_config(cfg_file)
    preset = next((p for d in ups if (p := (_read_json(d / "environment.json").get("data") or {}).get("preset"))),
                  None)
    if not preset:
        raise MedmimError(f"{stage_dir}: the run records no intensity preset (environment.json: data.preset), "
                          "so its preprocessing cannot be replayed; re-run its fine-tuning with this medmim")
    return ckpt, cfg, str(preset)


def load_run_model(ckpt_path: Path, cfg: Config) -> torch.nn.Module:
    """The fine-tuned model of a run (classifier or segmenter, as its config says) with the weights
    of ``ckpt_path``; a clear error when they do not fit."""
    from medmim.train.checkpoint import safe_torch_load
    from medmim.train.stages import build_encoder_for

    state = safe_torch_load(ckpt_path)["model"]
    if cfg.finetune.head != "segment" and not cfg.data.num_classes:
        raise MedmimError(f"{ckpt_path}: the run's config.yaml records no data.num_classes; cannot rebuild its head")
    encoder = build_encoder_for(cfg)
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
    return model.eval()


@dataclass
class PredictResult:
    outputs: list[str] = field(default_factory=list)
    failures: list[dict] = field(default_factory=list)  # {"file", "reason"}
    table: Path | None = None

    @property
    def ok(self) -> bool:
        return not self.failures


class Predictor:
    """A fine-tuned classifier or segmenter with the deterministic chain of its training run."""

    def __init__(self, model: torch.nn.Module, cfg: Config, preset: str, device: str | torch.device = "cpu"):
        from medmim.data.dataset import deterministic_transforms

        self.cfg = cfg
        self.head = cfg.finetune.head
        self.spatial_dims = cfg.data.spatial_dims
        self.in_channels = int(getattr(model.encoder, "in_channels", 1))
        self.image_size = (cfg.data.image_size,) * self.spatial_dims
        patch = cfg.finetune.seg_patch_size
        self.roi = (patch,) * self.spatial_dims if patch and patch < cfg.data.image_size else self.image_size
        self.preset = preset
        self.device = torch.device(device)
        self.model = model.to(self.device).eval()
        # classification: the very chain training and `medmim evaluate` run; segmentation: the same
        # chain keeping MetaTensors, so that the logits can be taken back to the source grid
        segment = self.head == "segment"
        self.chain = deterministic_transforms(cfg.data, preset, with_mask=False, track_meta=segment)
        native = cfg.data.model_copy(update={"resize": "none"})
        self.native_chain = deterministic_transforms(native, preset, with_mask=False, track_meta=True) \
            if segment else None

    @classmethod
    def from_run(cls, run_dir: str | Path, device: str = "cpu") -> "Predictor":
        ckpt_path, cfg, preset = find_run(run_dir)
        return cls(load_run_model(ckpt_path, cfg), cfg, preset, device)

    # ---- reading: the run's own chain ------------------------------------------------------------
    def read(self, inp: Input | str | Path, native: bool = False):
        """The model input ``(C, *spatial)`` (a MetaTensor that remembers the chain's geometry) for
        one input; DataError naming the file and the reason when it cannot be used."""
        from medmim.data.dataset import describe_failure

        inp = inp if isinstance(inp, Input) else Input(Path(inp))
        rec = inp.record()
        for path in inp.paths():
            if not path.exists():
                raise DataError(f"{path}: file not found")
        try:
            image = (self.native_chain if native and self.native_chain is not None else self.chain)(rec)["image"]
        except Exception as exc:  # noqa: BLE001 - reader and transform errors, reported per file
            info = describe_failure(rec, exc)
            raise DataError(f"{info['file']}: {info['reason']}") from None
        if image.shape[0] != self.in_channels:
            names = f" ({', '.join(self.cfg.data.channel_names)})" if self.cfg.data.channels else ""
            raise DataError(f"{inp.path}: the model takes {self.in_channels} channel(s){names}, this image has "
                            f"{image.shape[0]}")
        return image

    # ---- inference -------------------------------------------------------------------------------
    @torch.no_grad()
    def classify(self, image: torch.Tensor) -> np.ndarray:
        x = torch.Tensor.as_subclass(image, torch.Tensor)[None].float().to(self.device)
        logits = self.model(x).float()
        probs = torch.sigmoid(logits) if self.cfg.finetune.multilabel else logits.softmax(1)
        return probs[0].cpu().numpy()

    @torch.no_grad()
    def segment(self, image, native: bool = False) -> tuple[np.ndarray, np.ndarray | None]:
        """``(labels, affine)``: the integer label map on the input's own grid (the reader's voxel
        order, before orientation, spacing and resizing) and that grid's affine (None for 2D)."""
        from monai.data import MetaTensor

        from medmim.train.segment import sliding_window_logits

        x = image.as_tensor()[None].float().to(self.device)
        roi = self.roi if tuple(x.shape[2:]) != self.roi else None
        logits = sliding_window_logits(self.model, x, roi, self.cfg.finetune.sw_overlap)[0].float().cpu()
        # back through the chain's geometry: the logits carry the image's meta and applied operations
        back = MetaTensor(logits, meta=dict(image.meta), applied_operations=list(image.applied_operations))
        chain = self.native_chain if native else self.chain
        inv = chain.inverse({"image": back})["image"] if back.applied_operations else back
        affine = np.asarray(inv.affine, dtype=np.float64) if self.spatial_dims == 3 else None
        return inv.as_tensor().argmax(0).numpy().astype(np.uint8), affine


# ---- writing ---------------------------------------------------------------------------------------

def write_mask(mask: np.ndarray, source: Path, affine: np.ndarray | None, out_path: Path) -> Path:
    """Write ``mask`` (on the source's grid as the reader returned it) with the source's geometry.

    NIfTI source: the source header (affine, qform/sform codes, units) is copied. Other volumes:
    the RAS affine the reader gave. 2D sources other than NIfTI: a PNG with the same pixels.
    """
    import nibabel as nib

    if mask.ndim == 2 and _suffix(source) not in NIFTI_SUFFIXES:
        from PIL import Image

        out_path = out_path.with_name(out_path.name.replace(".nii.gz", ".png"))
        with atomic_path(out_path) as tmp:
            Image.fromarray(np.ascontiguousarray(mask)).save(tmp, format="PNG")
        return out_path
    if _suffix(source) in NIFTI_SUFFIXES:
        src = nib.load(str(source))
        if tuple(src.shape[: mask.ndim]) != tuple(mask.shape):
            raise DataError(f"{source}: internal: mask shape {mask.shape} != image shape {src.shape}")
        header = src.header.copy()
        header.set_data_dtype(np.uint8)
        img = nib.Nifti1Image(mask, src.affine, header)
        img.set_qform(src.get_qform(), code=int(src.header["qform_code"]))
        img.set_sform(src.get_sform(), code=int(src.header["sform_code"]))
    else:
        affine = np.asarray(affine, dtype=np.float64) if affine is not None else np.eye(4)
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
    """Predict every input; one error line per unusable input, the others go on."""
    err = err or sys.stderr
    pred = predictor or Predictor.from_run(run_dir, device=device)
    items = collect_inputs(inputs, channels=pred.cfg.data.channels)
    if not items:
        raise MedmimError("no input images (give files, manifests, DICOM series folders, or folders holding "
                          + ", ".join(IMAGE_SUFFIXES) + ")")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    result = PredictResult()
    rows: list[dict] = []
    used: set[str] = set()
    names = class_names(pred.cfg)

    def run_one(inp: Input) -> None:
        image = pred.read(inp, native=native and pred.head == "segment")
        if pred.head == "segment":
            mask, affine = pred.segment(image, native=native)
            source = inp.path if not inp.path.is_dir() else inp.path / "series"
            stem = _stem(source) if not inp.series_id else inp.name
            stem = stem if inp.frame is None or inp.series_id else f"{stem}_t{inp.frame}"
            out = _unique(out_dir / f"{stem}_seg.nii.gz", used)
            result.outputs.append(str(write_mask(mask, source, affine, out)))
        else:
            probs = pred.classify(image)
            row = {"file": str(inp.path), "series_id": inp.series_id or "",
                   "frame": "" if inp.frame is None else inp.frame,
                   **{f"prob_{n}": f"{probs[c]:.6f}" for c, n in enumerate(names[: len(probs)])}}
            if pred.cfg.finetune.multilabel:
                row["predicted"] = ";".join(names[c] for c in range(len(probs)) if probs[c] >= 0.5)
            else:
                row["predicted"] = names[int(np.argmax(probs))]
            rows.append(row)
            result.outputs.append(str(inp.path))

    with ProgressBar(len(items), "predict", enabled=progress, file=err) as bar:
        for inp in items:
            try:
                run_one(inp)
            except (MedmimError, RuntimeError, ValueError, OSError) as exc:
                reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
                prefix = f"{inp.path}: "
                reason = reason[len(prefix):] if reason.startswith(prefix) else reason
                where = str(inp.path) + (f" (series {inp.series_id[-12:]})" if inp.series_id else "") \
                    + (f" (frame {inp.frame})" if inp.frame is not None else "")
                result.failures.append({"file": where, "reason": reason})
                bar.print(f"medmim predict: {where}: {reason}")
            bar.advance()
    if pred.head != "segment":
        cols = ["file"] + (["series_id"] if any(r["series_id"] for r in rows) else []) \
            + (["frame"] if any(r["frame"] != "" for r in rows) else []) \
            + [f"prob_{n}" for n in names] + ["predicted"]
        result.table = out_dir / "predictions.csv"
        write_csv(result.table, rows, cols)
    if result.failures:
        write_csv(out_dir / "errors.csv", result.failures, ["file", "reason"])
    return result

