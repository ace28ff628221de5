"""The disk cache of the deterministic chain: compact shards keyed by chain config + file identity.

Layout: ``data.cache_dir/<key>/`` where ``key`` hashes every config field that changes the chain's
output plus CACHE_VERSION (bump it when the transform code changes what it produces), with
``transform_config.json`` (what the key stands for) and ``shards/``:

* ``<shard>.npy``: one float32 array, the items of up to SHARD_ITEMS records back to back;
* ``<shard>.json``: its index (item key -> offset and shape of the image, and of the mask).

An item key hashes the record's references (image, mask, series, frame) with the size and
modification time of their files (an edited file gets a new entry), or the bytes of an in-memory
array. Every stage and study cell with the same chain shares the folder: a 1 % label-fraction cell
reuses what the pretraining stage wrote. A shard is written atomically (array first, index last;
only indexed shards are read), so a killed run leaves nothing half-written; two processes that
compute the same item write it twice, which is harmless.

Items are read with ``os.pread`` at their offset, so a 100,000-image cache is never held in memory
(neither in the heap nor as mapped pages): resident memory does not grow with the image count.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
import uuid
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from medmim.io import atomic_path, write_json

CACHE_VERSION = 3
SHARD_ITEMS = 1024
KEY_FIELDS = ("spatial_dims", "image_size", "resize", "orientation", "target_spacing")
ARRAY_KEYS = ("image", "mask")
_MAX_NDIM = 5  # channel + up to 3 spatial axes (+1 spare)


def transform_config(dc, preset: str, with_mask: bool) -> dict:
    """What the chain's output depends on. Declared channels (``data.channels``) add each channel's
    name, resolved preset and series pattern, and ``data.channel_axis``; without channels the config
    (and so every existing cache folder) is what it was."""
    cfg = {f: getattr(dc, f) for f in KEY_FIELDS}
    out = {"version": CACHE_VERSION, "preset": preset, "with_mask": bool(with_mask), **cfg}
    if dc.channels:
        from medmim.data.presets import channel_entries

        out["channels"] = channel_entries(dc, preset)
        out["channel_axis"] = dc.channel_axis
    return out


def transform_key(dc, preset: str, with_mask: bool) -> str:
    text = json.dumps(transform_config(dc, preset, with_mask), sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def cache_dir_for(dc, preset: str, with_mask: bool) -> Path:
    """``data.cache_dir/<key>``, with the config it stands for written beside the shards."""
    path = Path(dc.cache_dir) / transform_key(dc, preset, with_mask)
    path.mkdir(parents=True, exist_ok=True)
    key_file = path / "transform_config.json"
    if not key_file.exists():
        write_json(key_file, transform_config(dc, preset, with_mask))
    return path


def file_stamp(ref) -> str:
    """Size and mtime of a file reference (all files of a folder); '' for in-memory arrays."""
    if not isinstance(ref, (str, Path)):
        return ""
    p = Path(str(ref).split("#", 1)[0])
    try:
        if p.is_dir():
            files = [q.stat() for q in p.rglob("*") if q.is_file()]
            return f"{len(files)}:{sum(s.st_size for s in files)}:{max((s.st_mtime_ns for s in files), default=0)}"
        st = p.stat()
        return f"{st.st_size}:{st.st_mtime_ns}"
    except OSError:
        return "missing"


def item_key(item: dict) -> str:
    """File identity of a record's item: references + file stamps, or the bytes of in-memory arrays."""
    h = hashlib.sha256()
    for k in ("image", "mask", "series_id", "frame"):
        v = item.get(k)
        if v is None or v == "":
            continue
        h.update(f"|{k}=".encode())
        if isinstance(v, (list, tuple)):  # one file per channel
            h.update(f"list {len(v)}".encode())
            for ref in v:
                h.update(f"|{ref}@{file_stamp(ref)}".encode())
        elif isinstance(v, (np.ndarray, torch.Tensor)):
            a = np.ascontiguousarray(v.numpy() if isinstance(v, torch.Tensor) else v)
            h.update(f"array {a.dtype} {a.shape}".encode())
            h.update(a.tobytes())
        else:
            h.update(str(v).encode())
            if k in ARRAY_KEYS:
                h.update(f"@{file_stamp(v)}".encode())
    return h.hexdigest()[:32]


class ShardStore:
    """The shards of one ``cache_dir_for`` folder: look items up, read them, write new shards."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.dir = self.root / "shards"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.names: list[str] = []
        self._fds: dict[tuple[int, int], int] = {}
        self._data_offset: dict[int, int] = {}

    def __getstate__(self):  # file descriptors stay in the process that opened them
        state = dict(self.__dict__)
        state["_fds"] = {}
        return state

    def _shard_id(self, name: str) -> int:
        self.names.append(name)
        return len(self.names) - 1

    def lookup(self, keys: set[str]) -> dict[str, tuple]:
        """key -> (shard id, image offset, image shape, mask offset, mask shape) for the keys cached."""
        found: dict[str, tuple] = {}
        for index in sorted(self.dir.glob("*.json")):
            if len(found) == len(keys):
                break
            try:
                meta = json.loads(index.read_text())
            except (OSError, ValueError):
                continue  # unreadable index: its items are recomputed
            if meta.get("version") != CACHE_VERSION or not (self.dir / f"{index.stem}.npy").exists():
                continue
            sid = None
            for k, entry in zip(meta["keys"], meta["entries"]):
                if k in keys and k not in found:
                    if sid is None:
                        sid = self._shard_id(index.stem)
                    found[k] = (sid, *entry)
        return found

    def write(self, entries: Sequence[tuple[str, dict]]) -> dict[str, tuple]:
        """One shard from ``(key, {"image": array, "mask": array?})``; returns their lookup entries."""
        if not entries:
            return {}
        name = f"{time.time_ns():x}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        arrays, index, offset = [], [], 0
        for _key, item in entries:
            entry = []
            for k in ARRAY_KEYS:
                a = item.get(k)
                if a is None:
                    entry += [-1, None]
                    continue
                a = np.ascontiguousarray(a.numpy() if isinstance(a, torch.Tensor) else a, dtype=np.float32)
                entry += [offset, list(a.shape)]
                arrays.append(a.reshape(-1))
                offset += a.size
            index.append(entry)
        data = np.concatenate(arrays) if arrays else np.zeros(0, np.float32)
        with atomic_path(self.dir / f"{name}.npy") as tmp:
            with open(tmp, "wb") as fh:
                np.save(fh, data)
        write_json(self.dir / f"{name}.json", {"version": CACHE_VERSION, "keys": [k for k, _ in entries],
                                               "entries": index})
        sid = self._shard_id(name)
        return {k: (sid, *e) for (k, _), e in zip(entries, index)}

    def _fd(self, sid: int) -> int:
        key = (os.getpid(), sid)
        fd = self._fds.get(key)
        if fd is None:
            path = self.dir / f"{self.names[sid]}.npy"
            fd = os.open(path, os.O_RDONLY)
            if sid not in self._data_offset:
                with open(path, "rb") as fh:
                    version = np.lib.format.read_magic(fh)
                    fmt = np.lib.format
                    (fmt.read_array_header_1_0 if version == (1, 0) else fmt.read_array_header_2_0)(fh)
                    self._data_offset[sid] = fh.tell()
            self._fds[key] = fd
        return fd

    def read(self, sid: int, offset: int, shape: Sequence[int]) -> torch.Tensor:
        """One array, read from disk at its offset (nothing stays mapped or buffered)."""
        n = int(np.prod(shape)) if len(shape) else 1
        fd = self._fd(sid)
        buf = bytearray(4 * n)
        got = os.preadv(fd, [buf], self._data_offset[sid] + 4 * int(offset))
        if got != len(buf):
            raise OSError(f"{self.dir / self.names[sid]}.npy: short read ({got} of {len(buf)} bytes)")
        return torch.from_numpy(np.frombuffer(buf, dtype=np.float32).reshape(tuple(shape)))

    def close(self) -> None:
        for fd in self._fds.values():
            try:
                os.close(fd)
            except OSError:
                pass
        self._fds.clear()


def pack_entries(entries: Sequence[tuple]) -> np.ndarray:
    """Lookup entries as one compact int64 table (shard, image offset, mask offset, ndim, shapes...)."""
    table = np.full((len(entries), 4 + 2 * _MAX_NDIM), -1, dtype=np.int64)
    for i, (sid, ioff, ishape, moff, mshape) in enumerate(entries):
        table[i, 0], table[i, 1], table[i, 2] = sid, ioff, moff
        table[i, 3] = len(ishape)
        table[i, 4:4 + len(ishape)] = ishape
        if mshape is not None:
            table[i, 4 + _MAX_NDIM:4 + _MAX_NDIM + len(mshape)] = mshape
    return table


def unpack_row(row: np.ndarray) -> tuple[int, int, tuple, int, tuple | None]:
    nd = int(row[3])
    ishape = tuple(int(s) for s in row[4:4 + nd])
    mshape = None if row[2] < 0 else tuple(int(s) for s in row[4 + _MAX_NDIM:4 + _MAX_NDIM + nd])
    return int(row[0]), int(row[1]), ishape, int(row[2]), mshape
