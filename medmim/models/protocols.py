"""The encoder contracts in one place (docs/contracts.md), as ``typing.Protocol`` classes.

* :class:`Encoder`: every backbone: ``forward(x, mask=None) -> [feature maps, finest first]``.
* :class:`TokenEncoder`: a ViT; MAE drives its pieces (embed only the visible patches, run the
  blocks on any token subset). :func:`is_vit` is the one test for it.
* :class:`MaskedCNN`: a CNN that runs masked (sparse or masked-dense) semantics and exposes its
  stages (layer-wise lr decay counts them).

Pretexts take an optional ``generator`` for their masks; :func:`accepts_generator` asks.
"""

from __future__ import annotations

import inspect
from typing import Protocol, runtime_checkable

import torch
from torch import nn


@runtime_checkable
class Encoder(Protocol):
    spatial_dims: int
    in_channels: int
    feature_channels: list[int]
    downsample_ratio: int

    def __call__(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> list[torch.Tensor]: ...


@runtime_checkable
class TokenEncoder(Encoder, Protocol):
    patch_size: int
    embed_dim: int
    depth: int
    blocks: nn.ModuleList

    def grid_of(self, x: torch.Tensor) -> tuple[int, ...]: ...

    def embed(self, x: torch.Tensor, add_pos: bool = True) -> torch.Tensor: ...

    def embed_visible(self, x: torch.Tensor, ids_keep: torch.Tensor) -> torch.Tensor: ...

    def forward_tokens(self, tokens: torch.Tensor) -> torch.Tensor: ...

    def layer_id(self, param_name: str) -> int: ...


@runtime_checkable
class MaskedCNN(Encoder, Protocol):
    stages: nn.ModuleList

    def __call__(self, x: torch.Tensor, mask: torch.Tensor | None = None, *, backend: str | None = None,
                 kernel: str = "torch") -> list[torch.Tensor]: ...


def is_vit(encoder: object) -> bool:
    """Whether ``encoder`` is a token encoder (a ViT): MAE, UNETR and token-level layer decay need one."""
    return isinstance(encoder, TokenEncoder)


def accepts_generator(model: nn.Module) -> bool:
    """Whether ``model.forward`` takes ``generator=`` (pretexts that draw masks do)."""
    try:
        return "generator" in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False


__all__ = ["Encoder", "TokenEncoder", "MaskedCNN", "is_vit", "accepts_generator"]
