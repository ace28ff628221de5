"""Training checkpoints: the RNG states a resumed run restores.

Writing and loading ``.pt`` files (atomic, SHA-256 sidecar, ``weights_only`` unpickling that refuses
pickled code) is :func:`medmim.io.save_checkpoint` / :func:`medmim.io.safe_torch_load`; they are
re-exported here for the callers that import them from this module.
"""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import torch

from medmim.io import safe_torch_load, save_checkpoint, verify_checkpoint

__all__ = ["rng_state", "set_rng_state", "safe_torch_load", "save_checkpoint", "verify_checkpoint"]

def rng_state() -> dict[str, Any]:
    """Python, NumPy, torch CPU (and CUDA, where initialised) generator states, as plain tensors."""
    np_state = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {"key": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "cached": float(np_state[4])},
        "python": [list(x) if isinstance(x, tuple) else x for x in random.getstate()],
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state(("MT19937", n["key"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached"]))
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
