"""A learned memory of normal patterns (MemAE, Gong et al. 2019; as used by MemMC-MAE, Tian et al. 2023).

Every encoder feature ``z`` is re-expressed as a sparse convex combination of ``N`` learned slots:

    w_i   = softmax_i( cos(z, m_i) / temperature )                   attention over the slots
    w'_i  = relu(w_i - lambda) * w_i / (|w_i - lambda| + eps)         hard shrinkage (sparsity)
    w'    = w' / ||w'||_1
    z_hat = sum_i w'_i m_i

Trained on normal images only, the slots hold normal patterns; an anomalous feature can only be
rebuilt from them, so the decoder reconstructs something normal and the error at the anomaly grows.
The entropy of ``w'`` is added to the training loss (weight ``entropy_weight``) to keep the
addressing sparse.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class MemoryModule(nn.Module):
    """``forward(z (..., D)) -> (z_hat (..., D), weights (..., N))``.

    Args:
        num_slots: ``N`` memory items.
        dim: feature width ``D``.
        shrink: hard-shrinkage threshold ``lambda`` (None: ``1 / N``; 0 disables shrinkage).
        temperature: softmax temperature on the cosine similarities.
    """

    def __init__(self, num_slots: int, dim: int, shrink: float | None = None, temperature: float = 1.0,
                 eps: float = 1e-12):
        super().__init__()
        self.num_slots, self.dim = int(num_slots), int(dim)
        self.shrink = 1.0 / num_slots if shrink is None else float(shrink)
        self.temperature = float(temperature)
        self.eps = eps
        self.slots = nn.Parameter(torch.empty(num_slots, dim))
        bound = 1.0 / dim**0.5
        nn.init.uniform_(self.slots, -bound, bound)

    def address(self, z: torch.Tensor) -> torch.Tensor:
        """Sparse addressing weights ``(..., N)``, each row summing to 1."""
        sim = F.normalize(z, dim=-1) @ F.normalize(self.slots, dim=-1).t()
        w = torch.softmax(sim / self.temperature, dim=-1)
        if self.shrink > 0:
            w = F.relu(w - self.shrink) * w / ((w - self.shrink).abs() + self.eps)
            w = w / w.sum(-1, keepdim=True).clamp_min(self.eps)
        return w

    def forward(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        w = self.address(z)
        return w @ self.slots.to(w.dtype), w


def addressing_entropy(w: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """Mean entropy of the addressing weights (low = sparse)."""
    return (-w * torch.log(w + eps)).sum(-1).mean()
