"""Arrow access for :class:`hf_loop.MapDataset`: the per-table cache, gathering rows with one read, and row
lengths from list offsets.

Numeric columns are gathered from zero-copy numpy views of each record batch (:class:`_NumericColumn`); the others
by ``take`` or one-row slices. ``Table.take`` is avoided: it would concatenate every chunk of a memory-mapped table.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc


class _NumericColumn:
    """Zero-copy numpy views of one numeric (or list-of-numeric) column, chunk by chunk, for gathering rows with
    per-row slices of the values: no pyarrow object per row and no concatenation of the whole chunk.

    ``twin`` names an earlier list column with the same offsets in every chunk (``attention_mask`` beside
    ``input_ids``): its row bounds are reused, and chunks whose values are all ones (checked once, the first time
    a chunk is read) need no per-row slicing at all."""

    def __init__(self, chunks: list[pa.Array], twin: str | None = None) -> None:
        self.nested = isinstance(chunks[0], (pa.ListArray, pa.LargeListArray))
        self.large = isinstance(chunks[0], pa.LargeListArray)
        self.twin = twin
        # memoryviews index to Python ints far faster than numpy scalars
        self.offsets = [memoryview(c.offsets.to_numpy()) for c in chunks] if self.nested else []
        self.values = [(c.values if self.nested else c).to_numpy() for c in chunks]
        self.dtype = self.values[0].dtype
        self.value_type = chunks[0].type.value_type if self.nested else chunks[0].type
        # the values as bytes: a row is a memoryview slice, and b"".join copies the rows in C
        self.raw = [memoryview(v.view(np.uint8)) for v in self.values] if self.nested else []
        self.scalars = [] if self.nested else [memoryview(v) for v in self.values]
        self.ones: dict[int, bool] = {}

    @staticmethod
    def usable(chunks: list[pa.Array]) -> bool:
        kind = chunks[0].type
        nested = pa.types.is_list(kind) or pa.types.is_large_list(kind)
        child = kind.value_type if nested else kind
        if not (pa.types.is_integer(child) or pa.types.is_floating(child)):
            return False
        return not any(c.null_count or (nested and c.values.null_count) for c in chunks)

    def _all_ones(self, chunks: set[int]) -> bool:
        for chunk in chunks - self.ones.keys():
            self.ones[chunk] = bool((self.values[chunk] == 1).all())
        return all(self.ones[chunk] for chunk in chunks)

    def gather(
        self, which: list[int], local: list[int], bounds: np.ndarray | None = None
    ) -> tuple[pa.Array, np.ndarray | None]:
        """The rows (chunk ``which[i]``, row ``local[i]``) as one array, and its offsets for a list column;
        ``bounds`` are the twin's offsets."""
        if not self.nested:
            return pa.array(np.array([self.scalars[b][s] for b, s in zip(which, local)], self.dtype)), None
        if bounds is not None and self._all_ones(set(which)):
            data = pa.py_buffer(np.ones(int(bounds[-1]), dtype=self.dtype))
        else:
            offsets, raw, size = self.offsets, self.raw, self.dtype.itemsize
            parts = [raw[b][offsets[b][s] * size : offsets[b][s + 1] * size] for b, s in zip(which, local)]
            bounds = np.zeros(len(parts) + 1, dtype=np.int64 if self.large else np.int32)
            np.cumsum(np.fromiter(map(len, parts), dtype=np.int64, count=len(parts)) // size, out=bounds[1:])
            data = pa.py_buffer(b"".join(parts))
        # from_buffers wraps the two numpy buffers as they are: no conversion of offsets or values
        values = pa.Array.from_buffers(self.value_type, int(bounds[-1]), [None, data])
        kind = pa.large_list(self.value_type) if self.large else pa.list_(self.value_type)
        rows = pa.Array.from_buffers(kind, len(bounds) - 1, [None, pa.py_buffer(bounds)], children=[values])
        return rows, bounds


def arrow_cache(ds: Any, source_columns: list[str]) -> dict[str, Any]:
    """The table's record batches, their row offsets, and the indices mapping as numpy (built once per
    :class:`hf_loop.MapDataset`), with a :class:`_NumericColumn` per numeric column."""
    table = ds.data.table
    if source_columns != table.column_names:
        table = table.select(source_columns)
    batches = [b for b in table.to_batches() if b.num_rows]
    offsets = np.cumsum([0] + [b.num_rows for b in batches])
    mapping = ds._indices  # the view left by select/shuffle/filter: dataset row -> table row
    index_map = None if mapping is None else mapping.column(0).to_numpy().astype(np.int64, copy=False)
    features = ds.features  # a deep copy on every access: read it once
    decode = {n for n in table.column_names if getattr(features, "_column_requires_decoding", {}).get(n)}
    numeric, lists = {}, {}
    for name in table.column_names:
        chunks = [b.column(name) for b in batches]
        if name not in decode and _NumericColumn.usable(chunks):
            nested = isinstance(chunks[0], (pa.ListArray, pa.LargeListArray))
            twin = next(
                (
                    other
                    for other, theirs in lists.items()
                    if type(theirs[0]) is type(chunks[0])
                    and all(a.offsets.equals(b.offsets) for a, b in zip(theirs, chunks))
                ),
                None,
            )
            numeric[name] = _NumericColumn(chunks, twin if nested else None)
            if nested:
                lists[name] = chunks
    return {
        "numeric": numeric,
        "table": table,
        "batches": batches,
        "offsets": offsets,
        "index_map": index_map,
        "features": features,
        "decode": decode,
    }


def read_rows(cache: dict[str, Any], rows: np.ndarray) -> dict[str, pa.Array]:
    """One read of the given table rows: a dict of single-chunk Arrow arrays, in the given order."""
    n, first = len(rows), int(rows[0]) if len(rows) else 0
    if n == 0 or (int(rows[-1]) - first == n - 1 and np.array_equal(rows, np.arange(first, first + n))):
        part = cache["table"].slice(first, n).combine_chunks()  # a contiguous run (sequential order)
        return {
            k: c.chunk(0) if c.num_chunks else pa.array([], c.type)
            for k, c in zip(part.column_names, part.columns)
        }
    # Table.take would concatenate every chunk of a memory-mapped table first. Gather only the rows asked for:
    # numeric columns from numpy views of each record batch, the others by take (one chunk) or as one-row
    # slices of their record batches.
    batches, offsets, numeric = cache["batches"], cache["offsets"], cache["numeric"]
    which = np.searchsorted(offsets, rows, side="right") - 1
    w, local = which.tolist(), (rows - offsets[which]).tolist()
    out: dict[str, pa.Array] = {}
    bounds: dict[str, np.ndarray | None] = {}
    for name, column in numeric.items():
        out[name], bounds[name] = column.gather(w, local, bounds[column.twin] if column.twin else None)
    others = [name for name in cache["table"].column_names if name not in numeric]
    if others:
        if len(batches) == 1:
            rest = pa.Table.from_batches([batches[0].select(others).take(pa.array(rows))])
        else:
            parts = [batches[b].select(others).slice(s, 1) for b, s in zip(w, local)]
            rest = pa.Table.from_batches(parts).combine_chunks()
        out.update({name: rest.column(name).chunk(0) for name in others})
    return {name: out[name] for name in cache["table"].column_names}


def arrow_lengths(column: pa.ChunkedArray | pa.Array, name: str) -> np.ndarray:
    """Row lengths of a list or string column, chunk by chunk, from offsets (nulls count as length 0).

    Example:
        >>> arrow_lengths(pa.array([[1, 2], [], None, [3]]), "input_ids").tolist()
        [2, 0, 0, 1]
    """
    chunks = column.chunks if isinstance(column, pa.ChunkedArray) else [column]
    if not chunks:
        return np.zeros(0, dtype=np.int64)
    kind = column.type
    if pa.types.is_list(kind) or pa.types.is_large_list(kind):
        parts = [np.diff(np.asarray(c.offsets, dtype=np.int64)) for c in chunks]
        lengths = np.concatenate(parts)
    elif pa.types.is_fixed_size_list(kind):
        return np.full(sum(len(c) for c in chunks), kind.list_size, dtype=np.int64)
    elif pa.types.is_string(kind) or pa.types.is_large_string(kind):
        lengths = np.concatenate([pc.utf8_length(c).to_numpy(zero_copy_only=False) for c in chunks])
    else:
        raise TypeError(
            f"lengths({name!r}): the column holds {kind}, which has no length per row; pass a list column "
            "(token ids) or a string column"
        )
    if column.null_count:  # offsets of a null row can be anything: define its length as 0
        nulls = np.concatenate([c.is_null().to_numpy(zero_copy_only=False) for c in chunks])
        lengths = np.where(nulls, 0, lengths)
    return lengths.astype(np.int64, copy=False)
