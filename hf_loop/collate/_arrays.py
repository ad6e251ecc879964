"""Vectorised padding helpers shared by :class:`hf_loop.PadCollator` and :class:`hf_loop.PackCollator`: output
dtypes, row masks, truncation and pad value checks."""

from __future__ import annotations

from typing import Any

import numpy as np

from hf_loop.collate._fields import _Ragged

LABEL_PAD = -100  # the index torch's cross-entropy ignores


def _out_dtype(dtype: np.dtype) -> np.dtype:
    """int -> int64, bool kept, half precision kept, other floats -> float32 (what models expect)."""
    if dtype.kind in "iu":
        return np.dtype(np.int64)
    if dtype.kind == "f":
        return dtype if dtype.itemsize == 2 else np.dtype(np.float32)
    return dtype


def _all_ones_flat(flat: np.ndarray) -> bool:
    """Every value is 1. One-byte values (the int8 masks datasets stores) are counted by ``bytes.count`` in C,
    with no temporary comparison array."""
    if flat.dtype.itemsize == 1 and flat.dtype.kind in "biu":
        return flat.tobytes().count(1) == len(flat)
    return bool((flat == 1).all())


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


def _check_pad(name: str, pad: Any, dtype: np.dtype) -> None:
    if type(pad) is int:  # the defaults (0, -100) and most explicit pad ids: valid for every dtype
        return
    if isinstance(pad, (bool, int, float, np.number)):
        if dtype.kind in "biu" and float(pad) != int(pad):
            raise ValueError(f"pad value {pad!r} for the integer field {name!r} is not an integer")
        return
    raise TypeError(f"pad value for field {name!r} must be a number, got {type(pad).__name__} {pad!r}")
