"""Batched augmentation on the training device: the distribution of the per-sample MONAI chain, for a
whole batch at once.

``medmim.data.dataset.augment_transforms`` defines the augmentation as MONAI dict transforms, run
per sample in the loader (16-33 ms per 64^2 image on a CPU core: more than a small model's step).
``BatchAugment`` draws the same random parameters and applies them to a ``(B, C, *spatial)`` batch
with one ``grid_sample`` per step, on whatever device the batch is on (the GPU under CUDA):

* pretraining crop (``data.random_resized_crop``): a crop holding ``crop_scale`` of the image with a
  mild aspect jitter, resized back (bilinear/trilinear), as ``presets.RandResizedCropd``;
* affine jitter with probability AFFINE_PROB: rotation U(-ROTATE, ROTATE) rad (3D: about the first
  axis), scale 1 + U(-SCALE, SCALE) on the first axis (MONAI applies a scalar ``scale_range`` to the
  first axis only, and so does this), translation U(-TRANSLATE, TRANSLATE) x image size per axis,
  zero padding, bilinear (masks: nearest), as ``RandAffined``;
* intensity scaling with probability INTENSITY_PROB: x (1 + U(-INTENSITY, INTENSITY)), as
  ``RandScaleIntensityd``;
* channel dropout (``data.channel_dropout = p``, multi-channel inputs): each channel zeroed with
  probability p, never all channels of one image, as ``RandChannelDropoutd`` (both draw their keep
  pattern with :func:`channel_keep`: independent drops conditioned on one channel kept at least).

Each sample's parameters are a function of (seed, epoch, dataset index) only -- a counter-based
hash, no generator state -- so they do not depend on the rank, the worker, the batch a sample
lands in, or a resume. Geometry matches MONAI's for the same parameters (tested to 1e-5), and the
parameter distribution matches MONAI's sampling (KS tests in tests/test_data_fast.py).
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from monai import transforms as mt

# the augmentation's parameters: one definition for the per-sample MONAI chain and the batched one
AFFINE_PROB = 0.7
ROTATE = 0.17  # rad
SCALE = 0.1
TRANSLATE = 0.06  # x image size, per axis
INTENSITY_PROB = 0.5
INTENSITY = 0.1
CROP_RATIO = (3 / 4, 4 / 3)
INDEX_KEY = "_index"  # dataset index of each sample in a batch (seeds its parameters)

_M64 = (1 << 64) - 1


def _splitmix(x: np.ndarray) -> np.ndarray:
    x = (x + np.uint64(0x9E3779B97F4A7C15)) & np.uint64(_M64)
    x = ((x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)) & np.uint64(_M64)
    x = ((x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)) & np.uint64(_M64)
    return x ^ (x >> np.uint64(31))


def uniforms(seed: int, epoch: int, index: np.ndarray, n: int) -> np.ndarray:
    """(len(index), n) independent U[0, 1) draws, a pure function of (seed, epoch, index, column)."""
    with np.errstate(over="ignore"):
        base = _splitmix(_splitmix(np.uint64(seed & _M64) ^ _splitmix(np.uint64(epoch & _M64) + np.uint64(1)))
                         ^ np.asarray(index, dtype=np.int64).astype(np.uint64))
        cols = _splitmix(base[:, None] ^ (np.arange(n, dtype=np.uint64)[None, :] * np.uint64(0xD1B54A32D192ED03)))
    return (cols >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))


def independent_drop_rate(p: float, channels: int) -> float:
    """The rate q of independent channel drops which, conditioned on at least one channel kept, drops
    each channel with probability exactly ``p``: the root of ``(q - q**C) / (1 - q**C) = p``. That
    marginal rises from 0 to ``(C - 1) / C`` (one channel left) as q goes to 1, so ``p`` must stay
    below ``(C - 1) / C``."""
    c = int(channels)
    if p <= 0 or c < 2:
        return 0.0
    if p >= (c - 1) / c:
        raise ValueError(f"channel dropout {p} cannot be met with {c} channels while one is always kept "
                         f"(at most {(c - 1) / c:.3g})")
    lo, hi = p, 1.0  # marginal(q) <= q, so q >= p
    for _ in range(80):
        q = (lo + hi) / 2
        if (q - q**c) / (1 - q**c) < p:
            lo = q
        else:
            hi = q
    return (lo + hi) / 2


def channel_keep(u: np.ndarray, p: float) -> np.ndarray:
    """Which channels of each image survive channel dropout: ``u`` (B, C) of U[0, 1) draws -> (B, C)
    bool, True = kept. Each channel is dropped with probability ``p``; never all of them.

    The law is that of C independent drops at the rate q of :func:`independent_drop_rate`,
    conditioned on at least one channel kept (a missing sequence is a fact of clinical life; a case
    with no image is not). It is sampled exactly, channel by channel: while every channel before c
    was dropped and m channels are left (c included), channel c is dropped with probability
    ``q (1 - q**(m-1)) / (1 - q**m)``; once one channel is kept, the rest drop independently with
    probability q. One channel is never dropped.
    """
    u = np.asarray(u, dtype=np.float64)
    if u.ndim != 2:
        raise ValueError(f"channel_keep takes (B, C) uniforms, got shape {u.shape}")
    b, c = u.shape
    keep = np.ones((b, c), dtype=bool)
    if p <= 0 or c < 2:
        return keep
    q = independent_drop_rate(p, c)
    any_kept = np.zeros(b, dtype=bool)
    for ch in range(c):
        m = c - ch
        cond = q * (1 - q ** (m - 1)) / (1 - q ** m)
        drop = u[:, ch] < np.where(any_kept, q, cond)
        keep[:, ch] = ~drop
        any_kept |= ~drop
    return keep


class BatchAugment:
    """Augment a batch dict (``image``, optional ``mask``, ``INDEX_KEY``) on its device."""

    def __init__(self, spatial_dims: int, image_size: int, *, seed: int = 0, crop: bool = False,
                 crop_scale: Sequence[float] = (0.5, 1.0), affine: bool = True, intensity: bool = True,
                 affine_prob: float = AFFINE_PROB, rotate: float = ROTATE, scale: float = SCALE,
                 translate: float = TRANSLATE, intensity_prob: float = INTENSITY_PROB,
                 intensity_factor: float = INTENSITY, channel_dropout: float = 0.0):
        self.n, self.size, self.seed = spatial_dims, image_size, seed
        self.channel_dropout = float(channel_dropout)
        self.crop, self.crop_scale = crop, tuple(crop_scale)
        self.affine, self.intensity = affine, intensity
        self.affine_prob, self.rotate, self.scale, self.translate = affine_prob, rotate, scale, translate
        self.intensity_prob, self.intensity_factor = intensity_prob, intensity_factor

    def __repr__(self) -> str:
        on = [k for k in ("crop", "affine", "intensity", "channel_dropout") if getattr(self, k)]
        return f"BatchAugment({self.n}D, size {self.size}, {'+'.join(on) or 'identity'})"

    # ---- parameters ------------------------------------------------------------------------------
    def params(self, index: np.ndarray, epoch: int, channels: int = 1) -> dict[str, np.ndarray]:
        """Every random parameter of each sample (numpy, float64), from (seed, epoch, index)."""
        n = self.n
        base = 6 + 4 * n  # columns of the geometric and intensity draws; channel dropout's follow
        u = uniforms(self.seed, epoch, index, base + channels)
        p: dict[str, np.ndarray] = {}
        # crop (presets.RandResizedCropd.randomize)
        s = self.crop_scale[0] + (self.crop_scale[1] - self.crop_scale[0]) * u[:, 0]
        lo, hi = math.log(CROP_RATIO[0]), math.log(CROP_RATIO[1])
        log_r = lo + (hi - lo) * u[:, 1:1 + n]
        log_r -= log_r.mean(1, keepdims=True)
        p["crop_frac"] = np.clip(s[:, None] ** (1.0 / n) * np.exp(log_r / 2), 0.05, 1.0)
        p["crop_start"] = u[:, 1 + n:1 + 2 * n]
        # affine (RandAffine: rotate_range (ROTATE,) [3D: (ROTATE, 0, 0)], scale_range SCALE, translate)
        c = 1 + 2 * n
        p["affine_on"] = u[:, c] < self.affine_prob
        p["angle"] = self.rotate * (2 * u[:, c + 1] - 1)
        p["scale0"] = 1.0 + self.scale * (2 * u[:, c + 2] - 1)
        p["shift"] = self.translate * self.size * (2 * u[:, c + 3:c + 3 + n] - 1)
        c += 3 + n
        # intensity (RandScaleIntensity: factors INTENSITY, prob INTENSITY_PROB)
        p["intensity_on"] = u[:, c] < self.intensity_prob
        p["factor"] = 1.0 + self.intensity_factor * (2 * u[:, c + 1] - 1)
        # channel dropout (RandChannelDropoutd): one draw per channel
        p["channel_keep"] = channel_keep(u[:, base:base + channels], self.channel_dropout)
        return p

    # ---- geometry --------------------------------------------------------------------------------
    def affine_matrices(self, p: dict[str, np.ndarray]) -> np.ndarray:
        """(B, n+1, n+1) output->input maps in centred voxel coordinates: R @ T @ S (MONAI's order)."""
        b, n = len(p["angle"]), self.n
        cos, sin = np.cos(p["angle"]), np.sin(p["angle"])
        rot = np.tile(np.eye(n + 1), (b, 1, 1))
        i, j = (0, 1) if n == 2 else (1, 2)  # 2D: in-plane; 3D: about the first axis
        rot[:, i, i], rot[:, i, j], rot[:, j, i], rot[:, j, j] = cos, -sin, sin, cos
        tra = np.tile(np.eye(n + 1), (b, 1, 1))
        tra[:, :n, n] = p["shift"]
        sca = np.tile(np.eye(n + 1), (b, 1, 1))
        sca[:, 0, 0] = p["scale0"]
        return rot @ tra @ sca

    @staticmethod
    def _centred_grid(shape: Sequence[int], device) -> torch.Tensor:
        axes = [torch.arange(d, device=device, dtype=torch.float32) - (d - 1) / 2 for d in shape]
        return torch.stack(torch.meshgrid(*axes, indexing="ij"), 0).reshape(len(shape), -1)  # (n, N)

    def apply_affine(self, x: torch.Tensor, mats: torch.Tensor, mode: str = "bilinear") -> torch.Tensor:
        """Resample ``x`` (B, C, *spatial) through ``mats`` (B, n+1, n+1) with zero padding."""
        shape = x.shape[2:]
        n = len(shape)
        mats = mats.to(device=x.device, dtype=torch.float32)
        coords = mats[:, :n, :n] @ self._centred_grid(shape, x.device) + mats[:, :n, n:]  # (B, n, N)
        scale = torch.tensor([2.0 / max(2, d) for d in shape], device=x.device).view(1, n, 1)
        grid = (coords * scale).flip(1).transpose(1, 2).reshape(x.shape[0], *shape, n)
        return F.grid_sample(x.float(), grid, mode=mode, padding_mode="zeros", align_corners=False)

    def apply_crop(self, x: torch.Tensor, frac: np.ndarray, start: np.ndarray) -> torch.Tensor:
        """Crop (fraction ``frac`` of each axis at relative ``start``) and resize to ``size``, as
        RandResizedCropd + Resize(bilinear, align_corners=False) do, for every sample at once."""
        shape = x.shape[2:]
        n = len(shape)
        out = (self.size,) * n
        per_axis = []
        for ax, d in enumerate(shape):
            k = np.maximum(1, np.round(d * frac[:, ax]).astype(np.int64))
            a = np.round(start[:, ax] * (d - k)).astype(np.int64)
            dst = np.arange(out[ax], dtype=np.float64)[None, :]
            src = np.clip((dst + 0.5) * (k[:, None] / out[ax]) - 0.5, 0, k[:, None] - 1) + a[:, None]
            norm = src * (2.0 / max(1, d - 1)) - 1.0  # align_corners=True: index 0 -> -1, d-1 -> 1
            per_axis.append(torch.as_tensor(norm, dtype=torch.float32, device=x.device))
        grids = torch.meshgrid(*[torch.arange(s, device=x.device) for s in out], indexing="ij")
        comp = [per_axis[ax][:, grids[ax]] for ax in range(n)]  # each (B, *out)
        grid = torch.stack(comp[::-1], dim=-1)
        return F.grid_sample(x.float(), grid, mode="bilinear", padding_mode="border", align_corners=True)

    # ---- the whole step --------------------------------------------------------------------------
    def __call__(self, batch: dict, epoch: int = 0) -> dict:
        batch = dict(batch)
        index = batch.pop(INDEX_KEY, None)
        if index is None:
            raise KeyError(f"BatchAugment needs the dataset index of every sample ('{INDEX_KEY}' in the batch)")
        idx = np.asarray(index.cpu() if isinstance(index, torch.Tensor) else index, dtype=np.int64).reshape(-1)
        x = batch["image"]
        p = self.params(idx, epoch, channels=int(x.shape[1]))
        mask = batch.get("mask")
        if self.crop:
            if mask is not None:
                raise ValueError("the pretraining crop does not take masks")
            x = self.apply_crop(x, p["crop_frac"], p["crop_start"])
        if self.affine:
            on = torch.as_tensor(p["affine_on"], device=x.device)
            if bool(on.any()):
                mats = torch.as_tensor(self.affine_matrices(p), device=x.device)
                sel = on.nonzero().squeeze(1)
                x = x.clone()
                x[sel] = self.apply_affine(x[sel], mats[sel]).to(x.dtype)
                if mask is not None:
                    mask = mask.clone()
                    mask[sel] = self.apply_affine(mask[sel], mats[sel], mode="nearest").to(mask.dtype)
        if self.intensity:
            f = np.where(p["intensity_on"], p["factor"], 1.0)
            x = x * torch.as_tensor(f, dtype=x.dtype, device=x.device).view(-1, *([1] * (x.ndim - 1)))
        if self.channel_dropout > 0 and x.shape[1] > 1:
            keep = torch.as_tensor(p["channel_keep"], dtype=x.dtype, device=x.device)
            x = x * keep.view(*keep.shape, *([1] * (x.ndim - 2)))
        batch["image"] = x
        if mask is not None:
            batch["mask"] = mask
        return batch


class RandChannelDropoutd(mt.RandomizableTransform, mt.MapTransform):
    """Per-sample channel dropout of ``keys`` (``(C, *spatial)`` images): each channel zeroed with
    probability ``prob``, never all of them (:func:`channel_keep`; the batched path draws the same law)."""

    def __init__(self, keys, prob: float):
        mt.MapTransform.__init__(self, keys)
        mt.RandomizableTransform.__init__(self, prob=1.0)
        if not 0 <= prob < 1:
            raise ValueError(f"channel dropout probability must be in [0, 1), got {prob}")
        self.drop_prob = float(prob)
        self._keep: np.ndarray | None = None

    def randomize(self, channels: int) -> None:
        self._keep = channel_keep(self.R.uniform(size=(1, channels)), self.drop_prob)[0]

    def __call__(self, data: dict) -> dict:
        d = dict(data)
        keys = list(self.key_iterator(d))
        if not keys:
            return d
        self.randomize(int(d[keys[0]].shape[0]))
        for key in keys:
            img = d[key]
            keep = torch.as_tensor(self._keep, dtype=img.dtype, device=img.device)
            d[key] = img * keep.view(-1, *([1] * (img.ndim - 1)))
        return d


def augment_batch(loader, batch: dict) -> dict:
    """The training loop's hook: apply the loader's batched augmentation (if it has one) to a batch
    already on the training device; batches of loaders without one pass through unchanged."""
    aug = getattr(getattr(loader, "dataset", None), "batch_augment", None)
    if aug is None:
        return batch
    return aug(batch, epoch=getattr(loader.dataset, "epoch", 0))
