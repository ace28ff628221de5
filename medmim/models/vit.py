"""Vision Transformer encoder for 2D and 3D images (one class, one ``spatial_dims`` argument).

Layout: a strided convolution cuts the image into patches (``patch_size`` on every axis) and embeds
each as a token; a fixed sin-cos (default) or learned position embedding is added; pre-norm
transformer blocks (fused qkv projection, ``scaled_dot_product_attention``, stochastic depth)
follow; a final LayerNorm closes. There is no class token: pooled features are the token mean.

Encoder contract (docs/contracts.md): ``forward(x, mask=None)`` returns ``[features]`` with
``features`` the token grid reshaped to ``(B, embed_dim, *grid)``; ``feature_channels = [embed_dim]``,
``downsample_ratio = patch_size``. With a mask, only the visible tokens are encoded (they attend to
one another only) and hidden cells of the returned grid are zero -- the same semantics as a sparse
CNN, where hidden cells carry no features.

MAE uses the pieces directly: ``embed`` (all patch tokens + position), ``embed_visible`` (only the
listed patches), ``forward_tokens`` (blocks + norm on any subset of tokens) and
``forward_visible(x, mask)``.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from monai.networks.layers import DropPath
from monai.networks.layers.factories import Conv
from torch import nn

from medmim.masking.base import visible_indices

VIT_SIZES = {
    "tiny": dict(embed_dim=192, depth=12, num_heads=3),
    "small": dict(embed_dim=384, depth=12, num_heads=6),
    "base": dict(embed_dim=768, depth=12, num_heads=12),
}


def sincos_position_embedding(grid: Sequence[int], dim: int) -> torch.Tensor:
    """Fixed sin-cos position embedding for a 2D/3D grid, shape ``(prod(grid), dim)``.

    The channels are split evenly between the axes; each axis gets sines and cosines of its
    coordinate at geometrically spaced frequencies (1 / 10000^(i/n)). Channels left over when
    ``dim`` is not a multiple of ``2 * len(grid)`` are zero.
    """
    per_axis = dim // (2 * len(grid))
    omega = 1.0 / 10000 ** (torch.arange(per_axis, dtype=torch.float64) / max(per_axis, 1))
    coords = torch.meshgrid(*[torch.arange(n, dtype=torch.float64) for n in grid], indexing="ij")
    parts = []
    for c in coords:
        angles = c.reshape(-1, 1) * omega.reshape(1, -1)
        parts += [torch.sin(angles), torch.cos(angles)]
    emb = torch.cat(parts, dim=1)
    if emb.shape[1] < dim:
        emb = torch.cat([emb, emb.new_zeros(emb.shape[0], dim - emb.shape[1])], dim=1)
    return emb.float()


class Attention(nn.Module):
    """Multi-head self-attention: one fused qkv projection and PyTorch's fused SDPA kernel."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"embed_dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.num_heads, d // self.num_heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(b, n, d))


class Block(nn.Module):
    """Pre-norm transformer block: ``x + DropPath(Attn(LN(x)))``, then ``x + DropPath(MLP(LN(x)))``."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, qkv_bias: bool = True,
                 drop_path: float = 0.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, num_heads, qkv_bias)
        self.norm2 = nn.LayerNorm(dim)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path(self.attn(self.norm1(x)))
        return x + self.drop_path(self.mlp(self.norm2(x)))


def _tuple(v, n: int) -> tuple[int, ...]:
    return tuple(int(a) for a in v) if isinstance(v, (tuple, list)) else (int(v),) * n


def resample_position_grid(pos: torch.Tensor, src: Sequence[int], dst: Sequence[int]) -> torch.Tensor:
    """``(1, prod(src), D)`` position embedding on the token grid ``src`` -> ``(1, prod(dst), D)`` on
    ``dst`` (same number of axes): bicubic in 2D, trilinear in 3D."""
    src, dst = tuple(src), tuple(dst)
    if src == dst:
        return pos
    pe = pos.transpose(1, 2).reshape(1, pos.shape[2], *src)
    pe = F.interpolate(pe, size=dst, mode="bicubic" if len(src) == 2 else "trilinear", align_corners=False)
    return pe.flatten(2).transpose(1, 2)


class ViT(nn.Module):
    """ViT encoder, 2D or 3D.

    Args:
        spatial_dims: 2 or 3.
        in_channels: image channels (1 for grayscale medical images).
        img_size: the training image size (int or per-axis); sets the position-embedding grid.
            Other sizes divisible by the patch size work too (sin-cos is recomputed, learned
            embeddings are interpolated).
        patch_size: patch edge in pixels/voxels (same on every axis); ``downsample_ratio``.
        embed_dim, depth, num_heads, mlp_ratio, qkv_bias: transformer shape.
        drop_path_rate: stochastic depth, rising linearly from 0 (first block) to this value.
        pos_embed: ``"sincos"`` (fixed) or ``"learned"``.
    """

    def __init__(self, spatial_dims: int = 2, in_channels: int = 1, img_size=224, patch_size: int = 16,
                 embed_dim: int = 384, depth: int = 12, num_heads: int = 6, mlp_ratio: float = 4.0,
                 qkv_bias: bool = True, drop_path_rate: float = 0.0, pos_embed: str = "sincos"):
        super().__init__()
        if spatial_dims not in (2, 3):
            raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims}")
        if pos_embed not in ("sincos", "learned"):
            raise ValueError(f"pos_embed must be 'sincos' or 'learned', got {pos_embed!r}")
        self.spatial_dims = spatial_dims
        self.in_channels = in_channels
        self.img_size = _tuple(img_size, spatial_dims)
        self.patch_size = int(patch_size)
        if any(s % self.patch_size for s in self.img_size):
            raise ValueError(f"img_size {self.img_size} is not divisible by patch_size {patch_size}")
        self.grid = tuple(s // self.patch_size for s in self.img_size)
        self.embed_dim, self.depth, self.num_heads = embed_dim, depth, num_heads
        self.feature_channels = [embed_dim]
        self.downsample_ratio = self.patch_size
        self.pos_embed_type = pos_embed

        self.patch_embed = Conv[Conv.CONV, spatial_dims](in_channels, embed_dim, kernel_size=self.patch_size, stride=self.patch_size)
        pe = sincos_position_embedding(self.grid, embed_dim).unsqueeze(0)
        if pos_embed == "learned":
            self.pos_embed = nn.Parameter(torch.randn_like(pe) * 0.02)
        else:
            self.register_buffer("pos_embed", pe, persistent=False)
        rates = torch.linspace(0, drop_path_rate, depth).tolist() if depth else []
        self.blocks = nn.ModuleList(Block(embed_dim, num_heads, mlp_ratio, qkv_bias, r) for r in rates)
        self.norm = nn.LayerNorm(embed_dim)
        self._init_weights()

    def _init_weights(self) -> None:
        # MAE's recipe: xavier for linear layers and the (flattened) patch projection
        w = self.patch_embed.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.patch_embed.bias)
        for m in self.blocks.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    # ---- pieces -------------------------------------------------------------------------------
    def grid_of(self, x: torch.Tensor) -> tuple[int, ...]:
        spatial = x.shape[2:]
        if len(spatial) != self.spatial_dims or any(s % self.patch_size for s in spatial):
            raise ValueError(f"input spatial shape {tuple(spatial)} does not fit a {self.spatial_dims}D "
                             f"ViT with patch size {self.patch_size}")
        return tuple(s // self.patch_size for s in spatial)

    def position_embedding(self, grid: Sequence[int]) -> torch.Tensor:
        """``(1, prod(grid), embed_dim)`` position embedding for a token grid."""
        grid = tuple(grid)
        if grid == self.grid:
            return self.pos_embed
        if self.pos_embed_type == "sincos":
            return sincos_position_embedding(grid, self.embed_dim).unsqueeze(0).to(self.pos_embed)
        return resample_position_grid(self.pos_embed, self.grid, grid)

    def embed(self, x: torch.Tensor, add_pos: bool = True) -> torch.Tensor:
        """Image ``(B, C, *spatial)`` -> patch tokens ``(B, N, D)`` in row-major grid order."""
        grid = self.grid_of(x)
        tokens = self.patch_embed(x).flatten(2).transpose(1, 2)
        return tokens + self.position_embedding(grid) if add_pos else tokens

    def embed_visible(self, x: torch.Tensor, ids_keep: torch.Tensor) -> torch.Tensor:
        """Embed only the patches listed in ``ids_keep`` ``(B, n)`` -> ``(B, n, D)`` with position.

        The same arithmetic as :meth:`embed` (the patch convolution written as a matrix product on
        the cut-out patches) but hidden patches are never projected: at 75% masking this skips
        3/4 of the patch-embedding work, which matters in 3D (a 16^3 patch has 4096 voxels).
        """
        grid = self.grid_of(x)
        b, c, p = x.shape[0], x.shape[1], self.patch_size
        d = self.spatial_dims
        # (B, C, g1, p, g2, p, ...) -> (B, g1, g2, ..., C, p, p, ...): the conv weight's own order
        cells = x.reshape(b, c, *[v for g in grid for v in (g, p)])
        cells = cells.permute(0, *[2 + 2 * i for i in range(d)], 1, *[3 + 2 * i for i in range(d)])
        cells = cells.reshape(b, math.prod(grid), c * p**d)
        cells = torch.gather(cells, 1, ids_keep.unsqueeze(-1).expand(-1, -1, cells.shape[-1]))
        tokens = F.linear(cells, self.patch_embed.weight.flatten(1), self.patch_embed.bias)
        pos = self.position_embedding(grid).expand(b, -1, -1)
        return tokens + torch.gather(pos, 1, ids_keep.unsqueeze(-1).expand(-1, -1, self.embed_dim))

    def forward_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        """Run the transformer blocks and final norm on ``(B, n, D)`` tokens (any subset)."""
        for blk in self.blocks:
            tokens = blk(tokens)
        return self.norm(tokens)

    def forward_visible(self, x: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Encode only the visible patches.

        Returns ``(tokens, ids_keep)``: ``tokens`` ``(B, N_visible, D)`` and ``ids_keep``
        ``(B, N_visible)`` their flat grid indices (ascending). The hidden patches are never
        embedded into the sequence, which is what makes MAE cheap.
        """
        ids_keep, _ = visible_indices(mask)
        return self.forward_tokens(self.embed_visible(x, ids_keep)), ids_keep

    # ---- encoder contract ---------------------------------------------------------------------
    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> list[torch.Tensor]:
        grid = self.grid_of(x)
        b = x.shape[0]
        if mask is None:
            tokens = self.forward_tokens(self.embed(x))
        else:
            if tuple(mask.shape[1:]) != grid:
                raise ValueError(f"mask grid {tuple(mask.shape[1:])} != token grid {grid}")
            visible, ids_keep = self.forward_visible(x, mask)
            tokens = visible.new_zeros(b, math.prod(grid), self.embed_dim)
            tokens = tokens.scatter(1, ids_keep.unsqueeze(-1).expand(-1, -1, self.embed_dim), visible)
        return [tokens.transpose(1, 2).reshape(b, self.embed_dim, *grid)]

    # ---- fine-tuning helpers ------------------------------------------------------------------
    def layer_id(self, param_name: str) -> int:
        """Layer index for layer-wise LR decay: 0 = embeddings, i + 1 = block i, depth + 1 = norm/head.

        Accepts names relative to the encoder or prefixed with ``encoder.``; anything that is not
        an embedding or a block (final norm, a task head) counts as depth + 1.
        """
        name = param_name.removeprefix("encoder.")
        if name.startswith(("patch_embed", "pos_embed", "mask_token")):
            return 0
        if name.startswith("blocks."):
            return int(name.split(".")[1]) + 1
        return self.depth + 1

    def no_weight_decay(self) -> set[str]:
        """Parameter names conventionally excluded from weight decay."""
        return {"pos_embed"} if self.pos_embed_type == "learned" else set()


def build_vit(size: str = "small", spatial_dims: int = 2, in_channels: int = 1, img_size=224,
              patch_size: int = 16, **kw) -> ViT:
    """Build ``tiny`` / ``small`` / ``base``; ``embed_dim``, ``depth``, ``num_heads`` etc. override."""
    if size not in VIT_SIZES:
        raise ValueError(f"unknown ViT size {size!r}; choose one of {', '.join(VIT_SIZES)}")
    args = {**VIT_SIZES[size], **kw}
    return ViT(spatial_dims=spatial_dims, in_channels=in_channels, img_size=img_size,
               patch_size=patch_size, **args)
