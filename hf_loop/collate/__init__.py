"""Vectorised collation: :class:`PadCollator` (pad every ragged field) and :class:`PackCollator` (padding-free
packing for causal LM).

Both read a batch field by field into flat numpy values plus per-row lengths — straight from Arrow offsets for
:class:`hf_loop.Columns`, or with one conversion pass per field for rows of Python lists — and build each padded
field with one masked assignment. There is no Python loop over tokens.

Modules: ``_fields`` (a batch read field by field), ``_arrays`` (output dtypes, row masks, truncation, pad checks),
``pad`` (:class:`PadCollator`), ``pack`` (:class:`PackCollator`).
"""

from hf_loop.collate._arrays import LABEL_PAD
from hf_loop.collate.pack import PackCollator
from hf_loop.collate.pad import PadCollator

__all__ = ["LABEL_PAD", "PackCollator", "PadCollator"]
