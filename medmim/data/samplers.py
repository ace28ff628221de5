"""Batch samplers: one deterministic global order, sharded over ranks without padding.

Batch semantics: a config's ``batch_size`` is the *global* batch of one forward/backward (summed over
ranks). :class:`GlobalBatchSampler` cuts the one deterministic order of an epoch into global batches
and hands each rank its slice of every global batch, so a run on N processes sees exactly the same
batches, in the same order, as a run on one process (and a run may resume on another world size).
Evaluation (:class:`ShardBatchSampler`) uses contiguous, unpadded shards, so predictions gathered in
rank order are the dataset in its own order, each sample exactly once (``DistributedSampler`` would
repeat samples to pad).
"""

from __future__ import annotations

from typing import Iterator

import torch




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
