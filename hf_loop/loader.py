"""`make_loader`: a dataset and a sampling strategy in, an exact, resumable, seeded DataLoader out.

:class:`Loader` is one class for map-style data and streams: it delegates the data position to one object that
implements the position protocol (``hf_loop.batches.MapBatches`` for map-style data,
``hf_loop.stream.StreamTracker`` for streams; the protocol is listed in ``hf_loop/batches.py``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader

from hf_loop import samplers as hs
from hf_loop.adapters import to_torch
from hf_loop.batches import MapBatches
from hf_loop.checks import boolean, integer, optional_integer
from hf_loop.collate import PadCollator
from hf_loop.dist import DistEnv, default_device, process_group_size
from hf_loop.samplers.strategy import STRATEGIES, STRATEGY_OPTIONS, build_sampler
from hf_loop.stream import StreamDataset, StreamTracker


def epoch_seed(seed: int, epoch: int) -> int:
    """A well-mixed 63-bit seed for (seed, epoch): what the Loader's torch.Generator is reseeded with."""
    return int(np.random.SeedSequence([seed, epoch]).generate_state(1, dtype=np.uint64)[0] >> np.uint64(1))


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
    After a complete pass the epoch advances by one (lazily, at the next pass); ``set_epoch`` sets it explicitly.

    ``unread_examples`` counts, over the whole run, the examples that ``hl.even_steps`` left unread on this rank
    when the ranks stopped together (0 when every rank had as many batches).

    Example:
        >>> from datasets import Dataset
        >>> ds = Dataset.from_dict({"input_ids": [[1, 2], [3], [4, 5, 6], [7]] * 4})
        >>> loader = make_loader(ds, batch_size=4, sampler="random", seed=0)
        >>> for step, batch in enumerate(loader):
        ...     if step == 1:
        ...         state = loader.state_dict(consumed=2)   # after 2 batches: plain ints and lists
        ...         break
        >>> fresh = make_loader(ds, batch_size=4, sampler="random", seed=0)
        >>> fresh.load_state_dict(state)   # the next pass yields exactly the remaining batches
        >>> fresh.batches_left()           # known without reading any data
        2
    """

    def __init__(
        self, dataset: Any, *, seed: int, env: DistEnv, position: Any, **dataloader_kwargs: Any
    ) -> None:
        super().__init__(dataset, generator=torch.Generator(), **dataloader_kwargs)
        self.seed = seed
        self.env = env
        self.position = position
        self.epoch = position.epoch
        self.padding = PaddingStats()
        self.unread_examples = 0
        self.pass_rows = 0  # examples yielded in the current pass
        self._kwargs = dataloader_kwargs
        self._yielded = 0
        self._pass_complete = (
            False  # the epoch advances lazily, at the next pass, so state_dict still sees it
        )
        self._twin: Loader | None = None

    def set_epoch(self, epoch: int) -> None:
        """Order the next pass as epoch ``epoch``.

        Setting the epoch the loader is already in (e.g. right after ``load_state_dict``) keeps the resumed
        position; any other epoch, or the same one after a complete pass, starts from its beginning.
        """
        epoch = integer("epoch", epoch, 0)
        if epoch != self.epoch or self._pass_complete:
            self.epoch = epoch
            self._pass_complete = False
            self.position.set_epoch(epoch)

    def __iter__(self) -> Iterator[Any]:
        return self._pass(keys=False)

    def indexed(self) -> Iterator[tuple[list[int], Any]]:
        """Iterate like ``for batch in loader``, yielding ``(dataset row indices, batch)`` pairs: the indices
        come from the batch sampler in the main process, so they never travel inside the batch.

        Raises:
            TypeError: a stream (its rows have no global index).

        Example:
            >>> rows, batch = next(loader.indexed())
            >>> rows                                    # the random sampler's first 8 rows (seed 0)
            [2, 11, 25, 21, 10, 4, 29, 16]
            >>> batch["input_ids"].shape[0]
            8
        """
        if not self.position.has_indices:
            raise TypeError("a streamed dataset has no row indices; iterate the loader itself")
        return self._pass(keys=True)

    def _pass(self, keys: bool) -> Iterator[Any]:
        """One pass: the batches, or ``(row indices, batch)`` pairs with ``keys``."""
        if self._pass_complete:
            self.set_epoch(self.epoch + 1)
        self.generator.manual_seed(epoch_seed(self.seed, self.epoch))
        self._yielded = self.pass_rows = 0
        source = self._in_process() if self._fetches_in_process() else super().__iter__()
        for key, rows, batch in self.position.iterate(source):
            self.padding.update(batch)
            self._yielded += 1
            self.pass_rows += rows
            yield (key, batch) if keys else batch
        self._pass_complete = True

    def _fetches_in_process(self) -> bool:
        """True when the batches can be fetched here exactly as DataLoader's single-process iterator would:
        no workers, no pinning, and the batch sampler (or bound stream) make_loader set up."""
        if self.num_workers != 0 or self.pin_memory or self.timeout:
            return False  # (DataLoader itself refuses a timeout without workers: leave that to it)
        return self.batch_sampler is self.position or self.batch_sampler is None

    def _in_process(self) -> Iterator[Any]:
        """What DataLoader's single-process iterator does per batch (fetch, then collate), without its
        per-batch profiler scope and bookkeeping, which cost about a tenth of a padded batch."""
        collate, dataset = self.collate_fn, self.dataset
        if self.batch_sampler is None:  # a bound stream yields whole batches (batch_size=None)
            for item in dataset:
                yield collate(item)
            return
        getitems = getattr(dataset, "__getitems__", None)  # as torch's fetcher: one call per batch if defined
        for indices in self.batch_sampler:
            yield collate(getitems(indices) if getitems else [dataset[i] for i in indices])

    def __len__(self) -> int:
        """Batches in a full epoch on this rank (TypeError for a stream, which has no length)."""
        return len(self.position)

    def batches_left(self) -> int | None:
        """Batches the next pass yields on this rank from the current (possibly resumed) position, without
        reading data; None for a stream."""
        return self.position.left(self.epoch + 1 if self._pass_complete else None)

    def data_identity(self) -> dict[str, Any]:
        """Plain JSON values that identify the data, for checkpoint resume checks: map-style, the HF dataset's
        fingerprint, rows, columns and the sampling strategy with its seed (not the world size); streams, the
        files and their sizes (or the dataset's config) and the shard plan's counts, seed and shuffle."""
        return self.position.identity()

    def state_dict(self, consumed: int | None = None) -> dict[str, Any]:
        """The position after ``consumed`` batches of the current pass (default: all yielded so far).

        The training loop passes the count at its last optimizer step, so batches that workers prefetched or the
        loop staged on the device are not counted. Holds only plain ints, lists and strings. Taken after the
        pass's last batch (even inside the ``for`` loop) it is the start of the next epoch.
        """
        k = self._yielded if consumed is None else integer("consumed", consumed)
        if k < 0 or k > self._yielded:
            raise ValueError(f"consumed must be between 0 and the {self._yielded} batches yielded, got {k}")
        return {"kind": self.position.kind, **self.position.state_dict(k)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from a :meth:`state_dict`: the next pass yields exactly the batches not yet consumed.

        Raises:
            ValueError: the state belongs to another kind of data (stream vs map-style) or another sampler
                (different dataset size, seed or strategy); the message says what differs.
        """
        kind = self.position.kind
        if state.get("kind") != kind:
            raise ValueError(f"this loader reads {kind} data but the state is for {state.get('kind')!r} data")
        self.position.load_state_dict({k: v for k, v in state.items() if k != "kind"})
        self.epoch = int(state["epoch"])
        self._pass_complete = False
        self._yielded = 0

    def unpadded(self) -> Loader:
        """This loader, or (when its distributed sampler pads ranks with duplicates) a twin that splits the same
        data over the ranks without padding: every row exactly once, ranks' shares at most one batch apart —
        what evaluation needs. The twin starts at the current epoch's beginning; this loader is not changed.

        Example:
            >>> from hf_loop.dist import DistEnv
            >>> rank2 = make_loader(data, batch_size=8, sampler="sequential", env=DistEnv(rank=2, world_size=3))
            >>> [rows for rows, _ in rank2.indexed()]             # 32 rows padded to 3 x 11: row 0 again
            [[2, 5, 8, 11, 14, 17, 20, 23], [26, 29, 0]]
            >>> [rows for rows, _ in rank2.unpadded().indexed()]  # every row on exactly one rank
            [[2, 5, 8, 11, 14, 17, 20, 23], [26, 29]]
        """
        if self._twin is None:
            position = self.position.unpadded()
            if position is None:
                return self
            kwargs = {**self._kwargs, "batch_sampler": position}
            self._twin = Loader(self.dataset, seed=self.seed, env=self.env, position=position, **kwargs)
        return self._twin

    @property
    def _is_accelerate_prepared(self) -> bool:
        """accelerate's ``Accelerator.prepare`` returns a loader with this attribute as it is: an hl.Loader is
        already split over the ranks by ``env`` and resumes exactly, and re-sharding it would keep 1/W of each
        rank's share. A loader built for one process inside a multi-process group is refused instead."""
        world = process_group_size()
        if world > 1 and self.env.world_size != world:
            raise ValueError(
                f"this hl.Loader was built for world_size={self.env.world_size} but runs in a process group of "
                f"{world}; build it with env=hl.init_distributed() (after creating the Accelerator) so that each "
                "rank reads its own share. accelerate then passes it through untouched"
            )
        return True

    @_is_accelerate_prepared.setter
    def _is_accelerate_prepared(self, value: bool) -> None:
        pass  # always prepared (see the getter)


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
        >>> data = hl.MapDataset(hf_dataset, transform=tokenize)      # text -> input_ids, once per batch
        >>> loader = hl.make_loader(data, batch_size=16, sampler="length", num_workers=2)
        >>> [batch["input_ids"].shape for batch in loader]          # 32 rows; similar lengths share a batch
        [torch.Size([16, 29]), torch.Size([16, 10])]
    """
    env = env or DistEnv(device=default_device())  # one process; pin_memory='auto' still sees a GPU
    options = {k: kwargs.pop(k) for k in STRATEGY_OPTIONS if k in kwargs}
    _check_dataloader_options(kwargs)
    batch_size = optional_integer("batch_size", batch_size, 1)
    num_workers = integer("num_workers", num_workers, 0)
    drop_last = boolean("drop_last", drop_last)
    seed = integer("seed", seed, 0)
    if type(dataset).__module__.startswith("datasets."):
        dataset = to_torch(dataset)
    common = {"num_workers": num_workers, "pin_memory": _resolve_pin_memory(pin_memory, env), **kwargs}
    collate_fn = collate_fn or PadCollator()
    if isinstance(dataset, StreamDataset):  # it yields whole batches itself
        bound = _bound_stream(dataset, sampler, options, env, num_workers, batch_size, drop_last)
        return Loader(bound, seed=seed, env=env, position=StreamTracker(bound), batch_size=None,
                      collate_fn=bound.wrap_collate(collate_fn), **common)  # fmt: skip
    if not hasattr(dataset, "__len__"):
        raise TypeError(
            f"make_loader needs a map-style dataset with __len__ or a StreamDataset, got {type(dataset).__name__}"
        )
    global_sampler = _global_sampler(dataset, sampler, options, env, batch_size, seed)
    if batch_size is None and not getattr(global_sampler, "yields_batches", False):
        raise ValueError("batch_size is required unless the sampler yields whole batches (sampler='tokens')")
    batches = MapBatches(
        global_sampler, batch_size, drop_last, seed, world_size=env.world_size, dataset=dataset
    )
    return Loader(
        dataset, seed=seed, env=env, position=batches, batch_sampler=batches, collate_fn=collate_fn, **common
    )


def _check_dataloader_options(kwargs: dict[str, Any]) -> None:
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


def _bound_stream(stream: StreamDataset, sampler: Any, options: dict[str, Any], env: DistEnv, num_workers: int,
                  batch_size: int | None, drop_last: bool) -> Any:  # fmt: skip
    """The stream bound to this rank's readers (a new object; the user's stream is not changed)."""
    ordering = sorted(set(options) - {"max_tokens"})  # a token budget is a batching choice, not an order
    if sampler is not None or ordering:
        raise ValueError(
            f"a StreamDataset orders itself; got sampler={sampler!r} {ordering or ''}. Shuffle a stream "
            "with StreamDataset(..., shuffle_buffer=N, seed=S) instead of a sampler"
        )
    if batch_size is None and "max_tokens" not in options:
        raise ValueError("a stream needs batch_size=... (or max_tokens=...)")
    return stream.bind(rank=env.rank, world_size=env.world_size, num_workers=num_workers, batch_size=batch_size,
                       max_tokens=options.get("max_tokens"), drop_last=drop_last)  # fmt: skip


def _global_sampler(dataset: Any, sampler: Any, options: dict[str, Any], env: DistEnv, batch_size: int | None,
                    seed: int) -> Any:  # fmt: skip
    """The named strategy (or the given sampler) over the GLOBAL order, split for this rank under ``env``."""
    strategy = "random" if sampler is None else sampler
    if isinstance(strategy, str):
        if strategy not in STRATEGIES:
            raise ValueError(f"sampler must be one of {STRATEGIES} or a sampler object, got {strategy!r}")
        if strategy != "tokens" and batch_size is None:
            raise ValueError(f"sampler={strategy!r} needs batch_size=...")
        chosen = build_sampler(strategy, len(dataset), dataset, batch_size=batch_size, seed=seed,
                               world_size=env.world_size, options=options)  # fmt: skip
    elif options:
        raise TypeError(
            f"strategy options {sorted(options)} only apply to a named sampler strategy; "
            f"set them on the {type(strategy).__name__} object instead"
        )
    else:
        chosen = strategy
    if not isinstance(chosen, hs.DistributedSampler):
        return (
            hs.DistributedSampler(chosen, num_replicas=env.world_size, rank=env.rank)
            if env.world_size > 1
            else chosen
        )
    if env.world_size > 1 and (chosen.num_replicas, chosen.rank) != (env.world_size, env.rank):
        raise ValueError(
            f"the DistributedSampler is rank {chosen.rank} of {chosen.num_replicas} but env is rank {env.rank} of "
            f"{env.world_size}; pass the global sampler and make_loader splits it for env"
        )
    return chosen
