"""Public pretrained weights: official MAE, SparK, timm and torchvision layouts -> medmim encoders.

``load_pretrained(encoder, path)`` reads a weights file (``.safetensors``, or a ``.pth``/``.pt``
loaded with ``weights_only``: no pickled code runs), recognises its layout from the key names,
renames the keys to medmim's, adapts the tensors to the encoder, loads them and prints the key
report. Layouts:

================================  =================================================================
layout                            what it is (keys, before conversion)
================================  =================================================================
``medmim``                        medmim's own exports (``encoder.safetensors``) and checkpoints
``monai-vit``                     MONAI ViT / UNETR / MaskedAutoEncoderViT (``patch_embedding.*``)
``mae``                           facebookresearch/mae ViT-B/L/H (``cls_token``, ``pos_embed``,
                                  ``patch_embed.proj``, ``blocks.N.{norm1,attn.qkv,attn.proj,norm2,
                                  mlp.fc1,mlp.fc2}``, ``norm``; pretraining files add ``mask_token``
                                  and ``decoder_*``)
``timm-vit``                      timm VisionTransformer: the same names as MAE (+ ``head``,
                                  ``fc_norm``)
``resnet``                        torchvision / timm ResNet, SparK's ResNet (``conv1``, ``bn1``,
                                  ``layerN.M.convK/bnK/downsample.{0,1}``, ``fc``)
``convnext``                      official ConvNeXt and SparK's ConvNeXt (``downsample_layers``,
                                  ``stages.N.M.{dwconv,norm,pwconv1,pwconv2,gamma}``, ``norm``,
                                  ``head``/``fc``)
``timm-convnext``                 timm ConvNeXt (``stem.{0,1}``, ``stages.N.downsample.{0,1}``,
                                  ``stages.N.blocks.M.{conv_dw,norm,mlp.fc1,mlp.fc2,gamma}``,
                                  ``head.{norm,fc}``)
================================  =================================================================

Wrappers are unwrapped first: a ``model`` / ``state_dict`` / ``module`` / ``encoder`` entry of a
checkpoint dict, and a key prefix such as ``module.``, ``encoder.``, ``backbone.`` or SparK's
``sparse_encoder.sp_cnn.`` (its ``*_withdecoder_*`` files); keys outside the encoder (decoders,
classification heads, class/mask tokens) are listed in the report as dropped.

Tensor adaptation to the encoder:

* input channels of the stem (``patch_embed`` / ``conv1`` / ``downsample_layers.0.0``): an RGB
  stem is summed over its 3 channels for a 1-channel encoder (a gray image then gives the response
  the RGB network gives to that gray image shown as RGB); for C channels (C != 3) every channel gets
  the averaged filter, sum / C (the same image on all C channels gives that response again; channel
  order carries no colour meaning in multi-sequence MRI). A 1-channel stem is repeated, divided by C.
  medmim's own exports (``encoder.json`` beside the weights) are never adapted: one made for
  other input channels (another count, or the run's channel names in another order) is refused
  in one line naming the file.
* position embeddings: prefix tokens (class, distillation, register) are dropped (medmim's ViT has
  none: it pools the patch tokens), and the grid is interpolated to the encoder's (bicubic in 2D,
  trilinear in 3D, as the ViT itself does). The embedding becomes the encoder's *learned* position
  embedding: MAE's fixed sin-cos orders the axes differently from medmim's, so replacing it with
  medmim's own would change the function the weights compute.
* ``inflate=True`` (``--inflate``): 2D weights into a 3D encoder. Every k x k conv kernel becomes
  k x k x k, repeated along the last spatial axis and divided by k (a volume that is constant along
  that axis then gives the 2D response); the ViT patch embedding likewise; a 2D position grid is
  interpolated in-plane and repeated along the last axis. The last axis is the slice axis of
  RAS-oriented volumes (medmim's default ``data.orientation``).

A load that leaves any encoder weight unset (missing, shape-mismatched, or a file weight with no
medmim counterpart, e.g. a layer scale) is an error unless ``allow_partial=True``
(``--allow-partial``). The key report is always printed.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from medmim.errors import MedmimError
from medmim.models.export import KeyReport, apply_state, check_export_channels, export_sidecar, load_state
from medmim.models.vit import resample_position_grid

LAYOUTS = ("medmim", "monai-vit", "mae", "timm-vit", "resnet", "convnext", "timm-convnext")
WRAPPER_ENTRIES = ("model", "state_dict", "module", "encoder", "teacher", "student")
WRAPPER_PREFIXES = ("module.", "sparse_encoder.sp_cnn.", "sparse_encoder.", "sp_cnn.", "encoder.", "backbone.",
                    "model.", "vit.")
STEM_KEYS = ("patch_embed.weight", "conv1.weight", "downsample_layers.0.0.weight")


@dataclass
class Conversion:
    """A state dict in medmim names, adapted to one encoder, and what happened on the way."""

    layout: str
    state: dict[str, torch.Tensor]
    dropped: list[str] = field(default_factory=list)  # file keys outside the encoder (heads, decoders, tokens)
    notes: list[str] = field(default_factory=list)


# --------------------------------------------------------------------------------------------
# reading and unwrapping
# --------------------------------------------------------------------------------------------

def read_state(path: str | Path) -> dict[str, torch.Tensor]:
    """The tensors of a weights file, wrappers (``model``/``module``/... entries) removed."""
    state = load_state(path)
    for _ in range(3):
        inner = next((state[k] for k in WRAPPER_ENTRIES if isinstance(state.get(k), dict)), None)
        if inner is None or any(isinstance(v, torch.Tensor) and k.count(".") for k, v in state.items()):
            break
        state = inner
    tensors = {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        raise MedmimError(f"{path}: no tensors found (keys: {', '.join(list(state)[:8])})")
    return tensors


def detect_layout(keys) -> str | None:
    """The layout a set of key names belongs to (None: not recognised)."""
    keys = set(keys)
    if any(k.startswith("patch_embedding.patch_embeddings") for k in keys):
        return "monai-vit"
    if "patch_embed.proj.weight" in keys or "cls_token" in keys or \
            any(re.match(r"blocks\.\d+\.mlp\.fc[12]\.", k) for k in keys):
        return "mae" if any(k.startswith(("decoder_", "mask_token")) for k in keys) else "timm-vit"
    if "patch_embed.weight" in keys and any(k.startswith("blocks.") for k in keys):
        return "medmim"
    if "stem.0.weight" in keys and any(re.match(r"stages\.\d+\.blocks\.", k) for k in keys):
        return "timm-convnext"
    if "downsample_layers.0.0.weight" in keys:
        return "medmim" if any(k.startswith("stages_.") for k in keys) else "convnext"
    if "conv1.weight" in keys and any(k.startswith("layer1.") for k in keys):
        return "resnet"
    return None


def unwrap_prefix(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Strip wrapper prefixes (``module.``, ``encoder.``, SparK's ``sparse_encoder.sp_cnn.`` ...)
    until the keys form a known layout; returns (encoder keys, keys outside that prefix)."""
    outside: list[str] = []
    for _ in range(4):
        if detect_layout(state):
            break
        for prefix in WRAPPER_PREFIXES:
            inner = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
            if inner and detect_layout(inner):
                outside += [k for k in state if not k.startswith(prefix)]
                state = inner
                break
        else:
            break
    return state, outside


# --------------------------------------------------------------------------------------------
# renaming, one function per layout: (state) -> (medmim-named state, dropped keys, n prefix tokens)
# --------------------------------------------------------------------------------------------

_VIT_BLOCK = [(r"^blocks\.(\d+)\.mlp\.fc1\.", r"blocks.\1.mlp.0."), (r"^blocks\.(\d+)\.mlp\.fc2\.", r"blocks.\1.mlp.2."),
              (r"^patch_embed\.proj\.", "patch_embed.")]
_VIT_OUTSIDE = ("cls_token", "dist_token", "reg_token", "mask_token", "head.", "head_dist.", "fc_norm.", "decoder_",
                "attn_pool.")


def _rename_timm_vit(state):
    out, dropped = {}, []
    for k, v in state.items():
        if k.startswith(_VIT_OUTSIDE):
            dropped.append(k)
            continue
        for pat, rep in _VIT_BLOCK:
            k = re.sub(pat, rep, k)
        out[k] = v
    n_prefix = sum(1 if k in ("cls_token", "dist_token") else int(state[k].shape[1]) if k == "reg_token" else 0
                   for k in state)
    return out, dropped, n_prefix


def _rename_resnet(state):
    dropped = [k for k in state if k.startswith("fc.")]
    return {k: v for k, v in state.items() if not k.startswith("fc.")}, dropped, 0


def _rename_convnext(state):
    out, dropped = {}, []
    for k, v in state.items():
        if k.startswith(("norm.", "head.", "fc.")):
            dropped.append(k)
        else:
            out[re.sub(r"^stages\.", "stages_.", k)] = v
    return out, dropped, 0


_TIMM_CONVNEXT = [(r"^stem\.0\.", "downsample_layers.0.0."), (r"^stem\.1\.", "downsample_layers.0.1."),
                  (r"^stages\.(\d+)\.downsample\.(\d)\.", r"downsample_layers.\1.\2."),
                  (r"^stages\.(\d+)\.blocks\.(\d+)\.conv_dw\.", r"stages_.\1.\2.dwconv."),
                  (r"^stages\.(\d+)\.blocks\.(\d+)\.mlp\.fc1\.", r"stages_.\1.\2.pwconv1."),
                  (r"^stages\.(\d+)\.blocks\.(\d+)\.mlp\.fc2\.", r"stages_.\1.\2.pwconv2."),
                  (r"^stages\.(\d+)\.blocks\.(\d+)\.", r"stages_.\1.\2.")]


def _rename_timm_convnext(state):
    out, dropped = {}, []
    for k, v in state.items():
        if k.startswith(("head.", "norm_pre.")):
            dropped.append(k)
            continue
        for pat, rep in _TIMM_CONVNEXT:
            new = re.sub(pat, rep, k)
            if new != k:
                k = new
                break
        out[k] = v
    return out, dropped, 0


def _rename_monai(state, target):
    from medmim.models.monai_compat import monai_vit_to_medmim

    out, dropped = monai_vit_to_medmim(state, target)
    return out, dropped, 0


_RENAME: dict[str, Callable] = {"mae": _rename_timm_vit, "timm-vit": _rename_timm_vit, "resnet": _rename_resnet,
                                "convnext": _rename_convnext, "timm-convnext": _rename_timm_convnext}


# --------------------------------------------------------------------------------------------
# tensor adaptation
# --------------------------------------------------------------------------------------------

def adapt_in_channels(weight: torch.Tensor, channels: int) -> torch.Tensor:
    """A stem weight ``(out, c_file, *k)`` for ``channels`` input channels (see the module doc)."""
    c_file = weight.shape[1]
    if c_file == channels:
        return weight
    if c_file in (1, 3):
        summed = weight.sum(dim=1, keepdim=True)
        return summed if channels == 1 else summed.repeat(1, channels, *[1] * (weight.dim() - 2)) / channels
    raise MedmimError(f"stem weight has {c_file} input channels; only 1- or 3-channel stems are adapted "
                      f"to an encoder with {channels}")


def inflate_kernel(weight: torch.Tensor, depth: int) -> torch.Tensor:
    """2D kernel ``(out, in, kh, kw)`` -> 3D ``(out, in, kh, kw, depth)``, repeated along the last
    axis and divided by ``depth``."""
    return weight.unsqueeze(-1).repeat(*[1] * weight.dim(), depth) / depth


def resize_position_grid(pos: torch.Tensor, grid: tuple[int, ...], file_dims: int) -> torch.Tensor:
    """``(1, N, D)`` patch-position embedding on a ``file_dims``-D square/cubic grid -> ``grid``
    (2D: bicubic; 3D: trilinear; 2D -> 3D: in-plane bicubic, repeated along the last axis)."""
    n, dim = pos.shape[1], pos.shape[2]
    side = round(n ** (1 / file_dims))
    if side ** file_dims != n:
        raise MedmimError(f"position embedding has {n} patch positions: not a square or cubic grid")
    if (side,) * file_dims == tuple(grid):
        return pos
    square = (side,) * file_dims
    if file_dims == 2 and len(grid) == 3:  # in-plane resample, then repeated along the last axis
        pe = resample_position_grid(pos.float(), square, grid[:2]).transpose(1, 2)
        pe = pe.reshape(1, dim, *grid[:2], 1).repeat(1, 1, 1, 1, grid[2]).flatten(2).transpose(1, 2)
    elif file_dims == len(grid):
        pe = resample_position_grid(pos.float(), square, grid)
    else:
        raise MedmimError(f"a {file_dims}D position grid cannot be fitted to a {len(grid)}D encoder")
    return pe.to(pos.dtype)


def _make_pos_embed_learned(encoder: nn.Module) -> None:
    """Turn a ViT's fixed sin-cos position buffer into a learned parameter (same values)."""
    if getattr(encoder, "pos_embed_type", "learned") == "learned":
        return
    pe = encoder.pos_embed.detach().clone()
    del encoder._buffers["pos_embed"]
    encoder._non_persistent_buffers_set.discard("pos_embed")
    encoder.pos_embed = nn.Parameter(pe)
    encoder.pos_embed_type = "learned"


# --------------------------------------------------------------------------------------------
# conversion and loading
# --------------------------------------------------------------------------------------------

def convert_state(state: dict[str, torch.Tensor], encoder: nn.Module, *, inflate: bool = False) -> Conversion:
    """Rename and adapt ``state`` (any layout above) to ``encoder``; the encoder's position
    embedding becomes learned when the file brings one (see the module doc)."""
    state, outside = unwrap_prefix(dict(state))
    layout = detect_layout(state) or "medmim"
    target = encoder.state_dict()
    if layout == "monai-vit":
        renamed, dropped, n_prefix = _rename_monai(state, target)
    elif layout in _RENAME:
        renamed, dropped, n_prefix = _RENAME[layout](state)
    else:
        renamed, dropped, n_prefix = dict(state), [], 0
    conv = Conversion(layout, {}, dropped=outside + dropped)
    d = getattr(encoder, "spatial_dims", None)
    file_dims = None
    for key in STEM_KEYS:
        if key in renamed and renamed[key].dim() >= 4:
            file_dims = renamed[key].dim() - 2

    for key, value in renamed.items():
        want = target.get(key)
        if want is not None and value.dim() == want.dim() - 1 and value.dim() == 4 and d == 3:
            if not inflate:
                raise MedmimError(f"{key}: 2D weights {tuple(value.shape)} for a 3D encoder {tuple(want.shape)}: "
                                  "pass --inflate (finetune.init_inflate=true) to inflate them to 3D")
            value = inflate_kernel(value, want.shape[-1])
        if key in STEM_KEYS and want is not None and value.dim() == want.dim() and value.shape[1] != want.shape[1]:
            conv.notes.append(f"{key}: {value.shape[1]} input channels adapted to {want.shape[1]} "
                              + ("(summed)" if want.shape[1] == 1 else f"(summed, divided by {want.shape[1]})"))
            value = adapt_in_channels(value, want.shape[1])
        if want is not None and value.dim() > want.dim() and value.numel() == want.numel():
            value = value.reshape(want.shape)  # 1x1 convs stored for linear layers (timm conv_mlp)
        conv.state[key] = value

    if "pos_embed" in conv.state and hasattr(encoder, "grid"):
        pos = conv.state["pos_embed"]
        pos = pos if pos.dim() == 3 else pos.reshape(1, -1, pos.shape[-1])
        pos = pos[:, n_prefix:]
        if n_prefix:
            conv.notes.append(f"pos_embed: {n_prefix} prefix-token position(s) dropped (no class token in medmim)")
        dims = file_dims or d
        if dims == 2 and d == 3 and not inflate:
            raise MedmimError("pos_embed: a 2D position grid for a 3D encoder: pass --inflate "
                              "(finetune.init_inflate=true)")
        side = round(pos.shape[1] ** (1 / dims))
        new = resize_position_grid(pos, tuple(encoder.grid), dims)
        if (side,) * dims != tuple(encoder.grid):
            conv.notes.append(f"pos_embed: {'x'.join([str(side)] * dims)} grid interpolated to "
                              f"{'x'.join(map(str, encoder.grid))}")
        if getattr(encoder, "pos_embed_type", "learned") != "learned":
            _make_pos_embed_learned(encoder)
            conv.notes.append("pos_embed: loaded as the encoder's learned position embedding (replaces the "
                              "fixed sin-cos one)")
        conv.state["pos_embed"] = new

    # weights whose absence changes nothing: zero biases MONAI leaves out, fresh batch-norm counters
    for key, want in encoder.state_dict().items():
        if key in conv.state:
            continue
        if key.endswith("num_batches_tracked"):
            conv.state[key] = torch.zeros_like(want)
        elif layout == "monai-vit" and key.endswith("attn.qkv.bias"):
            conv.state[key] = torch.zeros_like(want)
            if "attn.qkv.bias: zeros (MONAI's qkv_bias=False)" not in conv.notes:
                conv.notes.append("attn.qkv.bias: zeros (MONAI's qkv_bias=False)")
    return conv


def load_pretrained(encoder: nn.Module, path: str | Path, *, inflate: bool = False, allow_partial: bool = False,
                    verbose: bool = True, log: Callable[[str], None] = print,
                    channels: list[str] | None = None) -> KeyReport:
    """Load a weights file of any layout above into ``encoder``; print the key report.

    Raises MedmimError when any encoder weight stays unset (missing, shape-mismatched) or a file
    weight of the encoder has no medmim counterpart, unless ``allow_partial``. A medmim export
    (``encoder.json`` beside it) made for other input channels than the encoder's (another count,
    or ``channels``, the run's channel names, in another order) is refused: only public weights'
    stems are adapted to C channels."""
    state = read_state(path)
    side = export_sidecar(path)
    if side is not None:
        stem = next((state[k] for k in STEM_KEYS if k in state and state[k].dim() >= 3), None)
        check_export_channels(path, side, None if stem is None else int(stem.shape[1]),
                              int(getattr(encoder, "in_channels", 1)), channels)
    conv = convert_state(state, encoder, inflate=inflate)
    names_file = [c.get("name") for c in (side or {}).get("channels") or [] if isinstance(c, dict)]
    if names_file and channels and names_file != list(channels):  # same count (else refused above)
        conv.notes.append(f"channels: the export's are {', '.join(map(str, names_file))}, this run's "
                          f"{', '.join(channels)} (loaded in that order)")
    report = apply_state(encoder, conv.state, path)
    outside = set(conv.dropped)
    extra = [k for k in report.unexpected if k not in outside]
    report.unexpected = extra + [f"{k} (not part of the encoder)" for k in conv.dropped]
    lines = [f"{Path(path).name}: layout {conv.layout}", report.summary(), *[f"  note: {n}" for n in conv.notes]]
    if verbose:
        log("\n".join(lines))
    partial = report.missing or report.mismatched or extra
    if partial and not allow_partial:
        what = "; ".join(f"{len(v)} {k}" for k, v in (("missing", report.missing), ("shape-mismatched",
                         report.mismatched), ("without a medmim counterpart", extra)) if v)
        first = (report.missing + report.mismatched + extra)[0]
        raise MedmimError(f"{path}: partial load into the encoder ({what}; first: {first}). Check the encoder "
                          "settings (size, patch size, channels, 2D/3D) or pass --allow-partial "
                          "(finetune.init_allow_partial=true) to fine-tune from it anyway")
    return report
