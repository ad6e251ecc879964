"""Reading one streamed source: a shard's rows from a start to a stop (``Source``), and one reader's cursor over
its pieces (``Cursor``), which hands out rows in order and can always say where it stands."""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator
from typing import Any

import numpy as np
import pyarrow as pa

from hf_loop.stream.files import shard_counts
from hf_loop.stream.plan import Layout, Piece, assign


class Source:
    """A streamed dataset cut by its layout (whole shards, row groups or examples) for ``layout.readers``."""

    def __init__(self, ds: Any, layout: Layout, index: int, columns: list[str] | None) -> None:
        self.ds = ds.with_format("arrow")  # formatted once: .iter() then yields Arrow tables
        self.layout = layout
        self.index = index  # position among mixed sources (0 for a single stream)
        self.columns = columns  # pushed down when there is no transform
        self._groups: dict[int, tuple[Any, list[int]]] = {}  # shard -> its row groups and their counts

    def pieces(self, reader: int, seed: int, epoch: int, shuffle: bool) -> list[Piece]:
        return assign(self.layout, seed, epoch, shuffle, source=self.index)[reader]

    def read_unit(
        self, unit: int, offset: int, read_rows: int, stop: int | None = None
    ) -> Iterator[tuple[int, pa.Table]]:
        """Arrow tables of one shard from row ``offset`` up to row ``stop`` (None: its end), each with the row
        index it starts at.

        Seeking in a parquet shard starts at the row group holding ``offset`` (footers give the counts), so a
        resume re-reads less than one row group before it; other formats re-read the shard up to ``offset``.
        The shard is driven through ``.shard()`` and ``.iter()``, never through the dataset's ``__iter__``
        (which would split it by DataLoader worker a second time)."""
        counts = self.layout.counts
        end = counts[unit] if counts is not None else None
        stop = end if stop is None else stop
        if stop is not None and offset >= stop:
            return
        shard = self.ds.shard(num_shards=self.layout.shards, index=unit, contiguous=True)
        parts = [(shard, 0)]
        if offset > 0 and counts is not None:
            groups, group_counts = self._row_groups(unit, shard)
            if group_counts and groups.num_shards > 1:
                bounds = np.cumsum([0, *group_counts])
                first = int(np.searchsorted(bounds, offset, side="right")) - 1
                parts = [
                    (groups.shard(num_shards=groups.num_shards, index=i, contiguous=True), int(bounds[i]))
                    for i in range(first, groups.num_shards)
                ]
        for part, at in parts:
            for table in part.iter(batch_size=read_rows):
                n = table.num_rows
                if at + n > offset:
                    if self.columns is not None:
                        table = table.select(self.columns)
                    begin = max(at, offset)
                    table = table.slice(begin - at, n if stop is None else min(stop, at + n) - begin)
                    if table.num_rows:
                        yield begin, table
                at += n
                if stop is not None and at >= stop:
                    return

    def _row_groups(self, unit: int, shard: Any) -> tuple[Any, list[int] | None]:
        """A shard split into its parquet row groups, and their counts (footers read once per shard)."""
        if unit not in self._groups:
            groups = shard.reshard()
            self._groups[unit] = (groups, shard_counts(groups))
        return self._groups[unit]


class Cursor:
    """One reader's place in one source: its pieces for the epoch, read in order from (piece index, row).

    ``position`` is where the next row not yet taken starts, as (index into the reader's pieces, row offset in
    that piece's shard) — enough to restart reading there after a resume."""

    def __init__(
        self, source: Source, pieces: list[Piece], reader: int, pos: int, off: int, read_rows: int
    ) -> None:
        self.source = source
        self.pieces = pieces
        self.reader = reader
        self.read_rows = read_rows
        self._pieces: deque[tuple[int, np.ndarray, pa.Table]] = deque()  # (shard position, raw rows, rows)
        self._rows = 0
        self._end = (pos, off)  # just after the last row read from the source
        self._reads = self._read(pos, off)
        self._exhausted = False

    def _read(self, pos: int, off: int) -> Iterator[tuple[int, np.ndarray, pa.Table, tuple[int, int]]]:
        layout = self.source.layout
        for p in range(pos, len(self.pieces)):
            unit, start, stop = self.pieces[p]
            first = max(off, start) if p == pos else start
            for raw_start, table in self.source.read_unit(unit, first, self.read_rows, stop):
                raw = np.arange(raw_start, raw_start + table.num_rows)
                end = (p, raw_start + table.num_rows)
                if layout.mode == "examples":  # row i of shard u belongs to reader (i + u) % readers
                    keep = np.nonzero((raw + unit) % layout.readers == self.reader)[0]
                    table, raw = table.take(pa.array(keep)), raw[keep]
                yield p, raw, table, end

    def _pull(self, rows: int) -> None:
        while self._rows < rows and not self._exhausted:
            item = next(self._reads, None)
            if item is None:
                self._exhausted = True
                self._end = (len(self.pieces), 0)
                break
            p, raw, table, self._end = item
            if table.num_rows:
                self._pieces.append((p, raw, table))
                self._rows += table.num_rows

    @property
    def drained(self) -> bool:
        """True once every row was taken (after :meth:`probe` or a short :meth:`take`)."""
        return self._exhausted and not self._rows

    @property
    def position(self) -> tuple[int, int]:
        if self._pieces:
            p, raw, _ = self._pieces[0]
            return p, int(raw[0])
        return self._end

    def probe(self) -> None:
        """Read ahead until a row is buffered or the source is done, so ``drained`` depends on the data only
        (not on how far an earlier window happened to read)."""
        self._pull(1)

    def take(self, n: int) -> list[pa.Table]:
        """The next ``n`` rows (fewer only when the source is done), as a list of tables."""
        self._pull(n)
        out: list[pa.Table] = []
        while n and self._pieces:
            p, raw, table = self._pieces.popleft()
            if table.num_rows > n:
                self._pieces.appendleft((p, raw[n:], table.slice(n)))
                table = table.slice(0, n)
            out.append(table)
            n -= table.num_rows
            self._rows -= table.num_rows
        return out
