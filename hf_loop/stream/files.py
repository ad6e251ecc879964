"""What a streamed dataset is made of, learned without reading its data: whether StreamDataset can own its order
(:func:`check_source`), how many examples each shard holds (:func:`shard_counts`), and what identifies it
(:func:`source_identity`)."""

from __future__ import annotations

import os
from typing import Any

from datasets.packaged_modules.arrow.arrow import Arrow
from datasets.packaged_modules.parquet.parquet import Parquet

from hf_loop.errors import DataError

# Iterables that mix several sources with their own random state: a reader cannot take an exact share of them.
_MIXING = ("RandomlyCyclingMultiSourcesExamplesIterable", "CyclingMultiSourcesExamplesIterable")


def _chain(ex_iterable: Any) -> list[Any]:
    """The examples iterables of a datasets pipeline, outermost first (sources of concatenations included)."""
    out, todo = [], [ex_iterable]
    while todo:
        node = todo.pop()
        out.append(node)
        if hasattr(node, "ex_iterable"):
            todo.append(node.ex_iterable)
        todo.extend(getattr(node, "ex_iterables", []))
    return out


def check_source(ds: Any) -> None:
    """Refuse the streamed datasets whose order StreamDataset could not own exactly.

    Raises:
        TypeError: ``ds`` is not a ``datasets.IterableDataset``.
        DataError: it was already split by node, buffer-shuffled, or mixed with ``interleave_datasets``.
    """
    from datasets import IterableDataset

    if not isinstance(ds, IterableDataset):
        hint = " (a map-style datasets.Dataset goes to hl.MapDataset)" if hasattr(ds, "__getitems__") else ""
        raise TypeError(f"StreamDataset expects a datasets.IterableDataset, got {type(ds).__name__}{hint}")
    if getattr(ds, "_distributed", None) is not None:
        raise DataError(
            "this stream was already split with datasets.distributed.split_dataset_by_node; StreamDataset "
            "splits shards over ranks and workers itself. Pass the unsplit stream"
        )
    names = [type(node).__name__ for node in _chain(ds._ex_iterable)]
    if "BufferShuffledExamplesIterable" in names:
        raise DataError(
            "this stream was shuffled with IterableDataset.shuffle(); its buffer state cannot be resumed "
            "exactly. Pass the unshuffled stream and use StreamDataset(..., shuffle_buffer=N, seed=S)"
        )
    mixed = [name for name in names if name in _MIXING]
    if mixed:
        raise DataError(
            f"a stream mixed by datasets.interleave_datasets ({mixed[0]}) is not supported: its source "
            "choice is a random state that cannot be split exactly once over readers or resumed exactly. Mix "
            "the sources with StreamDataset([a, b], weights=[...]) instead, which keeps both guarantees"
        )


def shard_counts(ds: Any) -> list[int] | None:
    """Examples per shard, when known without reading the data: local parquet footers, local Arrow files, or the
    shards of ``Dataset.to_iterable_dataset``; None otherwise (other formats, remote files, or a pipeline — map,
    filter — that can change the number of rows).

    Example:
        >>> from datasets import Dataset
        >>> shard_counts(Dataset.from_dict({"x": list(range(10))}).to_iterable_dataset(num_shards=3))
        [4, 3, 3]
    """
    ex = ds._ex_iterable
    while type(ex).__name__ == "SelectColumnsIterable":
        ex = ex.ex_iterable
    kwargs = getattr(ex, "kwargs", None)
    if type(ex).__name__ != "ArrowExamplesIterable" or not isinstance(kwargs, dict):
        return None
    if set(kwargs) == {"shards", "batch_size"}:  # Dataset.to_iterable_dataset: in-memory Arrow shards
        shards = kwargs["shards"]
        return [len(s) for s in shards] if len(shards) == ds.num_shards else None
    files = kwargs.get("files")
    if not isinstance(files, list) or len(files) != ds.num_shards:
        return None
    if not all(isinstance(f, str) and os.path.isfile(f) for f in files):
        return None
    builder = getattr(getattr(ex, "generate_tables_fn", None), "__self__", None)
    if isinstance(builder, Arrow) and set(kwargs) == {"files"}:
        return [_arrow_rows(path) for path in files]
    # Hub-layout folders load through a renamed subclass of the parquet builder
    if not isinstance(builder, Parquet) or getattr(builder.config, "filters", None) is not None:
        return None
    if set(kwargs) != {"files", "row_groups_list"}:
        return None
    import pyarrow.parquet as pq

    metas: dict[str, Any] = {}
    counts = []
    for path, row_groups in zip(files, kwargs["row_groups_list"]):
        meta = metas.get(path) or metas.setdefault(path, pq.ParquetFile(path).metadata)
        ids = range(meta.num_row_groups) if row_groups is None else row_groups
        counts.append(sum(meta.row_group(i).num_rows for i in ids))
    return counts


def _arrow_rows(path: str) -> int:
    """Rows of an Arrow IPC stream or file, from its record batch headers (memory-mapped: no data is read)."""
    import pyarrow as pa

    with pa.memory_map(path) as source:
        try:
            return sum(batch.num_rows for batch in pa.ipc.open_stream(source))
        except pa.ArrowInvalid:
            source.seek(0)
            reader = pa.ipc.open_file(source)
            return sum(reader.get_batch(i).num_rows for i in range(reader.num_record_batches))


def source_identity(ds: Any) -> dict[str, Any]:
    """What identifies a streamed dataset's data without reading it: its files with their sizes, else the
    fingerprints of ``to_iterable_dataset``'s shards, else the dataset's name, config and features."""
    ex = ds._ex_iterable
    while hasattr(ex, "ex_iterable") and not hasattr(ex, "kwargs"):
        ex = ex.ex_iterable
    kwargs = getattr(ex, "kwargs", None) or {}
    files = kwargs.get("files")
    if isinstance(files, list) and all(isinstance(f, str) for f in files):
        sizes = [os.path.getsize(f) if os.path.isfile(f) else None for f in files]
        return {"files": [os.path.basename(f) for f in files], "sizes": sizes}
    shards = kwargs.get("shards")
    if isinstance(shards, list) and all(hasattr(s, "_fingerprint") for s in shards):
        return {"fingerprints": [s._fingerprint for s in shards]}
    info = ds.info
    features = None if ds.features is None else sorted(ds.features)
    return {"dataset": info.dataset_name, "config": info.config_name, "features": features}
