"""``to_torch``: the one place that knows both adapters, above them (``hf_loop.data`` and ``hf_loop.stream``
never import each other's adapter)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from hf_loop.data import MapDataset, Transform
from hf_loop.stream import StreamDataset


def to_torch(
    ds: Any, *, transform: Transform | None = None, columns: Sequence[str] | None = None, **kw: Any
) -> MapDataset | StreamDataset:
    """Adapt a Hugging Face dataset to torch: ``Dataset`` -> :class:`~hf_loop.MapDataset`, ``IterableDataset``
    -> :class:`~hf_loop.StreamDataset`. Extra keywords go to the adapter.

    Example:
        >>> from datasets import Dataset
        >>> type(to_torch(Dataset.from_dict({"x": [1, 2]}))).__name__
        'MapDataset'
    """
    from datasets import Dataset, DatasetDict, IterableDataset, IterableDatasetDict

    if isinstance(ds, (DatasetDict, IterableDatasetDict)):
        raise TypeError(
            f"to_torch got a {type(ds).__name__} with splits {sorted(ds)}; pick one split, e.g. ds['train'] "
            "(or hl.load(..., split='train'))"
        )
    if isinstance(ds, Dataset):
        return MapDataset(ds, transform=transform, columns=columns, **kw)
    if isinstance(ds, IterableDataset):
        return StreamDataset(ds, transform=transform, columns=columns, **kw)
    raise TypeError(
        f"to_torch needs a datasets.Dataset or datasets.IterableDataset, got {type(ds).__name__}; load one with "
        "hl.load(...) or datasets.Dataset.from_dict(...)"
    )
