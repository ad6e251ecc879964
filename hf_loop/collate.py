"""Vectorised collation: :class:`PadCollator` (pad every ragged field) and :class:`PackCollator` (padding-free
packing for causal LM).

Both read a batch field by field into flat numpy values plus per-row lengths — straight from Arrow offsets for
:class:`hf_loop.Columns`, or with one conversion pass per field for rows of Python lists — and build each padded
field with one masked assignment. There is no Python loop over tokens.
"""

from __future__ import annotations

import array
import itertools
from collections.abc import Mapping, Sequence
from dataclasses import KW_ONLY, dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import torch

LABEL_PAD = -100  # the index torch's cross-entropy ignores


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


def _read_arrow(name: str, values: pa.Array | pa.ChunkedArray) -> Any:
    """An Arrow column: list columns by their offsets (no per-row work), the rest by type."""
    if isinstance(values, pa.ChunkedArray):
        values = values.combine_chunks()
    kind = values.type
    if values.null_count:
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
    return _Stack(np.array(values))  # numpy scalars keep their dtype


def _read(name: str, values: Any) -> Any:
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


def _out_dtype(dtype: np.dtype) -> np.dtype:
    """int -> int64, bool kept, half precision kept, other floats -> float32 (what models expect)."""
    if dtype.kind in "iu":
        return np.dtype(np.int64)
    if dtype.kind == "f":
        return dtype if dtype.itemsize == 2 else np.dtype(np.float32)
    return dtype


def _row_mask(kept: np.ndarray, width: int, side: str) -> np.ndarray:
    """(rows, width) bool: True at real positions. Small integer types make the broadcast compare ~2x faster."""
    small = np.int16 if width < 2**15 else np.int64
    positions, kept = np.arange(width, dtype=small), kept.astype(small)
    if side == "right":
        return positions < kept[:, None]
    return positions >= (width - kept)[:, None]


def _truncate(field: _Ragged, width: int, side: str, longest: int | None = None) -> _Ragged:
    """Keep at most ``width`` values per row (the first ones, or the last ones for side='left')."""
    lengths = field.lengths
    if not len(lengths) or (longest if longest is not None else lengths.max()) <= width:
        return field
    starts = np.repeat(np.cumsum(lengths) - lengths, lengths)
    pos = np.arange(len(field.flat)) - starts
    keep = pos < width if side == "right" else pos >= np.repeat(lengths - width, lengths)
    return _Ragged(np.minimum(lengths, width), field.flat[keep])


def _all_ones(values: Any) -> _Ragged | None:
    """A mask given as Python lists of ones (what tokenizers return), recognised without converting each value."""
    if not isinstance(values, list) or not values or not all(type(row) is list for row in values):
        return None
    lengths = np.fromiter(map(len, values), dtype=np.int64, count=len(values))
    if sum(row.count(1) for row in values) != lengths.sum():  # list.count compares in C
        return None
    return _Ragged(lengths, np.ones(int(lengths.sum()), dtype=np.int64))


def _check_pad(name: str, pad: Any, dtype: np.dtype) -> None:
    if isinstance(pad, (bool, int, float, np.number)):
        if dtype.kind in "biu" and float(pad) != int(pad):
            raise ValueError(f"pad value {pad!r} for the integer field {name!r} is not an integer")
        return
    raise TypeError(f"pad value for field {name!r} must be a number, got {type(pad).__name__} {pad!r}")


@dataclass(frozen=True)
class PadCollator:
    """Pads every ragged field of a batch to one length, vectorised, and returns a dict of tensors.

    Accepts a list of row dicts, a dict of columns, or :class:`hf_loop.Columns` (whose Arrow list columns are
    padded straight from their offsets). Per field:

    - 1-D (and N-D) numeric rows are padded with the field's pad value: ``pad_values[field]`` when given, else
      ``-100`` for ``labels``, ``0`` for the attention mask and every other integer or bool field. Float fields
      have no default: a ragged float field without a pad value is an error, and an N-D field whose rows all
      share one shape (an image) is stacked unchanged unless it has an explicit pad value.
      ``pad_values={field: None}`` means "never pad": the rows must already have one shape. 1-D integer rows
      are padded even when they already have one length, so ``max_length`` and ``pad_to_multiple_of`` always
      apply to token fields.
    - ``max_length`` (truncation) and ``pad_to_multiple_of`` act on the first axis of each row (the sequence
      axis) of every padded field; other ragged axes are padded to the batch maximum. ``padding_side`` applies
      to every padded axis; ``truncation_side`` says which end ``max_length`` cuts.
    - Scalars are stacked; strings and other non-numeric values pass through as lists.
    - dtypes: integers -> int64, bool stays bool, float16 stays, other floats -> float32.
    - ``attention_mask`` (the name given; None to skip) is built from the lengths of ``input_ids`` (else
      ``inputs_embeds``, else the first padded field other than ``labels``) — from positions, never by comparing
      token ids, so pad == eos is safe. When rows bring their own mask it is padded with 0 instead.

    Example:
        >>> out = PadCollator()([{"input_ids": [5, 6, 7], "labels": 1}, {"input_ids": [8], "labels": 0}])
        >>> out["input_ids"].tolist(), out["attention_mask"].tolist(), out["labels"].tolist()
        ([[5, 6, 7], [8, 0, 0]], [[1, 1, 1], [1, 0, 0]], [1, 0])
    """

    pad_values: Mapping[str, float | None] | None = None
    _: KW_ONLY
    pad_to_multiple_of: int | None = None
    max_length: int | None = None
    padding_side: str = "right"
    attention_mask: str | None = "attention_mask"
    truncation_side: str = "right"

    def __post_init__(self) -> None:
        object.__setattr__(self, "pad_values", dict(self.pad_values or {}))
        for side_name in ("padding_side", "truncation_side"):
            if getattr(self, side_name) not in ("left", "right"):
                raise ValueError(f"{side_name} must be 'left' or 'right', got {getattr(self, side_name)!r}")
        for opt in ("pad_to_multiple_of", "max_length"):
            value = getattr(self, opt)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ValueError(f"{opt} must be a positive int or None, got {value!r}")
        max_length, multiple = self.max_length, self.pad_to_multiple_of
        if max_length and multiple and max_length % multiple:
            raise ValueError(
                f"max_length={max_length} is not a multiple of pad_to_multiple_of={multiple}, so padded "
                "batches could not respect both; pick a max_length that is a multiple"
            )

    @classmethod
    def for_tokenizer(cls, tokenizer: Any, **kw: Any) -> PadCollator:
        """A collator with the tokenizer's pad ids and sides: ``input_ids`` -> ``pad_token_id``, ``labels`` ->
        -100, ``token_type_ids`` -> ``pad_token_type_id``, ``special_tokens_mask`` -> 1; ``padding_side`` and
        ``truncation_side`` from the tokenizer. Keywords override.

        Example:
            >>> collate = PadCollator.for_tokenizer(tokenizer, pad_to_multiple_of=8)  # doctest: +SKIP
        """
        if getattr(tokenizer, "pad_token_id", None) is None:
            raise ValueError(
                f"{type(tokenizer).__name__} has no pad token; set one, e.g. tokenizer.pad_token = "
                "tokenizer.eos_token (safe here: the attention mask comes from positions and labels pad with -100)"
            )
        pad_values = {
            "input_ids": tokenizer.pad_token_id,
            "labels": LABEL_PAD,
            "token_type_ids": getattr(tokenizer, "pad_token_type_id", 0),
            "special_tokens_mask": 1,
        }
        pad_values.update(kw.pop("pad_values", None) or {})
        kw.setdefault("padding_side", getattr(tokenizer, "padding_side", "right"))
        kw.setdefault("truncation_side", getattr(tokenizer, "truncation_side", "right"))
        return cls(pad_values, **kw)

    def _pad_value(self, name: str, dtype: np.dtype) -> Any:
        if name in self.pad_values:
            return self.pad_values[name]
        if name == "labels":
            return LABEL_PAD
        if name == self.attention_mask or dtype.kind in "biu":
            return False if dtype.kind == "b" else 0
        return None

    def _width(self, longest: int) -> int:
        width = min(longest, self.max_length) if self.max_length else longest
        if self.pad_to_multiple_of:
            width = -(-width // self.pad_to_multiple_of) * self.pad_to_multiple_of
        return width

    def __call__(self, batch: Any) -> dict[str, Any]:
        columns, n = _rows_of(batch)
        out: dict[str, Any] = {}
        padded: dict[str, np.ndarray] = {}  # field -> (rows, width) bool mask of real positions
        masks: list[tuple[np.ndarray, int, np.ndarray]] = []  # fields with equal lengths share one mask
        for name, values in columns.items():
            field = (_all_ones(values) if name == self.attention_mask else None) or _read(name, values)
            if isinstance(field, _PassThrough):
                out[name] = field.values
            elif isinstance(field, _Stack):
                out[name] = torch.from_numpy(np.array(field.values, dtype=_out_dtype(field.values.dtype)))
            elif isinstance(field, _Ragged):
                out[name], padded[name] = self._pad_ragged(name, field, n, masks)
            else:
                out[name], padded[name] = self._pad_arrays(name, field)
        name = self.attention_mask
        if name and name not in columns and padded:
            source = next((f for f in ("input_ids", "inputs_embeds") if f in padded), None)
            source = source or next((f for f in padded if f != "labels"), None)
            if source is not None:
                out[name] = torch.from_numpy(padded[source].astype(np.int64))
        return out

    def _pad_ragged(self, name: str, field: _Ragged, n: int, masks: list) -> tuple[torch.Tensor, np.ndarray]:
        dtype = _out_dtype(field.flat.dtype) if len(field.flat) else np.dtype(np.int64)
        pad = self._pad_value(name, dtype)
        longest = int(field.lengths.max()) if n else 0
        if pad is None:
            if n and (field.lengths != longest).any():
                bad = int(np.flatnonzero(field.lengths != field.lengths[0])[0])
                why = (
                    "its pad value is None" if name in self.pad_values else f"{dtype} fields have no default"
                )
                raise ValueError(
                    f"field {name!r} is ragged (row 0 has {field.lengths[0]} values, row {bad} has "
                    f"{field.lengths[bad]}) and has no pad value ({why}); pass PadCollator(pad_values="
                    f"{{{name!r}: 0.0}}) or make the rows equal length"
                )
            return torch.from_numpy(np.array(field.flat.reshape(n, longest), dtype=dtype)), np.ones(
                (n, longest), bool
            )
        _check_pad(name, pad, dtype)
        width = self._width(longest)
        field = _truncate(field, width, self.truncation_side, longest)
        lengths = field.lengths
        mask = next(
            (m for lens, w, m in masks if w == width and (lens is lengths or (lens == lengths).all())), None
        )
        if mask is None:
            mask = _row_mask(lengths, width, self.padding_side)
            masks.append((lengths, width, mask))
        if name == self.attention_mask and pad == 0 and (field.flat == 1).all():
            return torch.from_numpy(mask.astype(dtype)), mask  # a mask of ones padded with 0 is the row mask
        result = np.zeros((n, width), dtype=dtype) if pad == 0 else np.full((n, width), pad, dtype=dtype)
        result[mask] = field.flat  # row-major order of the mask = the order of the flat values
        return torch.from_numpy(result), mask

    def _pad_arrays(self, name: str, field: _Arrays) -> tuple[torch.Tensor, np.ndarray]:
        rows = field.rows
        ndim = max(a.ndim for a in rows)
        real = [a for a in rows if a.ndim == ndim]
        dtype = _out_dtype(np.result_type(*real))
        shape = [max(a.shape[d] if a.ndim == ndim else 0 for a in rows) for d in range(ndim)]
        ragged = any(a.shape != tuple(shape) for a in rows)
        pad = (
            self.pad_values.get(name)
            if name in self.pad_values
            else (self._pad_value(name, dtype) if ragged else None)
        )
        if pad is None:
            if ragged:
                bad = next(i for i, a in enumerate(rows) if a.shape != rows[0].shape)
                raise ValueError(
                    f"field {name!r} is ragged (row 0 has shape {rows[0].shape}, row {bad} has {rows[bad].shape}) "
                    f"and has no pad value; pass PadCollator(pad_values={{{name!r}: 0}}) or make the shapes equal"
                )
            return torch.from_numpy(np.stack(rows).astype(dtype)), np.ones((len(rows), shape[0]), bool)
        _check_pad(name, pad, dtype)
        shape[0] = self._width(shape[0])
        result = np.full((len(rows), *shape), pad, dtype=dtype)
        kept = np.zeros(len(rows), dtype=np.int64)
        for i, a in enumerate(rows):  # one slice assignment per row; N-D fields are not the token hot path
            if a.ndim != ndim:
                continue  # an empty row: all padding
            if a.shape[0] > shape[0]:
                a = a[: shape[0]] if self.truncation_side == "right" else a[a.shape[0] - shape[0] :]
            kept[i] = a.shape[0]
            where = tuple(
                slice(0, s) if self.padding_side == "right" else slice(full - s, full)
                for s, full in zip(a.shape, shape)
            )
            result[(i, *where)] = a
        return torch.from_numpy(result), _row_mask(kept, shape[0], self.padding_side)


def _first_fit(lengths: np.ndarray, capacity: int) -> list[list[int]]:
    """Sequences (by position) into rows of at most ``capacity`` tokens: each goes to the first row with room."""
    rows: list[list[int]] = []
    used: list[int] = []
    for i, length in enumerate(lengths.tolist()):
        r = next((r for r, u in enumerate(used) if u + length <= capacity), len(rows))
        if r == len(rows):
            rows.append([])
            used.append(0)
        rows[r].append(i)
        used[r] += length
    return rows


@dataclass(frozen=True, kw_only=True)
class PackCollator:
    """Padding-free packing for causal LM: a batch's sequences concatenated into one row (or, with
    ``max_length``, into rows of ``max_length`` tokens filled first-fit), with no attention mask.

    Output: ``input_ids``, ``labels`` and ``position_ids`` of shape (rows, tokens); ``position_ids`` restart at 0
    for every sequence; ``labels`` are a copy of ``input_ids`` when the batch has none, and -100 at the first token
    of every sequence (so no sequence learns to predict another's start); ``cu_seq_lens_q``/``cu_seq_lens_k``
    (int32 boundaries over the flattened rows) and ``max_length_q``/``max_length_k`` for FlashAttention. Fields
    aligned with ``input_ids`` (one value per token) are packed the same way; per-sequence fields (``_index``,
    scalars, strings) are listed in packed order. An all-ones ``attention_mask`` is dropped.

    transformers keeps packed sequences apart by ``position_ids`` only when no attention mask is passed and no
    cache is built: train with ``use_cache=False``. With ``max_length`` the rows are filled up to exactly
    ``max_length`` tokens; the tail of a row is padding (``pad_value``, labels -100, positions restarting at 0, so
    it is its own segment). A sequence longer than ``max_length`` is an error unless ``truncate=True``.

    Example:
        >>> out = PackCollator()([{"input_ids": [5, 6, 7]}, {"input_ids": [8, 9]}])
        >>> out["input_ids"].tolist(), out["position_ids"].tolist(), out["labels"].tolist()
        ([[5, 6, 7, 8, 9]], [[0, 1, 2, 0, 1]], [[-100, 6, 7, -100, 9]])
        >>> out["cu_seq_lens_q"].tolist(), out["max_length_q"]
        ([0, 3, 5], 3)
    """

    max_length: int | None = None
    truncate: bool = False
    pad_value: int = 0

    def __post_init__(self) -> None:
        if self.max_length is not None and (not isinstance(self.max_length, int) or self.max_length < 1):
            raise ValueError(f"max_length must be a positive int or None, got {self.max_length!r}")

    def __call__(self, batch: Any) -> dict[str, Any]:
        columns, n = _rows_of(batch)
        if "input_ids" not in columns:
            raise ValueError(f"PackCollator needs an 'input_ids' field; the batch has {sorted(columns)}")
        ids = _read("input_ids", columns["input_ids"])
        if not isinstance(ids, _Ragged) or ids.flat.dtype.kind not in "iu" or n == 0:
            raise TypeError(
                "PackCollator needs 'input_ids' as a non-empty batch of 1-D integer token sequences"
            )
        if (ids.lengths == 0).any():
            raise ValueError(
                f"row {int(np.flatnonzero(ids.lengths == 0)[0])} has no tokens; filter empty sequences out first"
            )
        if "position_ids" in columns:
            raise ValueError("PackCollator builds position_ids itself; remove the 'position_ids' field")
        tokens, per_seq = {"input_ids": ids}, {}
        for name, values in columns.items():
            if name == "input_ids":
                continue
            field = (_all_ones(values) if name == "attention_mask" else None) or _read(name, values)
            if name == "attention_mask" and isinstance(field, _Ragged) and field.flat.all():
                continue  # all ones: carries nothing, and passing it would merge the packed sequences
            if isinstance(field, _Ragged) and np.array_equal(field.lengths, ids.lengths):
                tokens[name] = field
            elif isinstance(field, (_Stack, _PassThrough)):
                per_seq[name] = field
            else:
                lengths = field.lengths if isinstance(field, _Ragged) else None
                row = 0 if lengths is None else int(np.flatnonzero(lengths != ids.lengths)[0])
                raise ValueError(
                    f"field {name!r} is not one value per token (row {row} does not match its input_ids length); "
                    "PackCollator packs token-aligned fields and lists per-sequence ones, so drop or fix this field"
                    + (
                        " (an attention_mask with zeros means pre-padded rows: pass the unpadded sequences)"
                        if name == "attention_mask"
                        else ""
                    )
                )
        if "labels" not in tokens:
            tokens["labels"] = _Ragged(ids.lengths, ids.flat.astype(np.int64))
        return self._pack(tokens, per_seq, ids.lengths)

    def _pack(
        self, tokens: dict[str, _Ragged], per_seq: dict[str, Any], lengths: np.ndarray
    ) -> dict[str, Any]:
        capacity = self.max_length or int(lengths.sum())
        if lengths.max() > capacity:
            row = int(np.flatnonzero(lengths > capacity)[0])
            if not self.truncate:
                raise ValueError(
                    f"row {row} has {lengths[row]} tokens, more than max_length={capacity}; pass "
                    "PackCollator(max_length=..., truncate=True) to cut long sequences, or raise max_length"
                )
            tokens = {name: _truncate(field, capacity, "right") for name, field in tokens.items()}
            lengths = tokens["input_ids"].lengths
        rows = _first_fit(lengths, capacity) if self.max_length else [list(range(len(lengths)))]
        order = np.array([i for row in rows for i in row], dtype=np.int64)
        starts = np.cumsum(lengths) - lengths
        ordered = lengths[order]
        new_starts = np.cumsum(ordered) - ordered
        gather = np.repeat(starts[order] - new_starts, ordered) + np.arange(int(ordered.sum()))
        used = np.array([int(lengths[row].sum()) for row in rows], dtype=np.int64)
        mask = _row_mask(used, capacity, "right")
        out: dict[str, Any] = {}
        for name, field in tokens.items():
            flat = field.flat[gather]
            pad = LABEL_PAD if name == "labels" else (self.pad_value if name == "input_ids" else 0)
            grid = np.full((len(rows), capacity), pad, dtype=_out_dtype(flat.dtype))
            grid[mask] = flat
            out[name] = grid
        first_token = np.zeros(int(ordered.sum()), dtype=bool)
        first_token[new_starts] = True
        out["labels"][mask] = np.where(first_token, LABEL_PAD, out["labels"][mask])
        # Padding tails restart their positions, so they form their own segment.
        tail_start = np.where(mask, 0, used[:, None])
        positions = np.zeros(mask.shape, dtype=np.int64)
        positions[mask] = np.arange(len(first_token)) - np.repeat(new_starts, ordered)
        positions[~mask] = (np.arange(capacity)[None, :] - tail_start)[~mask]
        out["position_ids"] = positions
        segments = [
            s for r, row in enumerate(rows) for s in [*lengths[row].tolist(), capacity - int(used[r])] if s
        ]
        cu = np.concatenate([[0], np.cumsum(segments)]).astype(np.int32)
        result = {name: torch.from_numpy(value) for name, value in out.items()}
        result["cu_seq_lens_q"] = torch.from_numpy(cu)
        result["cu_seq_lens_k"] = result["cu_seq_lens_q"].clone()
        result["max_length_q"] = result["max_length_k"] = int(max(segments))
        for name, field in per_seq.items():
            if isinstance(field, _Stack):
                result[name] = torch.from_numpy(
                    np.array(field.values[order], dtype=_out_dtype(field.values.dtype))
                )
            else:
                result[name] = [field.values[i] for i in order.tolist()]
        return result
