"""Reading a batch field by field: :func:`_rows_of` turns rows, a columnar dict or :class:`hf_loop.Columns` into
columns, and :func:`_read` turns each column into flat numpy values plus per-row lengths (:class:`_Ragged`), N-D
rows (:class:`_Arrays`), one value per row (:class:`_Stack`) or a pass-through list (:class:`_PassThrough`) —
straight from Arrow offsets, or with one conversion pass per field for rows of Python lists.
"""

from __future__ import annotations

import array
import itertools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import torch


@dataclass
class _Ragged:
    """1-D rows as flat values + lengths (a rectangular 2-D column is the case of equal lengths)."""

    lengths: np.ndarray
    flat: np.ndarray


@dataclass
class _Arrays:
    """N-D rows (each at least 2-D), padded row by row in every ragged dimension."""

    rows: list[np.ndarray]


@dataclass
class _Stack:
    """One value (or one same-shaped array) per row: stacked."""

    values: np.ndarray


@dataclass
class _PassThrough:
    """Strings, ids and other non-numeric values: handed on as a list."""

    values: list


def _kind_name(value: Any) -> str:
    if isinstance(value, (bool, np.bool_)):
        return "bool"
    if isinstance(value, (int, np.integer)):
        return "int"
    if isinstance(value, (float, np.floating)):
        return "float"
    return type(value).__name__


_NUMERIC = {"bool", "int", "float"}


def _rows_of(columns: Any) -> tuple[dict[str, Any], int]:
    """A batch (rows, a columnar dict, or hl.Columns) as {field: column values} and the row count."""
    if hasattr(columns, "columns") and isinstance(getattr(columns, "columns", None), dict):
        return columns.columns, len(columns)
    if isinstance(columns, Mapping):
        data = dict(columns)
        sizes = {k: (v.shape[0] if hasattr(v, "shape") and len(v.shape) else len(v)) for k, v in data.items()}
        if len(set(sizes.values())) > 1:
            raise ValueError(f"a columnar batch needs one value per row in every field, got lengths {sizes}")
        return data, next(iter(sizes.values()), 0)
    if not isinstance(columns, Sequence) or (len(columns) and not isinstance(columns[0], Mapping)):
        raise TypeError(
            f"expected a list of row dicts, a dict of columns or hl.Columns, got {type(columns).__name__}"
            + (f" of {type(columns[0]).__name__}" if isinstance(columns, Sequence) and len(columns) else "")
        )
    keys = list(columns[0]) if columns else []
    for i, row in enumerate(columns):
        if row.keys() != columns[0].keys():
            absent = [k for k in keys if k not in row]
            field, where, present = (
                (absent[0], i, 0) if absent else (next(k for k in row if k not in keys), 0, i)
            )
            raise ValueError(
                f"field {field!r} is missing in row {where} (present in row {present}); every row needs the same "
                "fields: fill the gap in the dataset or the transform, or drop the field"
            )
    return {k: [row[k] for row in columns] for k in keys}, len(columns)


def _find_bad(name: str, rows: list, kind: str) -> Exception:
    """Slow path, only on error: the first row whose values are not of ``kind``."""
    for i, row in enumerate(rows):
        values = row if isinstance(row, (list, tuple)) else [row]
        for value in values:
            got = _kind_name(value)
            if got != kind and not (kind == "float" and got in ("int", "bool")):
                if got in _NUMERIC:
                    return TypeError(
                        f"field {name!r} mixes dtypes: row {i} holds {got} {value!r} but the field starts with "
                        f"{kind} values; make the transform return one type (e.g. all floats) for this field"
                    )
                return TypeError(
                    f"field {name!r}, row {i}: got {got} {value!r} where {kind} values are expected (the field "
                    f"starts with {kind}s); numeric fields cannot hold {got}s, so fix or drop those rows"
                )
    return TypeError(f"field {name!r}: values could not be read as {kind}")


def _read_lists(name: str, rows: list) -> _Ragged | _Arrays | _PassThrough:
    """Rows that are Python lists/tuples: one typed conversion pass for the whole field."""
    lengths = np.fromiter(map(len, rows), dtype=np.int64, count=len(rows))
    first = next((row[0] for row in rows if len(row)), None)
    kind = _kind_name(first) if first is not None else "int"
    if kind not in _NUMERIC:
        leaf = first
        while isinstance(leaf, (list, tuple)) and len(leaf):
            leaf = leaf[0]
        numeric_leaf = _kind_name(leaf) in _NUMERIC | {"ndarray", "Tensor"}
        if isinstance(first, (list, tuple, np.ndarray, torch.Tensor)) and numeric_leaf:
            return _read_arrays(name, rows, nested=True)
        return _PassThrough(list(rows))
    if kind == "bool":  # numpy infers bool only when every value is one (a C loop, no Python per value)
        flat = np.array(list(itertools.chain.from_iterable(rows)))
        if flat.dtype != bool:
            raise _find_bad(name, rows, kind)
        return _Ragged(lengths, flat)
    buffer = array.array("q" if kind == "int" else "d")
    try:  # array.array checks every value: a float in an int field or a str anywhere raises instead of casting
        for row in rows:
            buffer.fromlist(row) if isinstance(row, list) else buffer.extend(row)
    except TypeError:
        raise _find_bad(name, rows, kind) from None
    except OverflowError:  # a Python int beyond int64
        raise _too_large(name, max((v for row in rows for v in row), key=abs)) from None
    return _Ragged(lengths, np.frombuffer(buffer, dtype=np.int64 if kind == "int" else np.float64))


def _read_arrays(name: str, rows: list, nested: bool = False) -> _Ragged | _Arrays:
    """Rows that are numpy arrays or torch tensors (or nested lists, converted row by row)."""
    arrays = []
    for i, row in enumerate(rows):
        try:
            arrays.append(row.numpy() if isinstance(row, torch.Tensor) else np.asarray(row))
        except ValueError as exc:
            raise ValueError(
                f"field {name!r}, row {i}: nested lists of uneven lengths inside one row ({exc})"
            ) from None
    real = [a for a in arrays if a.size or not nested]  # an empty nested row has no dtype or rank of its own
    if any(a.dtype.kind not in "biuf" for a in real):
        bad = next(i for i, a in enumerate(arrays) if a.dtype.kind not in "biuf" and (a.size or not nested))
        raise TypeError(
            f"field {name!r}, row {bad}: holds {arrays[bad].dtype} values where numbers are expected"
        )
    if len({"i" if a.dtype.kind == "u" else a.dtype.kind for a in real}) > 1:
        first = real[0].dtype
        bad = next(i for i, a in enumerate(arrays) if a.dtype.kind != first.kind and (a.size or not nested))
        raise TypeError(
            f"field {name!r} mixes dtypes: row 0 is {first}, row {bad} is {arrays[bad].dtype}; convert the field to "
            "one dtype in the transform"
        )
    ndims = {a.ndim for a in real}
    if len(ndims) > 1:
        raise ValueError(
            f"field {name!r} mixes row ranks {sorted(ndims)}; every row needs the same number of dimensions"
        )
    if ndims == {1} or not ndims:
        flat = np.concatenate(arrays) if arrays else np.zeros(0, dtype=np.int64)
        return _Ragged(np.array([a.shape[0] for a in arrays], dtype=np.int64), flat)
    return _Arrays(arrays)


# Arrow value types whose data buffer numpy can view as is (bool is bit-packed, so it is not here)
_VIEWABLE = {
    t.id: np.dtype(t.to_pandas_dtype())
    for t in [
        pa.int8(),
        pa.int16(),
        pa.int32(),
        pa.int64(),
        pa.uint8(),
        pa.uint16(),
        pa.uint32(),
        pa.uint64(),
    ]
    + [pa.float16(), pa.float32(), pa.float64()]
}


def _list_buffers(values: pa.Array) -> _Ragged | None:
    """A list array of fixed-width numbers without nulls, read straight from its buffers (None: take the
    general path). Per batch this is the hot path, and each pyarrow accessor (``.offsets``, ``.values``,
    ``.to_numpy()``) costs a microsecond or more, so it reads the raw buffers with two ``np.frombuffer`` views."""
    large = type(values) is pa.LargeListArray
    if not (large or type(values) is pa.ListArray) or not len(values):
        return None
    dtype = _VIEWABLE.get(values.type.value_type.id)
    buffers = values.buffers()  # validity, offsets, the child's validity, the child's data
    if dtype is None or len(buffers) != 4 or buffers[1] is None or buffers[3] is None:
        return None
    child = values.values
    if buffers[2] is not None and child.null_count:
        return None  # the general path names the null
    width = 8 if large else 4
    offsets = np.frombuffer(
        buffers[1], np.int64 if large else np.int32, len(values) + 1, values.offset * width
    )
    first, last = int(offsets[0]), int(offsets[-1])
    flat = np.frombuffer(buffers[3], dtype, last - first, (child.offset + first) * dtype.itemsize)
    return _Ragged(np.subtract(offsets[1:], offsets[:-1], dtype=np.int64), flat)


def _read_arrow(name: str, values: pa.Array | pa.ChunkedArray) -> Any:
    """An Arrow column: list columns by their offsets (no per-row work), the rest by type."""
    if isinstance(values, pa.ChunkedArray):
        values = values.combine_chunks()
    kind = values.type
    if not values.null_count:
        fast = _list_buffers(values)
        if fast is not None:
            return fast
    else:
        row = int(np.flatnonzero(values.is_null().to_numpy(zero_copy_only=False))[0])
        raise ValueError(
            f"field {name!r}, row {row} is null (None); fill or drop missing values before collating"
        )
    if isinstance(values, (pa.ListArray, pa.LargeListArray, pa.FixedSizeListArray)):
        child = kind.value_type
        if pa.types.is_integer(child) or pa.types.is_floating(child) or pa.types.is_boolean(child):
            if isinstance(values, pa.FixedSizeListArray):
                flat = values.flatten()
                lengths = np.full(len(values), kind.list_size, dtype=np.int64)
            else:  # the offsets of this (possibly sliced) array index into the whole child array
                offsets = values.offsets.to_numpy().astype(np.int64)
                lengths = offsets[1:] - offsets[:-1]
                flat = values.values.slice(int(offsets[0]), int(offsets[-1] - offsets[0]))
            if flat.null_count:
                raise ValueError(
                    f"field {name!r} holds null values inside its rows; fill them before collating"
                )
            return _Ragged(lengths, flat.to_numpy(zero_copy_only=False))
        return _read_python(name, values.to_pylist())
    if pa.types.is_integer(kind) or pa.types.is_floating(kind) or pa.types.is_boolean(kind):
        return _Stack(values.to_numpy(zero_copy_only=False))
    return _PassThrough(values.to_pylist())


def _read_python(name: str, values: list) -> Any:
    first = next((v for v in values if v is not None), None)
    if first is None:
        return _PassThrough(list(values))
    if isinstance(first, (list, tuple)):
        return _read_lists(name, values)
    if isinstance(first, (np.ndarray, torch.Tensor)) and getattr(first, "ndim", 0) >= 1:
        return _read_arrays(name, values)
    kind = _kind_name(first)
    if kind not in _NUMERIC and not (isinstance(first, (np.ndarray, torch.Tensor)) and first.ndim == 0):
        return _PassThrough(list(values))
    kinds = {_kind_name(v) for v in values}
    if len(kinds) > 1:
        raise _find_bad(name, values, kind if kind in _NUMERIC else next(iter(kinds)))
    if isinstance(first, torch.Tensor):
        return _Stack(torch.stack(values).numpy(force=True))
    if type(first) is int:  # Python ints: int64, never the float64 numpy picks when one exceeds it
        try:
            return _Stack(np.array(values, dtype=np.int64))
        except OverflowError:
            raise _too_large(name, max(values, key=abs)) from None
    return _Stack(np.array(values))  # numpy scalars keep their dtype


_INT64_MAX = np.iinfo(np.int64).max


def _too_large(name: str, value: Any) -> ValueError:
    return ValueError(
        f"field {name!r} holds {value}, above int64's maximum {_INT64_MAX}: torch has no uint64 batches, so it "
        "would wrap to a negative number. Keep such ids as strings, or map them below 2**63"
    )


def _fits_int64(name: str, field: Any) -> Any:
    """``field``, after checking that unsigned 64-bit values fit the int64 tensors they become (one dtype check
    per field on the hot path)."""
    kind = type(field)
    if kind is _Ragged:
        arrays: Any = (field.flat,)
    elif kind is _Stack:
        arrays = (field.values,)
    elif kind is _Arrays:
        arrays = field.rows
    else:
        return field
    for values in arrays:
        code = values.dtype.kind
        if code == "u" and values.dtype.itemsize == 8 and values.size and values.max() > _INT64_MAX:
            raise _too_large(name, int(values.max()))
        if code == "O" and values.size:  # Python ints beyond 64 bits, or mixed with huge ones
            raise _too_large(name, max(values.tolist(), key=lambda v: abs(int(v))))
    return field


def _read(name: str, values: Any) -> Any:
    return _fits_int64(name, _read_any(name, values))


def _read_any(name: str, values: Any) -> Any:
    if isinstance(values, (pa.Array, pa.ChunkedArray)):
        return _read_arrow(name, values)
    if isinstance(values, torch.Tensor):
        values = values.numpy(force=True)
    if isinstance(values, np.ndarray):
        if values.dtype.kind not in "biuf":
            return _PassThrough(values.tolist())
        if values.ndim == 2:
            return _Ragged(np.full(values.shape[0], values.shape[1], dtype=np.int64), values.reshape(-1))
        return _Stack(values) if values.ndim < 2 else _Arrays(list(values))
    return _read_python(name, list(values))


def _all_ones(values: Any) -> _Ragged | None:
    """A mask given as Python lists of ones (what tokenizers return), recognised without converting each value."""
    if not isinstance(values, list) or not values or not all(type(row) is list for row in values):
        return None
    lengths = np.fromiter(map(len, values), dtype=np.int64, count=len(values))
    if sum(row.count(1) for row in values) != lengths.sum():  # list.count compares in C
        return None
    return _Ragged(lengths, np.ones(int(lengths.sum()), dtype=np.int64))
