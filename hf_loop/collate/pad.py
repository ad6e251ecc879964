"""``PadCollator``: pad every ragged field of a batch to one length, vectorised, into a dict of tensors."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import KW_ONLY, dataclass
from typing import Any

import numpy as np
import torch

from hf_loop.checks import optional_integer
from hf_loop.collate._arrays import LABEL_PAD, _all_ones_flat, _check_pad, _out_dtype, _row_mask, _truncate
from hf_loop.collate._fields import _all_ones, _Arrays, _PassThrough, _Ragged, _read, _rows_of, _Stack


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
            optional_integer(opt, getattr(self, opt), minimum=1)
        if self.attention_mask is not None and not isinstance(self.attention_mask, str):
            raise TypeError(
                f"attention_mask must be a field name (or None to build no mask), got {self.attention_mask!r}"
            )
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
            >>> collate = PadCollator.for_tokenizer(tokenizer, pad_to_multiple_of=8)
            >>> out = collate([tokenizer("w1 w2 w3"), tokenizer("w4")])     # rows as the tokenizer returns them
            >>> out["input_ids"].shape, out["attention_mask"][1].tolist()
            (torch.Size([2, 8]), [1, 0, 0, 0, 0, 0, 0, 0])
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
        masks: dict[bytes, tuple[int, int, np.ndarray]] = {}  # fields with equal lengths share one mask
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

    def _pad_ragged(self, name: str, field: _Ragged, n: int, masks: dict) -> tuple[torch.Tensor, np.ndarray]:
        """``masks`` maps the row lengths (as bytes: 8 a row, cheaper to compare than an elementwise ``==`` and
        ``.all()``) to (longest, width, row mask) of a field already padded in this batch."""
        dtype = _out_dtype(field.flat.dtype) if len(field.flat) else np.dtype(np.int64)
        pad = self._pad_value(name, dtype)
        key = field.lengths.tobytes()
        known = masks.get(key)
        longest = known[0] if known else (int(field.lengths.max()) if n else 0)
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
        width = known[1] if known else self._width(longest)
        field = _truncate(field, width, self.truncation_side, longest)
        if known:
            mask = known[2]
        else:
            mask = _row_mask(field.lengths, width, self.padding_side)
            masks[key] = (longest, width, mask)
        if name == self.attention_mask and pad == 0 and _all_ones_flat(field.flat):
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
