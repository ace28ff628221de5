"""Masked autoencoders on a ViT encoder: MAE (visible tokens only) and a full-token SimMIM variant.

MAE (He et al. 2022): the encoder sees ONLY the visible patches; a light decoder (its own width and
depth) gets the encoded visible tokens scattered back onto the full grid, a shared learned mask
token at every hidden cell, plus a fixed sin-cos position embedding, and predicts every patch's
pixels. The loss is the mean squared error over the HIDDEN patches only, optionally against
per-patch normalised targets (``norm_pix_loss``: each target patch minus its mean, over its std,
per channel for multi-channel inputs; see :mod:`medmim.models.patches`).

SimMIM (Xie et al. 2022), full-token: every patch enters the encoder, hidden ones replaced by a
learned mask token; a linear head predicts the pixels; L1 on the hidden patches. It costs a full
encoder pass, which is what the MAE bench compares against.

Both follow the Pretext contract (docs/contracts.md): ``forward(x, mask=None)`` returns a dict with
``loss``, ``mask`` ``(B, *grid)`` bool, ``recon`` ``(B, C, *spatial)`` (prediction at hidden patches,
the input pasted back at visible ones; detached, for display) and ``pred`` ``(B, N, P)`` (detached
per-patch predictions, in normalised units when ``norm_pix_loss``; ``P = C * patch_size ** dims``).
MAE predicts the hidden patches only (``pred`` is zero at visible ones); SimMIM predicts them all.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
from torch import nn

from medmim.masking import (DifficultyPredictor, LossGuidedMask, RandomMask, build_mask_generator,
                            difficulty_loss, visible_indices)
from medmim.models.patches import normalise_patches, patchify, unpatchify
from medmim.models.vit import Block, sincos_position_embedding

def _resolve_generator(mask_generator, mask_ratio: float) -> Callable:
    if mask_generator is None:
        return RandomMask(mask_ratio)
    if isinstance(mask_generator, str):
        return build_mask_generator(mask_generator, mask_ratio)
    return mask_generator


def _gather(tokens: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    return torch.gather(tokens, 1, ids.unsqueeze(-1).expand(-1, -1, tokens.shape[-1]))


# ---- MAE ----------------------------------------------------------------------------------------
class MAE(nn.Module):
    """Masked autoencoder around a ViT (``medmim.models.vit.ViT``), 2D or 3D.

    Args:
        encoder: a ViT (needs ``embed``, ``forward_tokens``, ``grid_of``, ``patch_size``).
        decoder_dim, decoder_depth, decoder_heads: the light decoder (MAE: 512/8/16 for ViT-B; a
            128-256 wide, 2-4 deep decoder is plenty for small medical datasets).
        mask_ratio: fraction of hidden patches (0.75 default; 0.9 is the X-ray recipe).
        mask_generator: a generator from ``medmim.masking``, or its name (built with
            ``mask_ratio``); ``None`` = random. A ``LossGuidedMask`` adds a difficulty predictor
            head here (``self.predictor``) and its loss to ``loss``.
        norm_pix_loss: regress per-patch normalised pixels (MAE's better default).
    """

    def __init__(self, encoder: nn.Module, decoder_dim: int = 128, decoder_depth: int = 2,
                 decoder_heads: int = 4, mask_ratio: float = 0.75, mask_generator=None,
                 norm_pix_loss: bool = True, mlp_ratio: float = 4.0):
        super().__init__()
        self.encoder = encoder
        self.patch_size = encoder.patch_size
        self.spatial_dims = encoder.spatial_dims
        self.in_channels = encoder.in_channels
        self.mask_ratio = mask_ratio
        self.mask_generator = _resolve_generator(mask_generator, mask_ratio)
        self.norm_pix_loss = norm_pix_loss
        self.decoder_dim = decoder_dim
        enc_dim = encoder.embed_dim
        patch_numel = self.patch_size**self.spatial_dims * self.in_channels

        self.decoder_embed = nn.Linear(enc_dim, decoder_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_dim))
        self.register_buffer("decoder_pos_embed",
                             sincos_position_embedding(encoder.grid, decoder_dim).unsqueeze(0),
                             persistent=False)
        self.decoder_blocks = nn.ModuleList(
            Block(decoder_dim, decoder_heads, mlp_ratio) for _ in range(decoder_depth))
        self.decoder_norm = nn.LayerNorm(decoder_dim)
        self.decoder_pred = nn.Linear(decoder_dim, patch_numel)

        self.predictor = None
        if isinstance(self.mask_generator, LossGuidedMask):
            self.predictor = DifficultyPredictor(enc_dim, self.mask_generator.predictor_hidden)
        self._init_weights()

    def _init_weights(self) -> None:
        nn.init.normal_(self.mask_token, std=0.02)
        for m in [self.decoder_embed, self.decoder_pred, *self.decoder_blocks.modules()]:
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def set_progress(self, progress: float) -> None:
        """Training progress in [0, 1]; drives the easy-to-hard schedule of loss-guided masking."""
        if hasattr(self.mask_generator, "set_progress"):
            self.mask_generator.set_progress(progress)

    def _decoder_pos(self, grid: tuple[int, ...]) -> torch.Tensor:
        if grid == tuple(self.encoder.grid):
            return self.decoder_pos_embed
        return sincos_position_embedding(grid, self.decoder_dim).unsqueeze(0).to(self.decoder_pos_embed)

    def decode(self, latent: torch.Tensor, ids_keep: torch.Tensor, ids_hidden: torch.Tensor,
               grid: tuple[int, ...]) -> torch.Tensor:
        """Encoded visible tokens ``(B, Nv, D)`` -> pixel predictions of the hidden patches
        ``(B, Nh, P)``, in the order of ``ids_hidden``.

        The decoder blocks see the whole grid (visible tokens + mask tokens); the final norm and the
        pixel head run on the hidden positions only, the only ones the loss looks at.
        """
        y = self.decoder_embed(latent)
        b, n, dd = y.shape[0], math.prod(grid), y.shape[-1]
        full = self.mask_token.to(y.dtype).expand(b, n, dd)
        full = full.scatter(1, ids_keep.unsqueeze(-1).expand(-1, -1, dd), y)
        full = full + self._decoder_pos(grid)
        for blk in self.decoder_blocks:
            full = blk(full)
        return self.decoder_pred(self.decoder_norm(_gather(full, ids_hidden)))

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None,
                generator: torch.Generator | None = None,
                target: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Mask (unless ``mask`` is given), encode the visible patches, decode, score.

        ``target`` (default ``x``) is the image whose hidden patches are regressed, e.g. a clean
        image when ``x`` is a corrupted one. ``generator`` seeds the mask.
        """
        grid = self.encoder.grid_of(x)
        b = x.shape[0]
        difficulty = None
        if self.predictor is not None:
            # loss-guided: every patch is embedded once, scored, then the visible ones gathered
            tokens = self.encoder.embed(x)
            difficulty = self.predictor(tokens.detach())
            if mask is None:
                mask = self.mask_generator(b, grid, scores=difficulty.detach(), generator=generator,
                                           device=x.device)
            ids_keep, ids_hidden = visible_indices(mask)
            visible = _gather(tokens, ids_keep)
        else:
            # plain MAE: only the visible patches are ever embedded
            if mask is None:
                mask = self.mask_generator(b, grid, generator=generator, device=x.device)
            ids_keep, ids_hidden = visible_indices(mask)
            visible = self.encoder.embed_visible(x, ids_keep)
        latent = self.encoder.forward_tokens(visible)
        pred_hidden = self.decode(latent, ids_keep, ids_hidden, grid)  # (B, Nh, P)

        target = patchify(x if target is None else target, self.patch_size)
        target_hidden = _gather(target, ids_hidden)
        if self.norm_pix_loss:
            target_hidden, mean, std = normalise_patches(target_hidden, self.in_channels)
        loss_hidden = ((pred_hidden - target_hidden) ** 2).mean(-1)  # (B, Nh): one value per patch
        recon_loss = loss_hidden.mean()
        out = {"recon_loss": recon_loss.detach(), "mask": mask}
        loss = recon_loss
        if difficulty is not None:
            d_loss = difficulty_loss(torch.gather(difficulty, 1, ids_hidden), loss_hidden)
            loss = loss + self.mask_generator.predictor_weight * d_loss
            out["difficulty_loss"] = d_loss.detach()
        out["loss"] = loss

        with torch.no_grad():
            idx = ids_hidden.unsqueeze(-1).expand(-1, -1, target.shape[-1])
            pred = pred_hidden.detach().to(target.dtype)
            out["pred"] = torch.zeros_like(target).scatter(1, idx, pred)
            pix = pred * std + mean if self.norm_pix_loss else pred
            out["recon"] = unpatchify(target.scatter(1, idx, pix), self.patch_size, grid, self.in_channels)
        return out


# ---- SimMIM (full-token) ------------------------------------------------------------------------
class SimMIM(nn.Module):
    """Full-token masked image modelling: all patches go through the encoder, hidden ones replaced
    by a learned mask token (before the position embedding is added); a linear head predicts each
    patch's pixels; the loss (L1 by default, as in SimMIM) is over the hidden patches only."""

    def __init__(self, encoder: nn.Module, mask_ratio: float = 0.75, mask_generator=None,
                 loss: str = "l1", norm_pix_loss: bool = False):
        super().__init__()
        if loss not in ("l1", "mse"):
            raise ValueError(f"loss must be 'l1' or 'mse', got {loss!r}")
        self.encoder = encoder
        self.patch_size = encoder.patch_size
        self.spatial_dims = encoder.spatial_dims
        self.in_channels = encoder.in_channels
        self.mask_ratio = mask_ratio
        self.mask_generator = _resolve_generator(mask_generator, mask_ratio)
        self.loss_kind, self.norm_pix_loss = loss, norm_pix_loss
        self.mask_token = nn.Parameter(torch.zeros(1, 1, encoder.embed_dim))
        nn.init.normal_(self.mask_token, std=0.02)
        self.head = nn.Linear(encoder.embed_dim, self.patch_size**self.spatial_dims * self.in_channels)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None,
                generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        grid = self.encoder.grid_of(x)
        b = x.shape[0]
        if mask is None:
            mask = self.mask_generator(b, grid, generator=generator, device=x.device)
        hidden = mask.reshape(b, -1)
        tokens = self.encoder.embed(x, add_pos=False)
        tokens = torch.where(hidden.unsqueeze(-1), self.mask_token.to(tokens.dtype), tokens)
        tokens = tokens + self.encoder.position_embedding(grid)
        pred = self.head(self.encoder.forward_tokens(tokens))

        target = patchify(x, self.patch_size)
        target_n, mean, std = normalise_patches(target, self.in_channels) if self.norm_pix_loss else (target, 0.0, 1.0)
        err = (pred - target_n).abs() if self.loss_kind == "l1" else (pred - target_n) ** 2
        weights = hidden.to(err.dtype)
        loss = (err.mean(-1) * weights).sum() / weights.sum()
        with torch.no_grad():
            pix = pred.detach() * std + mean if self.norm_pix_loss else pred.detach()
            pix = torch.where(hidden.unsqueeze(-1), pix.to(target.dtype), target)
            recon = unpatchify(pix, self.patch_size, grid, self.in_channels)
        return {"loss": loss, "mask": mask, "pred": pred, "recon": recon}
