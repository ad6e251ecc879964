"""``PackCollator``: padding-free packing of a batch's sequences for causal LM."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from hf_loop.checks import boolean, integer, optional_integer
from hf_loop.collate._arrays import LABEL_PAD, _out_dtype, _row_mask, _truncate
from hf_loop.collate._fields import _all_ones, _PassThrough, _Ragged, _read, _rows_of, _Stack


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
    aligned with ``input_ids`` (one value per token) are packed the same way; per-sequence fields (ids,
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
        optional_integer("max_length", self.max_length, minimum=1)
        boolean("truncate", self.truncate)
        integer("pad_value", self.pad_value)

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
