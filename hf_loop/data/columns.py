"""The batch type: :class:`Columns`, a read-only list of row dicts that keeps its columns, and column helpers."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import pyarrow as pa


def _readonly(*_args: Any, **_kwargs: Any) -> None:
    raise TypeError(
        "hl.Columns is read-only (its rows mirror .columns); copy it with list(batch) to edit rows"
    )


def column_len(values: Any) -> int:
    """Rows in a column: the first axis of an array or tensor, else ``len``."""
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
        lengths = {name: column_len(values) for name, values in self.columns.items()}
        if num_rows is None:
            num_rows = next(iter(lengths.values()), 0)
        wrong = {name: n for name, n in lengths.items() if n != num_rows}
        if wrong:
            raise ValueError(f"every column needs {num_rows} values (one per row), but got lengths {wrong}")
        self._n = num_rows
        self._filled = False

    @classmethod
    def of(cls, columns: dict[str, Any], num_rows: int) -> Columns:
        """Wrap ``columns`` (a fresh dict the caller hands over) already known to hold ``num_rows`` values each,
        without re-measuring every column: the per-batch path of MapDataset and StreamDataset.

        Example:
            >>> len(Columns.of({"x": [1, 2, 3]}, 3))
            3
        """
        batch = cls.__new__(cls)
        batch.columns, batch._n, batch._filled = columns, num_rows, False
        return batch

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
