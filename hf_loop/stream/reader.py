"""A StreamDataset bound to (rank, world size, workers, batch size): the IterableDataset a DataLoader runs.

Each reader (one DataLoader worker, or the main process) reads its pieces of the plan as Arrow tables, cuts
its stream into windows of ``window`` examples (drawn from several sources by weight when mixing), permutes
each window from (seed, epoch, reader, window), runs the transform once per window, groups the window's
examples into batches (by length when bucketing), and yields whole batches. Every item carries a
:class:`~hf_loop.stream.protocol.Meta`: its kind, its rows, and for a batch the reader's position after it,
which the tracker in the main process records.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import torch
from torch.utils.data import IterableDataset, get_worker_info

from hf_loop.data import BatchTransform, Columns, arrow_lengths, column_len
from hf_loop.errors import DataError
from hf_loop.stream.files import source_identity
from hf_loop.stream.protocol import Kind, Meta, ReaderPosition
from hf_loop.stream.source import Cursor, Source

READ_ROWS = 8192  # most rows per Arrow table read from the source (one window when it fits)


@dataclass(frozen=True)
class ReadOptions:
    """What a reader needs from the :class:`~hf_loop.StreamDataset` it was bound from (and nothing else)."""

    batch_transform: BatchTransform
    features: Any  # the source's features: images and audio are decoded for a transform
    seed: int
    shuffle: bool
    weights: tuple[float, ...] | None  # mixing weights (None: one source)
    bucket: str | None


class BoundStream(IterableDataset):
    """What ``StreamDataset.bind`` returns; see :class:`hf_loop.StreamDataset`.

    A reader's position is a :class:`~hf_loop.stream.protocol.ReaderPosition`."""

    def __init__(
        self,
        options: ReadOptions,
        sources: list[Source],
        *,
        rank: int,
        world_size: int,
        num_workers: int,
        batch_size: int | None,
        max_tokens: int | None,
        drop_last: bool,
        window: int,
    ) -> None:
        self.options = options
        self.sources = sources
        self.rank = rank
        self.world_size = world_size
        self.num_workers = num_workers
        self.local_readers = max(num_workers, 1)
        self.batch_size = batch_size
        self.max_tokens = max_tokens
        self.drop_last = drop_last
        self.window = window
        self.length_column = options.bucket or ("input_ids" if max_tokens else None)
        self.position_size = ReaderPosition.size(len(sources))
        # [epoch, resuming, then one position per local reader]. Shared memory, so persistent workers see
        # set_epoch and load_state_dict without being restarted.
        self.shared = torch.zeros(
            2 + self.position_size * self.local_readers, dtype=torch.int64
        ).share_memory_()
        self.collate_fn: Callable | None = None

    def identity(self) -> dict[str, Any]:
        """What a saved state must match to be resumed by this bound stream."""
        layouts = [source.layout.identity() for source in self.sources]
        if len(layouts) == 1:
            plan = layouts[0]
        else:
            plan = {key: [lay[key] for lay in layouts] for key in layouts[0]}
            plan["weights"] = list(self.options.weights)
        return {
            **plan,
            "world_size": self.world_size,
            "rank": self.rank,
            "num_workers": self.num_workers,
            "batch_size": self.batch_size,
            "max_tokens": self.max_tokens,
            "window": self.window,
            "seed": self.options.seed,
            "shuffle": self.options.shuffle,
            "bucket": self.length_column,
        }

    def data_identity(self) -> dict[str, Any]:
        """What identifies the data and its order, independent of the topology (for checkpoint resume checks)."""
        return {
            "kind": "stream",
            "sources": [
                {**source_identity(s.ds), "counts": s.layout.counts, "units": s.layout.shards}
                for s in self.sources
            ],
            "weights": None if self.options.weights is None else list(self.options.weights),
            "seed": self.options.seed,
            "shuffle": self.options.shuffle,
            "window": self.window,
            "bucket": self.length_column,
        }

    def wrap_collate(self, collate_fn: Callable) -> Callable:
        """The DataLoader's collate_fn: collates a batch in the worker and passes its meta along."""
        self.collate_fn = collate_fn
        return _CollateWithMeta(collate_fn)

    # --- the reader loop (runs in a DataLoader worker, or in the main process with num_workers=0) ---

    def __iter__(self) -> Iterator[tuple[Any, Meta]]:
        info = get_worker_info()
        workers = 0 if info is None else info.num_workers
        if workers != self.num_workers:
            raise RuntimeError(
                f"this stream was bound for num_workers={self.num_workers} but runs in a DataLoader with "
                f"num_workers={workers}; bind it with the DataLoader's num_workers (hl.make_loader does)"
            )
        local = 0 if info is None else info.id
        epoch, resuming = int(self.shared[0]), bool(self.shared[1])
        size = self.position_size
        start = None
        if resuming:
            start = ReaderPosition.from_flat(self.shared[2 + size * local : 2 + size * (local + 1)].tolist())
        yield from self._batches(local, epoch, start)
        yield None, Meta(local, epoch, Kind.END)

    def _batches(
        self, local: int, epoch: int, start: ReaderPosition | None = None
    ) -> Iterator[tuple[Any, Meta]]:
        """This reader's items from ``start`` (a recorded position; None: the epoch's beginning)."""
        start = start or ReaderPosition.start(len(self.sources))
        reader = self.rank * self.local_readers + local
        options = self.options
        for w, table, begin, following in self._windows(reader, epoch, start):
            rng = None
            if options.shuffle or options.batch_transform.takes_rng:
                rng = np.random.default_rng([options.seed, epoch, reader, w])
            perm = rng.permutation(table.num_rows) if options.shuffle else None
            columns = self._window_columns(table, rng)
            order, groups = self._group(table.num_rows, columns, perm, rng)
            if order is not None:  # one gather for the window; each batch is then a zero-copy slice of it
                columns = {k: _take(v, order) for k, v in columns.items()}
            for b, idx in enumerate(groups):
                if w == start.window and b < start.batch:
                    continue  # consumed before the resume: recomputed, never collated
                size = idx.stop - idx.start
                rows = Columns.of({k: _take(v, idx) for k, v in columns.items()}, size)  # window-checked
                if self.batch_size and size < self.batch_size:
                    yield rows, Meta(local, epoch, Kind.TAIL, size)
                    continue
                # ReaderPosition(w, begin, b + 1).flat(), or the next window's start after the last batch
                after = (w, *begin, b + 1) if b + 1 < len(groups) else (w + 1, *following, 0)
                yield rows, Meta(local, epoch, Kind.BATCH, size, after)

    def _window_columns(self, table: pa.Table, rng: np.random.Generator | None) -> dict[str, Any]:
        """One window's columns: Arrow arrays, or the transform's output (called once for the window); renamed
        and selected."""
        bt = self.options.batch_transform
        if bt.transform is None:
            return bt.select(bt.rename({name: _one_array(table.column(name)) for name in table.column_names}))
        batch = table.to_pydict()
        features = self.options.features
        for name, needs in (getattr(features, "_column_requires_decoding", None) or {}).items():
            if needs and name in batch:  # images, audio: decoded as set_transform would
                batch[name] = features.decode_column(batch[name], name)
        return bt(batch, table.num_rows, rng)

    def _windows(self, reader: int, epoch: int, start: ReaderPosition) -> Iterator[tuple]:
        """(window index, its rows, where it starts, where the next one starts) over this reader's stream; the
        starts are the flat (piece index, row offset) pairs of every source.

        With several sources, each window takes from each source a share drawn from (seed, epoch, reader,
        window) with the sources' weights; a source that runs dry hands its share to the others."""
        read_rows = min(self.window, READ_ROWS)
        seed, shuffle = self.options.seed, self.options.shuffle
        cursors = [
            Cursor(src, src.pieces(reader, seed, epoch, shuffle), reader, pos, off, read_rows)
            for src, (pos, off) in zip(self.sources, start.sources)
        ]
        w = start.window
        while True:
            for cursor in cursors:
                cursor.probe()
            begin = tuple(v for cursor in cursors for v in cursor.position)  # flat, as ReaderPosition.flat()
            if len(cursors) == 1:
                tables = cursors[0].take(self.window)
            else:
                tables = self._mixed(cursors, np.random.default_rng([seed, epoch, reader, w, 1]))
            rows = sum(t.num_rows for t in tables)
            if not rows:
                return
            following = tuple(v for cursor in cursors for v in cursor.position)
            yield w, pa.concat_tables(tables, promote_options="default").combine_chunks(), begin, following
            if rows < self.window:
                return
            w += 1

    def _mixed(self, cursors: list[Cursor], rng: np.random.Generator) -> list[pa.Table]:
        weights = np.asarray(self.options.weights, dtype=float)
        want, tables = self.window, []
        active = [i for i, c in enumerate(cursors) if not c.drained and weights[i] > 0]
        while want and active:
            counts = rng.multinomial(want, weights[active] / weights[active].sum())
            for i, k in zip(active, counts.tolist()):
                got = cursors[i].take(k) if k else []
                tables += got
                want -= sum(t.num_rows for t in got)
            active = [i for i in active if not cursors[i].drained]
        return tables

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

    def __call__(self, item: tuple[Any, Meta]) -> tuple[Any, Meta]:
        rows, meta = item
        if (
            meta.kind == Kind.TAIL
        ):  # a plain dict of columns: survives pin_memory, which rebuilds lists and tuples
            return dict(rows.columns), meta
        if meta.kind == Kind.END:
            return rows, meta
        return self.collate_fn(rows), meta


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
        return arrow_lengths(values, name)
    shape = getattr(values, "shape", None)
    if shape is not None and len(shape) >= 2:
        return np.full(shape[0], shape[1], dtype=np.int64)
    return np.fromiter(map(len, values), dtype=np.int64, count=column_len(values))


def _one_array(column: pa.ChunkedArray) -> pa.Array:
    # combine_chunks copies even a single chunk
    return column.chunk(0) if column.num_chunks == 1 else column.combine_chunks()


def _token_budget(sorted_lengths: np.ndarray, max_tokens: int) -> list[int]:
    """Batch boundaries over ascending lengths: as many examples as fit ``count * longest <= max_tokens``
    (an example longer than the budget gets a batch of its own). One vectorised step per batch."""
    bounds, start, n = [0], 0, len(sorted_lengths)
    while start < n:
        cost = np.arange(1, n - start + 1) * np.maximum(sorted_lengths[start:], 1)
        start += max(int(np.searchsorted(cost, max_tokens, side="right")), 1)
        bounds.append(start)
    return bounds
