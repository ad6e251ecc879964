"""Rank shards of any hf_loop sampler, positioned in the GLOBAL order so states move between world sizes."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from typing import Any

import numpy as np

from hf_loop.checks import boolean, integer
from hf_loop.samplers._base import Sampler, _stream


class DistributedSampler(Sampler):
    """Rank ``rank``'s share of any hf_loop sampler: positions rank, rank+W, rank+2W, ... of the global order.

    Every rank computes the same global order. The tail is padded by wrapping to the start of the epoch's order
    so every rank has the same length (or cut with ``drop_last``; or left uneven with ``pad=False``, where every
    example is read exactly once and shares differ by at most one item — what evaluation wants). Batch samplers
    are split by whole batches. ``start`` and the saved ``position`` are GLOBAL, so a state saved on W ranks
    loads on W' ranks (or into the bare inner sampler on one process) and continues the same global order.

    It is already rank-aware: a loader that shards again (``accelerate``'s ``BatchSamplerShard``, which the
    ``Trainer`` adds) would keep only 1/W of this share, so iterating it there is an error that names the fix.

    Example:
        >>> from hf_loop.samplers import SequentialSampler
        >>> ranks = [list(DistributedSampler(SequentialSampler(5), num_replicas=2, rank=r)) for r in (0, 1)]
        >>> ranks
        [[0, 2, 4], [1, 3, 0]]
        >>> [list(DistributedSampler(SequentialSampler(5), num_replicas=2, rank=r, pad=False)) for r in (0, 1)]
        [[0, 2, 4], [1, 3]]
    """

    def __init__(
        self, inner: Sampler, *, num_replicas: int, rank: int, drop_last: bool = False, pad: bool = True
    ) -> None:
        if isinstance(inner, DistributedSampler):
            raise TypeError("inner is already a DistributedSampler: wrap the global sampler once, not twice")
        if not isinstance(inner, Sampler):
            raise TypeError(
                f"DistributedSampler wraps an hf_loop sampler (hl.RandomSampler, hl.WeightedSampler, ...), got "
                f"{type(inner).__name__}: build the global order with one of them"
            )
        self.num_replicas = integer("num_replicas", num_replicas, 1)
        rank = integer("rank", rank, 0)
        if rank >= self.num_replicas:
            raise ValueError(
                f"rank must be in [0, {self.num_replicas}) for num_replicas={self.num_replicas}, got {rank}: pass "
                "rank=env.rank and num_replicas=env.world_size"
            )
        drop_last, pad = boolean("drop_last", drop_last), boolean("pad", pad)
        if drop_last and not pad:
            raise ValueError(
                "drop_last=True cuts every rank to the shortest share and pad=False leaves the shares uneven; "
                "choose one (pad=False for evaluation: every example exactly once)"
            )
        super().__init__(inner.n, inner.seed)
        self.inner, self.rank, self.drop_last, self.pad = inner, rank, drop_last, pad
        self.yields_batches = inner.yields_batches
        self.epoch, self.start = inner.epoch, inner.start

    def _draw(self, epoch: int) -> np.ndarray | list[np.ndarray]:
        return self.inner.order(epoch)

    def set_epoch(self, epoch: int) -> None:
        super().set_epoch(epoch)
        self.inner.set_epoch(epoch)

    def _epoch_size(self, epoch: int) -> int:
        return self.inner._epoch_size(epoch)  # the GLOBAL count

    def _share(self, count: int, rank: int | None = None) -> int:
        """Items rank ``rank`` (default: this one) gets of ``count``: rounded up (the tail wraps), down with
        ``drop_last``, or exactly its positions below ``count`` without padding."""
        if self.drop_last:
            return count // self.num_replicas
        if self.pad:
            return -(-count // self.num_replicas)
        return max(-(-(count - (self.rank if rank is None else rank)) // self.num_replicas), 0)

    def _positions(self) -> np.ndarray:
        """This rank's global positions from ``start``: wrapped past the end, or cut with ``drop_last``."""
        total = self._epoch_size(self.epoch)
        count = self._share(max(total - self.start, 0))
        positions = self.start + self.rank + self.num_replicas * np.arange(count)
        return np.where(positions < total, positions, (positions - total) % total)

    def items(self) -> np.ndarray | list[np.ndarray]:
        full, positions = self.order(self.epoch), self._positions()
        return [full[i] for i in positions] if self.yields_batches else full[positions]

    def __iter__(self) -> Iterator[Any]:
        wrapper = _sharding_caller()
        if wrapper is not None:
            raise RuntimeError(
                f"hl.DistributedSampler (rank {self.rank} of {self.num_replicas}) is iterated by "
                f"{type(wrapper).__name__}, which shards it again over {wrapper.num_processes} processes: each "
                "rank would read 1/W of its share. Give that loader the GLOBAL sampler instead (e.g. "
                "hl.RandomSampler(len(dataset), seed=...), which it splits itself), or use hl.make_loader"
            )
        return _stream(self.items(), self.yields_batches)

    def __len__(self) -> int:
        return self._share(self._epoch_size(self.epoch))

    def remaining(self, epoch: int | None = None, start: int | None = None) -> int:
        """Items THIS rank yields from the global position ``start`` of ``epoch`` (default: current)."""
        epoch = self.epoch if epoch is None else epoch
        return self._share(max(self._epoch_size(epoch) - (self.start if start is None else start), 0))

    def identity(self) -> dict[str, Any]:
        return {"kind": "DistributedSampler", "n": self.n, "seed": self.seed, "inner": self.inner.identity()}

    def _core_identity(self) -> dict[str, Any]:
        return self.inner.identity()

    def state_dict(self, consumed: int = 0) -> dict[str, Any]:
        """The GLOBAL position after this rank consumed ``consumed`` items: start + consumed x num_replicas."""
        consumed = integer("consumed", consumed, 0)
        total = self._epoch_size(self.epoch)
        position = self.start + min(consumed, len(self._positions())) * self.num_replicas
        if not self.pad:  # uneven shares: the last round is short
            position = min(position, total)
        return {**self.identity(), "world_size": self.num_replicas, "epoch": self.epoch, "position": position}


def _sharding_caller(depth: int = 6) -> Any:
    """The object iterating this sampler that splits its batches over several processes again, if any: a batch
    sampler wrapper with ``num_processes > 1`` and a ``process_index`` (accelerate's ``BatchSamplerShard``), found
    among the calling frames (torch's BatchSampler sits in between)."""
    frame = sys._getframe(2)
    for _ in range(depth):
        if frame is None:
            return None
        owner = frame.f_locals.get("self")
        processes = getattr(owner, "num_processes", None)
        if isinstance(processes, int) and processes > 1 and hasattr(owner, "process_index"):
            return owner
        frame = frame.f_back
    return None
