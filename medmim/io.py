"""Files: atomic writes (temp file in the same folder, fsync, rename: nothing is ever half-written),
JSON lines, one CSV writer, and checkpoints loaded without executing pickled code.

Checkpoints (``.pt``) -- written atomically with a SHA-256 sidecar, loaded without executing pickled code.

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

import csv
import hashlib
import io
import json
import os
import pickle
import tempfile
import zipfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterable, Iterator

import torch

from medmim.errors import UnsafeCheckpointError


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it is fsynced and renamed onto ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        with open(tmp_path, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp_path, path)
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def write_text(path: str | os.PathLike, text: str) -> None:
    write_bytes(path, text.encode("utf-8"))


def write_json(path: str | os.PathLike, obj: Any) -> None:
    write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def append_jsonl(path: str | os.PathLike, obj: Any) -> None:
    """Append one JSON record as a line (flushed and fsynced). A last line left unfinished by a
    killed process is ended first, so that it cannot swallow this record."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    lead = ""
    if path.exists() and path.stat().st_size:
        with open(path, "rb") as fh:
            fh.seek(-1, os.SEEK_END)
            lead = "" if fh.read(1) == b"\n" else "\n"
    with open(path, "a", encoding="utf-8") as fh:
        fh.write(lead + json.dumps(obj, sort_keys=True, default=str) + "\n")
        fh.flush()
        os.fsync(fh.fileno())


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    """The JSON-object records of a JSON-lines file; blank lines, a last line cut short by a killed
    process, and lines that are not objects are ignored. A missing file reads as no records."""
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except OSError:
        return []
    out = []
    for line in lines:
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if isinstance(rec, dict):
            out.append(rec)
    return out


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


# CSV/text files medmim writes hold file names; names that are not valid UTF-8 (raw bytes on POSIX,
# kept by Python as surrogate escapes) are written back as the same bytes instead of crashing
TEXT_ENCODING = {"encoding": "utf-8", "errors": "surrogateescape"}


def write_csv(path: str | os.PathLike, rows: Iterable[dict], fields: list[str] | None = None) -> Path:
    """Write ``rows`` (dicts) as a CSV with a header, atomically. ``fields``: the columns, in order
    (default: every key of the rows in first-seen order, dict-valued keys left out); keys not in
    ``fields`` are ignored, missing ones are written empty."""
    rows = list(rows)
    if fields is None:
        fields = []
        for r in rows:
            fields += [k for k in r if k not in fields and not isinstance(r[k], dict)]
    path = Path(path)
    with atomic_path(path) as tmp:
        with open(tmp, "w", newline="", **TEXT_ENCODING) as fh:  # odd (non-UTF-8) file names survive
            w = csv.DictWriter(fh, fieldnames=fields, extrasaction="ignore")
            w.writeheader()
            w.writerows(rows)
    return path


# ---- checkpoints ---------------------------------------------------------------------------------
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
