"""The mask at every stride of one masked forward pass, and the masked-dense reference backend.

``mask`` is ``(B, *grid)`` bool on the encoder's coarsest grid (one cell = ``downsample_ratio``
pixels per axis, ``True`` = hidden). At a feature map of stride ``s`` a site is *active* when the
coarse cell holding it is visible. :class:`MaskPlan` holds the active sites per stride and their
canonical *cell-major* row order (the visible cells row-major, inside each cell its
``(ratio / s)^d`` sites row-major), which every sparse kernel shares.

:class:`DenseMasked` is the reference: ordinary dense ops on the full grid with the mask
re-applied after every conv, pool and norm; batch norm sees the active sites only.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from medmim.models.patches import upsample_mask

CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
MAXPOOL = {1: F.max_pool1d, 2: F.max_pool2d, 3: F.max_pool3d}


class MaskPlan:
    """The visible sites at every stride of one masked forward pass (cached per stride); kernels
    keep their own per-pass tables in ``cache``."""

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
        self.cache: dict = {}

    def _check(self, stride: int) -> None:
        if self.ratio % stride:
            raise ValueError(f"stride {stride} does not divide downsample_ratio {self.ratio}")

    def active(self, stride: int) -> torch.Tensor:
        """``(B, *spatial)`` bool: sites of the feature map of this stride that are visible."""
        if stride not in self._active:
            self._check(stride)
            self._active[stride] = upsample_mask(self.visible, self.ratio // stride).contiguous()
        return self._active[stride]

    def cells(self) -> torch.Tensor:
        """Visible cells of the mask grid, ``(Nc, 1 + d)`` int64 ``[b, z, y, x]``, row-major."""
        if "cells" not in self.cache:
            self.cache["cells"] = self.visible.nonzero()
        return self.cache["cells"]

    def sites(self, stride: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Active sites in canonical (cell-major) order: ``indices`` (N, 1+d) int32 ``[b, z, y, x]``
        and ``lookup`` (B, *spatial) int64 giving each site's row (-1 where hidden).

        One cell's sites are consecutive rows, so ``(Nc * b^d, C)`` rows are ``(Nc, b, .., b, C)``
        blocks without a copy."""
        if stride not in self._sites:
            self._check(stride)
            b, d = self.ratio // stride, self.spatial_dims
            cells = self.cells()
            local = torch.stack(torch.meshgrid(*[torch.arange(b, device=cells.device)] * d,
                                               indexing="ij"), -1).reshape(-1, d)
            coords = (cells[:, None, 1:] * b + local).reshape(-1, d)
            batch = cells[:, :1].expand(-1, local.shape[0]).reshape(-1, 1)
            # nonzero()-like int32 table, contiguous (spconv reads its raw memory)
            indices = torch.cat([batch, coords], 1).to(torch.int32).contiguous()
            act = self.active(stride)
            lookup = torch.full(act.shape, -1, dtype=torch.long, device=act.device)
            lookup[(batch[:, 0], *coords.T)] = torch.arange(indices.shape[0], device=act.device)
            self._sites[stride] = (indices, lookup)
        return self._sites[stride]

    def spatial_shape(self, stride: int) -> list[int]:
        return list(self.active(stride).shape[1:])


class DenseMasked:
    """Masked-dense backend: a full ``(B, C, *spatial)`` map, zero at hidden sites."""

    backend = "dense"

    def __init__(self, x: torch.Tensor, stride: int, plan: MaskPlan):
        self.x, self.stride, self.plan = x, stride, plan

    def _remask(self, y: torch.Tensor, stride: int) -> "DenseMasked":
        hidden = ~self.plan.active(stride).unsqueeze(1)
        return DenseMasked(y.masked_fill(hidden, 0.0), stride, self.plan)

    def conv(self, weight, bias, stride, padding, groups) -> "DenseMasked":
        y = CONV[self.plan.spatial_dims](self.x, weight, bias, stride, padding, 1, groups)
        return self._remask(y, self.stride * stride)

    def max_pool(self, kernel, stride, padding) -> "DenseMasked":
        hidden = ~self.plan.active(self.stride).unsqueeze(1)
        y = MAXPOOL[self.plan.spatial_dims](self.x.masked_fill(hidden, -math.inf), kernel, stride, padding)
        return self._remask(y, self.stride * stride)

    def rows(self, fn) -> "DenseMasked":
        act = self.plan.active(self.stride)
        y = fn(self.x.movedim(1, -1)[act])
        out = y.new_zeros(*act.shape, y.shape[-1])
        out[act] = y
        return DenseMasked(out.movedim(-1, 1), self.stride, self.plan)

    def pointwise(self, fn) -> "DenseMasked":
        return self._remask(fn(self.x.movedim(1, -1)).movedim(-1, 1), self.stride)

    def elementwise(self, fn) -> "DenseMasked":
        return self._remask(fn(self.x), self.stride)

    def add(self, other: "DenseMasked") -> "DenseMasked":
        return DenseMasked(self.x + other.x, self.stride, self.plan)

    def scale_samples(self, scale: torch.Tensor) -> "DenseMasked":
        return DenseMasked(self.x * scale.view(-1, *([1] * (self.x.dim() - 1))).to(self.x.dtype), self.stride,
                           self.plan)

    def dense(self) -> torch.Tensor:
        return self.x
