"""torch.distributed from torchrun's environment; everything degrades to one process without it.

Batch semantics: a config's ``batch_size`` is the *global* batch of one forward/backward (summed over
ranks). The training sampler below cuts the one deterministic order of an epoch into global batches
and hands each rank its slice of every global batch, so a run on N processes sees exactly the same
batches, in the same order, as a run on one process (and a run may resume on another world size).
Evaluation uses contiguous, unpadded shards, so predictions gathered in rank order are the dataset
in its own order, each sample exactly once (``DistributedSampler`` would repeat samples to pad).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Iterator

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


# ----------------------------------------------------------------------------------------------
# samplers: one deterministic global order, sharded without padding


def _split_sizes(n: int, parts: int) -> list[int]:
    """``n`` items over ``parts`` ranks as evenly as possible, earlier ranks first."""
    return [n // parts + (1 if r < n % parts else 0) for r in range(parts)]


class GlobalBatchSampler:
    """Training batches: the epoch's order (``randperm`` seeded by ``seed + epoch``) cut into global
    batches of ``batch_size``; rank ``r`` gets the ``r``-th contiguous slice of each.

    Every rank yields the same number of batches. A rank whose slice of a (last, short) global batch
    is empty gets one stand-in sample with weight 0, so that DDP's collectives still line up.
    ``plan()`` tells the loop, per batch, how many real samples this rank holds and how many the
    global batch holds: it weights each rank's mean loss by its share, which makes gradients equal
    to the one-process gradient of the same global batch, however unevenly it was split.
    """

    def __init__(self, n: int, batch_size: int, *, shuffle: bool, seed: int, drop_last: bool,
                 rank: int = 0, world_size: int = 1):
        if batch_size < 1:
            raise ValueError("batch_size must be >= 1")
        self.n, self.batch_size, self.shuffle, self.seed = n, batch_size, shuffle, seed
        self.drop_last = drop_last and n >= batch_size
        self.rank, self.world_size = rank, world_size
        self.epoch = 0
        self._skip = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        self._skip = 0

    def skip(self, k: int) -> None:
        """The next iteration starts at batch ``k`` (a run resumed mid-epoch); no data is read for
        the skipped batches."""
        self._skip = k

    def order(self) -> list[int]:
        if self.shuffle:
            g = torch.Generator()
            g.manual_seed(self.seed + self.epoch)
            return torch.randperm(self.n, generator=g).tolist()
        return list(range(self.n))

    def global_batches(self) -> list[list[int]]:
        order = self.order()
        out = [order[i:i + self.batch_size] for i in range(0, self.n, self.batch_size)]
        if self.drop_last and out and len(out[-1]) < self.batch_size:
            out.pop()
        return out

    def _local(self, chunk: list[int]) -> tuple[list[int], int]:
        sizes = _split_sizes(len(chunk), self.world_size)
        start = sum(sizes[: self.rank])
        part = chunk[start:start + sizes[self.rank]]
        return (part, len(part)) if part else ([chunk[0]], 0)

    def plan(self) -> list[tuple[int, int]]:
        """(real samples on this rank, samples in the global batch) for every batch of the epoch."""
        return [(self._local(c)[1], len(c)) for c in self.global_batches()]

    def __iter__(self) -> Iterator[list[int]]:
        skip, self._skip = self._skip, 0
        for chunk in self.global_batches()[skip:]:
            yield self._local(chunk)[0]

    def __len__(self) -> int:
        full, rest = divmod(self.n, self.batch_size)
        return full + (1 if rest and not self.drop_last else 0)


class ShardBatchSampler:
    """Evaluation batches: rank ``r`` reads the ``r``-th contiguous shard of the data in order, no
    padding and no repeats; gathering per-rank outputs in rank order restores the dataset order."""

    def __init__(self, n: int, batch_size: int, *, rank: int = 0, world_size: int = 1):
        sizes = _split_sizes(n, world_size)
        self.start = sum(sizes[:rank])
        self.stop = self.start + sizes[rank]
        self.batch_size = max(1, batch_size)

    def set_epoch(self, epoch: int) -> None:  # order never changes
        pass

    def __iter__(self) -> Iterator[list[int]]:
        for i in range(self.start, self.stop, self.batch_size):
            yield list(range(i, min(i + self.batch_size, self.stop)))

    def __len__(self) -> int:
        return -(-(self.stop - self.start) // self.batch_size)
