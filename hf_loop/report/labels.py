"""What a label column holds: classes (ids, strings, a ``ClassLabel``) or regression targets (floats), and which
rows have no label. ``hf-loop inspect`` reports it; ``hf-loop finetune`` builds its head and label ids from it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from hf_loop.errors import DataError

__all__ = ["LabelSet", "describe_missing", "is_regression", "label_set", "missing_rows"]

SHOWN_ROWS = 5  # rows named in a message about missing labels


def is_regression(column: pa.Array | pa.ChunkedArray) -> bool:
    """True for float labels: regression targets, not classes (class balance would list every value).

    Example:
        >>> is_regression(pa.array([0.5, 1.25])), is_regression(pa.array([0, 1]))
        (True, False)
    """
    return pa.types.is_floating(column.type) or pa.types.is_decimal(column.type)


def missing_rows(column: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """Positions of the rows without a label: null, or NaN in a float column.

    Example:
        >>> missing_rows(pa.array([1.0, float("nan"), None, 2.0])).tolist()
        [1, 2]
    """
    missing = pc.is_null(column, nan_is_null=True)
    return np.flatnonzero(np.asarray(missing.to_numpy(zero_copy_only=False), dtype=bool))


def describe_missing(rows: np.ndarray, total: int) -> str:
    """``"3 of 60 rows have no label (NaN or null), rows 4, 17, 33"`` (the first few rows).

    Example:
        >>> describe_missing(np.array([4, 17]), 60)
        '2 of 60 rows have no label (NaN or null): rows 4, 17'
    """
    shown = ", ".join(str(r) for r in rows[:SHOWN_ROWS].tolist())
    more = f" and {rows.size - SHOWN_ROWS} more" if rows.size > SHOWN_ROWS else ""
    return f"{rows.size} of {total} rows have no label (NaN or null): rows {shown}{more}"


@dataclass(frozen=True)
class LabelSet:
    """The classes of a label column, or a regression target.

    ``names``: class names in id order (empty for regression). ``label2id``: raw value -> class id when the
    values are not already the ids 0..K-1 (strings, booleans); None otherwise.
    """

    regression: bool
    names: tuple[str, ...] = ()
    label2id: dict[Any, int] | None = None

    def ids(self, column: pa.Array | pa.ChunkedArray) -> np.ndarray:
        """Class ids of ``column``'s values (int64), through ``label2id`` when there is one."""
        values = column.to_numpy(zero_copy_only=False)
        if self.label2id is None:
            return values.astype(np.int64)
        return np.array([self.label2id[v] for v in values.tolist()], dtype=np.int64)


def label_set(
    column: pa.Array | pa.ChunkedArray, names: list[str] | None = None, *, name: str = "label"
) -> LabelSet:
    """The label set of ``column`` (with a ``ClassLabel``'s ``names`` when the feature has them).

    Raises:
        DataError: a list (or other nested) column, rows without a label (their count and the first rows), or
            negative class ids.

    Example:
        >>> label_set(pa.array(["pos", "neg", "pos"])).names
        ('neg', 'pos')
        >>> label_set(pa.array([0.5, 2.0])).regression
        True
    """
    if pa.types.is_nested(column.type):
        raise DataError(
            f"label column {name!r} holds {column.type}, not one class or score per row. Fix: a column with "
            "one label per example (token-level labels need a token-classification model)"
        )
    missing = missing_rows(column)
    if missing.size:
        raise DataError(
            f"label column {name!r}: {describe_missing(missing, len(column))}. Fix: drop those rows "
            "(ds.filter) or fill them in"
        )
    if names:
        return LabelSet(False, tuple(names))
    if is_regression(column):
        return LabelSet(True)
    values = np.unique(column.to_numpy(zero_copy_only=False))
    if values.dtype.kind in "iu":
        if values.min() < 0:
            raise DataError(
                f"label column {name!r} holds {values.min()}: class ids must be >= 0. Fix: map the labels to "
                "0..K-1 (ds.class_encode_column or ds.map)"
            )
        return LabelSet(False, tuple(str(i) for i in range(int(values.max()) + 1)))
    return LabelSet(False, tuple(str(v) for v in values), {v: i for i, v in enumerate(values.tolist())})
