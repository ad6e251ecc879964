"""The main-process side of a bound stream: canonical batch order, consumed positions, epoch and resume state.

The canonical order of a rank's batches is round-robin over its readers (reader 0, 1, ..., skipping readers
that ended), which is also the order torch's DataLoader delivers them in from the epoch's start. After a
resume the DataLoader starts again at worker 0 while the next canonical batch may belong to another reader,
so a :class:`_Pass` keeps a small per-reader buffer and always yields the canonical next batch. Readers' short
last batches ("tails") are merged here, after every reader ended, into full batches.

:class:`StreamTracker` is the stream's side of the Loader's position protocol (``hf_loop.loader``): ``epoch``,
``set_epoch``, ``iterate``, ``left``, ``state_dict``, ``load_state_dict``, ``identity``; the map-style side is
``hf_loop.loader.MapBatches``.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator
from itertools import islice
from typing import Any

import numpy as np
import pyarrow as pa
import torch

from hf_loop.data import Columns, column_len
from hf_loop.stream.protocol import Kind, Meta, ReaderPosition
from hf_loop.stream.reader import BoundStream

_KEEP = 50_000  # consumed-position records kept per pass before the oldest are folded into a snapshot


class _Pass:
    """One pass over a DataLoader iterator of ``(collated batch, Meta)`` items, in canonical order.

    :meth:`next` returns ``(reader, rows, position, batch)`` for the next batch (reader -1 for a merged tail) or
    None at the end; :meth:`peek` looks one batch ahead (pulling from the DataLoader), so a state taken right
    after the last batch knows that the pass is over."""

    def __init__(
        self, bound: BoundStream, source: Iterator[tuple[Any, Meta]], epoch: int, cursor: int, tails_done: int
    ) -> None:
        self.bound = bound
        self.source = source
        self.epoch = epoch
        self.tails_done = tails_done
        readers = bound.local_readers
        self.buffers: list[deque] = [deque() for _ in range(readers)]
        self.active = list(range(readers))
        self.tails: list[Any] = [None] * readers
        self.turn = cursor
        self.merged: Iterator[Any] | None = None
        self.ahead: list[Any] = []  # at most one peeked item (None: the end)

    def peek(self) -> Any:
        if not self.ahead:
            self.ahead.append(self._advance())
        return self.ahead[0]

    def next(self) -> Any:
        return self.ahead.pop() if self.ahead else self._advance()

    def _advance(self) -> Any:
        while self.active:
            reader = (
                self.turn
                if self.turn in self.active
                else next((r for r in self.active if r > self.turn), self.active[0])
            )
            while not self.buffers[reader]:
                item = next(self.source, None)
                if item is None:
                    raise RuntimeError(
                        f"the DataLoader ended before reader {reader} of the stream did; were the workers "
                        "restarted or the bound stream shared between loaders?"
                    )
                data, meta = item
                if meta.epoch != self.epoch:
                    raise RuntimeError(f"a reader sent epoch {meta.epoch} batches during epoch {self.epoch}")
                self.buffers[meta.reader].append((data, meta))
            data, meta = self.buffers[reader].popleft()
            self.turn = reader + 1
            if meta.kind == Kind.END:
                self.active.remove(reader)
            elif meta.kind == Kind.TAIL:
                self.tails[reader] = data
            else:
                return reader, meta.rows, tuple(meta.position), data
        if self.merged is None:
            self.merged = _merged_tails(self.bound, [t for t in self.tails if t is not None], self.tails_done)
        return next(self.merged, None)


class StreamTracker:
    """Records what each reader has delivered, so ``state_dict(consumed)`` is exact; see docs/internals.md.

    Example:
        >>> from torch.utils.data import DataLoader
        >>> bound = stream.bind(batch_size=8, num_workers=2)
        >>> loader = DataLoader(bound, batch_size=None, num_workers=2,
        ...                     collate_fn=bound.wrap_collate(hl.PadCollator()))
        >>> tracker = StreamTracker(bound)
        >>> sum(rows for _, rows, batch in tracker.iterate(iter(loader)))   # 2 parquet files of 32 rows
        64
        >>> tracker.state_dict(consumed=8)["epoch"]     # after the pass's last batch: the next epoch's start
        1
    """

    kind = "stream"
    has_indices = False  # a stream's rows have no global index

    def __init__(self, bound: BoundStream) -> None:
        self.bound = bound
        self.readers = bound.local_readers
        self.epoch = 0
        self._zero = ReaderPosition.start(len(bound.sources)).flat()
        self._start = [self._zero] * self.readers  # where each reader starts the pass
        self._cursor = 0  # the reader whose batch comes first
        self._tails = 0  # merged tail batches already consumed
        self._pass: _Pass | None = None
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
        self._pass = None

    def set_epoch(self, epoch: int) -> None:
        """Start epoch ``epoch`` from its beginning (the workers see it, persistent ones included)."""
        self.epoch = int(epoch)
        self._start = [self._zero] * self.readers
        self._cursor = self._tails = 0
        self._reset_pass()
        self._publish(resuming=False)

    def __len__(self) -> int:
        raise TypeError(
            "a streamed dataset has no length: give the training loop max_steps (or count batches yourself)"
        )

    def left(self, epoch: int | None = None) -> None:
        """Batches the next pass yields: unknown for a stream (None)."""
        return None

    def unpadded(self) -> None:
        """A stream reads each example once: there is no padding to remove."""
        return None

    def identity(self) -> dict[str, Any]:
        """What identifies the stream's data (files and sizes, shard counts, seed, shuffle, window)."""
        return self.bound.data_identity()

    def _over(self, consumed: int) -> bool:
        """True when nothing follows the first ``consumed`` batches of this pass (looking one batch ahead)."""
        if self._finished:
            return consumed == self._base_count + len(self._records)
        return (
            consumed == self._base_count + len(self._records)
            and self._pass is not None
            and self._pass.peek() is None
        )

    def state_dict(self, consumed: int) -> dict[str, Any]:
        """The position after ``consumed`` batches of the current pass: plain ints and lists. After the pass's
        last batch (even before the iterator is exhausted) it is the start of the next epoch."""
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
        if self._over(consumed):
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

    def iterate(self, source: Iterator[tuple[Any, Meta]]) -> Iterator[tuple[None, int, Any]]:
        """``(None, rows, batch)`` for the collated batches of ``source`` (a DataLoader iterator over the bound
        stream) in canonical order, recording each reader's position after each batch. A stream has no row
        indices, hence None."""
        self._reset_pass()
        # The pass holds the DataLoader iterator (so a state can look one batch ahead) but not this tracker.
        self._pass = current = _Pass(self.bound, source, self.epoch, self._cursor, self._tails)
        while (item := current.next()) is not None:
            reader, rows, position, batch = item
            self._record(reader, position)
            yield None, rows, batch
        self._finished = True
        self._pass = None  # let the DataLoader iterator (and its workers) go

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


def _merged_tails(
    bound: BoundStream, tails: list[dict[str, Any]], done: int
) -> Iterator[tuple[int, int, tuple[()], Any]]:
    """The readers' short last batches (dicts of columns), concatenated in reader order and cut into full
    batches, collated here in the main process; the first ``done`` were consumed before a resume."""
    size = bound.batch_size
    rows = sum(column_len(next(iter(t.values()))) for t in tails if t)
    if not rows:
        return
    names = list(tails[0])
    merged = {name: _concat([t[name] for t in tails]) for name in names}
    stop = rows - rows % size if bound.drop_last else rows
    for k, begin in enumerate(range(0, stop, size)):
        if k < done:
            continue
        end = min(begin + size, rows)
        batch = Columns({n: _slice(v, begin, end) for n, v in merged.items()})
        yield -1, end - begin, (), bound.collate_fn(batch) if bound.collate_fn else batch


def _concat(parts: list[Any]) -> Any:
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
