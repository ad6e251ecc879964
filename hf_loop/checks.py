"""Type checks for options: a boolean given as ``"False"`` or an int given as ``2.0`` is an error that names the
option, never a value coerced with ``bool()`` or ``int()`` (torch refuses ``replacement="False"`` the same way).

Every layer (samplers, loader, collators, adapters, config) checks its options with these functions.
"""

from __future__ import annotations

from typing import Any

import numpy as np


def boolean(name: str, value: Any) -> bool:
    """``value`` when it is a bool (numpy bools too); otherwise a TypeError naming ``name``.

    Example:
        >>> boolean("drop_last", True)
        True
        >>> boolean("drop_last", "False")
        Traceback (most recent call last):
        ...
        TypeError: drop_last must be True or False, got str 'False'
    """
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    raise TypeError(f"{name} must be True or False, got {type(value).__name__} {value!r}")


def integer(name: str, value: Any, minimum: int | None = None) -> int:
    """``value`` as an int when it is an integer (not a bool, not a float) of at least ``minimum``.

    Raises:
        TypeError: not an integer (``2.0``, ``"2"``, ``True``), naming ``name``.
        ValueError: below ``minimum``.

    Example:
        >>> integer("batch_size", np.int64(8), minimum=1)
        8
        >>> integer("batch_size", 8.0)
        Traceback (most recent call last):
        ...
        TypeError: batch_size must be an int, got float 8.0
    """
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return int(value)


def optional_integer(name: str, value: Any, minimum: int | None = None) -> int | None:
    """:func:`integer`, with None passed through.

    Example:
        >>> optional_integer("max_length", None) is None
        True
    """
    return None if value is None else integer(name, value, minimum)
