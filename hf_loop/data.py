"""Map-style adapter: a Hugging Face ``datasets.Dataset`` as a fast torch ``Dataset``.

A batch is fetched with ONE Arrow read and transformed with ONE call (``set_transform`` semantics), and arrives as
:class:`Columns`: a list of row dicts for any collator, that also keeps the columns (Arrow arrays with their
offsets, when there is no transform) for :class:`hf_loop.PadCollator`'s vectorised fast path.
"""

from __future__ import annotations

import inspect
import pickle
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from torch.utils.data import Dataset as TorchDataset

from hf_loop.hub import DataError

INDEX_KEY = "_index"

Transform = Callable[..., Mapping[str, Any]]


def _readonly(*_args: Any, **_kwargs: Any) -> None:
    raise TypeError(
        "hl.Columns is read-only (its rows mirror .columns); copy it with list(batch) to edit rows"
    )


def _column_len(values: Any) -> int:
    shape = getattr(values, "shape", None)  # numpy arrays and torch tensors: rows are the first axis
    return int(shape[0]) if shape is not None and len(shape) > 0 else len(values)


def _column_rows(values: Any) -> list:
    if isinstance(values, (pa.Array, pa.ChunkedArray)):
        return values.to_pylist()
    if isinstance(values, np.ndarray) and values.ndim == 1:
        return values.tolist()  # Python scalars, as a Hugging Face dataset's rows have
    return list(values)


class Columns(list):
    """A batch as a list of row dicts that also exposes its columns (``.columns``).

    It is a real ``list`` (transformers' ``tokenizer.pad`` accepts only lists and tuples), so ``default_collate``
    and transformers' collators work on it, while :class:`hf_loop.PadCollator` reads ``.columns`` directly.
    Column values may be pyarrow arrays (list columns keep their Arrow offsets), numpy arrays, torch tensors or
    Python lists. The rows are built on first row access (one conversion per column), never before, and are not
    pickled: a batch travels from a worker as its columns only. The list is read-only.

    Example:
        >>> batch = Columns({"input_ids": [[1, 2], [3]], "label": [0, 1]})
        >>> len(batch), batch[1]
        (2, {'input_ids': [3], 'label': 1})
        >>> batch.columns["label"]
        [0, 1]
    """

    __slots__ = ("columns", "_n", "_filled")

    def __init__(self, columns: Mapping[str, Any], num_rows: int | None = None) -> None:
        super().__init__()
        self.columns: dict[str, Any] = dict(columns)
        lengths = {name: _column_len(values) for name, values in self.columns.items()}
        if num_rows is None:
            num_rows = next(iter(lengths.values()), 0)
        wrong = {name: n for name, n in lengths.items() if n != num_rows}
        if wrong:
            raise ValueError(f"every column needs {num_rows} values (one per row), but got lengths {wrong}")
        self._n = num_rows
        self._filled = False

    def _fill(self) -> Columns:
        if not self._filled:
            names = list(self.columns)
            values = [_column_rows(self.columns[name]) for name in names]
            list.extend(
                self,
                (dict(zip(names, row)) for row in zip(*values)) if names else ({} for _ in range(self._n)),
            )
            self._filled = True
        return self

    def __len__(self) -> int:
        return self._n

    def __bool__(self) -> bool:
        return self._n > 0

    def __getitem__(self, key: Any) -> Any:
        return list.__getitem__(self._fill(), key)

    def __iter__(self):
        return list.__iter__(self._fill())

    def __reversed__(self):
        return list.__reversed__(self._fill())

    def __contains__(self, item: Any) -> bool:
        return list.__contains__(self._fill(), item)

    def __eq__(self, other: object) -> bool:
        return list.__eq__(self._fill(), other._fill() if isinstance(other, Columns) else other)

    __hash__ = None  # type: ignore[assignment]

    def __add__(self, other: Any) -> list:
        return list(self) + list(other)

    def __repr__(self) -> str:
        return f"Columns(num_rows={self._n}, columns={list(self.columns)})"

    def index(self, *args: Any) -> int:
        return list.index(self._fill(), *args)

    def count(self, item: Any) -> int:
        return list.count(self._fill(), item)

    def copy(self) -> list:
        return list(self)

    def __reduce__(self):
        return (Columns, (self.columns, self._n))

    append = extend = insert = pop = remove = clear = sort = reverse = _readonly  # type: ignore[assignment]
    __setitem__ = __delitem__ = __iadd__ = __imul__ = _readonly  # type: ignore[assignment]


def _takes_rng(fn: Callable) -> bool:
    """True when ``fn`` accepts a second positional argument (the batch's numpy Generator)."""
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):  # builtins without a signature take the batch only
        return False
    kinds = [p.kind for p in params]
    if inspect.Parameter.VAR_POSITIONAL in kinds:
        return True
    positional = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    return sum(kind in positional for kind in kinds) >= 2


def _describe(fn: Callable) -> str:
    name = getattr(fn, "__qualname__", None) or type(fn).__qualname__
    return f"{name!r} (module {getattr(fn, '__module__', None) or type(fn).__module__!r})"


def _pickle_problem(transform: Callable | None) -> str | None:
    """Why ``transform`` cannot travel to a spawned DataLoader worker, or None when it can."""
    if transform is None:
        return None
    try:
        pickle.dumps(transform)
    # pickle raises PicklingError, AttributeError or TypeError depending on the object
    except Exception as exc:
        return (
            f"the transform {_describe(transform)} cannot be pickled ({type(exc).__name__}: {exc}), so DataLoader "
            "workers started with 'spawn' or 'forkserver' cannot receive it. Define it at module level (not a "
            "lambda or a function nested in another function), or use num_workers=0"
        )
    return None


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

    def _all_ones(self, chunk: int) -> bool:
        if chunk not in self.ones:
            self.ones[chunk] = bool((self.values[chunk] == 1).all())
        return self.ones[chunk]

    def gather(self, which: list[int], local: list[int], bounds: np.ndarray | None = None) -> pa.Array:
        """The rows (chunk ``which[i]``, row ``local[i]``) as one array; ``bounds`` are the twin's offsets."""
        if not self.nested:
            return pa.array(
                np.array([self.scalars[b][s] for b, s in zip(which, local)], self.values[0].dtype)
            )
        values = self.values
        if bounds is not None and all(self._all_ones(b) for b in set(which)):
            flat = np.ones(int(bounds[-1]), dtype=values[0].dtype)
        else:
            offsets = self.offsets
            parts = [values[b][offsets[b][s] : offsets[b][s + 1]] for b, s in zip(which, local)]
            bounds = np.zeros(len(parts) + 1, dtype=np.int64 if self.large else np.int32)
            np.cumsum(np.fromiter(map(len, parts), dtype=np.int64, count=len(parts)), out=bounds[1:])
            flat = np.concatenate(parts) if parts else values[0][:0]
        make = pa.LargeListArray if self.large else pa.ListArray
        return make.from_arrays(pa.array(bounds), pa.array(flat))


class MapDataset(TorchDataset):
    """A ``datasets.Dataset`` as a torch map-style dataset with batched reads and an on-the-fly transform.

    Args:
        ds: the Hugging Face dataset (any ``select``/``shuffle``/``filter`` view of it works as is).
        transform: ``fn(batch) -> batch`` with ``set_transform`` semantics: called ONCE per batch with a dict of
            columns (Python lists) and returning a dict of columns, one value per row. A function with a second
            parameter, ``fn(batch, rng)``, also gets a ``numpy.random.Generator`` seeded from (seed, epoch, global
            position of the batch), so random augmentation is reproducible and survives a resume.
        columns: the columns to keep, chosen AFTER the transform (so a column the transform reads is never
            dropped first). None keeps all. The ``_index`` column (global row index) is always added.
        seed: seeds the transform's Generator when the batch does not carry its own key (a plain DataLoader).
        rename_label: rename a ``label`` column to ``labels``, the name transformers models expect.

    Example:
        >>> from datasets import Dataset
        >>> ds = MapDataset(Dataset.from_dict({"input_ids": [[5, 6, 7], [8]], "label": [0, 1]}))
        >>> batch = ds.__getitems__([1, 0])
        >>> batch[0]
        {'input_ids': [8], 'labels': 1, '_index': 1}
        >>> ds.lengths().tolist()
        [3, 1]
    """

    def __init__(
        self,
        ds: Any,
        *,
        transform: Transform | None = None,
        columns: Sequence[str] | None = None,
        seed: int = 0,
        rename_label: bool = True,
    ) -> None:
        from datasets import Dataset

        if not isinstance(ds, Dataset):
            raise TypeError(
                f"MapDataset needs a datasets.Dataset, got {type(ds).__name__}; for a streamed dataset use "
                "hl.StreamDataset (or hl.to_torch, which picks the right adapter)"
            )
        if ds.format["type"] == "custom":
            raise TypeError(
                "this dataset has a set_transform/with_transform function, which MapDataset would bypass (it reads "
                "the Arrow data itself); pass the function as MapDataset(ds.with_format(None), transform=fn)"
            )
        if transform is not None and not callable(transform):
            raise TypeError(f"transform must be callable (batch -> batch), got {type(transform).__name__}")
        if isinstance(columns, str):
            raise TypeError(
                f"columns must be a list of column names, got the string {columns!r}; use [{columns!r}]"
            )
        self.ds = ds
        self._len = len(ds)  # datasets' __len__ is slow enough to show per batch
        self.transform = transform
        self.columns = None if columns is None else list(columns)
        self.seed = seed
        self.rename_label = rename_label
        self._with_rng = transform is not None and _takes_rng(transform)
        # Checked now, raised when the dataset is pickled: a lambda is fine with num_workers=0 or fork workers,
        # and a spawned worker gets an error that names the function instead of pickle's AttributeError.
        self._pickle_problem = _pickle_problem(transform)
        format_columns = ds.format["columns"]
        self._source_columns = list(ds.column_names if ds.format["output_all_columns"] else format_columns)
        if transform is None and self.columns is not None:
            self._select(dict.fromkeys(self._renamed(self._source_columns)))  # fail fast: names are known now
        self._cache: dict[str, Any] | None = None

    # --- pickling: the HF dataset, the transform and the options; never the derived caches ---

    def __getstate__(self) -> dict[str, Any]:
        if self._pickle_problem is not None:
            raise TypeError(self._pickle_problem)
        state = self.__dict__.copy()
        state["_cache"] = None
        return state

    # --- Arrow access ---

    def _arrow(self) -> dict[str, Any]:
        """The table's record batches, their row offsets, and the indices mapping as numpy (built once)."""
        if self._cache is None:
            table = self.ds.data.table
            if self._source_columns != table.column_names:
                table = table.select(self._source_columns)
            batches = [b for b in table.to_batches() if b.num_rows]
            offsets = np.cumsum([0] + [b.num_rows for b in batches])
            mapping = self.ds._indices  # the view left by select/shuffle/filter: dataset row -> table row
            index_map = None if mapping is None else mapping.column(0).to_numpy().astype(np.int64, copy=False)
            features = self.ds.features  # a deep copy on every access: read it once
            decode = {
                n for n in table.column_names if getattr(features, "_column_requires_decoding", {}).get(n)
            }
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
            self._cache = {
                "numeric": numeric,
                "table": table,
                "batches": batches,
                "offsets": offsets,
                "index_map": index_map,
                "features": features,
                "decode": decode,
            }
        return self._cache

    def _read(self, rows: np.ndarray) -> dict[str, pa.Array]:
        """One read of the given table rows: a dict of single-chunk Arrow arrays, in the given order."""
        cache = self._arrow()
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
        for name, column in numeric.items():
            bounds = out[column.twin].offsets.to_numpy() if column.twin else None
            out[name] = column.gather(w, local, bounds)
        others = [name for name in cache["table"].column_names if name not in numeric]
        if others:
            if len(batches) == 1:
                rest = pa.Table.from_batches([batches[0].select(others).take(pa.array(rows))])
            else:
                parts = [batches[b].select(others).slice(s, 1) for b, s in zip(w, local)]
                rest = pa.Table.from_batches(parts).combine_chunks()
            out.update({name: rest.column(name).chunk(0) for name in others})
        return {name: out[name] for name in cache["table"].column_names}

    def _decode(self, arrays: dict[str, pa.Array], as_python: bool) -> dict[str, Any]:
        """Python lists for a transform; otherwise the Arrow arrays, decoding only the features that need it
        (images, audio)."""
        cache = self._arrow()
        out: dict[str, Any] = {}
        for name, array in arrays.items():
            if name in cache["decode"]:
                out[name] = cache["features"].decode_column(array.to_pylist(), name)
            else:
                out[name] = array.to_pylist() if as_python else array
        return out

    # --- the batch path ---

    def __len__(self) -> int:
        return self._len

    def _global_indices(self, indices: Sequence[int]) -> np.ndarray:
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        n = len(self)
        if len(idx) and (idx.min() < 0 or idx.max() >= n):  # rare: negative or bad indices
            if idx.min() < -n or idx.max() >= n:
                bad = int(idx[(idx < -n) | (idx >= n)][0])
                raise IndexError(f"index {bad} is out of range for a dataset of {n} rows")
            idx = np.where(idx < 0, idx + n, idx)
        return idx

    def __getitems__(self, indices: Sequence[int]) -> Columns:
        """Rows ``indices`` as one :class:`Columns` batch: one Arrow read, one transform call."""
        idx = self._global_indices(indices)
        batch = self._select(self._fetch(idx, getattr(indices, "rng_key", None)))
        batch[INDEX_KEY] = idx
        return Columns(batch, len(idx))

    def _fetch(self, idx: np.ndarray, rng_key: Any) -> dict[str, Any]:
        """The transformed, renamed columns of dataset rows ``idx`` (before the column selection)."""
        index_map = self._arrow()["index_map"]
        table = self._read(idx if index_map is None else index_map[idx])
        if self.transform is None:
            return self._renamed_batch(self._decode(table, as_python=False))
        batch = self._apply(self._decode(table, as_python=True), len(idx), rng_key, idx)
        return self._renamed_batch(batch)

    def __getitem__(self, index: int) -> dict[str, Any]:
        """One row as a dict (the transform still runs batched, on a batch of one)."""
        return self.__getitems__([index])[0]

    def _apply(self, batch: dict[str, list], n: int, rng_key: Any, idx: np.ndarray) -> dict[str, Any]:
        if self._with_rng:
            key = rng_key if rng_key is not None else (self.seed, 0, int(idx[0]) if len(idx) else 0)
            out = self.transform(batch, np.random.default_rng(key))
        else:
            out = self.transform(batch)
        if not isinstance(out, Mapping):
            raise TypeError(
                f"the transform {_describe(self.transform)} returned {type(out).__name__}; it must return a dict of "
                "columns (column name -> one value per row), like a set_transform function"
            )
        out = dict(out)
        wrong = {name: _column_len(v) for name, v in out.items() if _column_len(v) != n}
        if wrong:
            raise DataError(
                f"the transform {_describe(self.transform)} got {n} rows but returned columns of lengths {wrong}; "
                "MapDataset needs one output value per input row (change the number of rows with "
                "ds.map(fn, batched=True) before wrapping the dataset)"
            )
        if INDEX_KEY in out:
            raise DataError(
                f"the transform returned a column named {INDEX_KEY!r}, which hf_loop reserves for row indices"
            )
        return out

    def _renamed(self, names: Sequence[str]) -> list[str]:
        return [
            "labels" if self.rename_label and n == "label" and "labels" not in names else n for n in names
        ]

    def _renamed_batch(self, batch: dict[str, Any]) -> dict[str, Any]:
        if self.rename_label and "label" in batch:
            if "labels" in batch:
                raise DataError(
                    "the batch has both 'label' and 'labels'; MapDataset renames 'label' to 'labels' for "
                    "transformers models. Drop one of them, or pass rename_label=False"
                )
            batch["labels"] = batch.pop("label")
        return batch

    def _select(self, batch: dict[str, Any]) -> dict[str, Any]:
        if self.columns is None:
            return batch
        wanted = ["labels" if self.rename_label and c == "label" else c for c in self.columns]
        missing = [c for c in wanted if c not in batch]
        if missing:
            stage = "after the transform" if self.transform is not None else "in the dataset"
            raise DataError(
                f"columns={self.columns} asks for {missing}, which do not exist {stage}; available: "
                f"{sorted(batch)}. Fix the names, or make the transform return them"
            )
        return {c: batch[c] for c in wanted}

    # --- lengths ---

    def lengths(self, column: str = "input_ids") -> np.ndarray:
        """Per-row length of ``column`` in dataset order, as an int64 array.

        Computed from the Arrow list offsets (or string lengths) without a per-row Python pass; the
        select/shuffle view of the dataset is respected. Only when the column does not exist before the
        transform (e.g. ``input_ids`` made by a tokenizing transform) is the transform run, in large batches.

        Example:
            >>> from datasets import Dataset
            >>> MapDataset(Dataset.from_dict({"input_ids": [[1, 2], [3], []]})).lengths("input_ids").tolist()
            [2, 1, 0]
        """
        cache = self._arrow()
        table = cache["table"]
        source = (
            "label"
            if column == "labels" and self.rename_label and column not in table.column_names
            else column
        )
        if source in table.column_names:
            lengths = _arrow_lengths(table.column(source), column)
            return lengths if cache["index_map"] is None else lengths[cache["index_map"]]
        if self.transform is None:
            raise DataError(
                f"lengths({column!r}): no such column; available: {sorted(self._renamed(table.column_names))}"
            )
        return self._lengths_by_transform(column)

    def _lengths_by_transform(self, column: str, batch_size: int = 1000) -> np.ndarray:
        out = np.empty(len(self), dtype=np.int64)
        for start in range(0, len(self), batch_size):
            idx = np.arange(start, min(start + batch_size, len(self)))
            batch = self._fetch(idx, None)
            if column not in batch:
                raise DataError(
                    f"lengths({column!r}): the column exists neither in the dataset nor after the transform; "
                    f"available after the transform: {sorted(batch)}"
                )
            values = batch[column]
            shape = getattr(values, "shape", None)
            if shape is not None and len(shape) >= 2:  # a rectangular array: every row has the same length
                out[idx] = shape[1]
            elif isinstance(values, (pa.Array, pa.ChunkedArray)):
                out[idx] = _arrow_lengths(values, column)
            else:
                out[idx] = np.fromiter(map(len, values), dtype=np.int64, count=len(idx))
        return out


def _arrow_lengths(column: pa.ChunkedArray | pa.Array, name: str) -> np.ndarray:
    """Row lengths of a list or string column, chunk by chunk, from offsets (nulls count as length 0)."""
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


def to_torch(
    ds: Any, *, transform: Transform | None = None, columns: Sequence[str] | None = None, **kw: Any
) -> Any:
    """Adapt a Hugging Face dataset to torch: ``Dataset`` -> :class:`MapDataset`, ``IterableDataset`` ->
    :class:`hf_loop.StreamDataset`. Extra keywords go to the adapter.

    Example:
        >>> from datasets import Dataset
        >>> type(to_torch(Dataset.from_dict({"x": [1, 2]}))).__name__
        'MapDataset'
    """
    from datasets import Dataset, DatasetDict, IterableDataset, IterableDatasetDict

    if isinstance(ds, (DatasetDict, IterableDatasetDict)):
        raise TypeError(
            f"to_torch got a {type(ds).__name__} with splits {sorted(ds)}; pick one split, e.g. ds['train'] "
            "(or hl.load(..., split='train'))"
        )
    if isinstance(ds, Dataset):
        return MapDataset(ds, transform=transform, columns=columns, **kw)
    if isinstance(ds, IterableDataset):
        from hf_loop.stream import StreamDataset

        return StreamDataset(ds, transform=transform, columns=columns, **kw)
    raise TypeError(
        f"to_torch needs a datasets.Dataset or datasets.IterableDataset, got {type(ds).__name__}; load one with "
        "hl.load(...) or datasets.Dataset.from_dict(...)"
    )
