"""The anomaly model: an MAE (or any masked pretext, e.g. SparK) trained on normal images.

:class:`MemoryMAE` is the MAE of ``medmim.models.mae`` with a :class:`MemoryModule` between encoder
and decoder: the encoded visible tokens are re-expressed through the memory before the decoder sees
them, and the addressing entropy joins the loss. It keeps the Pretext contract, so the one training
loop trains it through ``PretrainTask`` and the scorer reads its ``recon`` like any other pretext's.
"""

from __future__ import annotations

import torch
from torch import nn

from medmim.anomaly.memory import MemoryModule, addressing_entropy
from medmim.config import Config
from medmim.errors import ConfigError
from medmim.models.mae import MAE
from medmim.models.protocols import is_vit


class MemoryMAE(MAE):
    """MAE whose decoder reads the encoder's visible tokens through a memory of normal patterns.

    Extra args (the rest as :class:`medmim.models.mae.MAE`):
        memory_slots, memory_shrink, memory_temperature: the :class:`MemoryModule`.
        entropy_weight: weight of the addressing entropy in ``loss``.
    """

    def __init__(self, encoder: nn.Module, *, memory_slots: int = 128, memory_shrink: float | None = None,
                 memory_temperature: float = 1.0, entropy_weight: float = 2e-4, **mae_kwargs):
        super().__init__(encoder, **mae_kwargs)
        self.memory = MemoryModule(memory_slots, encoder.embed_dim, memory_shrink, memory_temperature)
        self.entropy_weight = float(entropy_weight)
        self._weights: torch.Tensor | None = None  # addressing of the current forward only

    def decode(self, latent: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        """Re-express the encoded visible tokens through the memory, then MAE's own decoder (whatever
        else MAE.decode takes -- visible/hidden indices, grid -- is passed through unchanged)."""
        z_hat, w = self.memory(latent)
        self._weights = w
        return super().decode(z_hat, *args, **kwargs)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None, generator: torch.Generator | None = None,
                target: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        self._weights = None
        out = super().forward(x, mask=mask, generator=generator, target=target)
        w, self._weights = self._weights, None
        if w is not None:
            ent = addressing_entropy(w)
            out["memory_entropy"] = ent.detach()
            out["loss"] = out["loss"] + self.entropy_weight * ent
        return out


def build_anomaly_model(cfg: Config, encoder: nn.Module) -> nn.Module:
    """The pretext named by ``cfg.pretrain.method`` (MAE or SparK), with memory when ``anomaly.memory``."""
    pc, ac = cfg.pretrain, cfg.anomaly
    if pc.method not in ("mae", "spark"):
        raise ConfigError(f"pretrain.method: anomaly detection needs a masked-reconstruction pretext "
                          f"('mae' or 'spark'), got '{pc.method}'")
    if not ac.memory:
        from medmim.models import build_pretext

        return build_pretext(pc, encoder)
    if pc.method != "mae" or not is_vit(encoder):
        raise ConfigError("anomaly.memory: the memory module sits between a ViT encoder and the MAE "
                          "decoder; use pretrain.method=mae with a vit_* encoder")
    from medmim.masking import build_mask_generator

    return MemoryMAE(encoder, decoder_dim=pc.decoder_dim, decoder_depth=pc.decoder_depth,
                     mask_ratio=pc.mask_ratio, mask_generator=build_mask_generator(pc.masking, pc.mask_ratio),
                     norm_pix_loss=pc.norm_pix_loss, memory_slots=ac.memory_slots, memory_shrink=ac.memory_shrink,
                     memory_temperature=ac.memory_temperature, entropy_weight=ac.memory_entropy_weight)
