"""Task heads on any encoder (Encoder contract in docs/contracts.md), and the optimizer groups of
full fine-tuning (layer-wise learning-rate decay).

Segmentation decoders (UNet on CNN features, UNETR on ViT tokens) live in
:mod:`medmim.models.segmentation`.
"""

from __future__ import annotations

import torch
from torch import nn

from medmim.models.protocols import is_vit


def global_pool(feat: torch.Tensor) -> torch.Tensor:
    """(B, C, *spatial) -> (B, C)."""
    return feat.flatten(2).mean(-1)


class FreezableEncoder(nn.Module):
    """Base for encoder + head models: ``freeze_encoder(True)`` trains the head alone (the encoder
    in eval mode: no dropout, no BatchNorm statistic updates). The flag is a buffer, so it is saved
    in checkpoints and a resumed run continues in the right phase. Call ``_init_freeze()``."""

    def _init_freeze(self) -> None:
        self.register_buffer("encoder_frozen", torch.tensor(False))

    @property
    def frozen(self) -> bool:
        return bool(self.encoder_frozen)

    def freeze_encoder(self, frozen: bool = True) -> None:
        """Head-only phase (``True``) or joint training (``False``)."""
        self.encoder_frozen.fill_(bool(frozen))
        self.train(self.training)

    def train(self, mode: bool = True):
        super().train(mode)
        if self.frozen:
            self.encoder.eval()
        return self


class Classifier(FreezableEncoder):
    """Encoder + pooled coarsest features + linear layer.

    ``mode="linear"``: the encoder is frozen (eval mode, no gradients) and the head is
    BatchNorm without affine + Linear, as in MAE's linear probe. ``mode="full"``: everything trains.

    :meth:`freeze_encoder` gives the head-only phase of freeze-then-unfreeze fine-tuning: while
    frozen, the encoder runs in eval mode without gradients (its parameters get no ``.grad``, so
    AdamW leaves them untouched). The flag is a buffer, so a resumed run knows its phase.
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
        self._init_freeze()

    @property
    def frozen(self) -> bool:
        return self.mode == "linear" or bool(self.encoder_frozen)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        if self.frozen:
            with torch.no_grad():
                return global_pool(self.encoder(x)[-1])
        return global_pool(self.encoder(x)[-1])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


# ---- layer-wise learning-rate decay -------------------------------------------------------------

def _stage_modules(encoder: nn.Module) -> list[nn.Module]:
    stages = getattr(encoder, "stages", None)
    if stages is None:
        return []
    return list(stages)


def encoder_layer_ids(encoder: nn.Module) -> tuple[dict[str, int], int]:
    """``({param name: layer id}, number of layers)`` for the encoder's own parameters.

    ViT: its ``layer_id`` (0 = patch/position embedding, i + 1 = block i, depth + 1 = final norm).
    CNN: 0 = stem (everything outside the stages), i + 1 = stage i (``encoder.stages``); the
    number of layers is then ``len(stages) + 1`` and a head sits at id ``len(stages) + 1``.
    """
    names = [n for n, _ in encoder.named_parameters()]
    if is_vit(encoder):
        return {n: int(encoder.layer_id(n)) for n in names}, int(encoder.depth) + 2
    stage_of: dict[int, int] = {}
    stages = _stage_modules(encoder)
    for i, stage in enumerate(stages):
        for p in stage.parameters():
            stage_of.setdefault(id(p), i + 1)
    ids = {n: stage_of.get(id(p), 0) for n, p in encoder.named_parameters()}
    return ids, len(stages) + 2


def layer_decay_groups(model: nn.Module, weight_decay: float, layer_decay: float) -> list[dict]:
    """AdamW parameter groups with layer-wise learning-rate decay (BEiT / MAE fine-tuning).

    ``model`` is an encoder or a module holding one as ``model.encoder`` (Classifier, Segmenter).
    Layer ``i`` of ``L`` (0 = embeddings/stem, ``L - 1`` = the top: a ViT's final norm and every
    parameter outside the encoder, e.g. task heads and decoders) gets ``lr_scale =
    layer_decay ** (L - 1 - i)``. Biases, norm parameters (ndim <= 1), position embeddings and
    tokens get no weight decay. Parameters with ``requires_grad=False`` (a linear probe's frozen
    encoder) are left out. Each group carries ``lr_scale``, ``weight_decay``, ``layer_id`` and
    ``name`` keys; the loop sets ``lr = base_lr * lr_scale``.
    """
    encoder = getattr(model, "encoder", model)
    ids, num_layers = encoder_layer_ids(encoder)
    prefix = "encoder." if encoder is not model else ""
    skip = set(getattr(encoder, "no_weight_decay", lambda: set())())
    groups: dict[tuple[int, bool], dict] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        # the name relative to the encoder; None for heads and decoders (they sit at the top)
        rel = name if not prefix else (name[len(prefix):] if name.startswith(prefix) else None)
        layer = ids.get(rel, num_layers - 1) if rel is not None else num_layers - 1
        no_decay = (p.ndim <= 1 or name.endswith(".bias") or "pos_embed" in name or "token" in name
                    or (rel is not None and rel in skip))
        key = (layer, no_decay)
        if key not in groups:
            groups[key] = {"params": [], "weight_decay": 0.0 if no_decay else weight_decay,
                           "lr_scale": float(layer_decay ** (num_layers - 1 - layer)), "layer_id": layer,
                           "name": f"layer{layer}_{'no_decay' if no_decay else 'decay'}"}
        groups[key]["params"].append(p)
    return [groups[k] for k in sorted(groups)]
