"""Cache keys: a changed preset or geometry never reuses a stale cache.

The deterministic part of the pipeline (read, orient, resample, intensity preset, resize) is cached
by MONAI's PersistentDataset under ``data.cache_dir/<key>/``, where ``key`` hashes every config
field that changes its output plus CACHE_VERSION (bump it when the transform code changes what it
produces). Each item is further keyed (by MONAI) by its record, which carries the file's size and
modification time, so an edited file is re-read.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from medmim.io import write_json

CACHE_VERSION = 2
KEY_FIELDS = ("spatial_dims", "image_size", "resize", "orientation", "target_spacing")


def transform_config(dc, preset: str, with_mask: bool) -> dict:
    cfg = {f: getattr(dc, f) for f in KEY_FIELDS}
    return {"version": CACHE_VERSION, "preset": preset, "with_mask": bool(with_mask), **cfg}


def transform_key(dc, preset: str, with_mask: bool) -> str:
    text = json.dumps(transform_config(dc, preset, with_mask), sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def cache_dir_for(dc, preset: str, with_mask: bool) -> Path:
    """``data.cache_dir/<key>``, with the config it stands for written beside the items."""
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
