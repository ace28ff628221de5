"""Load MONAI-format ViT weights into medmim's ViT.

MONAI's ``monai.networks.nets.ViT`` (also the encoder inside ``UNETR``) and its
``MaskedAutoEncoderViT`` name their parameters differently from medmim's ViT. The layouts agree
(fused qkv in (q, k, v) x heads x head-dim order, pre-norm blocks, GELU MLP), so a state dict
converts by renaming:

==================================================  ======================================
MONAI                                               medmim
==================================================  ======================================
``patch_embedding.patch_embeddings.weight/bias``    ``patch_embed.weight/bias`` (conv)
``patch_embedding.patch_embeddings.1.weight/bias``  ``patch_embed.*`` (perceptron: reshaped)
``patch_embedding.position_embeddings``             ``pos_embed`` (learned position only)
``blocks.{i}.norm1/norm2``                          ``blocks.{i}.norm1/norm2``
``blocks.{i}.attn.qkv``                             ``blocks.{i}.attn.qkv``
``blocks.{i}.attn.out_proj``                        ``blocks.{i}.attn.proj``
``blocks.{i}.mlp.linear1/linear2``                  ``blocks.{i}.mlp.0/mlp.2``
``norm`` (ViT) or ``blocks.{depth}`` (MAE)          ``norm``
==================================================  ======================================

Left out, and listed in the report: MONAI's unused ``norm_cross_attn``, the class token and
classification head, the MAE decoder. MONAI's ``qkv_bias`` defaults to False: our qkv bias is
then reported missing and stays at its zero initialisation, which computes the same function.
Prefixes such as ``vit.`` (UNETR), ``module.`` (DDP) or ``encoder.`` are stripped.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
from torch import nn

from medmim.models.export import KeyReport, apply_state, load_encoder_weights, load_state

PREFIXES = ("module.", "vit.", "encoder.", "model.", "backbone.")
_DROPPED = ("norm_cross_attn", "cls_token", "classification_head", "mask_tokens")


def is_monai_vit_state(state: dict) -> bool:
    """Whether a state dict looks like a MONAI ViT / UNETR / MAE one."""
    return any("patch_embedding.patch_embeddings" in k for k in state)


def _strip_prefix(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drop one wrapping prefix (``vit.``, ``module.`` ...) when every ViT key carries it."""
    for _ in range(3):
        for prefix in PREFIXES:
            vit_keys = [k for k in state if "patch_embedding" in k]
            if vit_keys and all(k.startswith(prefix) for k in vit_keys):
                state = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
                break
        else:
            break
    return state


def monai_vit_to_medmim(state: dict[str, torch.Tensor], target: dict[str, torch.Tensor] | None = None
                        ) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Rename a MONAI ViT/MAE state dict to medmim ViT names.

    ``target`` (our model's state dict) lets perceptron patch embeddings be reshaped to the conv
    layout. Returns ``(converted, dropped)``: ``dropped`` lists the MONAI keys with no counterpart.
    """
    state = _strip_prefix(dict(state))
    block_ids = {int(m.group(1)) for k in state if (m := re.match(r"blocks\.(\d+)\.", k))}
    # MAE keeps its final LayerNorm as the last element of `blocks` (keys blocks.N.weight/bias)
    final_norm = {i for i in block_ids if f"blocks.{i}.weight" in state and f"blocks.{i}.attn.qkv.weight" not in state}
    out: dict[str, torch.Tensor] = {}
    dropped: list[str] = []
    for key, value in state.items():
        new = None
        if key.startswith("decoder") or any(d in key for d in _DROPPED):
            dropped.append(key)
            continue
        m = re.match(r"patch_embedding\.patch_embeddings\.(1\.)?(weight|bias)$", key)
        if m:
            new = f"patch_embed.{m.group(2)}"
            if m.group(1) and m.group(2) == "weight" and target is not None and new in target:
                # perceptron: Linear over patches flattened as (p1 p2 [p3] c) -> conv (D, C, p1, p2 [, p3])
                shape = tuple(target[new].shape)
                d_out, c, *ps = shape
                value = value.reshape(d_out, *ps, c).movedim(-1, 1).contiguous()
        elif key == "patch_embedding.position_embeddings":
            new = "pos_embed"
        elif key.startswith("norm."):
            new = key
        else:
            m = re.match(r"blocks\.(\d+)\.(.*)$", key)
            if m:
                i, rest = int(m.group(1)), m.group(2)
                if i in final_norm and rest in ("weight", "bias"):
                    new = f"norm.{rest}"
                else:
                    rest = (rest.replace("attn.out_proj", "attn.proj").replace("mlp.linear1", "mlp.0")
                            .replace("mlp.linear2", "mlp.2"))
                    new = f"blocks.{i}.{rest}"
        if new is None:
            dropped.append(key)
        else:
            out[new] = value
    return out, dropped


def load_monai_vit_weights(encoder: nn.Module, path: str | Path, verbose: bool = True) -> KeyReport:
    """Load a MONAI ViT/UNETR/MAE checkpoint (.pt/.pth state dict or .safetensors) by shape-matched
    names into a medmim ViT; returns (and prints) the strict key report."""
    state = load_state(path)
    converted, dropped = monai_vit_to_medmim(state, encoder.state_dict())
    report = apply_state(encoder, converted, path)
    report.unexpected += [f"{k} (no medmim counterpart)" for k in dropped]
    if verbose:
        print(report.summary())
    return report


def load_init_weights(encoder: nn.Module, path: str | Path, verbose: bool = True) -> KeyReport:
    """Initialise ``encoder`` from a medmim export (MAE / SparK ``encoder.safetensors``), a medmim
    checkpoint, or MONAI-format ViT weights (detected from the key names)."""
    state = load_state(path)
    if is_monai_vit_state(state):
        return load_monai_vit_weights(encoder, path, verbose=verbose)
    return load_encoder_weights(encoder, path, verbose=verbose)
