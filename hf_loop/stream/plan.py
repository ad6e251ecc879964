"""The shard plan: which reader (rank x DataLoader worker) reads which rows of a streamed dataset.

Pure functions of (shard counts, reader count, seed, epoch), so one process can compute and test every rank's
plan. The only I/O is reading parquet footers (or Arrow file headers) to learn how many examples each shard holds.

When the counts are known the plan is balanced by rows: the epoch's shards, in their (shuffled) order, are laid
end to end and cut into one contiguous run of rows per reader, so readers differ by at most one row and each reads
at most two partial shards (a piece is (shard, first row, end row)). Without counts whole shards are dealt out
(split into parquet row groups when there are fewer shards than readers, or by example when asked).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import numpy as np

from hf_loop.errors import DataError
from hf_loop.stream.files import shard_counts


class Piece(NamedTuple):
    """Rows ``start`` to ``stop`` (None: to its end) of shard ``unit``: what a reader reads, in order."""

    unit: int
    start: int = 0
    stop: int | None = None

    def __str__(self) -> str:
        return (
            str(self.unit)
            if self.start == 0 and self.stop is None
            else f"{self.unit}[{self.start}:{self.stop}]"
        )


@dataclass(frozen=True)
class Layout:
    """How a stream is cut for a number of readers (fixed for a bound stream, checked on resume)."""

    readers: int
    shards: int  # units the plan deals out
    mode: str  # "rows" | "shards" | "row groups" | "examples"
    counts: list[int] | None = field(default=None, repr=False)  # examples per unit, when known

    def identity(self) -> dict[str, Any]:
        return {"readers": self.readers, "shards": self.shards, "mode": self.mode}


def layout_for(ds: Any, world_size: int, num_workers: int, *, split_examples: bool) -> tuple[Any, Layout]:
    """Choose the units for world_size x max(num_workers, 1) readers: rows of whole shards when the counts are
    known; else whole shards, else row groups (``reshard``), else examples.

    Returns the (possibly resharded) dataset the readers read, and its layout.

    Raises:
        DataError: counts unknown, fewer shards than readers even after resharding, and ``split_examples`` is
            False.
    """
    readers = world_size * max(num_workers, 1)
    counts = shard_counts(ds)
    if counts is not None:
        return ds, Layout(readers=readers, shards=ds.num_shards, mode="rows", counts=counts)
    source, mode = ds, "shards"
    if ds.num_shards < readers:
        finer = ds.reshard()
        if finer.num_shards > ds.num_shards:
            source, mode = finer, "row groups"
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
                f"groups) of unknown size but world_size={world_size} x num_workers={num_workers} = {readers} "
                f"readers, so some readers would get no shard. Fix: {fewer}write the data as parquet or Arrow "
                "(whose row counts let the plan split by rows), in more files, or pass split_examples=True to "
                f"split by example instead (every reader then reads all {source.num_shards} shard(s) and keeps "
                f"1 example in {readers})"
            )
        warnings.warn(
            f"StreamDataset: {source.num_shards} shard(s) for {readers} readers; splitting by example "
            f"(split_examples=True): every reader reads all the data and keeps 1 example in {readers}",
            UserWarning,
            stacklevel=3,
        )
        mode = "examples"
    return source, Layout(readers=readers, shards=source.num_shards, mode=mode, counts=None)


def shard_order(layout: Layout, seed: int, epoch: int, shuffle: bool, source: int = 0) -> np.ndarray:
    """The epoch's shard order: a permutation from (seed, epoch[, source]) when shuffling, else file order."""
    if not shuffle:
        return np.arange(layout.shards)
    key = [seed, epoch] if source == 0 else [seed, epoch, source]
    return np.random.default_rng(key).permutation(layout.shards)


def assign(layout: Layout, seed: int, epoch: int, shuffle: bool, source: int = 0) -> list[list[Piece]]:
    """Pieces each global reader reads this epoch, in reading order.

    "rows": the shards in the epoch's order, laid end to end and cut into ``readers`` contiguous runs whose sizes
    differ by at most one row. "shards"/"row groups": whole units dealt round-robin in the epoch's order.
    "examples": every reader reads every unit (and keeps its share of rows).

    Example:
        >>> layout = Layout(readers=3, shards=4, mode="rows", counts=[10, 10, 10, 10])
        >>> [[str(p) for p in pieces] for pieces in assign(layout, 0, 0, shuffle=False)]
        [['0', '1[0:3]'], ['1[3:10]', '2[0:6]'], ['2[6:10]', '3']]
    """
    order = shard_order(layout, seed, epoch, shuffle, source).tolist()
    if layout.mode == "examples":
        return [[Piece(u) for u in order] for _ in range(layout.readers)]
    if layout.mode != "rows":
        return [[Piece(u) for u in order[r :: layout.readers]] for r in range(layout.readers)]
    counts = layout.counts
    total = sum(counts[u] for u in order)
    out: list[list[Piece]] = []
    ends = np.cumsum([counts[u] for u in order]).tolist()
    for r in range(layout.readers):
        first, last = total * r // layout.readers, total * (r + 1) // layout.readers
        pieces = []
        for u, end in zip(order, ends):
            begin = end - counts[u]
            lo, hi = max(first, begin), min(last, end)
            if lo < hi:
                whole = lo == begin and hi == end
                pieces.append(Piece(u) if whole else Piece(u, lo - begin, hi - begin))
        out.append(pieces)
    return out


def reader_examples(layout: Layout, pieces: list[Piece], reader: int) -> int | None:
    """Examples a reader will read (None when shard sizes are unknown)."""
    if layout.counts is None:
        return None
    if layout.mode != "examples":
        return sum((layout.counts[p.unit] if p.stop is None else p.stop) - p.start for p in pieces)
    # row i of unit u belongs to reader (i + u) % readers
    return sum(
        (layout.counts[p.unit] - (reader - p.unit) % layout.readers + layout.readers - 1) // layout.readers
        for p in pieces
    )


def expected_unread(rank_examples: list[int | None], batch_size: int | None, drop_last: bool) -> int | None:
    """Examples ``even_steps`` leaves unread per epoch when every rank stops with the one that has the fewest
    batches (None when a count or the batch size is unknown, e.g. token budgets).

    A rank of R examples yields ceil(R / b) batches (floor with ``drop_last``), all full but the last.

    Example:
        >>> expected_unread([100, 90], batch_size=8, drop_last=False)   # 13 and 12 batches: 12 steps
        4
    """
    if batch_size is None or None in rank_examples:
        return None
    steps = min(n // batch_size if drop_last else -(-n // batch_size) for n in rank_examples)
    return sum(n - min(n, steps * batch_size) for n in rank_examples)


@dataclass(frozen=True)
class ReaderPlan:
    """One reader's share: the shards it opens, how many examples (None: unknown), and its pieces in order."""

    rank: int
    worker: int
    shards: list[int]
    examples: int | None
    pieces: list[Piece] = field(default_factory=list)

    @classmethod
    def of(cls, rank: int, worker: int, pieces: list[Piece], examples: int | None) -> ReaderPlan:
        return cls(rank, worker, list(dict.fromkeys(p.unit for p in pieces)), examples, pieces)


def _rank_examples(readers: list[ReaderPlan], world_size: int) -> list[int | None]:
    out: list[int | None] = []
    for rank in range(world_size):
        counts = [r.examples for r in readers if r.rank == rank]
        out.append(None if None in counts else sum(counts))
    return out


def _unread_line(plan: StreamPlan | MixPlan) -> list[str]:
    unread = plan.expected_unread
    if unread is None:
        return []
    return [f"  under even_steps (batch {plan.batch_size}): {unread} example(s) left unread per epoch"]


@dataclass(frozen=True)
class StreamPlan:
    """A readable shard plan: ``print(stream.plan(num_workers=2, world_size=4, batch_size=32))``.

    Attributes:
        readers: one entry per (rank, worker), in global reader order.
        mode: "rows" (row runs of whole shards, balanced by the known counts), "shards" (whole files), "row
            groups" (files split by reshard) or "examples" (strided rows).
        batch_size: when given, ``expected_unread`` says how many examples ``even_steps`` leaves per epoch.
    """

    world_size: int
    num_workers: int
    epoch: int
    mode: str
    shards: int
    readers: list[ReaderPlan]
    batch_size: int | None = None
    drop_last: bool = False

    @property
    def rank_examples(self) -> list[int | None]:
        """Examples per rank this epoch (None where unknown)."""
        return _rank_examples(self.readers, self.world_size)

    @property
    def expected_unread(self) -> int | None:
        return expected_unread(self.rank_examples, self.batch_size, self.drop_last)

    def __str__(self) -> str:
        what = {"row groups": "row groups", "rows": "shards, split by rows"}.get(self.mode, "shards")
        head = (
            f"shard plan, epoch {self.epoch}: {self.world_size} rank(s) x {max(self.num_workers, 1)} "
            f"reader(s) over {self.shards} {what}"
            + (" (every reader reads all shards, keeps 1 example in N)" if self.mode == "examples" else "")
        )
        lines = [head]
        for r in self.readers:
            who = f"rank {r.rank} worker {r.worker}" if self.num_workers else f"rank {r.rank} (main process)"
            count = "? examples" if r.examples is None else f"{r.examples} examples"
            shown = [str(p) for p in r.pieces[:12]] + (["..."] if len(r.pieces) > 12 else [])
            lines.append(f"  {who}: {len(r.shards)} shard(s) [{', '.join(shown)}], {count}")
        return "\n".join(lines + _unread_line(self))


@dataclass(frozen=True)
class MixPlan:
    """The shard plans of weighted mixed sources, one per source: ``print(stream.plan(num_workers=2))``."""

    weights: list[float]
    sources: list[StreamPlan]

    @property
    def readers(self) -> list[ReaderPlan]:
        """Per (rank, worker): the pieces of every source it reads, and its examples where known."""
        out = []
        for parts in zip(*(plan.readers for plan in self.sources)):
            counts = [r.examples for r in parts]
            examples = None if None in counts else sum(counts)
            out.append(
                ReaderPlan.of(parts[0].rank, parts[0].worker, [p for r in parts for p in r.pieces], examples)
            )
        return out

    @property
    def mode(self) -> str:
        return "examples" if any(p.mode == "examples" for p in self.sources) else self.sources[0].mode

    @property
    def batch_size(self) -> int | None:
        return self.sources[0].batch_size

    @property
    def rank_examples(self) -> list[int | None]:
        return _rank_examples(self.readers, self.sources[0].world_size)

    @property
    def expected_unread(self) -> int | None:
        return expected_unread(self.rank_examples, self.batch_size, self.sources[0].drop_last)

    def __str__(self) -> str:
        lines = [
            f"mix source {k} (weight {w:.3g}): {plan}"
            for k, (w, plan) in enumerate(zip(self.weights, self.sources))
        ]
        return "\n".join(lines + _unread_line(self))


def build_plan(
    layout: Layout,
    *,
    world_size: int,
    num_workers: int,
    seed: int,
    epoch: int,
    shuffle: bool,
    source: int = 0,
    batch_size: int | None = None,
    drop_last: bool = False,
) -> StreamPlan:
    per_rank = max(num_workers, 1)
    pieces = assign(layout, seed, epoch, shuffle, source)
    readers = [
        ReaderPlan.of(g // per_rank, g % per_rank, pieces[g], reader_examples(layout, pieces[g], g))
        for g in range(layout.readers)
    ]
    return StreamPlan(
        world_size, num_workers, epoch, layout.mode, layout.shards, readers, batch_size, drop_last
    )


def check_no_idle(plan: StreamPlan | MixPlan) -> None:
    """A reader with no data is an error, never silent (with an opted-in example split of shards of unknown
    size the counts are not known, and the split's own warning stands)."""
    idle = [r for r in plan.readers if r.examples == 0 or not r.pieces]
    if not idle:
        return
    names = ", ".join(f"rank {r.rank} worker {r.worker}" for r in idle[:6])
    raise DataError(
        f"{len(idle)} of {len(plan.readers)} readers would get no examples ({names}): the stream has fewer "
        "examples than readers, or empty shards. Fix: use fewer workers or ranks, or drop empty files"
    )
