"""Run set-up shared by every verb and pipeline: one call before any stage runs.

    run, data, runtime = setup_run(cfg)

joins the torchrun process group (when launched by torchrun), seeds python/numpy/torch and fixes
``run.num_threads``, creates ``<run.out_dir>/<run.name>``, reads the data (rank 0 first, so that
files it writes, e.g. phantoms, exist before the other ranks read them), records the resolved
config and the environment in the run folder, and picks the device and precision.
:func:`report_skipped` is the one skip-and-report at the end of a run.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Callable

from medmim.config import Config
from medmim.data.dataset import DataBundle, prepare_data, summarize
from medmim.train.distributed import barrier, current, init_from_env
from medmim.train.loop import Runtime
from medmim.train.rundir import RunDir, seed_everything
from medmim.train.tracking import make_tracker


def join_distributed(cfg: Config) -> None:
    """Under torchrun, join the process group (nccl on CUDA, gloo on CPU); ranks other than 0 keep
    stderr (errors) but print nothing to stdout. Without torchrun, or when joined already: nothing."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or current().enabled:
        return
    import torch

    cuda = cfg.run.device == "cuda" or (cfg.run.device == "auto" and torch.cuda.is_available())
    info = init_from_env("cuda" if cuda else "cpu")
    if not info.is_main:
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - for the life of the process


def prepare_data_rank0_first(cfg: Config) -> DataBundle:
    """Rank 0 reads (and, for phantoms, writes) the data first; the others then read what it wrote."""
    main_rank = current().is_main
    if not main_rank:
        barrier()
    data = prepare_data(cfg)
    if main_rank:
        barrier()
    return data


def setup_run(cfg: Config, *, record: bool = True) -> tuple[RunDir, DataBundle, Runtime]:
    """The run folder, the data and the runtime of ``cfg``; with ``record``, ``config.yaml`` and
    ``environment.json`` are written to the folder (rank 0 only)."""
    join_distributed(cfg)
    seed_everything(cfg.run.seed, cfg.run.num_threads)
    run = RunDir.create(Path(cfg.run.out_dir) / cfg.run.name)
    data = prepare_data_rank0_first(cfg)
    if record:
        run.save_config(cfg)
        run.save_environment(cfg.run.seed, data.fingerprint, {"data": summarize(data)})
        run.tracker = make_tracker(cfg, run.path)  # TensorBoard: runs/<name>/tb (run.tensorboard)
    return run, data, Runtime.from_config(cfg.run)


def report_skipped(data: DataBundle, run: RunDir, say: Callable[[str], None] | None = None,
                   prefix: str = "") -> Path | None:
    """Skip-and-report, the one way: unreadable files were skipped, not fatal; list them in
    ``<run>/skipped.csv`` (file, reason; rank 0 writes) and say so in one line (stderr by default)."""
    if not data.skipped:
        return None
    path = run.path / "skipped.csv"
    if run.writer:
        data.write_skipped(path)
    (say or (lambda m: print(m, file=sys.stderr)))(f"{prefix}skipped {len(data.skipped)} unreadable file(s); "
                                                    f"see {path}")
    return path
