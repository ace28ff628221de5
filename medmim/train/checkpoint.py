"""Checkpoints: written atomically with a SHA-256 sidecar, loaded without executing pickled code.

Writing ``x.pt`` (every step is an atomic rename, so a kill at any instant leaves a loadable pair):

1. the new file goes to a temp file beside it (fsynced); its hash is computed;
2. ``x.pt.sha256`` := old hash(es) + new hash (all accepted while the swap is in flight);
3. the temp file is renamed onto ``x.pt``;
4. ``x.pt.sha256`` := new hash.

Loading verifies the file against the sidecar (when there is one) and unpickles with
``weights_only=True``: tensors, numbers, strings and containers only. A file whose pickle would run
code (``__reduce__`` to ``os.system``, ``open``...) is refused with UnsafeCheckpointError before any
of it runs; so are corrupted and truncated files.
"""

from __future__ import annotations

import io
import os
import pickle
import random
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from medmim.errors import UnsafeCheckpointError
from medmim.io import sha256_file, write_text


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


def _sidecar(path: Path) -> Path:
    return path.with_name(path.name + ".sha256")


def _stale_temps(path: Path) -> list[Path]:
    return list(path.parent.glob(f".{path.name}.*.tmp"))


def save_checkpoint(obj: dict[str, Any], path: str | Path) -> Path:
    """Write ``obj`` to ``path`` so that a kill at any moment leaves the old or the new checkpoint,
    each loadable with a matching checksum (see the module docstring)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    for stale in _stale_temps(path):  # left by a process killed mid-write
        stale.unlink(missing_ok=True)
    side = _sidecar(path)
    old = side.read_text().split() if side.exists() and path.exists() else []
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as fh:
            torch.save(obj, fh)
            fh.flush()
            os.fsync(fh.fileno())
        new = sha256_file(tmp)
        write_text(side, "\n".join(dict.fromkeys(old + [new])) + "\n")
        os.replace(tmp, path)
        _fsync_dir(path.parent)
        write_text(side, new + "\n")
    finally:
        tmp.unlink(missing_ok=True)
    return path


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def verify_checkpoint(path: str | Path) -> None:
    """Raise UnsafeCheckpointError unless ``path`` matches its ``.sha256`` sidecar (if it has one)."""
    path = Path(path)
    side = _sidecar(path)
    if not side.exists():
        return
    accepted = side.read_text().split()
    if sha256_file(path) not in accepted:
        raise UnsafeCheckpointError(
            f"{path}: checksum mismatch with {side.name}: the file is corrupt, truncated or was modified; "
            f"refusing to load it")


def safe_torch_load(path: str | Path, verify: bool = True) -> Any:
    """Load tensors/containers only (``weights_only=True``); refuse pickled code and bad checksums."""
    path = Path(path)
    if not path.is_file():
        raise UnsafeCheckpointError(f"{path}: checkpoint not found")
    if verify:
        verify_checkpoint(path)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise UnsafeCheckpointError(
            f"{path}: refused to load: it carries a pickle payload beyond plain tensors and containers "
            f"(it would run code on load; {_first_line(exc)})") from None
    except (RuntimeError, EOFError, io.UnsupportedOperation, ValueError, zipfile.BadZipFile, OSError,
            KeyError, IndexError, AttributeError, TypeError) as exc:
        raise UnsafeCheckpointError(
            f"{path}: not a readable checkpoint (corrupt or truncated? {_first_line(exc)})") from None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return (text[0] if text else type(exc).__name__)[:200]
