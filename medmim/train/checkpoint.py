"""Checkpoints: written atomically with a SHA-256 sidecar, loaded without executing pickled code."""

from __future__ import annotations

import io
import pickle
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from medmim.errors import UnsafeCheckpointError
from medmim.io import atomic_path, sha256_file, write_text


def rng_state() -> dict[str, Any]:
    np_state = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "numpy": {"key": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "cached": float(np_state[4])},
        "python": [list(x) if isinstance(x, tuple) else x for x in random.getstate()],
    }


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state(("MT19937", n["key"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached"]))
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))


def save_checkpoint(obj: dict[str, Any], path: str | Path) -> Path:
    """torch.save to a temp file, fsync, rename; then the checksum sidecar (also atomic)."""
    path = Path(path)
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)
    write_text(path.with_name(path.name + ".sha256"), sha256_file(path) + "\n")
    return path


def safe_torch_load(path: str | Path, verify: bool = True) -> Any:
    """Load tensors/containers only (``weights_only=True``); refuse pickled code and bad checksums."""
    path = Path(path)
    side = path.with_name(path.name + ".sha256")
    if verify and side.exists():
        expected = side.read_text().strip()
        if sha256_file(path) != expected:
            raise UnsafeCheckpointError(f"{path}: checksum mismatch (file is corrupt or was modified)")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise UnsafeCheckpointError(
            f"{path}: refused to load: it carries a pickle payload beyond plain tensors "
            f"({str(exc).splitlines()[0][:160]})") from None
    except (RuntimeError, EOFError, io.UnsupportedOperation, ValueError) as exc:
        raise UnsafeCheckpointError(f"{path}: not a readable checkpoint ({str(exc).splitlines()[0][:160]})") from None
