"""The main-process side of a bound stream: canonical batch order, consumed positions, epoch and resume state.

The canonical order of a rank's batches is round-robin over its readers (reader 0, 1, ..., skipping readers
that ended), which is also the order torch's DataLoader delivers them in from the epoch's start. After a
resume the DataLoader starts again at worker 0 while the next canonical batch may belong to another reader,
so :meth:`StreamTracker.iterate` keeps a small per-reader buffer and always yields the canonical next batch.
Readers' short last batches ("tails") are merged here, after every reader ended, into full batches.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator
from itertools import islice
from typing import Any

from hf_loop.data import Columns, _column_len
from hf_loop.stream.reader import END, TAIL, BoundStream

_KEEP = 50_000  # consumed-position records kept per pass before the oldest are folded into a snapshot


class StreamTracker:
    """Records what each reader has delivered, so ``state_dict(consumed)`` is exact; see docs/internals.md.

    Example:
        >>> bound = stream.bind(batch_size=32, num_workers=2)                     # doctest: +SKIP
        >>> loader = DataLoader(bound, batch_size=None, num_workers=2,
        ...                     collate_fn=bound.wrap_collate(hl.PadCollator()))  # doctest: +SKIP
        >>> tracker = bound.tracker()                                            # doctest: +SKIP
        >>> for batch in tracker.iterate(iter(loader)): ...                      # doctest: +SKIP
    """

    def __init__(self, bound: BoundStream) -> None:
        self.bound = bound
        self.readers = bound.local_readers
        self.epoch = 0
        self._zero = (0,) * bound.position_size
        self._start = [self._zero] * self.readers  # where each reader starts the pass
        self._cursor = 0  # the reader whose batch comes first
        self._tails = 0  # merged tail batches already consumed
        self._reset_pass()
        self._publish(resuming=False)

    # --- epoch and resume state, published to the workers through shared memory ---

    def _publish(self, resuming: bool) -> None:
        shared = self.bound.shared
        shared[0] = self.epoch
        shared[1] = int(resuming)
        size = self.bound.position_size
        for r, position in enumerate(self._start):
            shared[2 + size * r : 2 + size * (r + 1)] = shared.new_tensor(position)

    def _reset_pass(self) -> None:
        self._base = list(self._start)
        self._base_cursor = self._cursor
        self._base_tails = self._tails
        self._base_count = 0  # records folded into _base
        self._records: deque[tuple[int, tuple[int, ...]]] = deque()
        self._finished = False

    def set_epoch(self, epoch: int) -> None:
        """Start epoch ``epoch`` from its beginning (the workers see it, persistent ones included)."""
        self.epoch = int(epoch)
        self._start = [self._zero] * self.readers
        self._cursor = self._tails = 0
        self._reset_pass()
        self._publish(resuming=False)

    def state_dict(self, consumed: int) -> dict[str, Any]:
        """The position after ``consumed`` batches of the current pass: plain ints and lists."""
        if consumed < self._base_count:
            raise ValueError(
                f"consumed={consumed} is older than the last {_KEEP} batches this pass remembers "
                f"(from batch {self._base_count} on); save the state closer to the batches just used"
            )
        if consumed > self._base_count + len(self._records):
            raise ValueError(
                f"consumed={consumed} but only {self._base_count + len(self._records)} batches "
                "were yielded this pass"
            )
        if self._finished and consumed == self._base_count + len(self._records):
            epoch, positions, cursor, tails = self.epoch + 1, [self._zero] * self.readers, 0, 0
        else:
            epoch, positions, cursor, tails = (
                self.epoch,
                list(self._base),
                self._base_cursor,
                self._base_tails,
            )
            for reader, position in islice(self._records, consumed - self._base_count):
                if reader < 0:
                    tails += 1
                else:
                    positions[reader] = position
                    cursor = (reader + 1) % self.readers
        return {
            "epoch": epoch,
            "plan": self.bound.identity(),
            "positions": [list(p) for p in positions],
            "cursor": cursor,
            "tails": tails,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from :meth:`state_dict`; the next pass yields exactly the batches not yet consumed.

        Raises:
            ValueError: the state was saved with another plan (shards, workers, world size, batch size, seed,
                ...); the message lists what differs.
        """
        mine, saved = self.bound.identity(), state.get("plan", {})
        differs = [f"{k}: saved {saved.get(k)!r}, now {mine[k]!r}" for k in mine if saved.get(k) != mine[k]]
        if differs:
            raise ValueError(
                "this stream state was saved with a different plan, so its positions do not apply: "
                + "; ".join(differs)
                + ". Resume with the same world size, num_workers, batch size and stream "
                "options (or start the epoch over)"
            )
        self.epoch = int(state["epoch"])
        self._start = [tuple(int(v) for v in p) for p in state["positions"]]
        self._cursor, self._tails = int(state["cursor"]), int(state["tails"])
        self._reset_pass()
        self._publish(resuming=True)

    # --- the pass ---

    def iterate(self, source: Iterator[tuple[Any, tuple[int, ...]]]) -> Iterator[Any]:
        """Yield the collated batches of ``source`` (a DataLoader iterator over the bound stream) in canonical
        order, recording each reader's position after each batch."""
        self._reset_pass()
        buffers: list[deque] = [deque() for _ in range(self.readers)]
        active = list(range(self.readers))
        tails: list[Any] = [None] * self.readers
        turn = self._cursor
        while active:
            reader = turn if turn in active else next((r for r in active if r > turn), active[0])
            while not buffers[reader]:
                item = next(source, None)
                if item is None:
                    raise RuntimeError(
                        f"the DataLoader ended before reader {reader} of the stream did; were the workers "
                        "restarted or the bound stream shared between loaders?"
                    )
                data, meta = item
                if meta[1] != self.epoch:
                    raise RuntimeError(f"a reader sent epoch {meta[1]} batches during epoch {self.epoch}")
                buffers[meta[0]].append((data, meta))
            data, meta = buffers[reader].popleft()
            if meta[2] == END:
                active.remove(reader)
                turn = reader + 1
                continue
            turn = reader + 1
            if meta[2] == TAIL:
                tails[reader] = data
                continue
            self._record(reader, tuple(meta[3:]))
            yield data
        yield from self._merged_tails([t for t in tails if t is not None])
        self._finished = True

    def _merged_tails(self, tails: list[dict[str, Any]]) -> Iterator[Any]:
        """The readers' short last batches (dicts of columns), concatenated in reader order and cut into full
        batches, collated here in the main process."""
        size = self.bound.batch_size
        rows = sum(_column_len(next(iter(t.values()))) for t in tails if t)
        if not rows:
            return
        names = list(tails[0])
        merged = {name: _concat([t[name] for t in tails]) for name in names}
        stop = rows - rows % size if self.bound.drop_last else rows
        for k, begin in enumerate(range(0, stop, size)):
            if k < self._tails:
                continue
            batch = Columns({n: _slice(v, begin, min(begin + size, rows)) for n, v in merged.items()})
            self._record(-1, ())
            yield self.bound.collate_fn(batch) if self.bound.collate_fn else batch

    def _record(self, reader: int, position: tuple[int, ...]) -> None:
        self._records.append((reader, position))
        if len(self._records) > 2 * _KEEP:  # fold the oldest half into the snapshot: memory stays bounded
            for _ in range(_KEEP):
                r, p = self._records.popleft()
                if r < 0:
                    self._base_tails += 1
                else:
                    self._base[r] = p
                    self._base_cursor = (r + 1) % self.readers
            self._base_count += _KEEP


def _concat(parts: list[Any]) -> Any:
    import numpy as np
    import pyarrow as pa
    import torch

    if isinstance(parts[0], (pa.Array, pa.ChunkedArray)):
        return pa.chunked_array(
            [c for p in parts for c in (p.chunks if isinstance(p, pa.ChunkedArray) else [p])],
            type=parts[0].type,
        ).combine_chunks()
    if isinstance(parts[0], np.ndarray):
        return np.concatenate(parts)
    if isinstance(parts[0], torch.Tensor):
        return torch.cat(parts)
    return [v for p in parts for v in p]


def _slice(values: Any, begin: int, end: int) -> Any:
    return values.slice(begin, end - begin) if hasattr(values, "slice") else values[begin:end]
