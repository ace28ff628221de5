"""The run directory: resolved config, environment record, metrics (JSON lines), checkpoints."""

from __future__ import annotations

import json
import platform
import random
import subprocess
import sys
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from medmim.config import Config, dump_config
from medmim.io import append_jsonl, read_jsonl, write_json, write_text
from medmim.train.distributed import current

PACKAGES = ("medmim", "torch", "monai", "numpy", "nibabel", "pydicom", "SimpleITK", "scikit-image",
            "scikit-learn", "spconv", "spconv-cu120", "spconv-cu126", "safetensors", "pydantic")


def seed_everything(seed: int, num_threads: int | None = None) -> None:
    """One seed for python, numpy and torch; fixed CPU threads so that results repeat exactly."""
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)
    if num_threads:
        torch.set_num_threads(num_threads)


def _git_commit() -> str | None:
    repo = Path(__file__).resolve().parents[2]
    try:
        out = subprocess.run(["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True, text=True,
                             timeout=5)
        dirty = subprocess.run(["git", "-C", str(repo), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    if out.returncode != 0:
        return None
    return out.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")


def environment_record(seed: int, data_fingerprint: str | None, extra: dict | None = None) -> dict[str, Any]:
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "packages": versions,
        "git_commit": _git_commit(),
        "seed": seed,
        "data_fingerprint": data_fingerprint,
        "cuda": torch.cuda.is_available(),
        "torch_threads": torch.get_num_threads(),
        "world_size": current().world_size,
        **(extra or {}),
    }


@dataclass
class RunDir:
    """A folder of one run or one stage of a run. Only rank 0 writes."""

    path: Path
    # TensorBoard events (medmim.train.tracking; set by setup_run on rank 0, passed on to children)
    tracker: Any = field(default=None, compare=False, repr=False)

    @classmethod
    def create(cls, path: str | Path) -> "RunDir":
        path = Path(path)
        if current().is_main:
            path.mkdir(parents=True, exist_ok=True)
        return cls(path)

    @property
    def writer(self) -> bool:
        return current().is_main

    def child(self, name: str) -> "RunDir":
        return RunDir(RunDir.create(self.path / name).path, self.tracker.child(name) if self.tracker else None)

    @property
    def checkpoints(self) -> Path:
        return self.path / "checkpoints"

    def save_config(self, cfg: Config) -> None:
        if self.writer:
            write_text(self.path / "config.yaml", dump_config(cfg))

    def save_environment(self, seed: int, data_fingerprint: str | None, extra: dict | None = None) -> None:
        if self.writer:
            write_json(self.path / "environment.json", environment_record(seed, data_fingerprint, extra))

    def log_metrics(self, record: dict[str, Any], tracked: dict[str, float] | None = None) -> None:
        """Append ``record`` to metrics.jsonl; the tracker (if any) also gets ``tracked`` scalars."""
        if self.writer:
            append_jsonl(self.path / "metrics.jsonl", record)
            if self.tracker is not None:
                self.tracker.log_metrics(record, tracked)

    def read_metrics(self) -> list[dict[str, Any]]:
        """The metric records; a last line cut short by a killed process is ignored."""
        return read_jsonl(self.path / "metrics.jsonl")

    def keep_metrics(self, keep: Callable[[dict[str, Any]], bool]) -> None:
        """Rewrite metrics.jsonl (atomically) with only the records ``keep`` accepts: a resumed stage
        drops what it logged after its last checkpoint, so that it is logged exactly once."""
        f = self.path / "metrics.jsonl"
        if not self.writer or not f.exists():
            return
        records = self.read_metrics()
        kept = [r for r in records if keep(r)]
        text = f.read_text()
        if len(kept) == len(records) and (not text or text.endswith("\n")) and \
                len([ln for ln in text.splitlines() if ln.strip()]) == len(records):
            return
        write_text(f, "".join(json.dumps(r, sort_keys=True, default=str) + "\n" for r in kept))

    def write_json(self, name: str, obj: Any) -> None:
        if self.writer:
            write_json(self.path / name, obj)
