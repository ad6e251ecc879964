"""Transform helpers shared by the map-style and streamed adapters: the signature check for the per-batch
Generator, naming a transform in errors, and the pickling check for spawned DataLoader workers."""

from __future__ import annotations

import inspect
import pickle
from collections.abc import Callable, Mapping
from typing import Any

Transform = Callable[..., Mapping[str, Any]]


def _takes_rng(fn: Callable) -> bool:
    """True when ``fn`` accepts a second positional argument (the batch's numpy Generator)."""
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):  # builtins without a signature take the batch only
        return False
    kinds = [p.kind for p in params]
    if inspect.Parameter.VAR_POSITIONAL in kinds:
        return True
    positional = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    return sum(kind in positional for kind in kinds) >= 2


def _describe(fn: Callable) -> str:
    name = getattr(fn, "__qualname__", None) or type(fn).__qualname__
    return f"{name!r} (module {getattr(fn, '__module__', None) or type(fn).__module__!r})"


def _pickle_problem(transform: Callable | None) -> str | None:
    """Why ``transform`` cannot travel to a spawned DataLoader worker, or None when it can."""
    if transform is None:
        return None
    try:
        pickle.dumps(transform)
    # pickle raises PicklingError, AttributeError or TypeError depending on the object
    except Exception as exc:
        return (
            f"the transform {_describe(transform)} cannot be pickled ({type(exc).__name__}: {exc}), so DataLoader "
            "workers started with 'spawn' or 'forkserver' cannot receive it. Define it at module level (not a "
            "lambda or a function nested in another function), or use num_workers=0"
        )
    return None
