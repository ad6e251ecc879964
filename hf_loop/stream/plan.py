"""The shard plan: which reader (rank x DataLoader worker) reads which shards of a streamed dataset.

Pure functions of (shard counts, reader count, seed, epoch), so one process can compute and test every rank's
plan. The only I/O is reading parquet footers to learn how many examples each shard holds.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass, field
from typing import Any

import numpy as np
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
    """Examples per shard, read from local parquet footers; None when unknown (other formats, remote
    files, or a pipeline — map, filter — that can change the number of rows)."""
    ex = ds._ex_iterable
    while type(ex).__name__ == "SelectColumnsIterable":
        ex = ex.ex_iterable
    kwargs = getattr(ex, "kwargs", None)
    builder = getattr(getattr(ex, "generate_tables_fn", None), "__self__", None)
    if (
        type(ex).__name__ != "ArrowExamplesIterable"
        or not isinstance(builder, Parquet)  # Hub-layout folders load through a renamed subclass
        or getattr(builder.config, "filters", None) is not None
        or not isinstance(kwargs, dict)
        or set(kwargs) != {"files", "row_groups_list"}
    ):
        return None
    import pyarrow.parquet as pq

    files, groups = kwargs["files"], kwargs["row_groups_list"]
    if len(files) != ds.num_shards or not all(isinstance(f, str) and os.path.isfile(f) for f in files):
        return None
    metas: dict[str, Any] = {}
    counts = []
    for path, row_groups in zip(files, groups):
        meta = metas.get(path) or metas.setdefault(path, pq.ParquetFile(path).metadata)
        ids = range(meta.num_row_groups) if row_groups is None else row_groups
        counts.append(sum(meta.row_group(i).num_rows for i in ids))
    return counts


@dataclass(frozen=True)
class Layout:
    """How a stream is cut for a number of readers (fixed for a bound stream, checked on resume)."""

    readers: int
    shards: int  # units the plan deals out
    mode: str  # "shards" | "row groups" | "examples"
    counts: list[int] | None = field(default=None, repr=False)  # examples per unit, when known

    def identity(self) -> dict[str, Any]:
        return {"readers": self.readers, "shards": self.shards, "mode": self.mode}


def layout_for(ds: Any, world_size: int, num_workers: int, *, split_examples: bool) -> tuple[Any, Layout]:
    """Choose the units for world_size x max(num_workers, 1) readers: whole shards, else row groups
    (``reshard``), else examples.

    Returns the (possibly resharded) dataset the readers read, and its layout.

    Raises:
        DataError: fewer shards than readers even after resharding, and ``split_examples`` is False.
    """
    readers = world_size * max(num_workers, 1)
    source, mode = ds, "shards"
    if ds.num_shards < readers:
        finer = ds.reshard()
        if finer.num_shards > ds.num_shards:
            source, mode = finer, "row groups"
    counts = shard_counts(source)
    if source.num_shards < readers:
        if not split_examples:
            per_rank = source.num_shards // world_size
            if per_rank > 1:
                fewer = f"use num_workers={per_rank} (shards / world_size), "
            elif per_rank == 1:
                fewer = "use num_workers=0 (one reader per rank), "
            else:
                fewer = f"no worker count helps with fewer shards than the {world_size} ranks; "
            raise DataError(
                f"the stream has {ds.num_shards} shard(s) ({source.num_shards} after splitting into row "
                f"groups) but world_size={world_size} x num_workers={num_workers} = {readers} readers, so "
                f"some readers would get no shard. Fix: {fewer}write the data in more files (or smaller "
                "parquet row groups), or pass split_examples=True to split by example instead (every reader "
                f"then reads all {source.num_shards} shard(s) and keeps 1 example in {readers})"
            )
        warnings.warn(
            f"StreamDataset: {source.num_shards} shard(s) for {readers} readers; splitting by example "
            f"(split_examples=True): every reader reads all the data and keeps 1 example in {readers}",
            UserWarning,
            stacklevel=3,
        )
        mode = "examples"
    return source, Layout(readers=readers, shards=source.num_shards, mode=mode, counts=counts)


def shard_order(layout: Layout, seed: int, epoch: int, shuffle: bool, source: int = 0) -> np.ndarray:
    """The epoch's shard order: a permutation from (seed, epoch[, source]) when shuffling, else file order."""
    if not shuffle:
        return np.arange(layout.shards)
    key = [seed, epoch] if source == 0 else [seed, epoch, source]
    return np.random.default_rng(key).permutation(layout.shards)


def assign(layout: Layout, seed: int, epoch: int, shuffle: bool, source: int = 0) -> list[list[int]]:
    """Units each global reader reads this epoch, in reading order.

    Walks the epoch's shard order and gives each shard to the reader with the fewest examples so far (shard
    counts where known, else one per shard), so readers stay balanced without reading anything. In "examples"
    mode every reader reads every shard (and keeps its share of rows).
    """
    order = shard_order(layout, seed, epoch, shuffle, source)
    if layout.mode == "examples":
        return [order.tolist() for _ in range(layout.readers)]
    weights = layout.counts or [1] * layout.shards
    load = [0] * layout.readers
    out: list[list[int]] = [[] for _ in range(layout.readers)]
    for unit in order.tolist():
        reader = min(range(layout.readers), key=lambda r: (load[r], len(out[r]), r))
        out[reader].append(unit)
        load[reader] += weights[unit]
    return out


def reader_examples(layout: Layout, units: list[int], reader: int) -> int | None:
    """Examples a reader will read (None when shard sizes are unknown)."""
    if layout.counts is None:
        return None
    if layout.mode != "examples":
        return sum(layout.counts[u] for u in units)
    # row i of unit u belongs to reader (i + u) % readers
    return sum(
        (layout.counts[u] - (reader - u) % layout.readers + layout.readers - 1) // layout.readers
        for u in units
    )


@dataclass(frozen=True)
class ReaderPlan:
    rank: int
    worker: int
    shards: list[int]
    examples: int | None


@dataclass(frozen=True)
class StreamPlan:
    """A readable shard plan: ``print(stream.plan(num_workers=2, world_size=4))``.

    Attributes:
        readers: one entry per (rank, worker), in global reader order.
        mode: "shards" (whole files), "row groups" (files split by reshard) or "examples" (strided rows).
    """

    world_size: int
    num_workers: int
    epoch: int
    mode: str
    shards: int
    readers: list[ReaderPlan]

    def __str__(self) -> str:
        head = (
            f"shard plan, epoch {self.epoch}: {self.world_size} rank(s) x {max(self.num_workers, 1)} "
            "reader(s) "
            f"over {self.shards} {'row groups' if self.mode == 'row groups' else 'shards'}"
            + (" (every reader reads all shards, keeps 1 example in N)" if self.mode == "examples" else "")
        )
        lines = [head]
        for r in self.readers:
            who = f"rank {r.rank} worker {r.worker}" if self.num_workers else f"rank {r.rank} (main process)"
            count = "? examples" if r.examples is None else f"{r.examples} examples"
            shown = r.shards if len(r.shards) <= 12 else [*r.shards[:12], "..."]
            lines.append(f"  {who}: {len(r.shards)} shard(s) {shown}, {count}")
        return "\n".join(lines)


@dataclass(frozen=True)
class MixPlan:
    """The shard plans of weighted mixed sources, one per source: ``print(stream.plan(num_workers=2))``."""

    weights: list[float]
    sources: list[StreamPlan]

    @property
    def readers(self) -> list[ReaderPlan]:
        """Per (rank, worker): the shards of every source it reads, and its examples where known."""
        out = []
        for parts in zip(*(plan.readers for plan in self.sources)):
            counts = [r.examples for r in parts]
            examples = None if None in counts else sum(counts)
            out.append(
                ReaderPlan(parts[0].rank, parts[0].worker, [u for r in parts for u in r.shards], examples)
            )
        return out

    @property
    def mode(self) -> str:
        return "examples" if any(p.mode == "examples" for p in self.sources) else "shards"

    def __str__(self) -> str:
        return "\n".join(
            f"mix source {k} (weight {w:.3g}): {plan}"
            for k, (w, plan) in enumerate(zip(self.weights, self.sources))
        )


def build_plan(
    layout: Layout,
    *,
    world_size: int,
    num_workers: int,
    seed: int,
    epoch: int,
    shuffle: bool,
    source: int = 0,
) -> StreamPlan:
    per_rank = max(num_workers, 1)
    units = assign(layout, seed, epoch, shuffle, source)
    readers = [
        ReaderPlan(g // per_rank, g % per_rank, units[g], reader_examples(layout, units[g], g))
        for g in range(layout.readers)
    ]
    return StreamPlan(world_size, num_workers, epoch, layout.mode, layout.shards, readers)


def check_no_idle(plan: StreamPlan | MixPlan) -> None:
    """A reader with no data is an error (shards) or a warning (opted-in example split), never silent."""
    idle = [r for r in plan.readers if r.examples == 0 or not r.shards]
    if not idle:
        return
    names = ", ".join(f"rank {r.rank} worker {r.worker}" for r in idle[:6])
    message = f"{len(idle)} of {len(plan.readers)} readers would get no examples ({names})"
    if plan.mode == "examples":
        warnings.warn(f"StreamDataset: {message}; the dataset has fewer examples than readers", stacklevel=3)
        return
    raise DataError(
        f"{message}: their shards are empty. Fix: use fewer workers or ranks, or drop empty files"
    )
