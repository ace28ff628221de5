"""Models: the layer after data -> masking, before train. Encoders, pretexts and heads, built by
name from the config.

The contracts are declared in ``protocols.py`` (Encoder, TokenEncoder, MaskedCNN, ``is_vit``) and
described in docs/contracts.md; ``patches.py`` holds the patch helpers every pretext shares;
``sparse/`` runs masked CNNs (masked-dense reference, torch block kernel, optional spconv).
"""

from __future__ import annotations

from torch import nn

from medmim.config import EncoderConfig, PretrainConfig
from medmim.errors import ConfigError
from medmim.models.protocols import is_vit

VIT_NAMES = ("vit_tiny", "vit_small", "vit_base")
CNN_NAMES = ("resnet18", "resnet50", "convnext_tiny")


def build_encoder(name: str, spatial_dims: int = 2, in_channels: int = 1, img_size: int = 224,
                  **kwargs) -> nn.Module:
    """An Encoder by name; extra keyword arguments go to the family's constructor."""
    kwargs = {k: v for k, v in kwargs.items() if v is not None}
    if name in VIT_NAMES:
        from medmim.models.vit import build_vit

        return build_vit(name.split("_", 1)[1], spatial_dims=spatial_dims, in_channels=in_channels,
                         img_size=img_size, **kwargs)
    if name in CNN_NAMES:
        from medmim.models.cnn import build_cnn

        return build_cnn(name, spatial_dims=spatial_dims, in_channels=in_channels, **kwargs)
    raise ConfigError(f"encoder.name: unknown encoder '{name}'; allowed: {', '.join(VIT_NAMES + CNN_NAMES)}")


def encoder_from_config(enc: EncoderConfig, spatial_dims: int, img_size: int, in_channels: int = 1) -> nn.Module:
    if enc.name in VIT_NAMES:
        kw = dict(patch_size=enc.patch_size, embed_dim=enc.embed_dim, depth=enc.depth,
                  num_heads=enc.num_heads, drop_path_rate=enc.drop_path)
    else:
        kw = dict(base_channels=enc.width, small_input=enc.small_input, drop_path=enc.drop_path,
                  num_stages=enc.num_stages)
    return build_encoder(enc.name, spatial_dims=spatial_dims, in_channels=in_channels, img_size=img_size, **kw)


def _mask_generator(cfg: PretrainConfig):
    from medmim.masking import build_mask_generator

    try:
        return build_mask_generator(cfg.masking, cfg.mask_ratio, **cfg.masking_kw)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"pretrain.masking_kw: {exc} (masking '{cfg.masking}')") from None


def build_pretext(cfg: PretrainConfig, encoder: nn.Module) -> nn.Module:
    """A pretext module around ``encoder`` (Pretext contract)."""
    method = cfg.method
    if method == "mae":
        from medmim.models.mae import MAE

        if not is_vit(encoder):
            raise ConfigError("pretrain.method 'mae' needs a ViT encoder (encoder.name vit_*); "
                              "use 'spark' for CNN encoders")
        return MAE(encoder, decoder_dim=cfg.decoder_dim, decoder_depth=cfg.decoder_depth,
                   mask_generator=_mask_generator(cfg),
                   norm_pix_loss=cfg.norm_pix_loss)
    if method == "spark":
        from medmim.models.spark import SparK

        if cfg.masking == "loss_guided":
            raise ConfigError("pretrain.masking 'loss_guided' needs a difficulty predictor on tokens; it is "
                              "implemented for 'mae' only (use random, block or noise_* with 'spark')")
        if is_vit(encoder):
            raise ConfigError("pretrain.method 'spark' needs a CNN encoder (resnet18, resnet50, convnext_tiny)")

        return SparK(encoder, mask_ratio=cfg.mask_ratio, backend=cfg.backend, norm_pix_loss=cfg.norm_pix_loss,
                     decoder_width=cfg.decoder_dim, mask_generator=_mask_generator(cfg))
    if method == "simclr":
        from medmim.models.simclr import SimCLR

        return SimCLR(encoder, temperature=cfg.temperature)
    raise ConfigError(f"pretrain.method: '{method}' builds no pretext")
