"""The map-style side of the Loader's position protocol: :class:`MapBatches`, the batch sampler a map-style
:class:`~hf_loop.Loader` runs, which also owns the data position (the sampler's epoch and global start).

The protocol (the stream side is ``hf_loop.stream.StreamTracker``)::

    kind: str                                   # "map" | "stream", saved in the state
    has_indices: bool                           # batches come with their dataset row indices
    epoch: int
    set_epoch(epoch)                            # the next pass orders epoch `epoch` from its start
    iterate(source) -> Iterator[(indices | None, rows, batch)]   # one pass over the collated batches of `source`
    __len__() -> int                            # batches in a full epoch on this rank (TypeError for a stream)
    left(epoch=None) -> int | None              # batches the next pass yields (None for a stream)
    state_dict(consumed) -> dict                # the position after `consumed` batches of this pass
    load_state_dict(state)
    identity() -> dict                          # what identifies the data (plain JSON values)
    unpadded() -> protocol | None               # a twin without the distributed sampler's padding, if any
"""

from __future__ import annotations

import copy
import math
import warnings
from collections.abc import Iterator
from typing import Any

from hf_loop import samplers as hs


class _BatchIndices(list):
    """A batch of dataset indices that also carries ``rng_key`` = (seed, epoch, global position of its first
    example), from which MapDataset seeds a transform's random Generator. Pickles to workers with its key."""

    rng_key: tuple[int, int, int]


def strategy_name(sampler: Any) -> str:
    """The sampling strategy and its seed, e.g. "RandomSampler(seed=0)"; the DistributedSampler layer is left
    out (a run saved on 2 ranks may resume on 1)."""
    inner = getattr(sampler, "inner", sampler)
    seed = getattr(inner, "seed", None)
    return type(inner).__name__ + ("" if seed is None else f"(seed={seed})")


class MapBatches:
    """Batch sampler over an hf_loop sampler: groups an index sampler's stream into batches (or passes a batch
    sampler's batches through) and tags each batch with its rng_key; and the Loader's map-style position.

    Example:
        >>> from hf_loop.samplers import SequentialSampler
        >>> batches = MapBatches(SequentialSampler(5), batch_size=2, drop_last=False, seed=0, world_size=1)
        >>> list(batches), len(batches), batches.left()
        ([[0, 1], [2, 3], [4]], 3, 3)
    """

    kind = "map"
    has_indices = True

    def __init__(
        self,
        sampler: Any,
        batch_size: int | None,
        drop_last: bool,
        seed: int,
        *,
        world_size: int,
        dataset: Any = None,
    ) -> None:
        self.sampler = sampler
        self.batch_size = batch_size
        self.drop_last = drop_last
        self.seed = seed
        self.world_size = world_size
        self.dataset = dataset

    # --- the batch sampler DataLoader runs ---

    def _stride(self) -> tuple[int, int]:
        if isinstance(self.sampler, hs.DistributedSampler):
            return self.sampler.num_replicas, self.sampler.rank
        return 1, 0

    def __iter__(self) -> Iterator[_BatchIndices]:
        # DataLoader calls iter() more than once per epoch with workers: this must not change sampler state.
        world, rank = self._stride()
        start, epoch = getattr(self.sampler, "start", 0), getattr(self.sampler, "epoch", 0)
        for first_item, batch in self._group():
            tagged = _BatchIndices(batch)
            tagged.rng_key = (self.seed, epoch, start + first_item * world + rank)
            yield tagged

    def _group(self) -> Iterator[tuple[int, list[int]]]:
        """(position of the batch's first item in this rank's stream, the batch's indices)."""
        if hasattr(self.sampler, "items"):  # hf_loop samplers: slice one array instead of a stream of ints
            items = self.sampler.items()
            if getattr(self.sampler, "yields_batches", False):
                for k, batch in enumerate(items):
                    yield k, batch.tolist()
                return
            stop = len(items) - len(items) % self.batch_size if self.drop_last else len(items)
            for first in range(0, stop, self.batch_size):
                yield first, items[first : first + self.batch_size].tolist()
            return
        if getattr(self.sampler, "yields_batches", False):
            yield from enumerate(self.sampler)
            return
        batch: list[int] = []
        consumed = 0
        for index in self.sampler:
            batch.append(index)
            if len(batch) == self.batch_size:
                yield consumed, batch
                consumed += len(batch)
                batch = []
        if batch and not self.drop_last:
            yield consumed, batch

    def _batches(self, items: int) -> int:
        """Batches that ``items`` items of the sampler make."""
        if getattr(self.sampler, "yields_batches", False):
            return items
        return items // self.batch_size if self.drop_last else math.ceil(items / self.batch_size)

    def __len__(self) -> int:
        return self._batches(len(self.sampler))

    # --- the position protocol ---

    @property
    def epoch(self) -> int:
        return getattr(self.sampler, "epoch", 0)

    def set_epoch(self, epoch: int) -> None:
        if hasattr(self.sampler, "set_epoch"):
            self.sampler.set_epoch(epoch)

    def iterate(self, source: Iterator[Any]) -> Iterator[tuple[list[int], int, Any]]:
        """``(indices, rows, batch)`` for each collated batch of ``source``, which DataLoader (or the Loader's
        in-process fetch) produced from this batch sampler in order: the indices come from a second iteration
        over the same (epoch, start)."""
        groups = self._group()  # the batches' indices, without the rng keys the fetch needed
        for batch in source:
            _, rows = next(groups)
            yield rows, len(rows), batch

    def left(self, epoch: int | None = None) -> int:
        """Batches the next pass yields on this rank: from the current (possibly resumed) position, or from the
        start of ``epoch`` when given. Computed from the sampler, without reading data."""
        remaining = getattr(self.sampler, "remaining", None)
        if remaining is None:  # a plain torch sampler restarts every pass
            return len(self)
        return self._batches(remaining() if epoch is None else remaining(epoch, 0))

    def state_dict(self, consumed: int) -> dict[str, Any]:
        sampler = self.sampler
        if not hasattr(sampler, "state_dict"):
            raise TypeError(
                f"sampler {type(sampler).__name__} has no state_dict(), so this loader cannot be resumed; "
                "use one of hf_loop's samplers (hl.RandomSampler, hl.WeightedSampler, ...)"
            )
        items = consumed if getattr(sampler, "yields_batches", False) else consumed * self.batch_size
        state = sampler.state_dict(items)
        if self._batches(sampler.remaining(sampler.epoch, state["position"])) == 0:
            state.update(
                epoch=sampler.epoch + 1, position=0
            )  # nothing left: resume at the next epoch's start
        return {
            "kind": self.kind,
            "epoch": int(state["epoch"]),
            "batch_size": self.batch_size,
            "world_size": self.world_size,
            "sampler": state,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        saved = (state["batch_size"] or 1) * state["world_size"]
        now = (self.batch_size or 1) * self.world_size
        if saved != now:
            unit = "batches" if self.batch_size is None else "examples"
            warnings.warn(
                f"resuming with a global batch of {now} {unit} (saved with {saved}): the example order continues "
                "exactly, but optimizer steps now cover a different number of examples",
                stacklevel=3,
            )
        self.sampler.load_state_dict(state["sampler"])

    def identity(self) -> dict[str, Any]:
        """The HF dataset's content fingerprint (None for another torch dataset), its rows and columns, and the
        sampling strategy with its seed — not the world size, so elastic resume keeps matching."""
        hf = getattr(self.dataset, "ds", None)
        fingerprint = getattr(hf, "_fingerprint", None)
        return {
            "kind": self.kind,
            "fingerprint": fingerprint,
            "rows": len(self.dataset) if hasattr(self.dataset, "__len__") else None,
            "columns": list(hf.column_names) if fingerprint is not None else None,
            "strategy": strategy_name(self.sampler),
        }

    def unpadded(self) -> MapBatches | None:
        """A twin whose ranks split the data without padding (each row exactly once, shares at most one batch
        apart), at the start of the current epoch; None when there is no padding to remove."""
        sampler = self.sampler
        if not isinstance(sampler, hs.DistributedSampler) or not sampler.pad or sampler.drop_last:
            return None
        inner = copy.copy(
            sampler.inner
        )  # its own epoch and start; the drawn order stays shared and read-only
        twin = hs.DistributedSampler(inner, num_replicas=sampler.num_replicas, rank=sampler.rank, pad=False)
        twin.set_epoch(sampler.epoch)
        return MapBatches(
            twin, self.batch_size, self.drop_last, self.seed, world_size=self.world_size, dataset=self.dataset
        )
