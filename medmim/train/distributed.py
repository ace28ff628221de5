"""torch.distributed from torchrun's environment; everything degrades to one process without it.

The collectives here (sums, gathers in rank order, barriers) are what the loop and the tasks use;
each is the identity in one process. The samplers that cut batches per rank live in
:mod:`medmim.data.samplers`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def init_from_env(device_type: str = "cpu", timeout_s: float | None = None) -> DistInfo:
    """Join the process group torchrun describes (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR...).

    ``nccl`` on CUDA (after pinning this process to GPU ``LOCAL_RANK``), ``gloo`` on CPU. Without
    torchrun (no WORLD_SIZE, or 1) this does nothing and returns a one-process DistInfo.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_initialized():
        if device_type == "cuda":
            torch.cuda.set_device(local_rank)
        backend = "nccl" if device_type == "cuda" else "gloo"
        timeout = timedelta(seconds=timeout_s or float(os.environ.get("MEDMIM_DIST_TIMEOUT_S", "1800")))
        dist.init_process_group(backend=backend, timeout=timeout)
    return DistInfo(rank=dist.get_rank(), world_size=dist.get_world_size(), local_rank=local_rank)


def shutdown(sync: bool = False) -> None:
    """Leave the process group (at exit). Safe to call when none was joined.

    ``sync``: wait for every rank first (only on a normal exit, when all ranks get here), so that no
    rank tears gloo down while another still talks to it; an error path must not wait.
    """
    if dist.is_available() and dist.is_initialized():
        if sync:
            dist.barrier()
        dist.destroy_process_group()


def current() -> DistInfo:
    if dist.is_available() and dist.is_initialized():
        return DistInfo(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))
    return DistInfo()


def _comm_device(t: torch.Tensor) -> torch.device:
    """NCCL only moves CUDA tensors: CPU tensors (metric sums) go through the current GPU."""
    if dist.get_backend() == "nccl" and t.device.type != "cuda":
        return torch.device("cuda", torch.cuda.current_device())
    return t.device


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    if current().enabled:
        dev = _comm_device(t)
        out = t.detach().clone().to(dev)
        dist.all_reduce(out, op=dist.ReduceOp.SUM)
        t = out.to(t.device)
    return t


def any_rank(flag: bool) -> bool:
    """True on every rank when ``flag`` is true on at least one (collective under DDP)."""
    if not current().enabled:
        return bool(flag)
    return bool(all_reduce_sum(torch.tensor([1.0 if flag else 0.0], dtype=torch.float64)).item() > 0)


def all_gather_cat(t: torch.Tensor) -> torch.Tensor:
    """Concatenate a tensor of per-rank rows (sizes may differ) across ranks, in rank order."""
    info = current()
    if not info.enabled:
        return t
    home = t.device
    t = t.to(_comm_device(t))
    n = torch.tensor([t.shape[0]], device=t.device)
    sizes = [torch.zeros_like(n) for _ in range(info.world_size)]
    dist.all_gather(sizes, n)
    max_n = int(max(s.item() for s in sizes))
    padded = torch.zeros((max_n, *t.shape[1:]), dtype=t.dtype, device=t.device)
    padded[: t.shape[0]] = t
    chunks = [torch.zeros_like(padded) for _ in range(info.world_size)]
    dist.all_gather(chunks, padded)
    return torch.cat([c[: int(s.item())] for c, s in zip(chunks, sizes)]).to(home)


def gather_objects(obj: Any) -> list[Any]:
    """Every rank's ``obj`` in rank order (one-element list without DDP). Trusted, in-job traffic."""
    info = current()
    if not info.enabled:
        return [obj]
    out: list[Any] = [None] * info.world_size
    dist.all_gather_object(out, obj)
    return out


def barrier() -> None:
    if current().enabled:
        dist.barrier()
