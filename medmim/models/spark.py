"""SparK: masked image modelling for CNNs (Tian et al., ICLR 2023), in 2D and 3D.

1. A mask is drawn on the encoder's coarsest grid (one cell = ``downsample_ratio`` pixels per
   axis; ``True`` = hidden), ``mask_ratio`` of the cells per sample.
2. The CNN encoder sees the visible cells only: ``backend="sparse"`` runs it on them through
   spconv, ``backend="dense"`` runs it densely with the mask re-applied after every conv/pool/norm
   (same numbers; see :mod:`medmim.models.sparse`). It returns one map per stage, finest first,
   zero at hidden sites.
3. Densify: at every scale, hidden sites are filled with a learnable per-scale mask token (after a
   per-site LayerNorm of the visible features), then projected to the decoder width of that scale.
4. A light UNet-style decoder upsamples from the coarsest scale (x2 per block, adding the densified
   map of each scale it reaches) to full resolution and predicts the image.
5. Loss: mean squared error on the hidden cells only, against per-cell normalised pixels
   (``norm_pix_loss``: each cell's target has zero mean and unit variance, per channel).

``forward(x, mask=None)`` returns ``{"loss", "mask", "recon"}``; ``recon`` is the prediction in image
space (un-normalised with each cell's own statistics) with the visible cells pasted back from ``x``.
"""

from __future__ import annotations

import math

import torch
from monai.networks.layers.factories import Conv, Norm
from torch import nn

from medmim.masking import RandomMask
from medmim.models.patches import normalise_patches, patchify, unpatchify, upsample_mask
from medmim.models.sparse import BACKENDS

class _UpBlock(nn.Module):
    """x2 transposed-conv upsampling, then two 3^d conv-BN-ReLU."""

    def __init__(self, d, cin, cout):
        super().__init__()
        conv, bn = Conv[Conv.CONV, d], Norm[Norm.BATCH, d]
        self.up = Conv[Conv.CONVTRANS, d](cin, cin, kernel_size=2, stride=2)
        self.conv = nn.Sequential(
            conv(cin, cout, 3, padding=1, bias=False), bn(cout), nn.ReLU(inplace=True),
            conv(cout, cout, 3, padding=1, bias=False), bn(cout), nn.ReLU(inplace=True))

    def forward(self, x):
        return self.conv(self.up(x))


class SparK(nn.Module):
    """SparK pretext around a CNN encoder (``medmim.models.cnn``).

    ``decoder_width``: channels of the decoder at the coarsest scale; they halve at every x2
    upsampling (not below 8). ``mask_generator``: a callable ``gen(batch_size, grid, *,
    generator=None, device=None)`` (docs/contracts.md); default uniform random at ``mask_ratio``.
    """

    def __init__(self, encoder: nn.Module, mask_ratio: float = 0.6, backend: str = "sparse",
                 norm_pix_loss: bool = True, decoder_width: int = 128, mask_generator=None):
        super().__init__()
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        if not 0 < mask_ratio < 1:
            raise ValueError(f"mask_ratio must be in (0, 1), got {mask_ratio}")
        self.encoder = encoder
        self.mask_ratio, self.backend, self.norm_pix_loss = mask_ratio, backend, norm_pix_loss
        self.mask_generator = mask_generator or RandomMask(mask_ratio)
        d = self.spatial_dims = encoder.spatial_dims
        ratio = self.downsample_ratio = encoder.downsample_ratio
        n_up = int(round(math.log2(ratio)))
        if 2 ** n_up != ratio:
            raise ValueError(f"SparK needs a power-of-two downsample_ratio, got {ratio}")
        chans = list(encoder.feature_channels)
        strides = list(getattr(encoder, "feature_strides", None)
                       or [ratio // 2 ** (len(chans) - 1 - i) for i in range(len(chans))])
        self.feature_strides = strides
        # decoder width at stride ratio / 2**i
        widths = [max(8, decoder_width // 2 ** i) for i in range(n_up + 1)]
        width_at = {ratio // 2 ** i: w for i, w in enumerate(widths)}

        self.mask_tokens = nn.ParameterList()
        self.densify_norms = nn.ModuleList()
        self.densify_projs = nn.ModuleList()
        for c, s in zip(chans, strides):
            token = nn.Parameter(torch.zeros(1, c, *([1] * d)))
            nn.init.trunc_normal_(token, std=0.02)
            self.mask_tokens.append(token)
            self.densify_norms.append(nn.LayerNorm(c))
            k = 1 if s == ratio else 3
            self.densify_projs.append(Conv[Conv.CONV, d](c, width_at[s], k, padding=k // 2))
        self.decoder = nn.ModuleList(_UpBlock(d, widths[i], widths[i + 1]) for i in range(n_up))
        self.head = Conv[Conv.CONV, d](widths[-1], encoder.in_channels, 1)  # one output per input channel

    def densify(self, feats: list[torch.Tensor], mask: torch.Tensor) -> dict[int, torch.Tensor]:
        """Per stride: visible sites normalised, hidden sites = mask token, then projected."""
        out = {}
        for i, (f, s) in enumerate(zip(feats, self.feature_strides)):
            visible = upsample_mask(~mask, self.downsample_ratio // s).unsqueeze(1)
            f = self.densify_norms[i](f.movedim(1, -1)).movedim(-1, 1)
            f = torch.where(visible, f, self.mask_tokens[i].to(f.dtype))
            out[s] = self.densify_projs[i](f)
        return out

    def decode(self, dense: dict[int, torch.Tensor]) -> torch.Tensor:
        stride = self.downsample_ratio
        x = dense[stride]
        for block in self.decoder:
            x = block(x)
            stride //= 2
            if stride in dense:
                x = x + dense[stride]
        return self.head(x)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None,
                generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        p = self.downsample_ratio
        if any(s % p for s in x.shape[2:]):
            raise ValueError(f"image size {tuple(x.shape[2:])} is not divisible by the encoder's "
                             f"downsample ratio {p}")
        grid = tuple(s // p for s in x.shape[2:])
        if mask is None:
            mask = self.mask_generator(x.shape[0], grid, generator=generator, device=x.device)
        mask = mask.to(device=x.device, dtype=torch.bool)

        feats = self.encoder(x, mask, backend=self.backend)
        pred = self.decode(self.densify(feats, mask))

        target = patchify(x, p)
        normed, mean, std = normalise_patches(target, x.shape[1])
        if self.norm_pix_loss:
            target = normed
        pred_patches = patchify(pred, p)
        hidden = mask.flatten(1).to(pred.dtype)
        per_cell = ((pred_patches - target) ** 2).mean(dim=-1)
        loss = (per_cell * hidden).sum() / hidden.sum().clamp(min=1)

        with torch.no_grad():
            shown = pred_patches * std + mean if self.norm_pix_loss else pred_patches
            shown = torch.where(hidden.bool().unsqueeze(-1), shown, patchify(x, p))
            recon = unpatchify(shown, p, grid, x.shape[1])
        return {"loss": loss, "mask": mask, "recon": recon}
