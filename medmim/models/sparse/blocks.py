"""The sparse backend's rows and its torch kernel (``kernel="torch"``, the default): a block conv.

:class:`SparseMasked` stores only the active sites, as rows ``(N, C)`` in the plan's cell-major
order (plain torch tensors; no spconv). Active sites always come in whole cells, which the kernel
exploits: for each visible cell, gather its conv window -- the cell plus a halo of ``padding``
sites (fill where hidden or outside the image) -- into a ``(Nc, C, L, .., L)`` channels-last block,
and run the ordinary torch conv / max-pool on all blocks at once, unpadded: it computes exactly the
cell's active outputs, with torch's dense kernels (oneDNN on CPU, cuDNN on CUDA). The gather reads
``(L / b)^d`` times the features (halo overhead) instead of ``k^d`` times (im2col), and no rulebook
is built: one index table per (stride, kernel, conv stride, padding), cached per forward. 1^d convs
are a plain GEMM on the rows. The gather's backward is a sorted gather + ``segment_reduce`` (no
scatter with repeated indices).

``kernel="spconv"`` sends regular (groups 1, kernel > 1) convs to :mod:`.spconv_kernel`, imported
only then; everything else stays on this kernel.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from medmim.models.sparse.plan import CONV, MAXPOOL, MaskPlan


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


def block_table(plan: MaskPlan, stride: int, kernel: int, conv_stride: int, padding: int,
                dilation: int = 1) -> tuple[BlockTable, int]:
    """Input rows of each visible cell's conv window (cached in the plan).

    A conv (kernel, conv_stride, padding) on the stride-``stride`` map gives each visible cell
    ``b_out^d`` outputs (``b_out = ratio / (stride * conv_stride)``); they read the input window
    ``[cell * b_in - padding, + L)`` per axis, ``L = (b_out - 1) * conv_stride + dilation * (kernel - 1)
    + 1`` (the cell plus a halo). Returns ``(table (Nc, L^d), L)``: each window site's input row,
    ``N`` (one past the last row) where the site is hidden or outside the image. For 1^d kernels
    without padding the window is the strided sample only (``L = b_out``, read with stride 1).
    """
    key = ("table", stride, kernel, conv_stride, padding, dilation)
    if key not in plan.cache:
        d = plan.spatial_dims
        b_in = plan.ratio // stride
        if b_in % conv_stride:
            raise ValueError(f"conv stride {conv_stride} does not divide the cell size {b_in} at stride {stride}")
        b_out = b_in // conv_stride
        indices, lookup = plan.sites(stride)
        cells = plan.cells()
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
        plan.cache[key] = (BlockTable(rows.contiguous(), indices.shape[0]), length)
    return plan.cache[key]


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
        grad_feat = torch.segment_reduce(grad.index_select(0, t.order), "sum", lengths=t.counts, axis=0)
        return grad_feat, None, None


def _block_gather(feat: torch.Tensor, table: BlockTable, length: int, spatial_dims: int,
                  fill: float = 0.0) -> torch.Tensor:
    """Rows -> one ``(Nc, C, L, .., L)`` block per visible cell (window of :func:`block_table`).

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


def block_conv(feat: torch.Tensor, plan: MaskPlan, stride: int, weight, bias, conv_stride: int, padding: int,
               groups: int) -> torch.Tensor:
    """The rows of a conv on the stride-``stride`` rows ``feat``: one dense torch conv over every
    visible cell's window (the cell plus a halo), unpadded, so it computes exactly the active outputs."""
    d = plan.spatial_dims
    kernel = weight.shape[-1]
    if kernel == 1 and padding == 0 and groups == 1:  # pointwise: a GEMM on the rows
        if conv_stride > 1:
            table, _ = block_table(plan, stride, 1, conv_stride, 0)
            feat = feat.index_select(0, table.rows.reshape(-1))
        return F.linear(feat, weight.reshape(weight.shape[0], -1), bias)
    table, length = block_table(plan, stride, kernel, conv_stride, padding)
    blocks = _block_gather(feat, table, length, d)
    b_out = (length - kernel) // conv_stride + 1
    if groups == 1 and (b_out == 1 or (d == 3 and b_out == 2)):
        # Few outputs per cell (the deep stages): im2col + one GEMM. oneDNN reorders the whole
        # weight on every call instead, which costs more than the arithmetic there (a 512x512x3^3
        # weight on 1 output per cell: ~6x slower forward+backward).
        return F.linear(_im2col(blocks, kernel, conv_stride), weight.reshape(weight.shape[0], -1), bias)
    return _block_rows(CONV[d](blocks, weight, bias, conv_stride, 0, 1, groups))


class SparseMasked:
    """Sparse backend: the active sites only, as cell-major rows ``(N, C)``; ``kernel`` picks the
    conv arithmetic ("torch": block conv; "spconv": spconv's kernels for regular convs)."""

    backend = "sparse"

    def __init__(self, features: torch.Tensor, stride: int, plan: MaskPlan, kernel: str = "torch"):
        self.features, self.stride, self.plan, self.kernel = features, stride, plan, kernel

    def _new(self, features, stride=None) -> "SparseMasked":
        return SparseMasked(features, self.stride if stride is None else stride, self.plan, self.kernel)

    def conv(self, weight, bias, stride, padding, groups) -> "SparseMasked":
        out_ch, in_per_group = weight.shape[:2]
        kernel = weight.shape[-1]
        if any(k != kernel for k in weight.shape[2:]):
            raise NotImplementedError("masked convs need cubic kernels")
        if groups != 1 and not (groups == out_ch and in_per_group == 1 and self.features.shape[1] == groups):
            raise NotImplementedError("masked convs support groups=1 or depthwise convs only")
        if self.kernel == "spconv" and groups == 1 and kernel > 1:
            from medmim.models.sparse.spconv_kernel import spconv_conv

            y = spconv_conv(self.features, self.plan, self.stride, weight, bias, stride, padding)
        else:
            y = block_conv(self.features, self.plan, self.stride, weight, bias, stride, padding, groups)
        return self._new(y, self.stride * stride)

    def max_pool(self, kernel, stride, padding) -> "SparseMasked":
        d = self.plan.spatial_dims
        table, length = block_table(self.plan, self.stride, kernel, stride, padding)
        blocks = _block_gather(self.features, table, length, d, fill=-math.inf)
        return self._new(_block_rows(MAXPOOL[d](blocks, kernel, stride, 0)), self.stride * stride)

    def rows(self, fn) -> "SparseMasked":
        return self._new(fn(self.features))

    pointwise = rows  # every stored row is active: nothing to re-mask
    elementwise = rows

    def add(self, other: "SparseMasked") -> "SparseMasked":
        if other.stride != self.stride:
            raise ValueError("cannot add sparse maps of different strides")
        return self._new(self.features + other.features)

    def scale_samples(self, scale: torch.Tensor) -> "SparseMasked":
        sample = self.plan.sites(self.stride)[0][:, 0].long()
        return self.rows(lambda f: f * scale.to(f.dtype)[sample].unsqueeze(1))

    def dense(self) -> torch.Tensor:
        """``(B, C, *spatial)``, zero at hidden sites."""
        indices, _ = self.plan.sites(self.stride)
        f = self.features
        out = f.new_zeros(self.plan.batch_size, *self.plan.spatial_shape(self.stride), f.shape[1])
        out = out.index_put(tuple(indices.long().T), f)
        return out.movedim(-1, 1)
