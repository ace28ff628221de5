"""From a data config to torch DataLoaders, through MONAI dict transforms.

records (dicts: image path or array, label, patient_id, split, optional mask)
  -> deterministic transforms (read, channel first, intensity preset, resize)   cached once
  -> random transforms (augmentation, train only)                               every epoch
  -> batches {"image": (B, C, *spatial), "label": (B,) or (B, K), "mask": ...}

A record that cannot be read is skipped and reported (file + reason), unless ``data.strict``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from monai import transforms as mt
from monai.data import Dataset
from torch.utils.data import DataLoader, DistributedSampler

from medmim.config import Config, DataConfig
from medmim.data import manifest as mf
from medmim.data.presets import DEFAULT_FOR_MODALITY, intensity_transform
from medmim.data.splits import check_leakage, patient_split
from medmim.errors import DataError

log = logging.getLogger("medmim.data")


@dataclass
class DataBundle:
    """Everything a run needs to know about its data."""

    records: dict[str, list[dict]]  # split -> records
    spatial_dims: int
    preset: str
    fingerprint: str
    source: str
    num_classes: int
    skipped: list[dict] = field(default_factory=list)  # {"file", "reason"}

    def split(self, name: str) -> list[dict]:
        return self.records.get(name, [])

    def pretrain_records(self, include_test: bool = False) -> list[dict]:
        """Images for self-supervised pretraining: train+val, and test only when asked for."""
        out = self.split("train") + self.split("val")
        return out + self.split("test") if include_test else out


def _source_records(cfg: DataConfig) -> tuple[list[dict], str, str]:
    """Records, a default preset, and a source description."""
    if cfg.source == "phantoms":
        from medmim.data.phantoms import PhantomSpec, generate

        p = cfg.phantoms
        spec = PhantomSpec(n_patients=p.n_patients, images_per_patient=p.images_per_patient,
                           size_2d=p.size_2d, size_3d=p.size_3d, abnormal_fraction=p.abnormal_fraction,
                           seed=p.seed)
        manifest = generate(p.out_dir, cfg.spatial_dims, spec)
        preset = "uint8" if cfg.spatial_dims == 2 else "ct_soft_tissue"
        return mf.read_manifest(manifest), preset, f"medmim phantoms {cfg.spatial_dims}D (seed {p.seed})"
    if cfg.source == "medmnist":
        from medmim.data.medmnist import npz_records

        return npz_records(cfg.path), "uint8", f"MedMNIST npz {Path(cfg.path).name}"
    records = mf.read_manifest(cfg.path)
    modality = records[0].get("modality") or cfg.modality
    return records, DEFAULT_FOR_MODALITY.get(modality, "xray"), f"manifest {Path(cfg.path).name}"


def prepare_data(cfg: Config) -> DataBundle:
    """Read the source, split it by patient (where it has no split), check for leakage."""
    dc = cfg.data
    records, default_preset, source = _source_records(dc)
    patient_split(records, dc.val_fraction, dc.test_fraction, seed=cfg.run.seed)
    check_leakage(records)
    by_split: dict[str, list[dict]] = {"train": [], "val": [], "test": []}
    for r in records:
        by_split.setdefault(r["split"], []).append(r)
    if dc.max_train_images and len(by_split["train"]) > dc.max_train_images:
        rng = np.random.default_rng(cfg.run.seed)
        keep = sorted(rng.choice(len(by_split["train"]), dc.max_train_images, replace=False))
        by_split["train"] = [by_split["train"][i] for i in keep]
    if not by_split["train"]:
        raise DataError(f"{source}: no training images")
    return DataBundle(records=by_split, spatial_dims=dc.spatial_dims, preset=dc.preset or default_preset,
                      fingerprint=mf.records_fingerprint(records), source=source,
                      num_classes=dc.num_classes)


class LoadRecordd(mt.MapTransform):
    """Read ``keys`` from a file path (MONAI LoadImage: NIfTI, DICOM, MHA/NRRD, PNG/JPEG) or take an
    in-memory array, and put channels first (a grayscale image gets one channel)."""

    def __init__(self, keys: Sequence[str], spatial_dims: int):
        super().__init__(keys, allow_missing_keys=True)
        self.spatial_dims = spatial_dims
        self.loader = mt.LoadImage(image_only=True, ensure_channel_first=False)

    def __call__(self, data: dict) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            value = d[key]
            if isinstance(value, (str, Path)):
                arr = self.loader(str(value))
            else:
                arr = torch.as_tensor(np.asarray(value))
            if arr.ndim == self.spatial_dims:
                arr = arr.unsqueeze(0)
            elif arr.ndim == self.spatial_dims + 1 and arr.shape[-1] in (3, 4) and self.spatial_dims == 2:
                arr = arr[..., :1].movedim(-1, 0) if key == "mask" else arr[..., :3].float().mean(-1, keepdim=True).movedim(-1, 0)
            if arr.ndim != self.spatial_dims + 1:
                raise DataError(f"expected a {self.spatial_dims}D image, got shape {tuple(arr.shape)}")
            arr = arr.float()
            if not torch.isfinite(arr).all():
                raise DataError("image holds NaN or Inf values")
            d[key] = arr
        return d


def deterministic_transforms(dc: DataConfig, preset: str, with_mask: bool) -> mt.Compose:
    keys = ["image", "mask"] if with_mask else ["image"]
    size = (dc.image_size,) * dc.spatial_dims
    modes = ["area" if dc.spatial_dims == 2 else "trilinear", "nearest"][: len(keys)]
    return mt.Compose([
        LoadRecordd(keys, dc.spatial_dims),
        intensity_transform(preset, keys=["image"]),
        mt.Resized(keys, spatial_size=size, mode=modes),
        mt.EnsureTyped(keys, data_type="tensor", track_meta=False),
    ])


def augment_transforms(dc: DataConfig, with_mask: bool) -> mt.Compose:
    """Light, medically plausible augmentation: small affine jitter and a random resized crop."""
    keys = ["image", "mask"] if with_mask else ["image"]
    size = (dc.image_size,) * dc.spatial_dims
    rot = (0.17,) if dc.spatial_dims == 2 else (0.17, 0.0, 0.0)
    return mt.Compose([
        mt.RandAffined(keys, prob=0.7, rotate_range=rot, scale_range=0.1,
                       translate_range=[0.06 * dc.image_size] * dc.spatial_dims, padding_mode="zeros",
                       mode=["bilinear", "nearest"][: len(keys)]),
        mt.RandScaleIntensityd(["image"], factors=0.1, prob=0.5),
        mt.Resized(keys, spatial_size=size, mode=["area" if dc.spatial_dims == 2 else "trilinear", "nearest"][: len(keys)]),
    ])


def describe_failure(record: dict, exc: Exception) -> dict:
    where = record.get("source") or record.get("image")
    reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return {"file": str(where), "reason": reason[:300]}


def materialize(records: list[dict], dc: DataConfig, preset: str, with_mask: bool = False,
                skipped: list[dict] | None = None) -> list[dict]:
    """Run the deterministic transforms once per record (the in-memory cache).

    Only the keys needed for training are kept (image, label, mask): patient identifiers and
    paths never enter batches.
    """
    det = deterministic_transforms(dc, preset, with_mask)
    out = []
    for r in records:
        item = {"image": r["image"]}
        if with_mask:
            if not r.get("mask"):
                continue
            item["mask"] = r["mask"]
        try:
            item = det(item)
        except Exception as exc:  # noqa: BLE001 - any reader failure is reported, then skipped
            if dc.strict:
                raise DataError(f"{describe_failure(r, exc)['file']}: {describe_failure(r, exc)['reason']}") from None
            info = describe_failure(r, exc)
            log.warning("skipping %s: %s", info["file"], info["reason"])
            if skipped is not None:
                skipped.append(info)
            continue
        label = r.get("label")
        if label is not None:
            item["label"] = torch.as_tensor(label, dtype=torch.float32 if isinstance(label, list) else torch.long)
        out.append(item)
    if records and not out:
        raise DataError("no usable images left after skipping unreadable files"
                        + (f" (first: {skipped[0]['file']}: {skipped[0]['reason']})" if skipped else ""))
    return out


class AugmentedDataset(Dataset):
    """Cached items + random transforms, reseeded per epoch so that a resumed run sees the same data."""

    def __init__(self, items: list[dict], transform: mt.Compose | None, seed: int):
        super().__init__(items, transform=None)
        self.random = transform
        self.seed = seed

    def set_epoch(self, epoch: int) -> None:
        if self.random is not None:
            self.random.set_random_state(seed=(self.seed * 1000003 + epoch) % (2**32))

    def __getitem__(self, index):
        item = dict(self.data[index])
        return self.random(item) if self.random is not None else item


def make_loader(items: list[dict], batch_size: int, *, shuffle: bool, seed: int,
                augment: mt.Compose | None = None, drop_last: bool = False, num_workers: int = 0,
                rank: int = 0, world_size: int = 1) -> DataLoader:
    """A loader whose order depends only on (seed, epoch); ``loader.sampler.set_epoch`` each epoch.

    Under DDP, each rank reads its own shard of the same global order.
    """
    ds = AugmentedDataset(items, augment, seed)
    sampler = DistributedSampler(ds, num_replicas=world_size, rank=rank, shuffle=shuffle, seed=seed)
    return DataLoader(ds, batch_size=batch_size, sampler=sampler, num_workers=num_workers,
                      drop_last=drop_last and len(ds) >= batch_size * world_size)


def set_loader_epoch(loader: DataLoader, epoch: int) -> None:
    if hasattr(loader.sampler, "set_epoch"):
        loader.sampler.set_epoch(epoch)
    if hasattr(loader.dataset, "set_epoch"):
        loader.dataset.set_epoch(epoch)


def summarize(bundle: DataBundle) -> dict[str, Any]:
    counts = {s: len(r) for s, r in bundle.records.items()}
    return {"source": bundle.source, "fingerprint": bundle.fingerprint, "preset": bundle.preset,
            "counts": counts, "skipped": len(bundle.skipped)}
