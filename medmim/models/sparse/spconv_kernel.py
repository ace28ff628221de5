"""Optional: the sparse backend's regular convs through spconv's own kernels (``kernel="spconv"``).

The only module that imports spconv, and only when that kernel is chosen (the CUDA path the
project's design names, for servers with ``spconv-cu12x``; measured by ``bench/gpu_check.py``).
spconv builds the rulebooks from the plan's canonical rows (submanifold for stride 1; a regular
sparse conv restricted to the output stride's active sites, renumbered to its canonical rows, for
strided convs), cached per (stride, kernel, conv stride, padding) for one forward.

On CPU, spconv 2.3.8's ``scatter_add_cpu`` (used by its conv forward and backward) writes another
pair's source row into a few destination rows when torch runs more than one thread (a race; forward
outputs wrong in 0-30% of rows), so CPU calls run single-threaded, and its backward needs
:func:`_patch_spconv_cpu_stream` (it asks for a CUDA stream unconditionally).
"""

from __future__ import annotations

import contextlib

import torch

from medmim.models.sparse.plan import MaskPlan


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
    """Import spconv (once patched) and return ``(ops, ConvAlgo)``."""
    try:
        from spconv.core import ConvAlgo
        from spconv.pytorch import ops
    except ImportError as exc:  # depends on the installation
        raise ImportError("kernel='spconv' needs spconv (pip install spconv; spconv-cu126 on CUDA servers); "
                          "kernel='torch' (the default) runs the same sparse semantics without it") from exc
    _patch_spconv_cpu_stream()
    return ops, ConvAlgo


@contextlib.contextmanager
def _single_thread_if_cpu(t: torch.Tensor):
    """spconv 2.3.8's CPU ``scatter_add_cpu`` races with more than one torch thread: run its conv
    kernels with one, restoring the count afterwards."""
    if t.is_cuda:
        yield
        return
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def _conv_out_shape(shape, kernel, stride, padding, dilation):
    return [(s + 2 * padding - dilation * (kernel - 1) - 1) // stride + 1 for s in shape]


def rulebook(plan: MaskPlan, stride: int, kernel: int, conv_stride: int, padding: int, dilation: int = 1
             ) -> tuple[torch.Tensor, torch.Tensor, int, bool]:
    """``(pairs (2, kv, max_n) int32, counts (kv,) int32, num_out, subm)`` as spconv's conv kernels
    read them, for a conv on the stride-``stride`` rows (cached in the plan)."""
    key = ("spconv", stride, kernel, conv_stride, padding, dilation)
    if key in plan.cache:
        return plan.cache[key]
    ops, ConvAlgo = _spconv()
    d = plan.spatial_dims
    indices, _ = plan.sites(stride)
    num_in = indices.shape[0]
    subm = conv_stride == 1
    if subm and padding != dilation * (kernel // 2):
        raise NotImplementedError(f"stride-1 masked convs must be 'same' convs (kernel {kernel}, padding {padding})")
    kv = kernel ** d
    out_ids, sp_pairs, sp_counts = ops.get_indice_pairs(
        indices, plan.batch_size, plan.spatial_shape(stride), ConvAlgo.Native, [kernel] * d,
        [conv_stride] * d, [padding] * d, [dilation] * d, [0] * d, subm, False)
    if subm:
        result = (sp_pairs, sp_counts, num_in, True)
    else:
        # keep only outputs active at the output stride, renumbered to that stride's canonical rows
        # (spconv also creates outputs around visible regions)
        new_indices, lookup = plan.sites(stride * conv_stride)
        expected = _conv_out_shape(plan.spatial_shape(stride), kernel, conv_stride, padding, dilation)
        if list(lookup.shape[1:]) != expected:
            raise ValueError(f"conv (kernel {kernel}, stride {conv_stride}, padding {padding}) maps "
                             f"{plan.spatial_shape(stride)} to {expected}, not to the stride-{stride * conv_stride} "
                             f"grid {list(lookup.shape[1:])}")
        num_out = new_indices.shape[0]
        inp, out = sp_pairs[0].long(), sp_pairs[1].long()  # (kv, max_n), -1 padded
        offset = torch.arange(kv, device=inp.device).unsqueeze(1).expand_as(inp)
        valid = torch.arange(inp.shape[1], device=inp.device) < sp_counts.long().unsqueeze(1)
        row = lookup[tuple(out_ids.long().T)]  # -1 for outputs outside the visible region
        out = row[out.clamp(min=0)]
        valid &= out >= 0
        inp, out, offset = inp[valid], out[valid], offset[valid]
        counts = torch.bincount(offset, minlength=kv)
        order = torch.argsort(offset * (num_out + 1) + out, stable=True)  # by offset, then output row
        inp, out, offset = inp[order], out[order], offset[order]
        first = torch.cumsum(counts, 0) - counts
        slot = torch.arange(offset.shape[0], device=offset.device) - first[offset]
        pairs = torch.full((2, kv, max(1, int(counts.max()))), -1, dtype=torch.int32, device=inp.device)
        pairs[0, offset, slot] = inp.to(torch.int32)
        pairs[1, offset, slot] = out.to(torch.int32)
        result = (pairs, counts.to(torch.int32), num_out, False)
    plan.cache[key] = result
    return result


class _SpconvConv(torch.autograd.Function):
    """A conv through spconv's kernels over a rulebook; weight in spconv's ``(O, *k, C)`` layout."""

    @staticmethod
    def forward(ctx, feat, weight, book):
        ops, ConvAlgo = _spconv()
        pairs, counts, num_out, subm = book
        feat = feat.contiguous()
        with _single_thread_if_cpu(feat):
            out = ops.indice_conv(feat, weight, pairs, counts, num_out, False, subm, algo=ConvAlgo.Native)
        ctx.save_for_backward(feat, weight)
        ctx.book = book
        return out

    @staticmethod
    def backward(ctx, grad_out):
        ops, ConvAlgo = _spconv()
        feat, weight = ctx.saved_tensors
        pairs, counts, _, subm = ctx.book
        with _single_thread_if_cpu(feat):
            grad_feat, grad_w = ops.indice_conv_backward(feat, weight, grad_out.contiguous(), pairs, counts, False,
                                                         subm, algo=ConvAlgo.Native)
        return grad_feat, grad_w, None


def spconv_conv(feat: torch.Tensor, plan: MaskPlan, stride: int, weight: torch.Tensor, bias, conv_stride: int,
                padding: int) -> torch.Tensor:
    """Rows of a regular (groups 1) conv with torch-layout ``weight`` ``(O, C, *k)`` on the rows ``feat``."""
    book = rulebook(plan, stride, weight.shape[-1], conv_stride, padding)
    y = _SpconvConv.apply(feat, weight.movedim(1, -1).contiguous(), book)
    return y + bias if bias is not None else y
