"""Map-style adapter: a Hugging Face ``datasets.Dataset`` as a fast torch ``Dataset``.

A batch is fetched with ONE Arrow read and transformed with ONE call (``set_transform`` semantics), and arrives as
:class:`Columns`: a list of row dicts for any collator, that also keeps the columns (Arrow arrays with their
offsets, when there is no transform) for :class:`hf_loop.PadCollator`'s vectorised fast path.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import pyarrow as pa
from torch.utils.data import Dataset as TorchDataset

from hf_loop.checks import integer
from hf_loop.data.arrow import arrow_cache, arrow_lengths, read_rows
from hf_loop.data.columns import Columns
from hf_loop.data.transform import BatchTransform, Transform
from hf_loop.errors import DataError


class MapDataset(TorchDataset):
    """A ``datasets.Dataset`` as a torch map-style dataset with batched reads and an on-the-fly transform.

    Args:
        ds: the Hugging Face dataset (any ``select``/``shuffle``/``filter`` view of it works as is).
        transform: ``fn(batch) -> batch`` with ``set_transform`` semantics: called ONCE per batch with a dict of
            columns (Python lists) and returning a dict of columns, one value per row. A function with a second
            parameter, ``fn(batch, rng)``, also gets a ``numpy.random.Generator`` seeded from (seed, epoch, global
            position of the batch), so random augmentation is reproducible and survives a resume.
        columns: the columns to keep, chosen AFTER the transform (so a column the transform reads is never
            dropped first). None keeps all.
        seed: seeds the transform's Generator when the batch does not carry its own key (a plain DataLoader).
        rename_label: rename a ``label`` column to ``labels``, the name transformers models expect.

    Example:
        >>> from datasets import Dataset
        >>> ds = MapDataset(Dataset.from_dict({"input_ids": [[5, 6, 7], [8]], "label": [0, 1]}))
        >>> batch = ds.__getitems__([1, 0])
        >>> batch[0]
        {'input_ids': [8], 'labels': 1}
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
        # A transform that cannot be pickled is reported when the dataset is pickled: a lambda is fine with
        # num_workers=0 or fork workers, and a spawned worker gets an error that names the function.
        self.batch_transform = BatchTransform(transform, columns, rename_label)
        self.ds = ds
        self._len = len(ds)  # datasets' __len__ is slow enough to show per batch
        self.seed = integer("seed", seed, 0)
        format_columns = ds.format["columns"]
        self._source_columns = list(ds.column_names if ds.format["output_all_columns"] else format_columns)
        self.batch_transform.source_columns(self._source_columns)  # fail fast: the names are known now
        self._cache: dict[str, Any] | None = None

    @property
    def transform(self) -> Transform | None:
        return self.batch_transform.transform

    @property
    def columns(self) -> list[str] | None:
        return self.batch_transform.columns

    # --- pickling: the HF dataset, the transform and the options; never the derived caches ---

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_cache"] = None
        return state

    # --- Arrow access ---

    def _arrow(self) -> dict[str, Any]:
        """The table's record batches, their row offsets, and the indices mapping as numpy (built once)."""
        if self._cache is None:
            self._cache = arrow_cache(self.ds, self._source_columns)
        return self._cache

    def _read(self, rows: np.ndarray) -> dict[str, pa.Array]:
        """One read of the given table rows: a dict of single-chunk Arrow arrays, in the given order."""
        return read_rows(self._arrow(), rows)

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
        batch = self.batch_transform.select(self._fetch(idx, getattr(indices, "rng_key", None)))
        return Columns.of(batch, len(idx))  # every column was read (or checked after the transform) for idx

    def _fetch(self, idx: np.ndarray, rng_key: Any) -> dict[str, Any]:
        """The transformed, renamed columns of dataset rows ``idx`` (before the column selection)."""
        index_map = self._arrow()["index_map"]
        table = self._read(idx if index_map is None else index_map[idx])
        bt = self.batch_transform
        if bt.transform is None:
            return bt.rename(self._decode(table, as_python=False))
        rng = None
        if bt.takes_rng:
            key = rng_key if rng_key is not None else (self.seed, 0, int(idx[0]) if len(idx) else 0)
            rng = np.random.default_rng(key)
        return bt.rename(bt.apply(self._decode(table, as_python=True), len(idx), rng))

    def __getitem__(self, index: int) -> dict[str, Any]:
        """One row as a dict (the transform still runs batched, on a batch of one)."""
        return self.__getitems__([index])[0]

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
            if column == "labels" and self.batch_transform.rename_label and column not in table.column_names
            else column
        )
        if source in table.column_names:
            lengths = arrow_lengths(table.column(source), column)
            return lengths if cache["index_map"] is None else lengths[cache["index_map"]]
        if self.transform is None:
            raise DataError(
                f"lengths({column!r}): no such column; available: {sorted(self.batch_transform.renamed(table.column_names))}"
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
                out[idx] = arrow_lengths(values, column)
            else:
                out[idx] = np.fromiter(map(len, values), dtype=np.int64, count=len(idx))
        return out
