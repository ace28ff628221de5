"""Loss-guided masking (HPM, "Hard Patches Mining", Wang et al. 2023), easy-to-hard.

A small head predicts, for every patch, how hard it will be to reconstruct. The mask generator then
hides ``alpha * K`` of the ``K`` hidden patches as the *predicted hardest* ones and the rest
uniformly at random among the others. ``alpha`` grows linearly with training progress from
``alpha_start`` to ``alpha_end`` (easy-to-hard: at first the mask is plain random, because the
predictor knows nothing yet).

The predictor lives inside the pretext (``MAE`` creates a :class:`DifficultyPredictor` when its mask
generator is a :class:`LossGuidedMask`); it reads the *detached* patch tokens and is trained on the
*detached* real per-patch reconstruction loss, so it never shapes the encoder. Only the ranking of
patches matters, so the target is the per-sample standardised loss of the hidden patches.

The trainer reports progress through ``pretext.set_progress(step / total_steps)``.
"""

from __future__ import annotations

import torch
from torch import nn

from medmim.masking.base import MaskGenerator, check_grid, mask_from_scores, num_masked, rand


class LossGuidedMask(MaskGenerator):
    """Mix predicted-hard and random patches; with ``scores=None`` it is plain random masking.

    Args:
        ratio: fraction of hidden cells.
        alpha_start, alpha_end: share of the hidden cells chosen as predicted-hardest at the start
            and at the end of training (HPM uses 0 -> 0.5).
        predictor_hidden: width of the difficulty head built by the pretext.
        predictor_weight: weight of the predictor's loss in the pretext's total loss.
    """

    name = "loss_guided"
    needs_scores = True

    def __init__(self, ratio: float = 0.75, alpha_start: float = 0.0, alpha_end: float = 0.5,
                 predictor_hidden: int = 64, predictor_weight: float = 1.0):
        super().__init__(ratio)
        if not 0.0 <= alpha_start <= 1.0 or not 0.0 <= alpha_end <= 1.0:
            raise ValueError("alpha_start and alpha_end must lie in [0, 1]")
        self.alpha_start, self.alpha_end = float(alpha_start), float(alpha_end)
        self.predictor_hidden = int(predictor_hidden)
        self.predictor_weight = float(predictor_weight)
        self.progress = 0.0

    def set_progress(self, progress: float) -> None:
        """Training progress in [0, 1] (fraction of total steps done)."""
        self.progress = min(1.0, max(0.0, float(progress)))

    @property
    def alpha(self) -> float:
        return self.alpha_start + (self.alpha_end - self.alpha_start) * self.progress

    def __call__(self, batch_size, grid, *, scores: torch.Tensor | None = None, generator=None,
                 device=None):
        grid = check_grid(grid)
        k = num_masked(grid, self.ratio)
        device = scores.device if scores is not None and device is None else device
        noise = rand((batch_size, *grid), generator, device)
        n_hard = int(round(self.alpha * k))
        if scores is None or n_hard == 0:
            return mask_from_scores(noise, k)
        scores = scores.detach().reshape(batch_size, *grid).float()
        hard = mask_from_scores(scores, n_hard)
        # the predicted-hard cells first (score >= 2), the rest at random
        return mask_from_scores(hard.float() * 2 + noise, k)

    def __repr__(self):
        return (f"LossGuidedMask(ratio={self.ratio}, alpha={self.alpha_start}->{self.alpha_end}, "
                f"progress={self.progress:.3f})")


class DifficultyPredictor(nn.Module):
    """Per-patch difficulty from a patch token: LayerNorm -> Linear -> GELU -> Linear -> scalar."""

    def __init__(self, dim: int, hidden: int = 64):
        super().__init__()
        self.net = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, hidden), nn.GELU(),
                                 nn.Linear(hidden, 1))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """``(B, N, D)`` tokens (detached by the caller) -> ``(B, N)`` predicted difficulty."""
        return self.net(tokens).squeeze(-1)


def difficulty_loss(predicted: torch.Tensor, patch_loss: torch.Tensor) -> torch.Tensor:
    """Regress the predictor onto the per-sample standardised real loss of the hidden patches.

    Both are ``(B, Nh)`` over the hidden patches (the only ones with a real loss); ``patch_loss``
    is detached here. Standardising per sample makes the target a ranking signal, which is all the
    mask generator uses.
    """
    target = patch_loss.detach()
    mean = target.mean(1, keepdim=True)
    std = target.std(1, unbiased=False, keepdim=True).clamp_min(1e-6)
    return ((predicted - (target - mean) / std) ** 2).mean()
