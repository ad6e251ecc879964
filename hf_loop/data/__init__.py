"""Map-style adapter: a Hugging Face ``datasets.Dataset`` as a fast torch ``Dataset`` (:class:`MapDataset`,
:func:`to_torch`), and the batch type both adapters yield (:class:`Columns`).

Modules: ``columns`` (:class:`Columns` and column helpers), ``transform`` (transform checks shared with
``hf_loop.stream``), ``arrow`` (the Arrow cache, gathering rows with one read, row lengths from offsets),
``dataset`` (:class:`MapDataset` and :func:`to_torch`).
"""

# ``_name as _name``: private helpers re-exported for the modules that import them from here (hf_loop.stream).
from hf_loop.data.arrow import _arrow_lengths as _arrow_lengths
from hf_loop.data.columns import INDEX_KEY, Columns
from hf_loop.data.columns import _column_len as _column_len
from hf_loop.data.dataset import MapDataset, to_torch
from hf_loop.data.transform import Transform
from hf_loop.data.transform import _describe as _describe
from hf_loop.data.transform import _pickle_problem as _pickle_problem
from hf_loop.data.transform import _takes_rng as _takes_rng

__all__ = ["INDEX_KEY", "Columns", "MapDataset", "Transform", "to_torch"]
