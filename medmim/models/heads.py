"""Task heads on any encoder (Encoder contract in docs/contracts.md)."""

from __future__ import annotations

import torch
from torch import nn


def global_pool(feat: torch.Tensor) -> torch.Tensor:
    """(B, C, *spatial) -> (B, C)."""
    return feat.flatten(2).mean(-1)


class Classifier(nn.Module):
    """Encoder + pooled coarsest features + linear layer.

    ``mode="linear"``: the encoder is frozen (eval mode, no gradients) and the head is
    BatchNorm without affine + Linear, as in MAE's linear probe. ``mode="full"``: everything trains.
    """

    def __init__(self, encoder: nn.Module, num_outputs: int, mode: str = "full", dropout: float = 0.0):
        super().__init__()
        self.encoder = encoder
        self.mode = mode
        dim = encoder.feature_channels[-1]
        if mode == "linear":
            for p in encoder.parameters():
                p.requires_grad_(False)
            self.head = nn.Sequential(nn.BatchNorm1d(dim, affine=False), nn.Linear(dim, num_outputs))
        else:
            self.head = nn.Sequential(nn.LayerNorm(dim), nn.Dropout(dropout), nn.Linear(dim, num_outputs))
        nn.init.trunc_normal_(self.head[-1].weight, std=0.01 if mode == "linear" else 0.02)
        nn.init.zeros_(self.head[-1].bias)

    def train(self, mode: bool = True):
        super().train(mode)
        if self.mode == "linear":
            self.encoder.eval()  # frozen: no dropout, no BN statistic updates
        return self

    def features(self, x: torch.Tensor) -> torch.Tensor:
        if self.mode == "linear":
            with torch.no_grad():
                return global_pool(self.encoder(x)[-1])
        return global_pool(self.encoder(x)[-1])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))
