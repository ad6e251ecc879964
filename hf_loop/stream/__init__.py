"""``StreamDataset``: a streamed Hugging Face dataset as exact, resumable, bucketed torch batches.

Layout: ``files.py`` (what a stream is made of: checks, row counts, identity), ``plan.py`` (which reader reads
which rows), ``source.py`` (reading a shard's rows, and a reader's cursor over its pieces), ``protocol.py`` (what
a reader sends the main process), ``reader.py`` (the bound IterableDataset the DataLoader runs: windows, mixing,
shuffle, transform, bucketing), ``tracker.py`` (canonical batch order, consumed positions, resume).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import numpy as np
from torch.utils.data import IterableDataset

from hf_loop.checks import boolean, integer, optional_integer
from hf_loop.data import BatchTransform, Transform
from hf_loop.errors import DataError
from hf_loop.stream.files import check_source
from hf_loop.stream.plan import MixPlan, StreamPlan, build_plan, check_no_idle, layout_for
from hf_loop.stream.reader import BoundStream, ReadOptions
from hf_loop.stream.source import Source
from hf_loop.stream.tracker import StreamTracker

__all__ = ["BoundStream", "MixPlan", "StreamDataset", "StreamPlan", "StreamTracker"]

logger = logging.getLogger("hf_loop")

BUCKET_BATCHES = 50  # default window when bucketing without shuffling: 50 batches (a "megabatch")
# default window (examples) otherwise: the file order is kept, so it only sets the reading granularity
PLAIN_WINDOW = 1024


class StreamDataset(IterableDataset):
    """A ``datasets.IterableDataset`` as a torch IterableDataset that yields whole, exactly-once batches.

    ``hl.make_loader(stream, batch_size=...)`` binds a copy to (rank, world size, workers, batch size or
    ``max_tokens``); the object you build is never mutated. Each epoch reads every example exactly once across
    ranks x DataLoader workers. The plan is made up front: when the shards' example counts are known (parquet
    footers, Arrow files) the epoch's rows are cut into one contiguous run per reader, so readers differ by at
    most one row and ranks stop together with at most a batch per reader unread; otherwise whole shards are
    dealt (split into parquet row groups when there are fewer shards than readers, or by example with
    ``split_examples=True``). Order is deterministic: the shard order and a permutation inside each window of
    ``shuffle_buffer`` examples come from (seed, epoch, window), so a resume re-reads at most one window instead
    of replaying the epoch. (Parquet: the seek starts at the row group holding the window, from the footers.
    Formats without footers — json, csv, text — re-read the current shard up to the window.)

    Mixing: ``StreamDataset([a, b], weights=[0.3, 0.7])`` keeps every guarantee above (each source has its own
    shard plan and resumable position). ``a`` and ``b`` are HF streams or StreamDatasets; a StreamDataset item
    contributes its stream(s), and the mix's transform, columns and shuffle are the outer ones (an item built
    with other options is refused rather than silently ignored). ``datasets.interleave_datasets`` is refused:
    its random source choice cannot be split exactly once over readers nor resumed.
    ``datasets.concatenate_datasets`` works too.

    Args:
        ds: the stream, e.g. ``datasets.load_dataset("parquet", data_files=..., streaming=True)["train"]``.
            Do not ``.shuffle()`` or ``split_dataset_by_node`` it first: StreamDataset does both itself.
        transform: ``fn(batch) -> batch`` with ``set_transform`` semantics (a dict of columns as Python lists
            in, a dict of columns out, one value per row), called once per window; ``fn(batch, rng)`` also
            gets a numpy Generator seeded from (seed, epoch, reader, window).
        columns: columns to keep, chosen after the transform. None keeps all.
        shuffle_buffer: examples per shuffle window; 0 keeps the file order.
        seed: seeds the shard order and the window permutations.
        rename_label: rename ``label`` to ``labels`` (transformers' name).
        bucket: a list column (e.g. "input_ids") to group batches by length within each window, so streamed
            batches carry little padding. Token budgets (``max_tokens``) bucket by "input_ids" unless told.
        window: examples per window when ``shuffle_buffer`` is 0 (default: 50 batches when bucketing, else
            1024 examples). Windows are rounded up to whole batches. A resume re-reads at most one window.
        split_examples: when there are fewer shards (and row groups) than readers, let every reader read all
            shards and keep 1 example in N (slower: each reader reads everything). Off: that is an error.
        weights: mix several streams (``ds`` a list of them, same columns): each window takes from each
            source a share drawn with these weights (from seed, epoch, reader, window); a source that runs dry
            hands its share to the others, so every example of every source is still read exactly once per
            epoch — the weights set how densely the sources interleave, not how often an example repeats.
            Equal weights when ``ds`` is a list and ``weights`` is None.

    Example:
        >>> from datasets import load_dataset
        >>> hf = load_dataset("parquet", data_files="data/*.parquet", split="train", streaming=True)  # 2 x 32 rows
        >>> stream = StreamDataset(hf, shuffle_buffer=10_000, bucket="input_ids", seed=0,
        ...                        columns=["input_ids", "label"])
        >>> print(stream.plan(num_workers=2, world_size=2))
        shard plan, epoch 0: 2 rank(s) x 2 reader(s) over 2 shards, split by rows
          rank 0 worker 0: 1 shard(s) [0[0:16]], 16 examples
          rank 0 worker 1: 1 shard(s) [0[16:32]], 16 examples
          rank 1 worker 0: 1 shard(s) [1[0:16]], 16 examples
          rank 1 worker 1: 1 shard(s) [1[16:32]], 16 examples
        >>> loader = hl.make_loader(stream, batch_size=8, num_workers=2)
        >>> first = [batch for _, batch in zip(range(3), loader)]
        >>> state = loader.state_dict(consumed=3)      # per-reader positions: plain ints
        >>> resumed = hl.make_loader(stream, batch_size=8, num_workers=2)
        >>> resumed.load_state_dict(state)
        >>> sum(len(batch["labels"]) for batch in resumed)   # exactly the 64 - 3 x 8 rows not yet taken
        40
        >>> hf_a = load_dataset("parquet", data_files="data/train-00000.parquet", split="train", streaming=True)
        >>> hf_b = load_dataset("parquet", data_files="data/train-00001.parquet", split="train", streaming=True)
        >>> mixed = StreamDataset([hf_a, hf_b], weights=[0.3, 0.7], shuffle_buffer=4096)
        >>> sum(len(batch["labels"]) for batch in hl.make_loader(mixed, batch_size=8))   # each row once
        64
    """

    def __init__(
        self,
        ds: Any,
        *,
        transform: Transform | None = None,
        columns: Sequence[str] | None = None,
        shuffle_buffer: int = 0,
        seed: int = 0,
        rename_label: bool = True,
        bucket: str | None = None,
        window: int | None = None,
        split_examples: bool = False,
        weights: Sequence[float] | None = None,
    ) -> None:
        self.batch_transform = BatchTransform(transform, columns, rename_label)
        self.shuffle_buffer = integer("shuffle_buffer", shuffle_buffer, 0)
        self.seed = integer("seed", seed, 0)
        self.window = optional_integer("window", window, 1)
        self.split_examples = boolean("split_examples", split_examples)
        if bucket is not None and not isinstance(bucket, str):
            raise TypeError(f"bucket must be a column name such as 'input_ids', got {bucket!r}")
        self.bucket = bucket
        sources = self._unwrapped(list(ds) if isinstance(ds, (list, tuple)) else [ds])
        for source in sources:
            check_source(source)
        self.sources = sources
        self.ds = sources[0]
        self.weights = _check_weights(weights, sources)
        names = list(self.ds.features) if self.ds.features is not None else None
        self.read_columns = self.batch_transform.source_columns(names)

    @property
    def transform(self) -> Transform | None:
        return self.batch_transform.transform

    @property
    def columns(self) -> list[str] | None:
        return self.batch_transform.columns

    def _options(self) -> tuple[Any, ...]:
        return (
            self.batch_transform,
            self.shuffle_buffer,
            self.seed,
            self.bucket,
            self.window,
            self.split_examples,
        )

    def _unwrapped(self, items: list[Any]) -> list[Any]:
        """The HF streams to read: StreamDataset items contribute theirs, if they were built with this
        StreamDataset's options or the defaults (their own options would otherwise be silently ignored)."""
        if not items:
            raise ValueError("StreamDataset needs a stream, or a non-empty list of streams to mix; got []")
        out = []
        for k, item in enumerate(items):
            if not isinstance(item, StreamDataset):
                out.append(item)
                continue
            if item.weights is not None:
                raise ValueError(
                    f"item {k} is itself a weighted mix; mix all the streams in one StreamDataset"
                )
            if item._options() not in (self._options(), StreamDataset(item.ds)._options()):
                raise ValueError(
                    f"item {k} is a StreamDataset built with its own transform/columns/shuffle/bucket/window "
                    "options, which a mix would not apply per source; build the items as "
                    "hl.StreamDataset(hf_stream) (or pass the HF streams) and give those options to the mix: "
                    "hl.StreamDataset([a, b], weights=..., transform=..., shuffle_buffer=...)"
                )
            out.extend(item.sources)
        return out

    def __iter__(self):
        raise TypeError(
            "a StreamDataset yields whole batches once bound: use hl.make_loader(stream, batch_size=...) "
            "(or stream.bind(batch_size=...) in a DataLoader with batch_size=None)"
        )

    def plan(
        self,
        num_workers: int = 0,
        world_size: int = 1,
        *,
        epoch: int = 0,
        batch_size: int | None = None,
        drop_last: bool = False,
    ) -> StreamPlan | MixPlan:
        """Which reader (rank, worker) reads which rows, and how many examples where the counts are known (a
        :class:`MixPlan`, one plan per source, for mixed streams). A reader that would get no data is a
        DataError here already, as in ``bind``. With ``batch_size``, the plan also says how
        many examples ``even_steps`` (and ``hl.train``) will leave unread per epoch when the ranks stop together.

        Example:
            >>> print(stream.plan(num_workers=2, world_size=2, batch_size=8))   # 2 parquet files of 32 rows
            shard plan, epoch 0: 2 rank(s) x 2 reader(s) over 2 shards, split by rows
              rank 0 worker 0: 1 shard(s) [0[0:16]], 16 examples
              rank 0 worker 1: 1 shard(s) [0[16:32]], 16 examples
              rank 1 worker 0: 1 shard(s) [1[0:16]], 16 examples
              rank 1 worker 1: 1 shard(s) [1[16:32]], 16 examples
              under even_steps (batch 8): 0 example(s) left unread per epoch
        """
        plans = [plan for _, plan in self._plans(world_size, num_workers, epoch, batch_size, drop_last)]
        plan = plans[0] if len(plans) == 1 else MixPlan([float(w) for w in self.weights], plans)
        check_no_idle(plan)
        return plan

    def _plans(
        self,
        world_size: int,
        num_workers: int,
        epoch: int,
        batch_size: int | None = None,
        drop_last: bool = False,
    ) -> list[tuple[Source, StreamPlan]]:
        out = []
        for k, ds in enumerate(self.sources):
            try:
                source, layout = layout_for(ds, world_size, num_workers, split_examples=self.split_examples)
            except DataError as err:
                if len(self.sources) == 1:
                    raise
                raise DataError(f"mix source {k}: {err}") from None
            plan = build_plan(
                layout,
                world_size=world_size,
                num_workers=num_workers,
                seed=self.seed,
                epoch=epoch,
                shuffle=self.shuffle_buffer > 0,
                source=k,
                batch_size=batch_size,
                drop_last=drop_last,
            )
            out.append((Source(source, layout, k, self.read_columns), plan))
        return out

    def bind(
        self,
        *,
        rank: int = 0,
        world_size: int = 1,
        num_workers: int = 0,
        batch_size: int | None = None,
        max_tokens: int | None = None,
        drop_last: bool = False,
    ) -> BoundStream:
        """A new IterableDataset of this stream's batches for one rank (``hl.make_loader`` calls it).

        Give it to a DataLoader with ``batch_size=None`` and ``collate_fn=bound.wrap_collate(collate)``, and
        iterate through ``StreamTracker(bound).iterate(iter(dataloader))`` (docs/internals.md, "Stream path").
        ``drop_last`` drops the rank's last short batch (readers' short tails are merged into full batches
        first); token budgets (``max_tokens``) have no short batches to drop.

        Example:
            >>> bound = stream.bind(rank=0, world_size=2, num_workers=2, batch_size=32)
            >>> bound.rank, bound.world_size, bound.local_readers
            (0, 2, 2)

        Raises:
            ValueError: neither or both of batch_size / max_tokens, or a rank outside the world.
            DataError: a reader would get no data (see ``split_examples``).
        """
        if (batch_size is None) == (max_tokens is None):
            raise ValueError(
                f"give exactly one of batch_size or max_tokens, got batch_size={batch_size}, "
                f"max_tokens={max_tokens}"
            )
        optional_integer("batch_size", batch_size, 1)
        optional_integer("max_tokens", max_tokens, 1)
        integer("world_size", world_size, 1)
        integer("num_workers", num_workers, 0)
        if not 0 <= integer("rank", rank) < world_size:
            raise ValueError(f"rank must be in [0, {world_size}), got {rank}")
        drop_last = boolean("drop_last", drop_last)
        parts = self._plans(world_size, num_workers, 0, batch_size, drop_last)
        plans = [plan for _, plan in parts]
        plan = plans[0] if len(plans) == 1 else MixPlan([float(w) for w in self.weights], plans)
        check_no_idle(plan)
        if rank == 0:
            logger.info("%s", plan)
        options = ReadOptions(
            batch_transform=self.batch_transform,
            features=self.ds.features,
            seed=self.seed,
            shuffle=self.shuffle_buffer > 0,
            weights=None if self.weights is None else tuple(float(w) for w in self.weights),
            bucket=self.bucket,
        )
        return BoundStream(
            options,
            [source for source, _ in parts],
            rank=rank,
            world_size=world_size,
            num_workers=num_workers,
            batch_size=batch_size,
            max_tokens=max_tokens,
            drop_last=drop_last,
            window=self._window(batch_size),
        )

    def _window(self, batch_size: int | None) -> int:
        size = self.shuffle_buffer or self.window
        if size is None:
            size = batch_size * BUCKET_BATCHES if self.bucket and batch_size else PLAIN_WINDOW
        return -(-size // batch_size) * batch_size if batch_size else size  # whole batches


def _check_weights(weights: Sequence[float] | None, sources: list[Any]) -> np.ndarray | None:
    """Mixing weights as an array (None for a single stream); every source needs a positive weight, or its
    examples would never be read."""
    if len(sources) > 1:
        names = [sorted(ds.features) if ds.features is not None else None for ds in sources]
        if any(n != names[0] for n in names):
            raise DataError(
                f"mixed streams need the same columns; got {names}. Align them with select_columns / "
                "rename_column first"
            )
    if weights is None:
        return None if len(sources) == 1 else np.full(len(sources), 1.0 / len(sources))
    if len(sources) == 1:
        raise ValueError(
            "weights mix several streams; pass them as a list: StreamDataset([a, b], weights=[...])"
        )
    w = np.asarray(weights, dtype=float)
    if w.shape != (len(sources),) or not np.isfinite(w).all() or (w <= 0).any():
        raise ValueError(
            f"weights must be {len(sources)} positive numbers, one per stream, got {list(weights)}; a source "
            "with weight 0 would never be read (drop it from the list instead)"
        )
    return w / w.sum()
