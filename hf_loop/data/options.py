"""The ``transform`` / ``columns`` checks both adapters (:class:`~hf_loop.MapDataset` and
:class:`~hf_loop.StreamDataset`) run in their constructors, kept in one place so that both raise the same
errors."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


def _checked_options(transform: Any, columns: Sequence[str] | None) -> list[str] | None:
    """Check an adapter's ``transform`` and ``columns`` arguments; return ``columns`` as a list (or None).

    Raises:
        TypeError: ``transform`` is not callable, or ``columns`` is a single string (which would otherwise be
            read as a sequence of one-letter column names).

    Example:
        >>> _checked_options(None, ("input_ids", "label"))
        ['input_ids', 'label']
    """
    if transform is not None and not callable(transform):
        raise TypeError(f"transform must be callable (batch -> batch), got {type(transform).__name__}")
    if isinstance(columns, str):
        raise TypeError(
            f"columns must be a list of column names, got the string {columns!r}; use [{columns!r}]"
        )
    return None if columns is None else list(columns)
