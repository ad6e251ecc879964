"""Map-style adapter: a Hugging Face ``datasets.Dataset`` as a fast torch ``Dataset`` (:class:`MapDataset`), and
what both adapters share: the batch type (:class:`Columns`) and the per-batch work (:class:`BatchTransform`).

Modules: ``columns`` (:class:`Columns`, :func:`column_len`), ``transform`` (:class:`BatchTransform`: transform,
rename, column selection), ``arrow`` (the Arrow cache, gathering rows with one read, :func:`arrow_lengths`),
``dataset`` (:class:`MapDataset`). ``hf_loop.stream`` imports from here; nothing here imports it.
"""

from hf_loop.data.arrow import arrow_lengths
from hf_loop.data.columns import Columns, column_len
from hf_loop.data.dataset import MapDataset
from hf_loop.data.transform import BatchTransform, Transform, describe, pickle_problem, takes_rng

__all__ = [
    "BatchTransform",
    "Columns",
    "MapDataset",
    "Transform",
    "arrow_lengths",
    "column_len",
    "describe",
    "pickle_problem",
    "takes_rng",
]
