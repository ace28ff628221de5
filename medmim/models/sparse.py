"""Masked execution of CNN encoders: one set of weights, two backends.

SparK pretrains a CNN on the *visible* cells of an image only. The mask lives on the coarsest
feature grid (one cell = ``downsample_ratio`` pixels per axis, ``True`` = hidden); at a feature map
of stride ``s`` a site is *active* when the coarse cell that contains it is visible. Masked
semantics (SparK's reference): every conv, pool and norm sees hidden sites as absent -- inputs
there are zero, outputs there are zero, and batch-norm statistics are taken over active sites only.

Two backends compute exactly these semantics with the same ``nn.Parameter`` tensors:

``"dense"`` (masked-dense, :class:`DenseMasked`)
    Ordinary dense ops on the full grid, with the mask re-applied after every conv, pool and norm.
    Batch norm gathers the active sites, normalises them, and scatters them back. Simple and always
    available; the reference the sparse backend is tested against.

``"sparse"`` (:class:`SparseMasked`)
    Only active sites are stored, as the rows of a ``spconv`` ``SparseConvTensor`` (features
    ``(N, C)``, indices ``(N, 1 + spatial_dims)`` int32) in *cell-major* order: the visible mask
    cells in row-major order, and inside each cell its ``(ratio / stride)^d`` sites row-major.
    Active sites always come in whole cells, which the default arithmetic exploits.

Why the sparse backend reads the torch weights instead of owning spconv modules: the encoder is
written once with ordinary torch layouts (``(out, in, *kernel)``), so its ``state_dict`` is a plain
CNN checkpoint that fine-tuning loads without conversion; gradients land on that one parameter.

Three interchangeable ``kernel=`` choices compute the sparse convs and max-pools (same numbers):

``"torch"`` (default; block conv)
    For each visible cell, gather its conv window -- the cell plus a halo of ``padding`` sites
    (fill where hidden or outside the image) -- into a ``(Nc, C, L, .., L)`` channels-last block,
    and run the ordinary torch conv / max-pool on all blocks at once, unpadded: it computes exactly
    the cell's active outputs, with torch's dense conv kernels (oneDNN on CPU, cuDNN on CUDA).
    The gather reads ``(L / b)^d`` times the features (halo overhead) instead of ``k^d`` times
    (im2col), and no rulebook is built: one index table per (stride, kernel, conv stride,
    padding), cached per forward. 1^d convs are a plain GEMM on the rows. The gather's backward
    is a sorted gather + ``segment_reduce`` (no scatter with repeated indices).
``"gather"`` (rulebook gather-GEMM)
    spconv builds the rulebooks (submanifold for stride 1, regular sparse conv restricted to the
    output stride's active sites for strided convs and pools), cached per (stride, kernel, conv
    stride, padding); each conv is a chunked im2col gather over the rulebook plus one GEMM, and
    its input gradient the same through the transposed table. Works for any active set, not only
    whole cells, but at 64^3 the rulebook build and the ``k^d``-fold gather dominate (see
    docs/spark.md).
``"spconv"``
    The same rulebooks through spconv's own conv kernels (for CUDA servers with ``spconv-cu12x``).
    On CPU, spconv 2.3.8's ``scatter_add_cpu`` (used by its conv forward and backward) writes
    another pair's source row into a few destination rows when torch runs more than one thread
    (a race; seen on 2D and 3D inputs, forward outputs wrong in 0-30% of rows), so CPU calls run
    single-threaded, and its backward needs :func:`_patch_spconv_cpu_stream` (it asks for a CUDA
    stream unconditionally).

Usage: layers call the functions at the bottom of this module (:func:`conv`, :func:`batch_norm`,
:func:`pointwise`, :func:`max_pool`, :func:`add`), which take either a plain tensor (no mask:
ordinary dense ops) or a masked feature object made by :func:`masked_input`.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from typing import Callable

import torch
import torch.nn.functional as F

BACKENDS = ("dense", "sparse")
KERNELS = ("torch", "gather", "spconv")

_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
_MAXPOOL = {1: F.max_pool1d, 2: F.max_pool2d, 3: F.max_pool3d}


# --------------------------------------------------------------------------------------------
# spconv adapter: the only place that imports spconv
# --------------------------------------------------------------------------------------------

def _patch_spconv_cpu_stream() -> None:
    """Make spconv's ``get_current_stream`` return 0 when CUDA is unavailable (idempotent).

    spconv 2.3.8 calls ``torch.cuda.current_stream()`` in its conv backward even for CPU tensors,
    which asserts "Torch not compiled with CUDA enabled". Stream 0 is what its CPU forward uses.
    The name is imported by value into several spconv modules, so each binding is replaced.
    """
    from spconv.pytorch import cppcore, hash as sphash, ops

    if getattr(ops.get_current_stream, "_medmim_cpu_safe", False):
        return
    original = cppcore.get_current_stream

    def get_current_stream():
        return original() if torch.cuda.is_available() else 0

    get_current_stream._medmim_cpu_safe = True
    for module in (cppcore, ops, sphash):
        if hasattr(module, "get_current_stream"):
            module.get_current_stream = get_current_stream


def _spconv():
    """Import spconv (once patched) and return ``(spconv.pytorch, ops, ConvAlgo)``."""
    try:
        import spconv.pytorch as spconv
        from spconv.core import ConvAlgo
        from spconv.pytorch import ops
    except ImportError as exc:  # pragma: no cover - depends on the installation
        raise ImportError(
            "backend='sparse' needs spconv (pip install spconv; spconv-cu126 on CUDA servers); "
            "backend='dense' runs the same masked semantics without it") from exc
    _patch_spconv_cpu_stream()
    return spconv, ops, ConvAlgo


@contextlib.contextmanager
def _single_thread_if_cpu(t: torch.Tensor):
    """spconv 2.3.8's CPU ``scatter_add_cpu`` races with more than one torch thread (rows get
    another pair's values): run its conv kernels with one, restoring the count afterwards."""
    if t.is_cuda:
        yield
        return
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


# --------------------------------------------------------------------------------------------
# the mask at every stride, and the rulebooks built from it
# --------------------------------------------------------------------------------------------

class Rulebook:
    """Which input row feeds which output row through which kernel offset, as two tables.

    ``fwd`` (num_out, kv): the input row each output reads at each offset (``num_in`` where there
    is none: a zero row); ``bwd`` (num_in, kv): the output row each input feeds at each offset
    (``num_out`` where none) -- the transposed conv, used by the input gradient.
    ``spconv_pairs`` / ``spconv_counts``: the same pairs in spconv's format (``kernel="spconv"``).
    """

    def __init__(self, fwd, bwd, num_in, num_out, subm, spconv_pairs=None, spconv_counts=None):
        self.fwd, self.bwd = fwd, bwd
        self.num_in, self.num_out = num_in, num_out
        self.subm = subm
        self._spconv = (spconv_pairs, spconv_counts)

    @property
    def kv(self) -> int:
        return self.fwd.shape[1]

    def spconv_format(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(pairs (2, kv, max_n) int32, counts (kv,) int32)`` as spconv's conv kernels read them."""
        if self._spconv[0] is None:
            valid = self.fwd < self.num_in
            counts = valid.sum(0)
            k, out = valid.T.nonzero(as_tuple=True)  # sorted by offset, then output row
            first = torch.cumsum(counts, 0) - counts
            slot = torch.arange(k.shape[0], device=k.device) - first[k]
            pairs = torch.full((2, self.kv, max(1, int(counts.max()))), -1, dtype=torch.int32,
                               device=k.device)
            pairs[0, k, slot] = self.fwd[out, k].to(torch.int32)
            pairs[1, k, slot] = out.to(torch.int32)
            self._spconv = (pairs, counts.to(torch.int32))
        return self._spconv


class MaskPlan:
    """The visible sites at every stride of one masked forward pass, and its rulebook cache.

    ``mask`` is ``(B, *grid)`` bool, ``True`` = hidden, on the grid of stride ``downsample_ratio``.
    """

    def __init__(self, mask: torch.Tensor, downsample_ratio: int, spatial_dims: int):
        if mask.dtype != torch.bool or mask.dim() != spatial_dims + 1:
            raise ValueError(f"mask must be a bool tensor (B, *grid) with {spatial_dims} grid dims, "
                             f"got {tuple(mask.shape)} {mask.dtype}")
        self.visible = ~mask
        self.ratio = downsample_ratio
        self.spatial_dims = spatial_dims
        self.batch_size = mask.shape[0]
        self._active: dict[int, torch.Tensor] = {}
        self._sites: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self._rulebooks: dict[tuple, Rulebook] = {}
        self._blocks: dict = {}

    def active(self, stride: int) -> torch.Tensor:
        """``(B, *spatial)`` bool: sites of the feature map of this stride that are visible."""
        if stride not in self._active:
            if self.ratio % stride:
                raise ValueError(f"stride {stride} does not divide downsample_ratio {self.ratio}")
            act = self.visible
            factor = self.ratio // stride
            for dim in range(1, self.spatial_dims + 1):
                act = act.repeat_interleave(factor, dim=dim)
            self._active[stride] = act.contiguous()
        return self._active[stride]

    def cells(self) -> torch.Tensor:
        """Visible cells of the mask grid, ``(Nc, 1 + d)`` int64 ``[b, z, y, x]``, row-major."""
        if "cells" not in self._blocks:
            self._blocks["cells"] = self.visible.nonzero()
        return self._blocks["cells"]

    def sites(self, stride: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Active sites in canonical (cell-major) order: ``indices`` (N, 1+d) int32 ``[b, z, y, x]``
        and ``lookup`` (B, *spatial) int64 giving each site's row (-1 where hidden).

        Cell-major: the visible cells in row-major order, and inside each cell its
        ``(ratio / stride)^d`` sites in row-major order, so one cell's sites are consecutive rows
        and ``(Nc * b^d, C)`` rows are ``(Nc, b, .., b, C)`` blocks without a copy."""
        if stride not in self._sites:
            if self.ratio % stride:
                raise ValueError(f"stride {stride} does not divide downsample_ratio {self.ratio}")
            b, d = self.ratio // stride, self.spatial_dims
            cells = self.cells()
            local = torch.stack(torch.meshgrid(*[torch.arange(b, device=cells.device)] * d,
                                               indexing="ij"), -1).reshape(-1, d)
            coords = (cells[:, None, 1:] * b + local).reshape(-1, d)
            batch = cells[:, :1].expand(-1, local.shape[0]).reshape(-1, 1)
            # nonzero()-like int32 table; spconv reads raw memory, so keep it contiguous.
            indices = torch.cat([batch, coords], 1).to(torch.int32).contiguous()
            act = self.active(stride)
            lookup = torch.full(act.shape, -1, dtype=torch.long, device=act.device)
            lookup[(batch[:, 0], *coords.T)] = torch.arange(indices.shape[0], device=act.device)
            self._sites[stride] = (indices, lookup)
        return self._sites[stride]

    def block_table(self, stride: int, kernel: int, conv_stride: int, padding: int,
                    dilation: int = 1) -> tuple["BlockTable", int]:
        """Input rows of each visible cell's conv window, for the block kernel (cached).

        A conv (kernel, conv_stride, padding) on the stride-``stride`` map gives each visible
        cell ``b_out^d`` outputs (``b_out = ratio / (stride * conv_stride)``); they read the input
        window ``[cell * b_in - padding, + L)`` per axis, ``L = (b_out - 1) * conv_stride +
        dilation * (kernel - 1) + 1`` (the cell plus a halo). Returns ``(table (Nc, L^d), L)``:
        each window site's input row, ``N`` (one past the last row) where the site is hidden or
        outside the image (a :class:`BlockTable`). For 1^d kernels without padding the window is the strided sample only
        (``L = b_out``, read with stride 1).
        """
        key = ("table", stride, kernel, conv_stride, padding, dilation)
        if key not in self._blocks:
            d = self.spatial_dims
            b_in = self.ratio // stride
            if b_in % conv_stride:
                raise ValueError(f"conv stride {conv_stride} does not divide the cell size {b_in} "
                                 f"at stride {stride}")
            b_out = b_in // conv_stride
            indices, lookup = self.sites(stride)
            cells = self.cells()
            if kernel == 1 and padding == 0:
                length, step = b_out, conv_stride
            else:
                length, step = (b_out - 1) * conv_stride + dilation * (kernel - 1) + 1, 1
            ar = torch.arange(length, device=cells.device) * step
            local = torch.stack(torch.meshgrid(*[ar] * d, indexing="ij"), -1).reshape(-1, d)
            coords = cells[:, None, 1:] * b_in - padding + local  # (Nc, L^d, d)
            shape = torch.tensor(lookup.shape[1:], device=cells.device)
            inside = ((coords >= 0) & (coords < shape)).all(-1)
            coords = torch.where(inside.unsqueeze(-1), coords, 0)
            batch = cells[:, :1].expand(-1, coords.shape[1])
            rows = lookup[(batch, *coords.unbind(-1))]
            rows = torch.where(inside & (rows >= 0), rows, indices.shape[0])
            self._blocks[key] = (BlockTable(rows.contiguous(), indices.shape[0]), length)
        return self._blocks[key]

    def spatial_shape(self, stride: int) -> list[int]:
        return list(self.active(stride).shape[1:])

    def rulebook(self, stride: int, kernel: int, conv_stride: int, padding: int,
                 dilation: int = 1) -> Rulebook:
        """Rulebook of a conv/pool applied to the stride-``stride`` map, cached per parameters."""
        key = (stride, kernel, conv_stride, padding, dilation)
        if key not in self._rulebooks:
            self._rulebooks[key] = self._build_rulebook(*key)
        return self._rulebooks[key]

    def _build_rulebook(self, stride, kernel, conv_stride, padding, dilation) -> Rulebook:
        d = self.spatial_dims
        indices, _ = self.sites(stride)
        num_in = indices.shape[0]
        subm = conv_stride == 1
        if subm and padding != dilation * (kernel // 2):
            raise NotImplementedError("stride-1 masked convs must be 'same' convs "
                                      f"(kernel {kernel}, padding {padding})")
        kv = kernel ** d
        if subm and kernel == 1:
            rows = torch.arange(num_in, device=indices.device).unsqueeze(1)
            return Rulebook(rows, rows, num_in, num_in, True)
        _, ops, ConvAlgo = _spconv()
        out_ids, sp_pairs, sp_counts = ops.get_indice_pairs(
            indices, self.batch_size, self.spatial_shape(stride), ConvAlgo.Native, [kernel] * d,
            [conv_stride] * d, [padding] * d, [dilation] * d, [0] * d, subm, False)
        inp, out = sp_pairs[0].long(), sp_pairs[1].long()  # (kv, max_n), -1 padded
        offset = torch.arange(kv, device=inp.device).unsqueeze(1).expand_as(inp)
        valid = torch.arange(inp.shape[1], device=inp.device) < sp_counts.long().unsqueeze(1)
        if subm:
            # spconv stores half of a submanifold rulebook: offset k < kv // 2 and its mirror
            # kv-1-k are the same pairs read in opposite directions; the centre is the identity.
            num_out = num_in
            centre = torch.arange(num_in, device=inp.device)
            inp = torch.cat([inp[valid], out[valid], centre])
            out = torch.cat([out[valid], sp_pairs[0].long()[valid], centre])
            offset = torch.cat([offset[valid], kv - 1 - offset[valid],
                                torch.full_like(centre, kv // 2)])
            spconv_pairs, spconv_counts = sp_pairs, sp_counts
        else:
            # Regular (strided) rulebook: keep only outputs active at the output stride, renumbered
            # to that stride's canonical rows (spconv also creates outputs around visible regions).
            new_indices, lookup = self.sites(stride * conv_stride)
            expected = _conv_out_shape(self.spatial_shape(stride), kernel, conv_stride, padding,
                                       dilation)
            if list(lookup.shape[1:]) != expected:
                raise ValueError(f"conv (kernel {kernel}, stride {conv_stride}, padding {padding}) "
                                 f"maps {self.spatial_shape(stride)} to {expected}, not to the "
                                 f"stride-{stride * conv_stride} grid {list(lookup.shape[1:])}")
            num_out = new_indices.shape[0]
            row = lookup[tuple(out_ids.long().T)]  # -1 for outputs outside the visible region
            out = row[out.clamp(min=0)]
            valid &= out >= 0
            inp, out, offset = inp[valid], out[valid], offset[valid]
            spconv_pairs = spconv_counts = None  # built on demand from the tables
        fwd = torch.full((num_out, kv), num_in, dtype=torch.long, device=inp.device)
        bwd = torch.full((num_in, kv), num_out, dtype=torch.long, device=inp.device)
        fwd.view(-1)[out * kv + offset] = inp
        bwd.view(-1)[inp * kv + offset] = out
        return Rulebook(fwd, bwd, num_in, num_out, subm, spconv_pairs, spconv_counts)


def _conv_out_shape(shape, kernel, stride, padding, dilation):
    return [(s + 2 * padding - dilation * (kernel - 1) - 1) // stride + 1 for s in shape]


# --------------------------------------------------------------------------------------------
# sparse arithmetic on rows (torch; identical on CPU and CUDA)
# --------------------------------------------------------------------------------------------

_CHUNK_ELEMENTS = 1 << 23  # gathered values per chunk (32 MiB in float32)


def _gather(src: torch.Tensor, table: torch.Tensor, fill: float = 0.0) -> torch.Tensor:
    """``src`` rows looked up through ``table`` (R, kv) -> (R, kv, C); index ``len(src)`` = fill."""
    padded = torch.cat([src, src.new_full((1, src.shape[1]), fill)])
    return padded.index_select(0, table.reshape(-1)).view(*table.shape, src.shape[1])


def _chunks(rows: int, per_row: int):
    step = max(1, _CHUNK_ELEMENTS // max(1, per_row))
    return [slice(i, min(i + step, rows)) for i in range(0, rows, step)]


class _RowConv(torch.autograd.Function):
    """Sparse conv as gather-GEMM over a rulebook (im2col on the active rows), chunked.

    ``weight`` is ``(kv, C, O)`` (dense conv) or ``(kv, C)`` (depthwise: per-channel products).
    Forward gathers each output's kv neighbours and does one GEMM; the input gradient is the same
    through the transposed table, so neither direction scatters. Only the inputs are saved.
    """

    @staticmethod
    def forward(ctx, feat, weight, rulebook):
        fwd = rulebook.fwd
        kv, c = weight.shape[:2]
        depthwise = weight.dim() == 2
        out = feat.new_empty(rulebook.num_out, c if depthwise else weight.shape[2])
        w2 = weight if depthwise else weight.reshape(kv * c, -1)
        for part in _chunks(rulebook.num_out, kv * c):
            cols = _gather(feat, fwd[part])
            if depthwise:
                out[part] = (cols * w2).sum(1)
            else:
                torch.mm(cols.view(cols.shape[0], -1), w2, out=out[part])
        ctx.save_for_backward(feat, weight)
        ctx.rulebook = rulebook
        return out

    @staticmethod
    def backward(ctx, grad_out):
        feat, weight = ctx.saved_tensors
        fwd, bwd = ctx.rulebook.fwd, ctx.rulebook.bwd
        grad_out = grad_out.contiguous()
        kv, c = weight.shape[:2]
        depthwise = weight.dim() == 2
        grad_feat = grad_w = None
        if ctx.needs_input_grad[0]:
            grad_feat = torch.empty_like(feat)
            # transposed conv: input i gets sum_k grad_out[bwd[i, k]] @ W_k^T
            wt = weight if depthwise else weight.transpose(1, 2).reshape(kv * weight.shape[2], c)
            for part in _chunks(feat.shape[0], kv * grad_out.shape[1]):
                gcols = _gather(grad_out, bwd[part])
                if depthwise:
                    grad_feat[part] = (gcols * wt).sum(1)
                else:
                    torch.mm(gcols.view(gcols.shape[0], -1), wt, out=grad_feat[part])
        if ctx.needs_input_grad[1]:
            grad_w = torch.zeros_like(weight).view(kv * c, -1) if not depthwise \
                else torch.zeros_like(weight)
            for part in _chunks(ctx.rulebook.num_out, kv * c):
                cols = _gather(feat, fwd[part])
                if depthwise:
                    grad_w += (cols * grad_out[part].unsqueeze(1)).sum(0)
                else:
                    grad_w.addmm_(cols.view(cols.shape[0], -1).T, grad_out[part])
            grad_w = grad_w.view_as(weight)
        return grad_feat, grad_w, None


class _SpconvConv(torch.autograd.Function):
    """The same conv through spconv's own kernels (``kernel="spconv"``); weight ``(O, *k, C)``."""

    @staticmethod
    def forward(ctx, feat, weight, rulebook):
        _, ops, ConvAlgo = _spconv()
        feat = feat.contiguous()
        pairs, counts = rulebook.spconv_format()
        with _single_thread_if_cpu(feat):
            out = ops.indice_conv(feat, weight, pairs, counts, rulebook.num_out, False,
                                  rulebook.subm, algo=ConvAlgo.Native)
        ctx.save_for_backward(feat, weight)
        ctx.rulebook = rulebook
        return out

    @staticmethod
    def backward(ctx, grad_out):
        _, ops, ConvAlgo = _spconv()
        feat, weight = ctx.saved_tensors
        rb = ctx.rulebook
        pairs, counts = rb.spconv_format()
        with _single_thread_if_cpu(feat):
            grad_feat, grad_w = ops.indice_conv_backward(
                feat, weight, grad_out.contiguous(), pairs, counts, False, rb.subm,
                algo=ConvAlgo.Native)
        return grad_feat, grad_w, None


class _RowMaxPool(torch.autograd.Function):
    """Max over the active inputs of each window; ties go to the first offset (torch's rule)."""

    @staticmethod
    def forward(ctx, feat, rulebook):
        fwd = rulebook.fwd
        vals, which = _gather(feat, fwd, fill=-math.inf).max(dim=1)  # first max on ties
        ctx.save_for_backward(torch.gather(fwd, 1, which))  # input row of each max, per channel
        ctx.num_in = feat.shape[0]
        return vals

    @staticmethod
    def backward(ctx, grad_out):
        (arg,) = ctx.saved_tensors
        grad = grad_out.new_zeros(ctx.num_in, grad_out.shape[1])
        return grad.scatter_add_(0, arg, grad_out.contiguous()), None


class BlockTable:
    """``rows`` (Nc, L^d) int64: the input row of every site of every cell's window (``num_in``
    where none), plus the transposed form the gather's backward uses: ``order`` (the window
    sites sorted by input row, fill sites left out) and ``counts`` (sites per input row)."""

    def __init__(self, rows: torch.Tensor, num_in: int):
        self.rows, self.num_in = rows, num_in
        flat = rows.reshape(-1)
        order = torch.argsort(flat, stable=True)
        self.counts = torch.bincount(flat, minlength=num_in + 1)[:num_in]
        self.order = order[:int(self.counts.sum())]

    @property
    def shape(self):
        return self.rows.shape


class _BlockGather(torch.autograd.Function):
    """``src[table]`` rows, with ``fill`` where the table says ``num_in``.

    Backward sums each input row's gradient over the window sites that read it (a cell's own
    sites and its neighbours' halos) as one sorted gather + ``segment_reduce``: autograd's
    ``index_select`` backward (``index_add_`` with repeated indices) was ~8x slower on CPU."""

    @staticmethod
    def forward(ctx, feat, table, fill):
        src = torch.cat([feat, feat.new_full((1, feat.shape[1]), fill)])
        ctx.table = table
        return src.index_select(0, table.rows.reshape(-1))

    @staticmethod
    def backward(ctx, grad):
        t = ctx.table
        grad_feat = torch.segment_reduce(grad.index_select(0, t.order), "sum",
                                         lengths=t.counts, axis=0)
        return grad_feat, None, None


def _block_gather(feat: torch.Tensor, table: BlockTable, length: int, spatial_dims: int,
                  fill: float = 0.0) -> torch.Tensor:
    """Rows -> one ``(Nc, C, L, .., L)`` block per visible cell (window of ``block_table``).

    One ``index_select`` of ``Nc * L^d`` rows of the (fill-padded) features; the result is a
    channels-last view, which torch's CPU convs (oneDNN) and pools read without a copy."""
    cols = _BlockGather.apply(feat, table, fill)
    return cols.view(table.shape[0], *[length] * spatial_dims, feat.shape[1]).movedim(-1, 1)


def _im2col(blocks: torch.Tensor, kernel: int, stride: int) -> torch.Tensor:
    """``(Nc, C, L, .., L)`` windows -> ``(Nc * b_out^d, C * kernel^d)`` columns: one row per
    output site in cell-major order, columns in the torch weight's ``(C, *kernel)`` order."""
    d = blocks.dim() - 2
    cols = blocks
    for axis in range(2, 2 + d):
        cols = cols.unfold(axis, kernel, stride)  # (Nc, C, b_out.., kernel..)
    cols = cols.permute(0, *range(2, 2 + d), 1, *range(2 + d, 2 + 2 * d))
    return cols.reshape(-1, blocks.shape[1] * kernel ** d)


def _block_rows(y: torch.Tensor) -> torch.Tensor:
    """``(Nc, C, b, .., b)`` conv output -> ``(Nc * b^d, C)`` cell-major rows (a view when
    channels-last, as the convs here return it)."""
    return y.movedim(1, -1).reshape(-1, y.shape[1])


# --------------------------------------------------------------------------------------------
# masked feature maps: the two backends
# --------------------------------------------------------------------------------------------

class DenseMasked:
    """Masked-dense backend: a full ``(B, C, *spatial)`` map, zero at hidden sites."""

    backend = "dense"

    def __init__(self, x: torch.Tensor, stride: int, plan: MaskPlan):
        self.x, self.stride, self.plan = x, stride, plan

    def _remask(self, y: torch.Tensor, stride: int) -> "DenseMasked":
        hidden = ~self.plan.active(stride).unsqueeze(1)
        return DenseMasked(y.masked_fill(hidden, 0.0), stride, self.plan)

    def conv(self, weight, bias, stride, padding, groups) -> "DenseMasked":
        y = _CONV[self.plan.spatial_dims](self.x, weight, bias, stride, padding, 1, groups)
        return self._remask(y, self.stride * stride)

    def max_pool(self, kernel, stride, padding) -> "DenseMasked":
        hidden = ~self.plan.active(self.stride).unsqueeze(1)
        y = _MAXPOOL[self.plan.spatial_dims](self.x.masked_fill(hidden, -math.inf), kernel,
                                             stride, padding)
        return self._remask(y, self.stride * stride)

    def rows(self, fn) -> "DenseMasked":
        act = self.plan.active(self.stride)
        y = fn(self.x.movedim(1, -1)[act])
        out = y.new_zeros(*act.shape, y.shape[-1])
        out[act] = y
        return DenseMasked(out.movedim(-1, 1), self.stride, self.plan)

    def pointwise(self, fn) -> "DenseMasked":
        return self._remask(fn(self.x.movedim(1, -1)).movedim(-1, 1), self.stride)

    def add(self, other: "DenseMasked") -> "DenseMasked":
        return DenseMasked(self.x + other.x, self.stride, self.plan)

    def dense(self) -> torch.Tensor:
        return self.x


class SparseMasked:
    """Sparse backend: the active sites only (cell-major rows), as an spconv ``SparseConvTensor``;
    ``kernel`` picks the conv arithmetic ("torch": block conv, "gather", "spconv")."""

    backend = "sparse"

    def __init__(self, features: torch.Tensor, stride: int, plan: MaskPlan, kernel: str = "torch"):
        spconv, _, _ = _spconv()
        indices, _ = plan.sites(stride)
        self.tensor = spconv.SparseConvTensor(features, indices, plan.spatial_shape(stride),
                                              plan.batch_size)
        self.stride, self.plan, self.kernel = stride, plan, kernel

    @property
    def features(self) -> torch.Tensor:
        return self.tensor.features

    def _new(self, features, stride=None) -> "SparseMasked":
        return SparseMasked(features, self.stride if stride is None else stride, self.plan,
                            self.kernel)

    def conv(self, weight, bias, stride, padding, groups) -> "SparseMasked":
        out_ch, in_per_group = weight.shape[:2]
        kernel = weight.shape[-1]
        if any(k != kernel for k in weight.shape[2:]):
            raise NotImplementedError("masked convs need cubic kernels")
        if groups != 1 and not (groups == out_ch and in_per_group == 1
                                and self.features.shape[1] == groups):
            raise NotImplementedError("masked convs support groups=1 or depthwise convs only")
        if self.kernel == "torch":
            return self._new(self._block_conv(weight, bias, stride, padding, groups),
                             self.stride * stride)
        rb = self.plan.rulebook(self.stride, kernel, stride, padding)
        kv = kernel ** self.plan.spatial_dims
        if groups == 1:
            if self.kernel == "spconv" and kv > 1:
                w = weight.movedim(1, -1).contiguous()  # spconv's KRSC layout (O, *k, C)
                y = _SpconvConv.apply(self.features, w, rb)
            else:
                y = _RowConv.apply(self.features, weight.reshape(out_ch, in_per_group, kv)
                                   .permute(2, 1, 0).contiguous(), rb)
        else:
            y = _RowConv.apply(self.features, weight.reshape(out_ch, kv).T.contiguous(), rb)
        if bias is not None:
            y = y + bias
        return self._new(y, self.stride * stride)

    def _block_conv(self, weight, bias, stride, padding, groups) -> torch.Tensor:
        """``kernel="torch"``: one dense torch conv over every visible cell's window (the cell
        plus a halo), unpadded, so it computes exactly the active outputs."""
        d, feat = self.plan.spatial_dims, self.features
        kernel = weight.shape[-1]
        if kernel == 1 and padding == 0 and groups == 1:  # pointwise: a GEMM on the rows
            if stride > 1:
                table, _ = self.plan.block_table(self.stride, 1, stride, 0)
                feat = feat.index_select(0, table.rows.reshape(-1))
            return F.linear(feat, weight.reshape(weight.shape[0], -1), bias)
        table, length = self.plan.block_table(self.stride, kernel, stride, padding)
        blocks = _block_gather(feat, table, length, d)
        b_out = (length - kernel) // stride + 1
        if groups == 1 and (b_out == 1 or (d == 3 and b_out == 2)):
            # Few outputs per cell (the deep stages): im2col + one GEMM. oneDNN reorders the
            # whole weight on every call instead, which costs more than the arithmetic there
            # (a 512x512x3^3 weight on 1 output per cell: ~6x slower forward+backward).
            return F.linear(_im2col(blocks, kernel, stride), weight.reshape(weight.shape[0], -1),
                            bias)
        return _block_rows(_CONV[d](blocks, weight, bias, stride, 0, 1, groups))

    def max_pool(self, kernel, stride, padding) -> "SparseMasked":
        if self.kernel == "torch":
            d = self.plan.spatial_dims
            table, length = self.plan.block_table(self.stride, kernel, stride, padding)
            blocks = _block_gather(self.features, table, length, d, fill=-math.inf)
            return self._new(_block_rows(_MAXPOOL[d](blocks, kernel, stride, 0)),
                             self.stride * stride)
        rb = self.plan.rulebook(self.stride, kernel, stride, padding)
        return self._new(_RowMaxPool.apply(self.features, rb), self.stride * stride)

    def rows(self, fn) -> "SparseMasked":
        return self._new(fn(self.features))

    pointwise = rows  # every stored row is active: nothing to re-mask

    def add(self, other: "SparseMasked") -> "SparseMasked":
        if other.stride != self.stride:
            raise ValueError("cannot add sparse maps of different strides")
        return self._new(self.features + other.features)

    def dense(self) -> torch.Tensor:
        with warnings.catch_warnings():  # spconv 2.3.8 indexes with a list (a torch deprecation notice)
            warnings.filterwarnings("ignore", message="Using a non-tuple sequence", category=UserWarning)
            return self.tensor.dense(channels_first=True)


Masked = DenseMasked | SparseMasked


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
    act = plan.active(1)
    if backend == "dense":
        return DenseMasked(x.masked_fill(~act.unsqueeze(1), 0.0), 1, plan)
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
        return _CONV[h.dim() - 2](h, weight, bias, stride, padding, 1, groups)
    return h.conv(weight, bias, stride, padding, groups)


def max_pool(h, kernel, stride, padding=0):
    """Max-pool; masked: the max over the window's active sites only."""
    if isinstance(h, torch.Tensor):
        return _MAXPOOL[h.dim() - 2](h, kernel, stride, padding)
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
    if isinstance(h, DenseMasked):
        return h._remask(fn(h.x), h.stride)
    return h.rows(fn)


def add(a, b):
    """Residual sum of two maps of the same stride."""
    if isinstance(a, torch.Tensor):
        return a + b
    return a.add(b)


def scale_samples(h, scale: torch.Tensor):
    """Multiply every sample ``b`` of the batch by ``scale[b]`` (stochastic depth)."""
    if isinstance(h, torch.Tensor):
        return h * scale.view(-1, *([1] * (h.dim() - 1))).to(h.dtype)
    if isinstance(h, DenseMasked):
        return DenseMasked(h.x * scale.view(-1, *([1] * (h.x.dim() - 1))).to(h.x.dtype), h.stride,
                           h.plan)
    sample = h.tensor.indices[:, 0].long()
    return h.rows(lambda f: f * scale.to(f.dtype)[sample].unsqueeze(1))


def batch_size(h) -> int:
    return h.shape[0] if isinstance(h, torch.Tensor) else h.plan.batch_size


def to_dense(h) -> torch.Tensor:
    """A dense ``(B, C, *spatial)`` tensor (zeros at hidden sites for masked maps)."""
    return h if isinstance(h, torch.Tensor) else h.dense()
