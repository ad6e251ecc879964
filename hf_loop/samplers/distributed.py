"""Rank shards of any hf_loop sampler, positioned in the GLOBAL order so states move between world sizes."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np

from hf_loop.samplers._base import Sampler, _count, _stream


class DistributedSampler(Sampler):
    """Rank ``rank``'s share of any hf_loop sampler: positions rank, rank+W, rank+2W, ... of the global order.

    Every rank computes the same global order. The tail is padded by wrapping to the start of the epoch's order
    so every rank has the same length (or cut with ``drop_last``). Batch samplers are split by whole batches.
    ``start`` and the saved ``position`` are GLOBAL, so a state saved on W ranks loads on W' ranks (or into the
    bare inner sampler on one process) and continues the same global order.

    Example:
        >>> from hf_loop.samplers import SequentialSampler
        >>> ranks = [list(DistributedSampler(SequentialSampler(5), num_replicas=2, rank=r)) for r in (0, 1)]
        >>> ranks
        [[0, 2, 4], [1, 3, 0]]
    """

    def __init__(self, inner: Sampler, *, num_replicas: int, rank: int, drop_last: bool = False) -> None:
        if isinstance(inner, DistributedSampler):
            raise TypeError("inner is already a DistributedSampler: wrap the global sampler once, not twice")
        if not isinstance(inner, Sampler):
            raise TypeError(
                f"DistributedSampler wraps an hf_loop sampler (hl.RandomSampler, hl.WeightedSampler, ...), got "
                f"{type(inner).__name__}: build the global order with one of them"
            )
        self.num_replicas = _count(num_replicas, "num_replicas", 1)
        rank = _count(rank, "rank", 0)
        if rank >= self.num_replicas:
            raise ValueError(
                f"rank must be in [0, {self.num_replicas}) for num_replicas={self.num_replicas}, got {rank}: pass "
                "rank=env.rank and num_replicas=env.world_size"
            )
        super().__init__(inner.n, inner.seed)
        self.inner, self.rank, self.drop_last = inner, rank, bool(drop_last)
        self.yields_batches = inner.yields_batches
        self.epoch, self.start = inner.epoch, inner.start

    def _draw(self, epoch: int) -> np.ndarray | list[np.ndarray]:
        return self.inner.order(epoch)

    def set_epoch(self, epoch: int) -> None:
        super().set_epoch(epoch)
        self.inner.set_epoch(epoch)

    def _epoch_size(self, epoch: int) -> int:
        return self.inner._epoch_size(epoch)  # the GLOBAL count

    def _share(self, count: int) -> int:
        """Items each rank gets of ``count``: rounded up (the tail wraps), or down with ``drop_last``."""
        return count // self.num_replicas if self.drop_last else -(-count // self.num_replicas)

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
        return _stream(self.items(), self.yields_batches)

    def __len__(self) -> int:
        return self._share(self._epoch_size(self.epoch))

    def identity(self) -> dict[str, Any]:
        return {"kind": "DistributedSampler", "n": self.n, "seed": self.seed, "inner": self.inner.identity()}

    def _core_identity(self) -> dict[str, Any]:
        return self.inner.identity()

    def state_dict(self, consumed: int = 0) -> dict[str, Any]:
        """The GLOBAL position after this rank consumed ``consumed`` items: start + consumed x num_replicas."""
        consumed = _count(consumed, "consumed", 0)
        position = self.start + min(consumed, len(self._positions())) * self.num_replicas
        return {**self.identity(), "world_size": self.num_replicas, "epoch": self.epoch, "position": position}
