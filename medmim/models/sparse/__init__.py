"""Masked execution of CNN encoders: one set of weights, two backends.

SparK pretrains a CNN on the *visible* cells of an image only. The mask lives on the coarsest
feature grid (one cell = ``downsample_ratio`` pixels per axis, ``True`` = hidden); at a feature map
of stride ``s`` a site is *active* when the coarse cell that contains it is visible. Masked
semantics (SparK's reference): every conv, pool and norm sees hidden sites as absent -- inputs
there are zero, outputs there are zero, and batch-norm statistics are taken over active sites only.

Two backends compute exactly these semantics with the same ``nn.Parameter`` tensors:

``"dense"`` (masked-dense, :class:`~medmim.models.sparse.plan.DenseMasked`)
    Ordinary dense ops on the full grid, with the mask re-applied after every conv, pool and norm.
    Simple and always available; the reference the sparse backend is tested against.
``"sparse"`` (:class:`~medmim.models.sparse.blocks.SparseMasked`)
    Only active sites are stored, as rows in *cell-major* order (:class:`~.plan.MaskPlan`).
    ``kernel="torch"`` (default, :mod:`.blocks`): a dense torch conv per visible cell plus halo.
    ``kernel="spconv"`` (:mod:`.spconv_kernel`, imported only when chosen): regular convs through
    spconv's own kernels, for CUDA servers with ``spconv-cu12x``.

Why the sparse backend reads the torch weights instead of owning spconv modules: the encoder is
written once with ordinary torch layouts (``(out, in, *kernel)``), so its ``state_dict`` is a plain
CNN checkpoint that fine-tuning loads without conversion; gradients land on that one parameter.

Files: :mod:`.plan` (mask plan + masked-dense reference), :mod:`.blocks` (sparse rows, torch block
kernel), :mod:`.spconv_kernel` (optional). Layers call the functions below (:func:`conv`,
:func:`batch_norm`, :func:`pointwise`, :func:`max_pool`, :func:`add` ...), which take either a
plain tensor (no mask: ordinary dense ops) or a masked map made by :func:`masked_input`.
"""

from __future__ import annotations

from typing import Callable

import torch

from medmim.models.sparse.blocks import SparseMasked
from medmim.models.sparse.plan import CONV, MAXPOOL, DenseMasked, MaskPlan

BACKENDS = ("dense", "sparse")
KERNELS = ("torch", "spconv")

Masked = DenseMasked | SparseMasked

__all__ = ["BACKENDS", "KERNELS", "MaskPlan", "DenseMasked", "SparseMasked", "masked_input", "conv", "max_pool",
           "batch_norm", "pointwise", "elementwise", "add", "scale_samples", "batch_size", "to_dense"]


def masked_input(x: torch.Tensor, mask: torch.Tensor, downsample_ratio: int,
                 backend: str = "dense", kernel: str = "torch") -> Masked:
    """Wrap an input image for masked execution: the one place a backend is chosen.

    ``x`` is ``(B, C, *spatial)`` with ``spatial`` divisible by ``downsample_ratio``; ``mask``
    ``(B, *grid)`` bool, ``True`` = hidden. Hidden pixels are dropped (sparse) or zeroed (dense).
    """
    spatial_dims = x.dim() - 2
    grid = tuple(s // downsample_ratio for s in x.shape[2:])
    if any(s % downsample_ratio for s in x.shape[2:]) or tuple(mask.shape) != (x.shape[0], *grid):
        raise ValueError(f"input {tuple(x.shape)} with downsample ratio {downsample_ratio} needs a "
                         f"mask of shape {(x.shape[0], *grid)}, got {tuple(mask.shape)}")
    if bool(mask.all()):
        raise ValueError(f"the mask hides all {mask.numel()} cells of the batch: nothing is left to "
                         "encode (use a smaller mask ratio or a finer coarse grid)")
    plan = MaskPlan(mask.to(x.device), downsample_ratio, spatial_dims)
    if backend == "dense":
        return DenseMasked(x.masked_fill(~plan.active(1).unsqueeze(1), 0.0), 1, plan)
    if backend == "sparse":
        if kernel not in KERNELS:
            raise ValueError(f"kernel must be one of {KERNELS}, got {kernel!r}")
        indices, _ = plan.sites(1)
        rows = x.movedim(1, -1)[tuple(indices.long().T)]  # canonical (cell-major) row order
        return SparseMasked(rows, 1, plan, kernel)
    raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")


# --------------------------------------------------------------------------------------------
# masked-aware ops: what encoder layers call (plain tensor = no mask = ordinary dense op)
# --------------------------------------------------------------------------------------------

def conv(h, weight, bias=None, stride=1, padding=0, groups=1):
    """N-d convolution; ``weight`` in torch layout ``(out, in / groups, *kernel)``."""
    if isinstance(h, torch.Tensor):
        return CONV[h.dim() - 2](h, weight, bias, stride, padding, 1, groups)
    return h.conv(weight, bias, stride, padding, groups)


def max_pool(h, kernel, stride, padding=0):
    """Max-pool; masked: the max over the window's active sites only."""
    if isinstance(h, torch.Tensor):
        return MAXPOOL[h.dim() - 2](h, kernel, stride, padding)
    return h.max_pool(kernel, stride, padding)


def batch_norm(h, fn: Callable[[torch.Tensor], torch.Tensor]):
    """Apply ``fn`` (a norm with batch statistics, taking ``(N, C)``) over active sites only."""
    if isinstance(h, torch.Tensor):
        return fn(h)
    return h.rows(_rows_as_map(fn))


def _rows_as_map(fn):
    """Run a batch norm on ``(N, C)`` rows as the map ``(N, C, 1, 1)`` (a view): same statistics
    (over N sites), about 2x faster forward+backward with torch 2.13 on CPU, where the 2D
    ``(N, C)`` kernel walks each channel with stride C. (The transposed view ``(1, C, N, 1)``,
    channels-last, is fast too but its batch-norm backward is wrong in torch 2.13 CPU.)"""
    def run(rows: torch.Tensor) -> torch.Tensor:
        if rows.dim() != 2:
            return fn(rows)
        return fn(rows[:, :, None, None])[:, :, 0, 0]
    return run


def pointwise(h, fn: Callable[[torch.Tensor], torch.Tensor]):
    """Apply a per-site ``fn`` on channels-last values ``(..., C) -> (..., C')``."""
    if isinstance(h, torch.Tensor):
        return fn(h.movedim(1, -1)).movedim(-1, 1)
    return h.pointwise(fn)


def elementwise(h, fn: Callable[[torch.Tensor], torch.Tensor]):
    """Apply an elementwise ``fn`` (activation); masked sites are re-zeroed in masked-dense."""
    if isinstance(h, torch.Tensor):
        return fn(h)
    return h.elementwise(fn)


def add(a, b):
    """Residual sum of two maps of the same stride."""
    if isinstance(a, torch.Tensor):
        return a + b
    return a.add(b)


def scale_samples(h, scale: torch.Tensor):
    """Multiply every sample ``b`` of the batch by ``scale[b]`` (stochastic depth)."""
    if isinstance(h, torch.Tensor):
        return h * scale.view(-1, *([1] * (h.dim() - 1))).to(h.dtype)
    return h.scale_samples(scale)


def batch_size(h) -> int:
    return h.shape[0] if isinstance(h, torch.Tensor) else h.plan.batch_size


def to_dense(h) -> torch.Tensor:
    """A dense ``(B, C, *spatial)`` tensor (zeros at hidden sites for masked maps)."""
    return h if isinstance(h, torch.Tensor) else h.dense()
