"""A StreamDataset bound to (rank, world size, workers, batch size): the torch IterableDataset the DataLoader runs.

Each reader (one DataLoader worker, or the main process) reads its shards of the plan as Arrow tables, cuts its
stream into windows of ``window`` examples, permutes each window from (seed, epoch, reader, window), runs the
transform once per window, groups the window's examples into batches (by length when bucketing), and yields
whole batches. Every item carries ``meta`` = (reader, epoch, kind, window, shard position, row offset, batches
done): the position to resume from after it, which the tracker in the main process records.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import pyarrow as pa
import torch
from torch.utils.data import IterableDataset, get_worker_info

from hf_loop.data import Columns, _arrow_lengths, _column_len
from hf_loop.hub import DataError
from hf_loop.stream.plan import Layout, assign, shard_counts

# item kinds: a full batch, a reader's short last batch (merged in the main process), end of the reader
BATCH, TAIL, END = 0, 1, 2
READ_ROWS = 8192  # most rows per Arrow table read from the source (one window when it fits)


class BoundStream(IterableDataset):
    """What ``StreamDataset.bind`` returns; see :class:`hf_loop.StreamDataset`."""

    def __init__(
        self,
        stream: Any,
        source: Any,
        layout: Layout,
        *,
        rank: int,
        world_size: int,
        num_workers: int,
        batch_size: int | None,
        max_tokens: int | None,
        drop_last: bool,
        window: int,
    ) -> None:
        self.stream = stream
        self.source = source
        self.layout = layout
        self.rank = rank
        self.world_size = world_size
        self.num_workers = num_workers
        self.local_readers = max(num_workers, 1)
        self.batch_size = batch_size
        self.max_tokens = max_tokens
        self.drop_last = drop_last
        self.window = window
        self.length_column = stream.bucket or ("input_ids" if max_tokens else None)
        # [epoch, resuming, then (window, shard position, row offset, batches done) per local reader]. Shared
        # memory, so persistent workers see set_epoch and load_state_dict without being restarted.
        self.shared = torch.zeros(2 + 4 * self.local_readers, dtype=torch.int64).share_memory_()
        self.collate_fn: Callable | None = None

    def identity(self) -> dict[str, Any]:
        """What a saved state must match to be resumed by this bound stream."""
        return {
            **self.layout.identity(),
            "world_size": self.world_size,
            "rank": self.rank,
            "num_workers": self.num_workers,
            "batch_size": self.batch_size,
            "max_tokens": self.max_tokens,
            "window": self.window,
            "seed": self.stream.seed,
            "shuffle": self.stream.shuffle_buffer > 0,
            "bucket": self.length_column,
        }

    def wrap_collate(self, collate_fn: Callable) -> Callable:
        """The DataLoader's collate_fn: collates a batch in the worker and passes its meta along."""
        self.collate_fn = collate_fn
        return _CollateWithMeta(collate_fn)

    def tracker(self) -> Any:
        from hf_loop.stream.tracker import StreamTracker

        return StreamTracker(self)

    # --- the reader loop (runs in a DataLoader worker, or in the main process with num_workers=0) ---

    def __iter__(self) -> Iterator[tuple[Any, tuple[int, ...]]]:
        info = get_worker_info()
        workers = 0 if info is None else info.num_workers
        if workers != self.num_workers:
            raise RuntimeError(
                f"this stream was bound for num_workers={self.num_workers} but runs in a DataLoader with "
                f"num_workers={workers}; bind it with the DataLoader's num_workers (hl.make_loader does)"
            )
        local = 0 if info is None else info.id
        epoch, resuming = int(self.shared[0]), bool(self.shared[1])
        start = tuple(self.shared[2 + 4 * local : 6 + 4 * local].tolist()) if resuming else (0, 0, 0, 0)
        yield from self._batches(local, epoch, start)
        yield None, (local, epoch, END, 0, 0, 0, 0)

    def _batches(
        self, local: int, epoch: int, start: tuple[int, ...]
    ) -> Iterator[tuple[Any, tuple[int, ...]]]:
        reader = self.rank * self.local_readers + local
        shuffle = self.stream.shuffle_buffer > 0
        units = assign(self.layout, self.stream.seed, epoch, shuffle)[reader]
        first_window, skip = start[0], start[3]
        for w, table, (pos, off), (next_pos, next_off) in self._windows(reader, units, *start[:3]):
            rng = None
            if shuffle or self.stream._with_rng:
                rng = np.random.default_rng([self.stream.seed, epoch, reader, w])
            perm = rng.permutation(table.num_rows) if shuffle else None
            columns = self.stream._columns(table, rng)
            order, groups = self._group(table.num_rows, columns, perm, rng)
            if order is not None:  # one gather for the window; each batch is then a zero-copy slice of it
                columns = {k: _take(v, order) for k, v in columns.items()}
            for b, idx in enumerate(groups):
                if w == first_window and b < skip:
                    continue  # consumed before the resume: recomputed, never collated
                size = idx.stop - idx.start
                rows = Columns({k: _take(v, idx) for k, v in columns.items()}, size)
                if self.batch_size and size < self.batch_size:
                    yield rows, (local, epoch, TAIL, w, pos, off, b)
                    continue
                after = (w, pos, off, b + 1) if b + 1 < len(groups) else (w + 1, next_pos, next_off, 0)
                yield rows, (local, epoch, BATCH, *after)

    def _windows(self, reader: int, units: list[int], w: int, pos: int, off: int) -> Iterator[tuple]:
        """(window index, its table, where it starts, where the next one starts) over this reader's stream.

        A position is (index into ``units``, row offset in that unit): enough to restart reading there."""
        pieces: list[tuple[int, np.ndarray, pa.Table]] = []  # (unit position, raw row offsets, rows)
        rows, start, end = 0, (pos, off), (pos, off)
        for p in range(pos, len(units)):
            for raw_start, table in self._read_unit(units[p], off if p == pos else 0):
                raw = np.arange(raw_start, raw_start + table.num_rows)
                end = (p, raw_start + table.num_rows)
                if self.layout.mode == "examples":  # row i of unit u belongs to reader (i + u) % readers
                    keep = np.nonzero((raw + units[p]) % self.layout.readers == reader)[0]
                    table, raw = table.take(pa.array(keep)), raw[keep]
                if table.num_rows:
                    pieces.append((p, raw, table))
                    rows += table.num_rows
                while rows >= self.window:
                    window, pieces = _cut(pieces, self.window)
                    rows -= self.window
                    following = (pieces[0][0], int(pieces[0][1][0])) if pieces else end
                    yield w, window, start, following
                    start, w = following, w + 1
        if rows:
            yield w, pa.concat_tables([t for _, _, t in pieces]).combine_chunks(), start, (len(units), 0)

    def _read_unit(self, unit: int, offset: int) -> Iterator[tuple[int, pa.Table]]:
        """Arrow tables of one shard from row ``offset`` on, each with the row index it starts at.

        Seeking in a parquet shard starts at the row group holding ``offset`` (footers give the counts), so a
        resume re-reads less than one row group before it; other formats re-read the shard up to ``offset``."""
        counts = self.layout.counts
        if counts is not None and offset >= counts[unit]:
            return
        shard = self.source.shard(num_shards=self.layout.shards, index=unit, contiguous=True)
        parts = [(shard, 0)]
        if offset > 0 and counts is not None:
            groups = shard.reshard()
            group_counts = shard_counts(groups)
            if group_counts and groups.num_shards > 1:
                bounds = np.cumsum([0, *group_counts])
                first = int(np.searchsorted(bounds, offset, side="right")) - 1
                parts = [
                    (groups.shard(num_shards=groups.num_shards, index=i, contiguous=True), int(bounds[i]))
                    for i in range(first, groups.num_shards)
                ]
        columns = self.stream.read_columns
        for part, at in parts:
            for table in part.with_format("arrow").iter(batch_size=min(self.window, READ_ROWS)):
                n = table.num_rows
                if at + n > offset:
                    if columns is not None:
                        table = table.select(columns)
                    yield max(at, offset), table.slice(max(offset - at, 0))
                at += n

    def _group(
        self, n: int, columns: dict[str, Any], perm: np.ndarray | None, rng: np.random.Generator | None
    ) -> tuple[np.ndarray | None, list[slice]]:
        """The window's row order (None: as read) and its batches as slices of that order.

        The order is ``perm`` (the window's shuffle), sorted by length when bucketing; batches are runs of a
        batch size or of a token budget, and bucketed batches are then shuffled."""
        if self.length_column is None:
            order = perm
            bounds = list(range(0, n, self.batch_size)) + [n]
        else:
            if self.length_column not in columns:
                raise DataError(
                    f"bucketing by {self.length_column!r}, but the stream's batches have no such column; "
                    f"available: {sorted(columns)}. Pass StreamDataset(bucket=<a list column>) or bucket=None"
                )
            lengths = _lengths(columns[self.length_column], self.length_column)
            base = np.arange(n) if perm is None else perm
            order = base[np.argsort(lengths[base], kind="stable")]  # ties keep the shuffled order
            if self.max_tokens is not None:
                bounds = _token_budget(lengths[order], self.max_tokens)
            else:
                bounds = list(range(0, n, self.batch_size)) + [n]
        groups = [slice(a, b) for a, b in zip(bounds[:-1], bounds[1:])]
        if perm is not None and self.length_column is not None and len(groups) > 1:
            # bucketed batches come out sorted by length: shuffle their order (a short last batch stays last)
            full = len(groups) - (
                1 if self.batch_size and groups[-1].stop - groups[-1].start < self.batch_size else 0
            )
            groups = [groups[i] for i in rng.permutation(full)] + groups[full:]
        return order, groups


class _CollateWithMeta:
    """Collate a batch in the worker; tails and end markers go to the main process uncollated."""

    def __init__(self, collate_fn: Callable) -> None:
        self.collate_fn = collate_fn

    def __call__(self, item: tuple[Any, tuple[int, ...]]) -> tuple[Any, tuple[int, ...]]:
        rows, meta = item
        if meta[2] == TAIL:  # a plain dict of columns: survives pin_memory, which rebuilds lists and tuples
            return dict(rows.columns), meta
        if meta[2] == END:
            return rows, meta
        return self.collate_fn(rows), meta


def _cut(pieces: list[tuple[int, np.ndarray, pa.Table]], size: int) -> tuple[pa.Table, list]:
    taken, rest, need = [], [], size
    for i, (p, raw, table) in enumerate(pieces):
        if need >= table.num_rows:
            taken.append(table)
            need -= table.num_rows
            if need == 0:
                rest = pieces[i + 1 :]
                break
        else:
            taken.append(table.slice(0, need))
            rest = [(p, raw[need:], table.slice(need))] + pieces[i + 1 :]
            break
    return pa.concat_tables(taken).combine_chunks(), rest


def _take(values: Any, idx: np.ndarray | slice) -> Any:
    if isinstance(idx, slice):
        return values.slice(idx.start, idx.stop - idx.start) if hasattr(values, "slice") else values[idx]
    if isinstance(values, (pa.Array, pa.ChunkedArray)):
        return values.take(pa.array(idx))
    if isinstance(values, (np.ndarray, torch.Tensor)):
        return values[idx]
    return [values[i] for i in idx.tolist()]


def _lengths(values: Any, name: str) -> np.ndarray:
    if isinstance(values, (pa.Array, pa.ChunkedArray)):
        return _arrow_lengths(values, name)
    shape = getattr(values, "shape", None)
    if shape is not None and len(shape) >= 2:
        return np.full(shape[0], shape[1], dtype=np.int64)
    return np.fromiter(map(len, values), dtype=np.int64, count=_column_len(values))


def _token_budget(sorted_lengths: np.ndarray, max_tokens: int) -> list[int]:
    """Batch boundaries over ascending lengths: as many examples as fit ``count * longest <= max_tokens``
    (an example longer than the budget gets a batch of its own). One vectorised step per batch."""
    bounds, start, n = [0], 0, len(sorted_lengths)
    while start < n:
        cost = np.arange(1, n - start + 1) * np.maximum(sorted_lengths[start:], 1)
        start += max(int(np.searchsorted(cost, max_tokens, side="right")), 1)
        bounds.append(start)
    return bounds
