"""What both adapters (:class:`~hf_loop.MapDataset` and :class:`~hf_loop.StreamDataset`) do to a batch of
columns, in one place: the user's transform (called once per batch, its output checked), the ``label`` ->
``labels`` rename, and the column selection (:class:`BatchTransform`); plus the helpers behind it (does a
transform take a Generator, can it be pickled for spawned workers, how to name it in an error)."""

from __future__ import annotations

import inspect
import pickle
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from hf_loop.checks import boolean
from hf_loop.data.columns import column_len
from hf_loop.errors import DataError

Transform = Callable[..., Mapping[str, Any]]


def takes_rng(fn: Callable) -> bool:
    """True when ``fn`` accepts a second positional argument (the batch's numpy Generator).

    Example:
        >>> takes_rng(lambda batch: batch), takes_rng(lambda batch, rng: batch)
        (False, True)
    """
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):  # builtins without a signature take the batch only
        return False
    kinds = [p.kind for p in params]
    if inspect.Parameter.VAR_POSITIONAL in kinds:
        return True
    positional = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    return sum(kind in positional for kind in kinds) >= 2


def describe(fn: Callable) -> str:
    """A function's name and module, for error messages.

    Example:
        >>> describe(len)
        "'len' (module 'builtins')"
    """
    name = getattr(fn, "__qualname__", None) or type(fn).__qualname__
    return f"{name!r} (module {getattr(fn, '__module__', None) or type(fn).__module__!r})"


def pickle_problem(transform: Callable | None) -> str | None:
    """Why ``transform`` cannot travel to a spawned DataLoader worker, or None when it can.

    Example:
        >>> pickle_problem(len) is None
        True
    """
    if transform is None:
        return None
    try:
        pickle.dumps(transform)
    # pickle raises PicklingError, AttributeError or TypeError depending on the object
    except Exception as exc:
        return (
            f"the transform {describe(transform)} cannot be pickled ({type(exc).__name__}: {exc}), so DataLoader "
            "workers started with 'spawn' or 'forkserver' cannot receive it. Define it at module level (not a "
            "lambda or a function nested in another function), or use num_workers=0"
        )
    return None


class BatchTransform:
    """The per-batch work both adapters share: ``transform`` (set_transform semantics: a dict of columns in, a
    dict of columns out, one value per row; a second parameter gets a numpy Generator), the ``label`` ->
    ``labels`` rename, and keeping ``columns`` (named after the rename; ``"label"`` also finds ``labels``).

    Pickles for DataLoader workers; a transform that cannot be pickled is reported when the adapter is pickled
    (``num_workers=0`` and fork workers never pickle it), with a message that names the function.

    Args:
        transform: the user's function, or None.
        columns: columns to keep after the transform (None keeps all).
        rename_label: rename ``label`` to ``labels``, the name transformers models expect.

    Raises:
        TypeError: ``transform`` is not callable, ``columns`` is a single string, ``rename_label`` not a bool.

    Example:
        >>> bt = BatchTransform(lambda b: {"x": [v * 2 for v in b["x"]], "label": b["label"]}, ["x", "label"])
        >>> bt({"x": [1, 2], "label": [0, 1]}, 2)
        {'x': [2, 4], 'labels': [0, 1]}
    """

    def __init__(
        self,
        transform: Transform | None = None,
        columns: Sequence[str] | None = None,
        rename_label: bool = True,
    ) -> None:
        if transform is not None and not callable(transform):
            raise TypeError(f"transform must be callable (batch -> batch), got {type(transform).__name__}")
        if isinstance(columns, str):
            raise TypeError(
                f"columns must be a list of column names, got the string {columns!r}; use [{columns!r}]"
            )
        self.transform = transform
        self.columns = None if columns is None else list(columns)
        self.rename_label = boolean("rename_label", rename_label)
        self.takes_rng = transform is not None and takes_rng(transform)
        self.pickle_problem = pickle_problem(transform)

    def __getstate__(self) -> dict[str, Any]:
        if self.pickle_problem is not None:
            raise TypeError(self.pickle_problem)
        return self.__dict__.copy()

    def __eq__(self, other: object) -> bool:
        return isinstance(other, BatchTransform) and (self.transform, self.columns, self.rename_label) == (
            other.transform,
            other.columns,
            other.rename_label,
        )

    def __call__(
        self, batch: dict[str, Any], n: int, rng: np.random.Generator | None = None
    ) -> dict[str, Any]:
        """Transform (when there is one), rename and select: ``batch`` holds ``n`` rows."""
        return self.select(self.rename(self.apply(batch, n, rng) if self.transform is not None else batch))

    def apply(self, batch: dict[str, Any], n: int, rng: np.random.Generator | None) -> dict[str, Any]:
        """The transform's output for ``batch`` (``n`` rows), checked: a dict with one value per row."""
        out = self.transform(batch, rng) if self.takes_rng else self.transform(batch)
        if not isinstance(out, Mapping):
            raise TypeError(
                f"the transform {describe(self.transform)} returned {type(out).__name__}; it must return a dict of "
                "columns (column name -> one value per row), like a set_transform function"
            )
        out = dict(out)
        wrong = {name: column_len(v) for name, v in out.items() if column_len(v) != n}
        if wrong:
            raise DataError(
                f"the transform {describe(self.transform)} got {n} rows but returned columns of lengths {wrong}; "
                "it must return one value per input row (change the number of rows with ds.map(fn, "
                "batched=True) before wrapping the dataset)"
            )
        return out

    def renamed(self, names: Sequence[str]) -> list[str]:
        """Column names after the rename."""
        return [
            "labels" if self.rename_label and n == "label" and "labels" not in names else n for n in names
        ]

    def rename(self, batch: dict[str, Any]) -> dict[str, Any]:
        if self.rename_label and "label" in batch:
            if "labels" in batch:
                raise DataError(
                    "the batch has both 'label' and 'labels'; hf_loop renames 'label' to 'labels' for "
                    "transformers models. Drop one of them, or pass rename_label=False"
                )
            batch["labels"] = batch.pop("label")
        return batch

    def select(self, batch: dict[str, Any]) -> dict[str, Any]:
        """The selected columns of a renamed batch, in the order ``columns`` names them."""
        if self.columns is None:
            return batch
        wanted = ["labels" if self.rename_label and c == "label" else c for c in self.columns]
        missing = [c for c in wanted if c not in batch]
        if missing:
            stage = "after the transform" if self.transform is not None else "in the data"
            raise DataError(
                f"columns={self.columns} asks for {missing}, which do not exist {stage}; available: "
                f"{sorted(batch)}. Fix the names, or make the transform return them"
            )
        return {c: batch[c] for c in wanted}

    def source_columns(self, names: Sequence[str] | None) -> list[str] | None:
        """Columns to read from a source with columns ``names`` (None: all): ``columns`` pushed down before the
        rename when there is no transform, checked now, since the names are known.

        Raises:
            DataError: a selected column does not exist.
        """
        if self.columns is None or self.transform is not None or names is None:
            return None
        self.select(dict.fromkeys(self.renamed(list(names))))  # fail fast, with the usual message
        renamed = self.rename_label and "label" in names and "labels" not in names
        return ["label" if renamed and c in ("label", "labels") else c for c in self.columns]
