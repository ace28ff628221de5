"""Encoder weights as safetensors + a JSON sidecar, and loading them by name with a strict report."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from medmim.errors import MedmimError
from medmim.io import atomic_path, write_json

WEIGHTS_NAME = "encoder.safetensors"
SIDECAR_NAME = "encoder.json"


@dataclass
class KeyReport:
    """What happened to each parameter name when weights were loaded into a model."""

    matched: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)  # in the model, not in the file
    unexpected: list[str] = field(default_factory=list)  # in the file, not in the model
    mismatched: list[str] = field(default_factory=list)  # same name, different shape

    @property
    def ok(self) -> bool:
        return not (self.missing or self.unexpected or self.mismatched)

    def summary(self) -> str:
        lines = [
            f"weights: {len(self.matched)} matched, {len(self.missing)} missing, "
            f"{len(self.unexpected)} unexpected, {len(self.mismatched)} shape-mismatched"
        ]
        for title, keys in (("missing", self.missing), ("unexpected", self.unexpected),
                            ("shape-mismatched", self.mismatched)):
            if keys:
                shown = ", ".join(keys[:8]) + (f", ... (+{len(keys) - 8})" if len(keys) > 8 else "")
                lines.append(f"  {title}: {shown}")
        return "\n".join(lines)


def channel_metadata(data_cfg, preset: str | None) -> list[dict[str, Any]]:
    """The input channels of a run, in order, for export sidecars and model cards: ``{"name",
    "preset"}`` per channel (``data.channels``; its preset, else the run's ``preset``), or one
    grayscale ``image`` channel when none are declared."""
    from medmim.data.presets import channel_presets

    return [{"name": n, "preset": pr} for n, pr in zip(data_cfg.channel_names, channel_presets(data_cfg, preset))]


def export_encoder(encoder: nn.Module, out_dir: str | Path, meta: dict[str, Any]) -> Path:
    """Write ``encoder.safetensors`` and ``encoder.json`` (architecture and provenance) atomically.
    ``meta`` adds to the sidecar (pretraining runs record ``channels``: :func:`channel_metadata`)."""
    out_dir = Path(out_dir)
    state = {k: v.detach().cpu().contiguous() for k, v in encoder.state_dict().items()}
    sidecar = {
        "format": "medmim-encoder-v1",
        "spatial_dims": getattr(encoder, "spatial_dims", None),
        "in_channels": getattr(encoder, "in_channels", None),
        "feature_channels": list(getattr(encoder, "feature_channels", []) or []),
        "downsample_ratio": getattr(encoder, "downsample_ratio", None),
        "num_tensors": len(state),
        **meta,
    }
    weights = out_dir / WEIGHTS_NAME
    # sidecar first: a weights file never exists without its description
    write_json(out_dir / SIDECAR_NAME, sidecar)
    with atomic_path(weights) as tmp:
        save_file(state, str(tmp), metadata={"format": "medmim-encoder-v1"})
    return weights


def export_sidecar(path: str | Path) -> dict[str, Any] | None:
    """The sidecar of a medmim export (``encoder.json`` beside ``encoder.safetensors``, format
    ``medmim-encoder-v1``); ``{}`` for a medmim export whose sidecar is gone (the safetensors metadata
    says so); None for any other weights file (public layouts)."""
    import json

    path = Path(path)
    fmt = None
    if path.suffix == ".safetensors" and path.is_file():
        try:
            from safetensors import safe_open

            with safe_open(str(path), "pt") as fh:
                fmt = (fh.metadata() or {}).get("format")
        except Exception:  # noqa: BLE001 - not readable here: load_state reports it
            fmt = None
    side_path = path.with_name(SIDECAR_NAME)
    if (path.name == WEIGHTS_NAME or fmt == "medmim-encoder-v1") and side_path.is_file():
        try:
            side = json.loads(side_path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            side = None
        if isinstance(side, dict) and side.get("format") == "medmim-encoder-v1":
            return side
    return {} if fmt == "medmim-encoder-v1" else None


def check_export_channels(path: str | Path, side: dict[str, Any], file_channels: int | None, in_channels: int,
                          channel_names: list[str] | None = None) -> None:
    """Refuse, in one line naming the file, a medmim export whose input channels are not the run's:
    another count (``in_channels`` of the sidecar, else ``file_channels``, the stem's), or the same
    channels in another order. A stem is adapted to C channels only for public (RGB / grayscale)
    weights, where channel order carries no meaning; a medmim export's channels are named sequences."""
    n_file = side.get("in_channels") or file_channels
    names_file = [c.get("name") for c in side.get("channels") or [] if isinstance(c, dict)]
    names = list(channel_names or [])

    def listed(n, nm):
        return f"{n} input channel(s)" + (f" ({', '.join(map(str, nm))})" if nm else "")

    if n_file is not None and int(n_file) != int(in_channels):
        raise MedmimError(f"{path}: a medmim export for {listed(n_file, names_file)}, this run's encoder takes "
                          f"{listed(in_channels, names)}; pretrain with the same data.channels (a medmim "
                          "export's channels are not adapted)")
    if names_file and names and names_file != names and sorted(names_file) == sorted(names):
        raise MedmimError(f"{path}: a medmim export for channels {', '.join(names_file)}, this run declares "
                          f"{', '.join(names)} (another order); list data.channels in the export's order")


def load_state(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a weights file without ever executing pickled code."""
    path = Path(path)
    if not path.exists():
        raise MedmimError(f"{path}: weights file not found")
    if path.suffix == ".safetensors":
        try:
            return load_file(str(path))
        except Exception as exc:  # noqa: BLE001 - safetensors raises several types
            raise MedmimError(f"{path}: not a readable safetensors file ({exc})") from None
    from medmim.io import safe_torch_load  # weights_only, refuses pickle payloads

    obj = safe_torch_load(path)
    for key in ("encoder", "state_dict", "model"):
        if isinstance(obj, dict) and key in obj and isinstance(obj[key], dict):
            obj = obj[key]
            break
    return obj


def apply_state(model: nn.Module, state: dict[str, torch.Tensor], source: str | Path, *,
                strict: bool = False) -> KeyReport:
    """Copy the tensors of ``state`` whose name and shape match into ``model``; report the rest."""
    own = model.state_dict()
    report = KeyReport()
    usable = {}
    for key, value in state.items():
        if key not in own:
            report.unexpected.append(key)
        elif tuple(own[key].shape) != tuple(value.shape):
            report.mismatched.append(f"{key} {tuple(value.shape)}->{tuple(own[key].shape)}")
        else:
            usable[key] = value
            report.matched.append(key)
    report.missing = [k for k in own if k not in state]
    if strict and not report.ok:
        raise MedmimError(f"{source}: weights do not match the model\n{report.summary()}")
    model.load_state_dict(usable, strict=False)
    return report


def load_encoder_weights(model: nn.Module, path: str | Path, prefix: str = "",
                         strict: bool = False, verbose: bool = True) -> KeyReport:
    """Load weights by name. ``prefix`` is stripped from file keys (e.g. ``"encoder."``)."""
    state = load_state(path)
    if prefix:
        state = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    report = apply_state(model, state, path, strict=strict)
    if verbose:
        print(report.summary())
    return report
