"""Segmentation models on any encoder, 2D or 3D: a UNet decoder on a CNN's feature pyramid and a
UNETR decoder on a ViT's intermediate tokens.

``Segmenter(encoder, num_classes)`` picks the decoder from the encoder (a ViT, i.e. a module with
``blocks`` and ``embed``, gets UNETR; everything else that meets the Encoder contract gets UNet)
and returns logits ``(B, num_classes, *spatial)`` at the input resolution.

UNETR (Hatamizadeh et al. 2022) needs the tokens after several intermediate transformer blocks.
:func:`vit_intermediate_tokens` runs the ViT's public pieces (``embed``, ``blocks``, ``norm``) and
keeps the outputs of the requested blocks, so the ViT itself needs no change. The decoder blocks
are MONAI's (``UnetrBasicBlock``, ``UnetrPrUpBlock``, ``UnetrUpBlock``), generalised to any
power-of-two patch size: a patch size ``p = 2**L`` gives ``L`` upsampling levels, fed by ``L - 1``
intermediate blocks evenly spaced through the depth, the final tokens, and the raw image.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from monai.networks.layers.factories import Conv, Norm
from torch import nn

from medmim.models.heads import FreezableEncoder
from medmim.models.protocols import is_vit


def vit_intermediate_tokens(vit: nn.Module, x: torch.Tensor, layers: Sequence[int]) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Token grids ``(B, D, *grid)`` after each block in ``layers`` (0-based, before the final norm)
    and the final normed grid, in one forward pass through the ViT's own modules."""
    grid = vit.grid_of(x)
    b = x.shape[0]
    tokens = vit.embed(x)
    wanted = set(int(i) for i in layers)
    kept: dict[int, torch.Tensor] = {}
    for i, blk in enumerate(vit.blocks):
        tokens = blk(tokens)
        if i in wanted:
            kept[i] = tokens
    to_grid = lambda t: t.transpose(1, 2).reshape(b, t.shape[-1], *grid)  # noqa: E731
    return [to_grid(kept[i]) for i in layers], to_grid(vit.norm(tokens))


def _norm(spatial_dims: int, channels: int) -> nn.Module:
    return Norm[Norm.INSTANCE, spatial_dims](channels, affine=True)


class ConvBlock(nn.Sequential):
    """Two (conv 3^d -> instance norm -> leaky ReLU) layers."""

    def __init__(self, spatial_dims: int, cin: int, cout: int):
        conv = Conv[Conv.CONV, spatial_dims]
        super().__init__(conv(cin, cout, 3, padding=1, bias=False), _norm(spatial_dims, cout),
                         nn.LeakyReLU(0.01, inplace=True),
                         conv(cout, cout, 3, padding=1, bias=False), _norm(spatial_dims, cout),
                         nn.LeakyReLU(0.01, inplace=True))


class UNetDecoder(nn.Module):
    """UNet decoder on a feature pyramid (finest first), back to the input resolution.

    From the coarsest map up: upsample (interpolation) to the next finer map, concatenate it, and
    apply a :class:`ConvBlock`. When the finest map is coarser than the input (a stride-4 stem),
    a last level joins a small conv block run on the image itself. Strides need not be powers of
    two: every upsampling goes to the size of the map it joins.
    """

    def __init__(self, spatial_dims: int, in_channels: int, feature_channels: Sequence[int],
                 num_classes: int, decoder_channels: Sequence[int] | None = None, image_skip: bool = True,
                 image_channels: int = 16):
        super().__init__()
        self.spatial_dims = spatial_dims
        feats = list(feature_channels)
        n = len(feats)
        if decoder_channels is None:
            decoder_channels = [max(16, c // 2) for c in feats[:-1]] if n > 1 else []
        dec = list(decoder_channels)
        if len(dec) != n - 1:
            raise ValueError(f"decoder_channels needs {n - 1} entries (one per skip), got {len(dec)}")
        self.blocks = nn.ModuleList()
        cin = feats[-1]
        for i in range(n - 2, -1, -1):  # coarse -> fine
            out = dec[i]
            self.blocks.append(ConvBlock(spatial_dims, cin + feats[i], out))
            cin = out
        self.image_skip = image_skip
        if image_skip:
            self.image_block = ConvBlock(spatial_dims, in_channels, image_channels)
            self.final_block = ConvBlock(spatial_dims, cin + image_channels, image_channels)
            cin = image_channels
        self.out = Conv[Conv.CONV, spatial_dims](cin, num_classes, 1)

    def _up(self, h: torch.Tensor, size) -> torch.Tensor:
        if tuple(h.shape[2:]) == tuple(size):
            return h
        return F.interpolate(h, size=size, mode="bilinear" if self.spatial_dims == 2 else "trilinear",
                             align_corners=False)

    def forward(self, x: torch.Tensor, feats: Sequence[torch.Tensor]) -> torch.Tensor:
        h = feats[-1]
        for blk, skip in zip(self.blocks, reversed(feats[:-1])):
            h = blk(torch.cat([self._up(h, skip.shape[2:]), skip], 1))
        if self.image_skip:
            h = self.final_block(torch.cat([self._up(h, x.shape[2:]), self.image_block(x)], 1))
        else:
            h = self._up(h, x.shape[2:])
        return self.out(h)


class UNETRDecoder(nn.Module):
    """UNETR decoder for a ViT with patch size ``2**L`` (``L >= 1``), 2D or 3D.

    Skips: the raw image (``UnetrBasicBlock``, stride 1) and blocks ``layers[k]`` for ``k = 1..L-1``
    brought from the patch grid to stride ``2**k`` by ``UnetrPrUpBlock`` (``L - 1 - k`` extra
    transposed convs); the bottleneck is the final normed token grid. ``UnetrUpBlock`` doubles the
    resolution and merges the skip at each level.
    """

    def __init__(self, spatial_dims: int, in_channels: int, embed_dim: int, patch_size: int, num_classes: int,
                 feature_size: int = 16, norm_name: str = "instance", res_block: bool = True):
        super().__init__()
        from monai.networks.blocks import UnetrBasicBlock, UnetrPrUpBlock, UnetrUpBlock

        levels = int(round(math.log2(patch_size)))
        if patch_size < 2 or 2 ** levels != patch_size:
            raise ValueError(f"UNETR needs a power-of-two ViT patch size >= 2, got {patch_size}")
        self.levels = levels
        d = spatial_dims
        self.enc_image = UnetrBasicBlock(d, in_channels, feature_size, kernel_size=3, stride=1,
                                         norm_name=norm_name, res_block=res_block)
        # skip k (1..L-1) lives at stride 2**k, with feature_size * 2**k channels
        self.enc_tokens = nn.ModuleList(
            UnetrPrUpBlock(d, embed_dim, feature_size * 2 ** k, num_layer=levels - 1 - k, kernel_size=3,
                           stride=1, upsample_kernel_size=2, norm_name=norm_name, conv_block=True,
                           res_block=res_block)
            for k in range(1, levels))
        # decoder level k (L-1 .. 0): from stride 2**(k+1) to 2**k
        self.dec = nn.ModuleList()
        cin = embed_dim
        for k in range(levels - 1, -1, -1):
            cout = feature_size * 2 ** k
            self.dec.append(UnetrUpBlock(d, cin, cout, kernel_size=3, upsample_kernel_size=2,
                                         norm_name=norm_name, res_block=res_block))
            cin = cout
        self.out = Conv[Conv.CONV, d](feature_size, num_classes, 1)

    def forward(self, x: torch.Tensor, hidden: Sequence[torch.Tensor], last: torch.Tensor) -> torch.Tensor:
        skips = [self.enc_image(x)] + [enc(h) for enc, h in zip(self.enc_tokens, hidden)]
        h = last
        for blk, skip in zip(self.dec, reversed(skips)):
            h = blk(h, skip)
        return self.out(h)


def unetr_layers(depth: int, levels: int) -> list[int]:
    """0-based block indices for the ``levels - 1`` UNETR skips, evenly spaced (12 blocks, 4
    levels: blocks 3, 6, 9 in 1-based counting, as in UNETR)."""
    return [max(0, round(depth * k / levels) - 1) for k in range(1, levels)]


class Segmenter(FreezableEncoder):
    """Encoder + segmentation decoder -> logits ``(B, num_classes, *spatial)``.

    ``decoder``: ``"auto"`` (UNETR for a ViT, UNet otherwise), ``"unetr"`` or ``"unet"``. A UNet on
    a ViT decodes its single token grid. ``freeze_encoder`` works as in the classifier.
    """

    def __init__(self, encoder: nn.Module, num_classes: int, decoder: str = "auto", feature_size: int = 16):
        super().__init__()
        self.encoder = encoder
        self.num_classes = num_classes
        self.spatial_dims = encoder.spatial_dims
        self.in_channels = encoder.in_channels
        kind = ("unetr" if is_vit(encoder) else "unet") if decoder == "auto" else decoder
        if kind not in ("unet", "unetr"):
            raise ValueError(f"decoder must be 'auto', 'unet' or 'unetr', got {decoder!r}")
        if kind == "unetr" and not is_vit(encoder):
            raise ValueError("the UNETR decoder needs a ViT encoder; use decoder='unet' for CNNs")
        self.kind = kind
        if kind == "unetr":
            self.decoder = UNETRDecoder(encoder.spatial_dims, encoder.in_channels, encoder.embed_dim,
                                        encoder.patch_size, num_classes, feature_size=feature_size)
            self.layers = unetr_layers(len(encoder.blocks), self.decoder.levels)
        else:
            self.decoder = UNetDecoder(encoder.spatial_dims, encoder.in_channels, encoder.feature_channels,
                                       num_classes, image_channels=feature_size)
        self._init_freeze()

    def _encode(self, x):
        if self.kind == "unetr":
            return vit_intermediate_tokens(self.encoder, x, self.layers)
        return self.encoder(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.frozen:
            with torch.no_grad():
                enc = self._encode(x)
        else:
            enc = self._encode(x)
        if self.kind == "unetr":
            hidden, last = enc
            return self.decoder(x, hidden, last)
        return self.decoder(x, enc)
