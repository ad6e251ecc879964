"""``StreamDataset``: a streamed Hugging Face dataset as exact, resumable, bucketed torch batches.

Layout: ``plan.py`` (which reader reads which shards), ``source.py`` (reading a shard from a row on, and a
reader's cursor over its shards), ``reader.py`` (the bound IterableDataset the DataLoader runs: windows,
mixing, shuffle, transform, bucketing), ``tracker.py`` (canonical batch order, consumed positions, resume).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pyarrow as pa
from torch.utils.data import IterableDataset

from hf_loop.data import Transform, _column_len, _describe, _pickle_problem, _takes_rng
from hf_loop.data.options import _checked_options
from hf_loop.errors import DataError
from hf_loop.stream.plan import MixPlan, StreamPlan, build_plan, check_no_idle, check_source, layout_for
from hf_loop.stream.reader import BoundStream
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
    ranks x DataLoader workers: shards are dealt to the readers up front (split into parquet row groups when
    there are fewer shards than readers, or by example with ``split_examples=True``). Order is deterministic:
    the shard order and a permutation inside each window of ``shuffle_buffer`` examples come from
    (seed, epoch, window), so a resume re-reads at most one window instead of replaying the epoch. (Parquet:
    the seek starts at the row group holding the window, from the footers. Formats without footers — json,
    csv, text — re-read the current shard up to the window.)

    Mixing: ``StreamDataset([a, b], weights=[0.3, 0.7])`` keeps every guarantee above (each source has its own
    shard plan and resumable position). ``datasets.interleave_datasets`` is refused: its random source choice
    cannot be split exactly once over readers nor resumed. ``datasets.concatenate_datasets`` works too.

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
        >>> hf = load_dataset("parquet", data_files="data/*.parquet", split="train",
        ...                   streaming=True)                                               # doctest: +SKIP
        >>> stream = StreamDataset(hf, shuffle_buffer=10_000, bucket="input_ids", seed=0)   # doctest: +SKIP
        >>> print(stream.plan(num_workers=2, world_size=2))                                 # doctest: +SKIP
        >>> loader = hl.make_loader(stream, batch_size=32, num_workers=2)                   # doctest: +SKIP
        >>> state = loader.state_dict()     # per-reader positions: plain ints              # doctest: +SKIP
        >>> mixed = StreamDataset([hf_a, hf_b], weights=[0.3, 0.7], shuffle_buffer=4096)    # doctest: +SKIP
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
        sources = list(ds) if isinstance(ds, (list, tuple)) else [ds]
        if not sources:
            raise ValueError("StreamDataset needs a stream, or a non-empty list of streams to mix; got []")
        for source in sources:
            check_source(source)
        self.sources = sources
        self.weights = _check_weights(weights, sources)
        columns = _checked_options(transform, columns)
        for name, value in (("shuffle_buffer", shuffle_buffer), ("window", window)):
            if value is not None and (
                not isinstance(value, int) or value < (0 if name == "shuffle_buffer" else 1)
            ):
                raise ValueError(
                    f"{name} must be an int >= {0 if name == 'shuffle_buffer' else 1}, got {value!r}"
                )
        if bucket is not None and not isinstance(bucket, str):
            raise TypeError(f"bucket must be a column name such as 'input_ids', got {bucket!r}")
        self.ds = sources[0]
        self.transform = transform
        self.columns = columns
        self.shuffle_buffer = shuffle_buffer
        self.seed = seed
        self.rename_label = rename_label
        self.bucket = bucket
        self.window = window
        self.split_examples = split_examples
        self._with_rng = transform is not None and _takes_rng(transform)
        self._pickle_problem = _pickle_problem(transform)
        self.read_columns = self._source_columns()

    def __getstate__(self) -> dict[str, Any]:
        if self._pickle_problem is not None:
            raise TypeError(self._pickle_problem)
        return self.__dict__.copy()

    def __iter__(self):
        raise TypeError(
            "a StreamDataset yields whole batches once bound: use hl.make_loader(stream, batch_size=...) "
            "(or stream.bind(batch_size=...) in a DataLoader with batch_size=None)"
        )

    def _source_columns(self) -> list[str] | None:
        """Columns to read from the source (None: all). Without a transform, ``columns`` is pushed down."""
        names = list(self.ds.features) if self.ds.features is not None else None
        if self.columns is None or self.transform is not None or names is None:
            return None
        renamed = self.rename_label and "label" in names and "labels" not in names
        wanted = ["label" if renamed and c in ("label", "labels") else c for c in self.columns]
        missing = [c for c in wanted if c not in names]
        if missing:
            raise DataError(
                f"columns={self.columns} asks for {missing}, which the stream does not have; "
                f"available: {sorted(names)}"
            )
        return wanted

    def plan(self, num_workers: int = 0, world_size: int = 1, *, epoch: int = 0) -> StreamPlan | MixPlan:
        """Which reader (rank, worker) reads which shards, and how many examples where parquet footers tell
        (a :class:`MixPlan`, one plan per source, for mixed streams).

        Example:
            >>> print(stream.plan(num_workers=2, world_size=2))   # doctest: +SKIP
            shard plan, epoch 0: 2 rank(s) x 2 reader(s) over 8 shards
              rank 0 worker 0: 2 shard(s) [0, 4], 250 examples
              ...
        """
        plans = [plan for _, plan in self._plans(world_size, num_workers, epoch)]
        return plans[0] if len(plans) == 1 else MixPlan([float(w) for w in self.weights], plans)

    def _plans(self, world_size: int, num_workers: int, epoch: int) -> list[tuple[Source, StreamPlan]]:
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
        iterate through ``bound.tracker().iterate(iter(dataloader))`` (docs/internals.md, "Stream path").
        ``drop_last`` drops the rank's last short batch (readers' short tails are merged into full batches
        first); token budgets (``max_tokens``) have no short batches to drop.

        Example:
            >>> bound = stream.bind(rank=0, world_size=2, num_workers=2, batch_size=32)   # doctest: +SKIP

        Raises:
            ValueError: neither or both of batch_size / max_tokens, or a rank outside the world.
            DataError: a reader would get no data (see ``split_examples``).
        """
        if (batch_size is None) == (max_tokens is None):
            raise ValueError(
                f"give exactly one of batch_size or max_tokens, got batch_size={batch_size}, "
                f"max_tokens={max_tokens}"
            )
        for name, value in (
            ("batch_size", batch_size),
            ("max_tokens", max_tokens),
            ("world_size", world_size),
        ):
            if value is not None and value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, {world_size}), got {rank}")
        if num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {num_workers}")
        parts = self._plans(world_size, num_workers, epoch=0)
        plans = [plan for _, plan in parts]
        plan = plans[0] if len(plans) == 1 else MixPlan([float(w) for w in self.weights], plans)
        check_no_idle(plan)
        if rank == 0:
            logger.info("%s", plan)
        return BoundStream(
            self,
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

    def _columns(self, table: pa.Table, rng: np.random.Generator) -> dict[str, Any]:
        """One window's columns: Arrow arrays, or the transform's output (called once for the window)."""
        if self.transform is None:
            out: dict[str, Any] = {name: _one_array(table.column(name)) for name in table.column_names}
        else:
            batch = table.to_pydict()
            features = self.ds.features
            for name, needs in (getattr(features, "_column_requires_decoding", None) or {}).items():
                if needs and name in batch:  # images, audio: decoded as set_transform would
                    batch[name] = features.decode_column(batch[name], name)
            out = self.transform(batch, rng) if self._with_rng else self.transform(batch)
            if not isinstance(out, Mapping):
                raise TypeError(
                    f"the transform {_describe(self.transform)} returned {type(out).__name__}; it must "
                    "return a dict of columns (column name -> one value per row)"
                )
            out = dict(out)
            wrong = {k: _column_len(v) for k, v in out.items() if _column_len(v) != table.num_rows}
            if wrong:
                raise DataError(
                    f"the transform {_describe(self.transform)} got {table.num_rows} rows but returned "
                    f"columns of lengths {wrong}; it must return one value per input row"
                )
        if self.rename_label and "label" in out:
            if "labels" in out:
                raise DataError(
                    "the batch has both 'label' and 'labels'; StreamDataset renames 'label' to "
                    "'labels'. Drop one of them, or pass rename_label=False"
                )
            out["labels"] = out.pop("label")
        if self.columns is None:
            return out
        wanted = ["labels" if self.rename_label and c == "label" else c for c in self.columns]
        missing = [c for c in wanted if c not in out]
        if missing:
            raise DataError(
                f"columns={self.columns} asks for {missing}, which do not exist after the transform; "
                f"available: {sorted(out)}"
            )
        return {c: out[c] for c in wanted}


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


def _one_array(column: pa.ChunkedArray) -> pa.Array:
    # combine_chunks copies even a single chunk
    return column.chunk(0) if column.num_chunks == 1 else column.combine_chunks()
