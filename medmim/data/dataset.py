"""From a data config to torch DataLoaders, through MONAI dict transforms.

records (dicts: image path or array, label, patient_id, split, optional mask)
  -> deterministic transforms (read, channel first, checks, orientation/spacing, intensity preset,
     size)                                                   cached: data.cache = memory | disk | none
  -> random transforms (augmentation; pretraining crops)     every epoch
  -> batches {"image": (B, C, *spatial), "label": (B,) or (B, K), "mask": ...}

A record that cannot be used is skipped and reported (file + reason) in ``DataBundle.skipped``
(written as skipped.csv by the pipelines), unless ``data.strict``. A run fails only when nothing
usable is left.
"""

from __future__ import annotations

import csv
import logging
import os
from collections.abc import Sequence as SequenceABC
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from monai import transforms as mt
from monai.data import Dataset, list_data_collate
from torch.utils.data import DataLoader

from medmim.config import Config, DataConfig
from medmim.data import augment as aug
from medmim.data import manifest as mf
from medmim.data.cache import SHARD_ITEMS, ShardStore, cache_dir_for, item_key, pack_entries, unpack_row
from medmim.data.checks import channel_first, check_pair, validate
from medmim.data.fastpath import FastChain2D
from medmim.data.presets import (DEFAULT_FOR_MODALITY, channel_presets, crop_transforms, intensity_transform,
                                  preset_transforms)
from medmim.data.readers import read_channels, read_image
from medmim.data.labels import check_labels
from medmim.data.splits import (apply_fold, apply_split_file, assign_folds, check_leakage, handle_duplicates,
                                load_fold_file, load_split_file, patient_split, save_split_file)
from medmim.errors import DataError
from medmim.io import TEXT_ENCODING, atomic_path
from medmim.progress import ProgressBar

log = logging.getLogger("medmim.data")

__all__ = ["DataBundle", "prepare_data", "materialize", "make_loader", "set_loader_epoch", "augment_transforms",
           "deterministic_transforms", "pretrain_transforms", "summarize", "intensity_transform", "without_labels",
           "run_chain"]

# record keys that travel with an item through the deterministic transforms (dropped afterwards)
_PASS_KEYS = ("series_id", "frame")


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
    # unlabelled pretraining pool (data.unlabelled; guarded against val/test): medmim.data.pool
    pool: list[dict] = field(default_factory=list)
    pool_info: dict = field(default_factory=dict)
    pretrain_on_labelled: bool = True
    duplicates: list[dict] = field(default_factory=list)  # dropped as byte-identical to another split's image
    class_names: list[str] | None = None  # data.class_names, given or read from the manifest (medmim.data.labels)
    # cross-validation (data.folds = K): every non-test record with its ``fold``; ``fold``: the one selected
    folds: int = 0
    fold_records: list[dict] = field(default_factory=list)
    fold: int | None = None

    def split(self, name: str) -> list[dict]:
        return self.records.get(name, [])

    def pretrain_records(self, include_test: bool = False) -> list[dict]:
        """Images for self-supervised pretraining: train+val (unless data.pretrain_on_labelled is
        false), test only when asked for, and the unlabelled pool."""
        out = self.split("train") + self.split("val") if self.pretrain_on_labelled else []
        return (out + self.split("test") if include_test else out) + self.pool

    def write_skipped(self, path: str | Path) -> Path | None:
        """skipped.csv (file, reason), deduplicated; nothing is written when nothing was skipped."""
        return write_skipped(self.skipped, path)


def write_skipped(skipped: list[dict], path: str | Path) -> Path | None:
    if not skipped:
        return None
    seen, rows = set(), []
    for s in skipped:
        key = (s.get("file"), s.get("reason"))
        if key not in seen:
            seen.add(key)
            rows.append({"file": s.get("file", ""), "reason": s.get("reason", "")})
    with atomic_path(path) as tmp:
        with open(tmp, "w", newline="", **TEXT_ENCODING) as fh:  # odd (non-UTF-8) file names survive
            w = csv.DictWriter(fh, fieldnames=["file", "reason"])
            w.writeheader()
            w.writerows(rows)
    return Path(path)


def _source_records(cfg: DataConfig, skipped: list[dict] | None = None) -> tuple[list[dict], str, str]:
    """Records, a default preset, and a source description. Manifest rows without a file for some
    declared channel go to ``skipped`` (unless data.strict)."""
    skipped = None if cfg.strict else skipped
    if cfg.source == "phantoms":
        from medmim.data.phantoms import phantom_source

        # data.channels declared: a multi-sequence MRI set, one sequence per channel
        manifest, preset, source = phantom_source(cfg)
        return mf.read_manifest(manifest, cfg.channels, skipped), preset, source
    if cfg.source == "medmnist":
        from medmim.data.medmnist import npz_records

        return npz_records(cfg.path), "uint8", f"MedMNIST npz {Path(cfg.path).name}"
    records = mf.read_manifest(cfg.path, cfg.channels, skipped)
    modality = records[0].get("modality") or cfg.modality
    return records, DEFAULT_FOR_MODALITY.get(modality, "xray"), f"manifest {Path(cfg.path).name}"


def assign_splits(records: list[dict], dc: DataConfig, seed: int) -> None:
    """Splits from the source, then the split file (if any), then new patient-level splits; with
    ``data.folds``, the fold of every non-test patient (from the split file, new patients placed by
    ``assign_folds``). The split file is (re)written when it was missing or gained patients or folds."""
    mapping: dict[str, str] = {}
    k_known, folds_known = 0, {}
    path = Path(dc.split_file) if dc.split_file else None
    if path is not None and path.exists():
        mapping = load_split_file(path)
        k_known, folds_known = load_fold_file(path)
        apply_split_file(records, mapping, where=str(path))
    patient_split(records, dc.val_fraction, dc.test_fraction, seed=seed)
    folds: dict[str, int] = {}
    if dc.folds:
        if folds_known and k_known != dc.folds:
            raise DataError(f"{path}: holds {k_known} cross-validation folds but data.folds is {dc.folds}; folds are "
                            "written once: use another data.split_file for a different K")
        folds = assign_folds([r for r in records if r["split"] != "test"], dc.folds, seed, known=folds_known)
    if path is not None:
        new = {str(r["patient_id"]) for r in records} - set(mapping)
        if new or not path.exists() or set(folds) - set(folds_known):
            save_split_file(records + [{"patient_id": p, "split": s} for p, s in mapping.items()], path,
                            folds={**folds_known, **folds}, n_folds=dc.folds or k_known, seed=seed,
                            val_fraction=dc.val_fraction, test_fraction=dc.test_fraction)


def _by_split(records: list[dict], cfg: Config) -> dict[str, list[dict]]:
    """Records per split; ``data.max_train_images`` caps the train split (seeded)."""
    by_split: dict[str, list[dict]] = {"train": [], "val": [], "test": []}
    for r in records:
        by_split.setdefault(r["split"], []).append(r)
    cap = cfg.data.max_train_images
    if cap and len(by_split["train"]) > cap:
        rng = np.random.default_rng(cfg.run.seed)
        keep = sorted(rng.choice(len(by_split["train"]), cap, replace=False))
        by_split["train"] = [by_split["train"][i] for i in keep]
    return by_split


def select_fold(bundle: DataBundle, fold: int, cfg: Config) -> DataBundle:
    """The bundle of cross-validation split ``fold``: that fold's patients are the val split, the
    other folds' the train split, test unchanged. The records are copies: views of different folds
    never share a record, and the unlabelled pool is the same object in all of them."""
    import dataclasses

    if not bundle.folds:
        raise DataError("no cross-validation folds in this data (set data.folds = K >= 2)")
    if not 0 <= fold < bundle.folds:
        raise DataError(f"fold {fold} does not exist: data.folds is {bundle.folds} (folds 0..{bundle.folds - 1})")
    records = [dict(r) for r in bundle.fold_records]
    apply_fold(records, fold)
    by_split = _by_split(records + bundle.split("test"), cfg)
    if not by_split["train"]:
        raise DataError(f"{bundle.source}: fold {fold} leaves no training images")
    return dataclasses.replace(bundle, records=by_split, fold=fold)


def prepare_data(cfg: Config) -> DataBundle:
    """Read the source, split it by patient (where it has no split), check for leakage; with
    ``data.folds`` and ``finetune.fold``, the split of that fold (:func:`select_fold`)."""
    dc = cfg.data
    skipped: list[dict] = []  # manifest rows missing a channel's file (data.channels)
    records, default_preset, source = _source_records(dc, skipped)
    assign_splits(records, dc, cfg.run.seed)
    check_leakage(records)
    # byte-identical images across splits (and, for cross-validation, across folds)
    records, duplicates = handle_duplicates(records, dc.duplicates, by_fold=bool(dc.folds))
    check_labels(records, cfg)  # one-line errors; fills data.num_classes / class_names when empty
    by_split = _by_split(records, cfg)
    if not by_split["train"]:
        raise DataError(f"{source}: no training images")
    bundle = DataBundle(records=by_split, spatial_dims=dc.spatial_dims, preset=dc.preset or default_preset,
                        fingerprint=mf.records_fingerprint(records), source=source,
                        num_classes=dc.num_classes, pretrain_on_labelled=dc.pretrain_on_labelled,
                        duplicates=duplicates, class_names=dc.class_names, skipped=skipped, folds=dc.folds,
                        fold_records=[r for r in records if r["split"] != "test"] if dc.folds else [])
    for s in skipped:
        log.warning("skipping %s: %s", s["file"], s["reason"])
    if dc.unlabelled or (dc.source == "phantoms" and dc.phantoms.pool_patients):
        from medmim.data.pool import attach_pool

        attach_pool(bundle, cfg)
    if dc.folds and cfg.finetune.fold is not None:
        bundle = select_fold(bundle, cfg.finetune.fold, cfg)
    return bundle


class LoadRecordd(mt.MapTransform):
    """Read ``keys`` (file, DICOM folder, npz entry or in-memory array; see medmim.data.readers), put
    channels first (grayscale -> one channel), and refuse bad input with one clear reason:
    unreadable/truncated, not an image, wrong dimensionality, empty, NaN/Inf, image/mask mismatch.

    With ``channels`` (``data.channels``) the image is a multi-channel case (``read_channels``: one file
    per channel, one multi-channel file on ``channel_axis``, or a DICOM study), ``(C, *spatial)`` on the
    first channel's grid. Masks stay single-channel. ``LoadRecordd.of(dc, keys)`` builds it from a config."""

    def __init__(self, keys: Sequence[str], spatial_dims: int, channels: Sequence = (), channel_axis: int = -1):
        super().__init__(keys, allow_missing_keys=True)
        self.spatial_dims = spatial_dims
        self.channels = list(channels)
        self.channel_axis = channel_axis

    @classmethod
    def of(cls, dc: DataConfig, keys: Sequence[str]) -> "LoadRecordd":
        return cls(keys, dc.spatial_dims, channels=dc.channels, channel_axis=dc.channel_axis)

    def _multichannel(self, value, series_id) -> bool:
        """Read through ``read_channels``: several channels, a list of files, or a study folder whose
        one channel is picked by SeriesDescription. One declared channel in one file reads as grayscale."""
        if not self.channels:
            return False
        if len(self.channels) > 1 or isinstance(value, (list, tuple)):
            return True
        return bool(self.channels[0].series) and not series_id and isinstance(value, (str, Path)) \
            and Path(str(value)).is_dir()

    def __call__(self, data: dict) -> dict:
        d = dict(data)
        extra = {k: d.pop(k, None) for k in _PASS_KEYS}
        frame = extra["frame"]
        frame = None if frame in (None, "") else int(frame)
        for key in self.key_iterator(d):
            value = d[key]
            if key == "image" and self._multichannel(value, extra["series_id"]):
                d[key] = read_channels(value, self.channels, spatial_dims=self.spatial_dims,
                                       channel_axis=self.channel_axis, series_id=extra["series_id"] or None,
                                       frame=frame)
                continue
            where = str(value) if isinstance(value, (str, Path)) else f"<array {key}>"
            arr = read_image(value, series_id=extra["series_id"] or None, frame=frame, key=key)
            arr = channel_first(arr, self.spatial_dims, key, where)
            validate(arr, key, where)
            d[key] = arr.float()
        if "mask" in d and "image" in d:
            check_pair(d["image"], d["mask"], str(data.get("mask")))
        return d


class DeterministicChain(mt.Compose):
    """The deterministic chain: a MONAI Compose (LoadRecordd -> preset -> size -> plain tensors),
    which defines the result, plus a fast path for 2D pictures (``medmim.data.fastpath``) that gives
    the same numbers without MONAI's per-item MetaTensor overhead. ``reference(item)`` always runs
    the MONAI chain; ``fast=False`` switches the fast path off."""

    def __init__(self, transforms, fast=None):
        super().__init__(transforms)
        self.fast = fast

    def reference(self, data: dict) -> dict:
        return super().__call__(data)

    def __call__(self, data, *args, **kwargs):
        if self.fast is not None and isinstance(data, dict) and not args and not kwargs:
            out = self.fast(data)
            if out is not None:
                return out
        return super().__call__(data, *args, **kwargs)


def deterministic_transforms(dc: DataConfig, preset: str, with_mask: bool, fast: bool = True,
                             track_meta: bool = False) -> DeterministicChain:
    """File -> tensor for every caller (training, evaluation, prediction, anomaly scoring).
    ``track_meta=True`` (MONAI path only) keeps MetaTensors with their applied operations, so that
    ``chain.inverse`` can take a prediction back to the source grid (medmim.predict)."""
    keys = ["image", "mask"] if with_mask else ["image"]
    presets = channel_presets(dc, preset)  # one per input channel (data.channels), else [preset]
    chain = [
        LoadRecordd.of(dc, keys),
        *preset_transforms(preset, keys, spatial_dims=dc.spatial_dims, image_size=dc.image_size,
                           resize=dc.resize, orientation=dc.orientation, target_spacing=dc.target_spacing,
                           channel_presets=presets),
        mt.EnsureTyped(keys, data_type="tensor", track_meta=track_meta),
    ]
    # 2D pictures (one per channel with data.channels): the same numbers without MONAI's overhead
    use_fast = fast and dc.spatial_dims == 2 and not track_meta
    fast_path = FastChain2D(presets[0], keys, dc.image_size, dc.resize, presets=presets) if use_fast else None
    return DeterministicChain(chain, fast=fast_path)


class AugmentChain(mt.Compose):
    """A per-sample MONAI augmentation chain (the definition) with its batched equivalent ``batch``
    (a medmim.data.augment.BatchAugment, or None where only the per-sample chain applies).
    ``make_loader`` runs ``batch`` on the training device when there is one and ``data.augment`` is
    "batch"; the loop applies it (medmim.data.augment.augment_batch)."""

    def __init__(self, transforms, batch=None):
        super().__init__(transforms)
        self.batch = batch


def _batchable(dc: DataConfig, stage: str) -> bool:
    """Batched augmentation needs equal-size items (a size mode) and no multi-patch sampling."""
    return dc.augment == "batch" and dc.resize != "none" and not (stage == "pretrain" and dc.patch_samples)


def augment_transforms(dc: DataConfig, with_mask: bool, stage: str = "finetune") -> AugmentChain:
    """Light, medically plausible augmentation: small affine jitter, intensity scale; plus the
    pretraining crops switched on in the config (``stage="pretrain"``) and channel dropout
    (``data.channel_dropout``: each channel zeroed with that probability, never all of them).
    Training only: evaluation and prediction run the deterministic chain alone. Parameters:
    medmim.data.augment."""
    keys = ["image", "mask"] if with_mask else ["image"]
    size = (dc.image_size,) * dc.spatial_dims
    rot = (aug.ROTATE,) if dc.spatial_dims == 2 else (aug.ROTATE, 0.0, 0.0)
    chain = [
        mt.RandAffined(keys, prob=aug.AFFINE_PROB, rotate_range=rot, scale_range=aug.SCALE,
                       translate_range=[aug.TRANSLATE * dc.image_size] * dc.spatial_dims, padding_mode="zeros",
                       mode=["bilinear", "nearest"][: len(keys)]),
        mt.RandScaleIntensityd(["image"], factors=aug.INTENSITY, prob=aug.INTENSITY_PROB),
    ]
    if dc.patch_samples == 0 or stage != "pretrain":
        chain.append(mt.Resized(keys, spatial_size=size,
                                mode=["area" if dc.spatial_dims == 2 else "trilinear", "nearest"][: len(keys)]))
    crop = stage == "pretrain" and dc.random_resized_crop
    if stage == "pretrain":
        chain = crop_transforms(keys, dc.spatial_dims, dc.image_size, random_resized_crop=dc.random_resized_crop,
                                crop_scale=dc.crop_scale, patch_samples=dc.patch_samples) + chain
    if dc.channel_dropout > 0:
        chain.append(aug.RandChannelDropoutd(["image"], dc.channel_dropout))
    batch = aug.BatchAugment(dc.spatial_dims, dc.image_size, crop=crop, crop_scale=dc.crop_scale,
                             channel_dropout=dc.channel_dropout) if _batchable(dc, stage) else None
    return AugmentChain(chain, batch=batch)


def pretrain_transforms(dc: DataConfig, with_mask: bool = False) -> AugmentChain | None:
    """The pretraining crops the config switches on (random resized crop with ``crop_scale``,
    ``patch_samples`` random patches of ``image_size``), or None when both are off."""
    keys = ["image", "mask"] if with_mask else ["image"]
    chain = crop_transforms(keys, dc.spatial_dims, dc.image_size, random_resized_crop=dc.random_resized_crop,
                            crop_scale=dc.crop_scale, patch_samples=dc.patch_samples)
    if not chain:
        return None
    batch = aug.BatchAugment(dc.spatial_dims, dc.image_size, crop=True, crop_scale=dc.crop_scale, affine=False,
                             intensity=False) if _batchable(dc, "pretrain") else None
    return AugmentChain(chain, batch=batch)


def describe_failure(record: dict, exc: Exception) -> dict:
    """{"file", "reason"}: a DataError message is '<file>: <reason>'; other errors name the record (a
    multi-channel case by its first channel's file)."""
    where = str(record.get("source") or mf.case_name(record))
    while exc.__cause__ is not None and "applying transform" in str(exc):  # MONAI wraps transform errors
        exc = exc.__cause__
    text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    reason = text if isinstance(exc, DataError) else f"{type(exc).__name__}: {text}"
    if isinstance(exc, DataError) and ": " in text:
        file, reason = text.split(": ", 1)
        if not file.startswith("<array"):
            where = file
    return {"file": where, "reason": reason[:300]}


def _item_of(r: dict, with_mask: bool) -> dict | None:
    item = {"image": r["image"]}
    for k in _PASS_KEYS:
        if r.get(k) not in (None, ""):
            item[k] = r[k]
    if with_mask:
        if not r.get("mask"):
            return None
        item["mask"] = r["mask"]
    return item


def _finish(item: dict, r: dict) -> dict:
    out = {k: v for k, v in item.items() if k in ("image", "mask")}
    label = r.get("label")
    if label is not None and label != "":
        out["label"] = torch.as_tensor(label, dtype=torch.float32 if isinstance(label, list) else torch.long)
    return out


def _skip(r: dict, exc: Exception | dict, dc: DataConfig, skipped: list[dict] | None) -> None:
    """Report an unusable record (``exc``: the exception, or its describe_failure info from a worker)."""
    info = exc if isinstance(exc, dict) else describe_failure(r, exc)
    if dc.strict:
        raise DataError(f"{info['file']}: {info['reason']} (data.strict is true)") from None
    log.warning("skipping %s: %s", info["file"], info["reason"])
    if skipped is not None:
        skipped.append(info)


class LazyItems(SequenceABC):
    """data.cache=none: the deterministic transforms run again on every access."""

    def __init__(self, records: list[dict], det: mt.Compose, with_mask: bool):
        self.records, self.det, self.with_mask = records, det, with_mask

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i):
        r = self.records[i]
        return _finish(self.det(_item_of(r, self.with_mask)), r)


class CachedItems(SequenceABC):
    """data.cache=disk: items read from the shard cache on every access (nothing held in memory but a
    small table of offsets and the labels), so a 100,000-image set costs no more RAM than a small one."""

    def __init__(self, store: ShardStore, table: np.ndarray, labels: list):
        self.store, self.table, self.labels = store, table, labels

    def __len__(self) -> int:
        return len(self.table)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        sid, ioff, ishape, moff, mshape = unpack_row(self.table[i])
        out = {"image": self.store.read(sid, ioff, ishape)}
        if mshape is not None:
            out["mask"] = self.store.read(sid, moff, mshape)
        return _finish(out, {"label": self.labels[i]})


class WithoutLabels(SequenceABC):
    """A view of items without their labels (self-supervised pretraining), computed on access."""

    def __init__(self, items: Sequence[dict]):
        self.items = items

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i):
        return {k: v for k, v in self.items[i].items() if k != "label"}


def without_labels(items: Sequence[dict]) -> Sequence[dict]:
    """Labels never enter pretraining batches; lazy item sequences stay lazy."""
    return WithoutLabels(items)


# ---- running the chain over many records: in-process or in ``data.num_workers`` processes ----------
_WORKER: dict[str, Any] = {}
PARALLEL_MIN_ITEMS = 32  # fewer items than this run in-process (a pool costs more than it saves)
PROGRESS_MIN_ITEMS = 200  # a progress bar (stderr) for at least this many items


def _worker_init(dc_dump: dict, preset: str, with_mask: bool) -> None:
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
    _WORKER["det"] = deterministic_transforms(DataConfig.model_validate(dc_dump), preset, with_mask)


def _run_one(det, item: dict, where: str) -> tuple[bool, Any]:
    """(True, {key: float32 array}) or (False, describe_failure info)."""
    try:
        out = det(dict(item))
        return True, {k: out[k] for k in ("image", "mask") if k in out}
    except Exception as exc:  # noqa: BLE001 - any reader failure is reported, then skipped
        return False, describe_failure({"image": where}, exc)


def _worker_run(chunk: list[tuple[int, dict, str]]) -> list[tuple[int, bool, Any]]:
    det = _WORKER["det"]
    out = []
    for i, item, where in chunk:
        ok, res = _run_one(det, item, where)
        if ok:
            res = {k: v.numpy() for k, v in res.items()}
        out.append((i, ok, res))
    return out


def _mp_context():
    import multiprocessing as mp

    # fork is cheap; after CUDA was initialised only spawn is safe
    if "fork" in mp.get_all_start_methods() and not torch.cuda.is_initialized():
        return mp.get_context("fork")
    return mp.get_context("spawn")


def run_chain(items: list[dict], wheres: list[str], dc: DataConfig, preset: str, with_mask: bool, *,
              det=None, workers: int | None = None, progress: ProgressBar | None = None):
    """Yield ``(index, ok, result)`` for every item, in order: the deterministic chain in-process, or
    in ``workers`` processes (default ``data.num_workers``; one torch thread each) when there are
    enough items. ``result``: {"image": tensor, "mask": tensor?} or a describe_failure dict."""
    workers = dc.num_workers if workers is None else workers
    if workers <= 1 or len(items) < PARALLEL_MIN_ITEMS:
        det = det or deterministic_transforms(dc, preset, with_mask)
        for i, item in enumerate(items):
            ok, res = _run_one(det, item, wheres[i])
            if progress:
                progress.advance()
            yield i, ok, res
        return
    from concurrent.futures import ProcessPoolExecutor

    chunk = max(1, min(32, len(items) // (4 * workers)))
    jobs = [[(i, items[i], wheres[i]) for i in range(a, min(a + chunk, len(items)))]
            for a in range(0, len(items), chunk)]
    with ProcessPoolExecutor(max_workers=workers, mp_context=_mp_context(), initializer=_worker_init,
                             initargs=(dc.model_dump(), preset, with_mask)) as pool:
        for results in pool.map(_worker_run, jobs):
            for i, ok, res in results:
                if ok:
                    res = {k: torch.from_numpy(v) for k, v in res.items()}
                yield i, ok, res
            if progress:
                progress.advance(len(results))


def materialize(records: list[dict], dc: DataConfig, preset: str, with_mask: bool = False,
                skipped: list[dict] | None = None, progress: bool | None = None) -> Sequence[dict]:
    """Run the deterministic transforms per record (in ``data.num_workers`` processes when > 1, with a
    progress bar on stderr for long runs), cached as ``dc.cache`` says:

    * ``memory``: once per run, kept in memory;
    * ``disk``: shards under ``dc.cache_dir/<hash of the transform config>`` (medmim.data.cache),
      shared by every run, stage and study cell with the same chain; only missing items are computed;
      items are read back from disk on access, so memory does not grow with the number of images;
    * ``none``: checked once (so bad files are skipped up front), then re-read on every access.

    Only the keys needed for training are kept (image, label, mask): patient identifiers and
    paths never enter batches. Records carrying their own preset (an unlabelled pool source's,
    medmim.data.pool) are materialised per preset and concatenated.
    """
    from medmim.data.pool import PRESET_KEY, preset_groups

    groups = preset_groups(records, preset)
    if len(groups) > 1 or (groups and groups[0][0] != preset):
        parts = [materialize([{k: v for k, v in r.items() if k != PRESET_KEY} for r in rs], dc, p, with_mask,
                             skipped, progress) for p, rs in groups]
        return [it for part in parts for it in part] if all(isinstance(q, list) for q in parts) \
            else torch.utils.data.ConcatDataset(parts)
    det = deterministic_transforms(dc, preset, with_mask)
    pairs = [(r, it) for r in records if (it := _item_of(r, with_mask)) is not None]
    wheres = [str(r.get("source") or mf.case_name(r)) for r, _ in pairs]
    out: Sequence[dict]
    bar = ProgressBar(len(pairs), f"preparing {len(pairs)} images",
                      enabled=len(pairs) >= PROGRESS_MIN_ITEMS if progress is None else progress)
    bar.start()
    try:
        if dc.cache == "disk" and pairs:
            out = _materialize_disk(pairs, wheres, dc, preset, with_mask, det, skipped, bar)
        else:
            res_items: list[dict] = []
            good: list[dict] = []
            for i, ok, res in run_chain([it for _r, it in pairs], wheres, dc, preset, with_mask, det=det,
                                        progress=bar):
                r = pairs[i][0]
                if not ok:
                    _skip(r, res, dc, skipped)
                elif dc.cache == "none":
                    good.append(r)
                else:
                    res_items.append(_finish(res, r))
            out = LazyItems(good, det, with_mask) if dc.cache == "none" else res_items
    finally:
        bar.close()
    if pairs and not len(out):
        raise DataError("no usable images left after skipping unreadable files"
                        + (f" (first: {skipped[0]['file']}: {skipped[0]['reason']})" if skipped else ""))
    return out


def _materialize_disk(pairs, wheres, dc, preset, with_mask, det, skipped, bar) -> CachedItems:
    store = ShardStore(cache_dir_for(dc, preset, with_mask))
    keys = [item_key(it) for _r, it in pairs]
    found = store.lookup(set(keys))
    todo: dict[str, int] = {}
    for i, k in enumerate(keys):
        if k not in found and k not in todo:
            todo[k] = i
    bar.advance(len(pairs) - len(todo))
    failed: dict[str, dict] = {}
    order = list(todo.items())
    for a in range(0, len(order), SHARD_ITEMS):  # one shard per block: memory stays bounded
        block = order[a:a + SHARD_ITEMS]
        entries = []
        for j, ok, res in run_chain([pairs[i][1] for _k, i in block], [wheres[i] for _k, i in block], dc,
                                    preset, with_mask, det=det, progress=bar):
            if ok:
                entries.append((block[j][0], res))
            else:
                failed[block[j][0]] = res
        found.update(store.write(entries))
    rows, labels = [], []
    for (r, _it), k in zip(pairs, keys):
        if k in failed:
            _skip(r, failed[k], dc, skipped)
            continue
        rows.append(found[k])
        labels.append(r.get("label"))
    return CachedItems(store, pack_entries(rows), labels)


class AugmentedDataset(Dataset):
    """Cached items + random transforms. Each item's augmentation is seeded by (seed, epoch, index),
    so it does not depend on which rank or worker reads it, in what order, or whether a resumed run
    skipped the batches before it."""

    def __init__(self, items: Sequence[dict], transform: mt.Compose | None, seed: int, batch_augment=None):
        super().__init__(items, transform=None)
        self.random = transform
        self.seed = seed
        self.epoch = 0
        # batched augmentation (applied by the loop on the device): items carry their index instead
        self.batch_augment = batch_augment

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __getitem__(self, index):
        item = dict(self.data[index])
        if self.batch_augment is not None:
            item[aug.INDEX_KEY] = int(index)
            return item
        if self.random is None:
            return item
        state = np.random.SeedSequence([self.seed % (2**32), self.epoch, int(index)]).generate_state(1)[0]
        self.random.set_random_state(seed=int(state))
        return self.random(item)


def make_loader(items: Sequence[dict], batch_size: int, *, shuffle: bool, seed: int,
                augment: mt.Compose | None = None, drop_last: bool = False, num_workers: int = 0,
                rank: int = 0, world_size: int = 1, for_eval: bool | None = None) -> DataLoader:
    """A loader whose order depends only on (seed, epoch); ``set_loader_epoch`` before each epoch.

    ``batch_size`` is global: under DDP each rank reads its slice of every global batch
    (medmim.train.distributed.GlobalBatchSampler), so N ranks see the batches one process would.
    Evaluation loaders (``for_eval``; default: neither shuffled nor dropping the last batch) give
    each rank a contiguous unpadded shard instead, so gathered predictions are exact and in order.
    Transforms that return several samples per item (patch sampling) are flattened into the batch
    (MONAI list_data_collate). An ``augment`` with a batched equivalent (``AugmentChain.batch``) is
    not run per sample: batches carry each sample's index, and the training loop augments the whole
    batch on its device (medmim.data.augment.augment_batch), with parameters seeded by
    (seed, epoch, index) as the per-sample chain is.
    """
    import copy

    from medmim.data.samplers import GlobalBatchSampler, ShardBatchSampler

    batch_aug = getattr(augment, "batch", None)
    if batch_aug is not None:
        batch_aug = copy.copy(batch_aug)
        batch_aug.seed = seed
        ds = AugmentedDataset(items, None, seed, batch_augment=batch_aug)
    else:
        ds = AugmentedDataset(items, augment, seed)
    if for_eval is None:
        for_eval = not shuffle and not drop_last
    if for_eval:
        sampler = ShardBatchSampler(len(ds), max(1, batch_size // world_size), rank=rank, world_size=world_size)
    else:
        sampler = GlobalBatchSampler(len(ds), batch_size, shuffle=shuffle, seed=seed, drop_last=drop_last,
                                     rank=rank, world_size=world_size)
    # its own generator: creating an iterator never draws from the global torch RNG (exact resume)
    return DataLoader(ds, batch_sampler=sampler, num_workers=num_workers, collate_fn=list_data_collate,
                      generator=torch.Generator().manual_seed(seed))


def set_loader_epoch(loader: DataLoader, epoch: int) -> None:
    for sampler in (getattr(loader, "batch_sampler", None), getattr(loader, "sampler", None)):
        if hasattr(sampler, "set_epoch"):
            sampler.set_epoch(epoch)
    if hasattr(loader.dataset, "set_epoch"):
        loader.dataset.set_epoch(epoch)


def summarize(bundle: DataBundle) -> dict[str, Any]:
    counts = {s: len(r) for s, r in bundle.records.items()}
    out = {"source": bundle.source, "fingerprint": bundle.fingerprint, "preset": bundle.preset,
           "counts": counts, "skipped": len(bundle.skipped), "duplicates_dropped": len(bundle.duplicates)}
    if bundle.pool_info:
        out["pretraining_pool"] = bundle.pool_info
    return out
