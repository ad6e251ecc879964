"""`make_loader`: a dataset and a sampling strategy in, an exact, resumable, seeded DataLoader out."""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader

from hf_loop import samplers as hs
from hf_loop.dist import DistEnv, default_device
from hf_loop.samplers.strategy import STRATEGIES, STRATEGY_OPTIONS, build_sampler


def epoch_seed(seed: int, epoch: int) -> int:
    """A well-mixed 63-bit seed for (seed, epoch): what the Loader's torch.Generator is reseeded with."""
    return int(np.random.SeedSequence([seed, epoch]).generate_state(1, dtype=np.uint64)[0] >> np.uint64(1))


class _BatchIndices(list):
    """A batch of dataset indices that also carries ``rng_key`` = (seed, epoch, global position of its first
    example), from which MapDataset seeds a transform's random Generator. Pickles to workers with its key."""

    rng_key: tuple[int, int, int]


class _Batches:
    """Batch sampler over an hf_loop sampler: groups an index sampler's stream into batches (or passes a batch
    sampler's batches through) and tags each batch with its rng_key."""

    def __init__(self, sampler: Any, batch_size: int | None, drop_last: bool, seed: int) -> None:
        self.sampler = sampler
        self.batch_size = batch_size
        self.drop_last = drop_last
        self.seed = seed

    def _stride(self) -> tuple[int, int]:
        if isinstance(self.sampler, hs.DistributedSampler):
            return self.sampler.num_replicas, self.sampler.rank
        return 1, 0

    def __iter__(self) -> Iterator[_BatchIndices]:
        # DataLoader calls iter() more than once per epoch with workers: this must not change sampler state.
        world, rank = self._stride()
        start, epoch = getattr(self.sampler, "start", 0), getattr(self.sampler, "epoch", 0)
        for first_item, batch in self._group():
            tagged = _BatchIndices(batch)
            tagged.rng_key = (self.seed, epoch, start + first_item * world + rank)
            yield tagged

    def _group(self) -> Iterator[tuple[int, list[int]]]:
        """(position of the batch's first item in this rank's stream, the batch's indices)."""
        if hasattr(self.sampler, "items"):  # hf_loop samplers: slice one array instead of a stream of ints
            items = self.sampler.items()
            if getattr(self.sampler, "yields_batches", False):
                for k, batch in enumerate(items):
                    yield k, batch.tolist()
                return
            stop = len(items) - len(items) % self.batch_size if self.drop_last else len(items)
            for first in range(0, stop, self.batch_size):
                yield first, items[first : first + self.batch_size].tolist()
            return
        if getattr(self.sampler, "yields_batches", False):
            yield from enumerate(self.sampler)
            return
        batch: list[int] = []
        consumed = 0
        for index in self.sampler:
            batch.append(index)
            if len(batch) == self.batch_size:
                yield consumed, batch
                consumed += len(batch)
                batch = []
        if batch and not self.drop_last:
            yield consumed, batch

    def __len__(self) -> int:
        n = len(self.sampler)
        if getattr(self.sampler, "yields_batches", False):
            return n
        return n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)


class PaddingStats:
    """Running count of real vs padded token slots in the batches a Loader yielded (from ``attention_mask``)."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.real_tokens = 0
        self.total_tokens = 0
        self.batches = 0

    def update(self, batch: Any) -> None:
        if not isinstance(batch, dict):
            return
        mask, ids = batch.get("attention_mask"), batch.get("input_ids")
        if isinstance(mask, torch.Tensor) and mask.dim() >= 2:
            self.real_tokens += int(mask.sum())  # a 0/1 mask: sum is half the cost of count_nonzero
            self.total_tokens += mask.numel()
        elif isinstance(ids, torch.Tensor):  # unpadded or packed: every slot counts as real
            self.real_tokens += ids.numel()
            self.total_tokens += ids.numel()
        self.batches += 1

    @property
    def waste(self) -> float:
        """Fraction of token slots that were padding (0.0 when nothing was counted)."""
        return 1.0 - self.real_tokens / self.total_tokens if self.total_tokens else 0.0

    def __repr__(self) -> str:
        return f"PaddingStats(real={self.real_tokens}, total={self.total_tokens}, waste={self.waste:.1%})"


class Loader(DataLoader):
    """A torch DataLoader that knows its epoch, its exact position, and how much of each batch was padding.

    Build it with :func:`make_loader`. Iterating never draws from the global RNG: the Loader owns a
    ``torch.Generator`` reseeded from (seed, epoch) at each pass, and samplers are pure functions of (seed, epoch).
    After a complete pass the epoch advances by one; ``set_epoch`` sets it explicitly.

    Example:
        >>> loader = make_loader(ds, batch_size=32, sampler="random", seed=0)       # doctest: +SKIP
        >>> for step, batch in enumerate(loader):                                  # doctest: +SKIP
        ...     if step == 9:
        ...         state = loader.state_dict(consumed=10)   # after 10 batches: plain ints and lists
        ...         break
        >>> fresh = make_loader(ds, batch_size=32, sampler="random", seed=0)        # doctest: +SKIP
        >>> fresh.load_state_dict(state)   # the next pass yields exactly the remaining batches
    """

    def __init__(
        self,
        dataset: Any,
        *,
        seed: int,
        env: DistEnv,
        batches: _Batches | None = None,
        tracker: Any = None,
        **dataloader_kwargs: Any,
    ) -> None:
        generator = torch.Generator()
        if batches is not None:
            dataloader_kwargs["batch_sampler"] = batches
        super().__init__(dataset, generator=generator, **dataloader_kwargs)
        self.seed = seed
        self.env = env
        self.epoch = 0
        self.padding = PaddingStats()
        self._batches = batches
        self._tracker = tracker
        self._yielded = 0
        self._pass_complete = (
            False  # the epoch advances lazily, at the next pass, so state_dict still sees it
        )

    def set_epoch(self, epoch: int) -> None:
        """Order the next pass as epoch ``epoch``.

        Setting the epoch the loader is already in (e.g. right after ``load_state_dict``) keeps the resumed
        position; any other epoch, or the same one after a complete pass, starts from its beginning.
        """
        if epoch != self.epoch or self._pass_complete:
            self.epoch = epoch
            self._pass_complete = False
            if self._batches is not None and hasattr(self._batches.sampler, "set_epoch"):
                self._batches.sampler.set_epoch(epoch)
            if self._tracker is not None:
                self._tracker.set_epoch(epoch)

    def __iter__(self) -> Iterator[Any]:
        if self._pass_complete:
            self.set_epoch(self.epoch + 1)
        self.generator.manual_seed(epoch_seed(self.seed, self.epoch))
        self._yielded = 0
        source = self._in_process() if self._fetches_in_process() else super().__iter__()
        if self._tracker is not None:
            source = self._tracker.iterate(source)
        for batch in source:
            self.padding.update(batch)
            self._yielded += 1
            yield batch
        self._pass_complete = True

    def _fetches_in_process(self) -> bool:
        """True when the batches can be fetched here exactly as DataLoader's single-process iterator would:
        no workers, no pinning, and the batch sampler (or bound stream) make_loader set up."""
        if self.num_workers != 0 or self.pin_memory or self.timeout:
            return False  # (DataLoader itself refuses a timeout without workers: leave that to it)
        return self._tracker is not None or (
            self._batches is not None and self.batch_sampler is self._batches
        )

    def _in_process(self) -> Iterator[Any]:
        """What DataLoader's single-process iterator does per batch (fetch, then collate), without its
        per-batch profiler scope and bookkeeping, which cost about a tenth of a padded batch."""
        collate = self.collate_fn
        if self._tracker is not None:  # a bound stream yields whole batches (batch_size=None)
            for item in self.dataset:
                yield collate(item)
            return
        dataset = self.dataset
        getitems = getattr(dataset, "__getitems__", None)  # as torch's fetcher: one call per batch if defined
        for indices in self._batches:
            yield collate(getitems(indices) if getitems else [dataset[i] for i in indices])

    def __len__(self) -> int:
        if self._tracker is not None:
            raise TypeError(
                "a streamed dataset has no length: give the training loop max_steps (or count batches yourself)"
            )
        return super().__len__()

    def batches_left(self) -> int | None:
        """Batches the next pass yields on this rank from the current (possibly resumed) position; None for a
        stream. Computed from the sampler's order, without reading data."""
        if self._tracker is not None:
            return None
        if self._pass_complete:
            return len(self)
        sampler, batch_size = self._batches.sampler, self._batches.batch_size
        left = len(sampler.items()) if hasattr(sampler, "items") else len(sampler)
        if getattr(sampler, "yields_batches", False):
            return left
        return left // batch_size if self._batches.drop_last else -(-left // batch_size)

    def state_dict(self, consumed: int | None = None) -> dict[str, Any]:
        """The position after ``consumed`` batches of the current pass (default: all yielded so far).

        The training loop passes the count at its last optimizer step, so batches that workers prefetched or the
        loop staged on the device are not counted. Holds only plain ints, lists and strings.
        """
        k = self._yielded if consumed is None else consumed
        if k < 0 or k > self._yielded:
            raise ValueError(f"consumed must be between 0 and the {self._yielded} batches yielded, got {k}")
        if self._tracker is not None:
            return {"kind": "stream", **self._tracker.state_dict(k)}
        sampler = self._batches.sampler
        if not hasattr(sampler, "state_dict"):
            raise TypeError(
                f"sampler {type(sampler).__name__} has no state_dict(), so this loader cannot be resumed; "
                "use one of hf_loop's samplers (hl.RandomSampler, hl.WeightedSampler, ...)"
            )
        items = k if getattr(sampler, "yields_batches", False) else k * self._batches.batch_size
        state = sampler.state_dict(items)
        if self._epoch_done(sampler, state["position"]):  # nothing left: resume at the next epoch's start
            state.update(epoch=self.epoch + 1, position=0)
        return {
            "kind": "map",
            "epoch": int(state["epoch"]),
            "batch_size": self._batches.batch_size,
            "world_size": self.env.world_size,
            "sampler": state,
        }

    def _epoch_done(self, sampler: Any, position: int) -> bool:
        left = max(sampler._epoch_size(sampler.epoch) - position, 0)
        world = getattr(sampler, "num_replicas", 1)
        per_rank = left // world if getattr(sampler, "drop_last", False) else -(-left // world)
        if getattr(sampler, "yields_batches", False):
            return per_rank == 0
        return per_rank == 0 or (self._batches.drop_last and per_rank < self._batches.batch_size)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from a :meth:`state_dict`: the next pass yields exactly the batches not yet consumed.

        Raises:
            ValueError: the state belongs to another kind of data (stream vs map-style) or another sampler
                (different dataset size, seed or strategy); the message says what differs.
        """
        kind = "stream" if self._tracker is not None else "map"
        if state.get("kind") != kind:
            raise ValueError(f"this loader reads {kind} data but the state is for {state.get('kind')!r} data")
        self.epoch = int(state["epoch"])
        self._pass_complete = False
        self._yielded = 0
        if self._tracker is not None:
            self._tracker.load_state_dict({k: v for k, v in state.items() if k != "kind"})
            return
        saved = (state["batch_size"] or 1) * state["world_size"]
        now = (self._batches.batch_size or 1) * self.env.world_size
        if saved != now:
            unit = "batches" if self._batches.batch_size is None else "examples"
            warnings.warn(
                f"resuming with a global batch of {now} {unit} (saved with {saved}): the example order continues "
                "exactly, but optimizer steps now cover a different number of examples",
                stacklevel=2,
            )
        self._batches.sampler.load_state_dict(state["sampler"])


def _resolve_pin_memory(pin_memory: bool | str, env: DistEnv) -> bool:
    if pin_memory == "auto":
        return env.device.type == "cuda"
    if not isinstance(pin_memory, bool):
        raise ValueError(f"pin_memory must be True, False or 'auto', got {pin_memory!r}")
    return pin_memory


def make_loader(
    dataset: Any,
    *,
    batch_size: int | None = None,
    sampler: str | Any = None,
    collate_fn: Callable | None = None,
    env: DistEnv | None = None,
    num_workers: int = 0,
    pin_memory: bool | str = "auto",
    drop_last: bool = False,
    seed: int = 0,
    **kwargs: Any,
) -> Loader:
    """A seeded, resumable DataLoader over a MapDataset or StreamDataset, sharded for ``env``.

    Args:
        dataset: hl.MapDataset, hl.StreamDataset, a ``datasets.Dataset``/``IterableDataset`` (adapted with
            hl.to_torch), or any torch map-style dataset.
        batch_size: examples per batch on this rank (not needed with sampler="tokens").
        sampler: "sequential" | "random" | "weighted" (weights=) | "subset" (indices=) | "length" (lengths=, or
            computed by MapDataset.lengths) | "tokens" (max_tokens=) | an hf_loop sampler object. None means
            "random" for map-style data and the stream's own order for a stream.
        collate_fn: defaults to hl.PadCollator().
        env: the process topology (hl.init_distributed()); with world_size > 1 the strategy is wrapped in
            hl.DistributedSampler so the ranks split one global order.
        pin_memory: "auto" pins when env's device is CUDA.
        **kwargs: strategy options (weights, num_samples, replacement, indices, shuffle, lengths, length_column,
            megabatch, max_tokens) and DataLoader options (timeout, persistent_workers, prefetch_factor,
            worker_init_fn, multiprocessing_context). ``in_order=False`` is refused.

    Example:
        >>> ds = hl.MapDataset(hf_dataset, transform=tokenize)                         # doctest: +SKIP
        >>> loader = hl.make_loader(ds, batch_size=32, sampler="length", num_workers=2)   # doctest: +SKIP
    """
    from hf_loop.collate import PadCollator
    from hf_loop.data import to_torch

    env = env or DistEnv(device=default_device())  # one process; pin_memory='auto' still sees a GPU
    options = {k: kwargs.pop(k) for k in STRATEGY_OPTIONS if k in kwargs}
    if kwargs.get("in_order", True) is False:
        raise ValueError(
            "in_order=False is refused: it makes batch order depend on worker timing, which "
            "breaks determinism and exact resume; leave in_order at its default (True)"
        )
    for taken in ("shuffle_dataloader", "batch_sampler", "generator"):
        if taken in kwargs:
            raise TypeError(
                f"make_loader sets {taken} itself; choose the order with sampler=... and seed=..."
            )
    if batch_size is not None and batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if type(dataset).__module__.startswith("datasets."):
        dataset = to_torch(dataset)
    common = {"num_workers": num_workers, "pin_memory": _resolve_pin_memory(pin_memory, env), **kwargs}
    collate_fn = collate_fn or PadCollator()

    if hasattr(dataset, "bind"):  # a StreamDataset: it yields whole batches itself
        ordering = sorted(set(options) - {"max_tokens"})  # a token budget is a batching choice, not an order
        if sampler is not None or ordering:
            raise ValueError(
                f"a StreamDataset orders itself; got sampler={sampler!r} {ordering or ''}. Shuffle a stream "
                "with StreamDataset(..., shuffle_buffer=N, seed=S) instead of a sampler"
            )
        if batch_size is None and "max_tokens" not in options:
            raise ValueError("a stream needs batch_size=... (or max_tokens=...)")
        bound = dataset.bind(
            rank=env.rank,
            world_size=env.world_size,
            num_workers=num_workers,
            batch_size=batch_size,
            max_tokens=options.get("max_tokens"),
            drop_last=drop_last,
        )
        return Loader(
            bound,
            seed=seed,
            env=env,
            tracker=bound.tracker(),
            batch_size=None,
            collate_fn=bound.wrap_collate(collate_fn),
            **common,
        )

    if not hasattr(dataset, "__len__"):
        raise TypeError(
            f"make_loader needs a map-style dataset with __len__ or a StreamDataset, "
            f"got {type(dataset).__name__}"
        )
    n = len(dataset)
    strategy = "random" if sampler is None else sampler
    if isinstance(strategy, str):
        if strategy not in STRATEGIES:
            raise ValueError(f"sampler must be one of {STRATEGIES} or a sampler object, got {strategy!r}")
        if strategy != "tokens" and batch_size is None:
            raise ValueError(f"sampler={strategy!r} needs batch_size=...")
        global_sampler = build_sampler(
            strategy, n, dataset, batch_size=batch_size, seed=seed, world_size=env.world_size, options=options
        )
    else:
        if options:
            raise TypeError(
                f"strategy options {sorted(options)} only apply to a named sampler strategy; "
                f"set them on the {type(strategy).__name__} object instead"
            )
        global_sampler = strategy
    if env.world_size > 1 and not isinstance(global_sampler, hs.DistributedSampler):
        global_sampler = hs.DistributedSampler(global_sampler, num_replicas=env.world_size, rank=env.rank)
    if batch_size is None and not getattr(global_sampler, "yields_batches", False):
        raise ValueError("batch_size is required unless the sampler yields whole batches (sampler='tokens')")
    batches = _Batches(global_sampler, batch_size, drop_last, seed)
    return Loader(dataset, seed=seed, env=env, batches=batches, collate_fn=collate_fn, **common)
