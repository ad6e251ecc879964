"""The training data, one optimizer step at a time.

:class:`Feed` turns the training loader into lists of micro-batches (one list per optimizer step), staged on the
device one batch ahead. That look-ahead also tells, at an epoch's last step, that the epoch has ended, so the
loop handles an epoch's end in one place for map-style data and streams alike. Under DDP a stream goes through
``even_steps``: the ranks agree before every batch and end the epoch together. The feed's state is the loader's
state at the batches handed to the loop; batches prefetched by workers or staged ahead are not counted.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from itertools import islice
from typing import Any

import torch

from hf_loop.dist import DistEnv, all_reduce, even_steps

_END = object()


def to_device(batch: Any, device: torch.device, non_blocking: bool = False) -> Any:
    """Move every tensor of a (nested) batch; lists of strings and other values stay as they are."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=non_blocking)
    if isinstance(batch, Mapping):
        return {k: to_device(v, device, non_blocking) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)) and batch and isinstance(batch[0], torch.Tensor):
        return type(batch)(to_device(v, device, non_blocking) for v in batch)
    return batch


def _record_stream(batch: Any, stream: torch.cuda.Stream) -> None:
    if isinstance(batch, torch.Tensor):
        batch.record_stream(stream)
    elif isinstance(batch, Mapping):
        for v in batch.values():
            _record_stream(v, stream)


class Staged:
    """Yield batches on ``device``, the next one already being copied while the caller computes on this one.

    On CUDA the copy runs on a side stream (from pinned memory, ``non_blocking``) and the compute stream waits on
    it only when the batch is used; ``record_stream`` keeps the caching allocator from reusing its memory early.
    Elsewhere it is a one-batch look-ahead with a plain copy. ``more`` says whether a batch follows the one last
    yielded (it is already fetched).

    Example:
        >>> batches = Staged([{"x": torch.ones(2)}, {"x": torch.zeros(2)}], torch.device("cpu"))
        >>> first = next(batches); batches.more
        True
        >>> second = next(batches); batches.more
        False
    """

    def __init__(self, batches: Iterable[Any], device: torch.device) -> None:
        self._iterator = iter(batches)
        self._device = device
        self._side = torch.cuda.Stream(device) if device.type == "cuda" else None
        self._upcoming: Any = None  # fetched on first use, not at construction

    def _fetch(self) -> Any:
        batch = next(self._iterator, _END)
        if batch is _END or self._device.type == "cpu":  # a loader's batches are made on the CPU
            return batch
        if self._side is None:
            return to_device(batch, self._device)
        with torch.cuda.stream(self._side):
            return to_device(batch, self._device, non_blocking=True)

    @property
    def more(self) -> bool:
        if self._upcoming is None:
            self._upcoming = self._fetch()
        return self._upcoming is not _END

    def __iter__(self) -> Staged:
        return self

    def __next__(self) -> Any:
        if not self.more:
            raise StopIteration
        current = self._upcoming
        if self._side is not None:
            compute = torch.cuda.current_stream(self._device)
            compute.wait_stream(self._side)
            _record_stream(current, compute)
        self._upcoming = self._fetch()
        return current


def staged(batches: Iterable[Any], device: torch.device) -> Staged:
    """Batches on ``device`` with a one-batch look-ahead (see :class:`Staged`)."""
    return Staged(batches, device)


def loader_length(loader: Iterable) -> int | None:
    """``len(loader)``, or None for a loader without a length (a stream)."""
    try:
        return len(loader)  # type: ignore[arg-type]
    except TypeError:
        return None


def set_epoch(loader: Iterable, epoch: int) -> None:
    """Tell the loader (or its batch sampler, or sampler) which epoch to order."""
    for owner in (loader, getattr(loader, "batch_sampler", None), getattr(loader, "sampler", None)):
        if hasattr(owner, "set_epoch"):
            owner.set_epoch(epoch)
            return


class Feed:
    """The training loader as lists of micro-batches, one list per optimizer step.

    Args:
        loader: an ``hl.Loader`` (or any iterable of batches; only an ``hl.Loader`` can be checkpointed).
        env: the process's place in the job; streams under DDP go through ``even_steps``.
        grad_accum: micro-batches per optimizer step; an epoch's last step may have fewer.

    Example:
        >>> feed = Feed([{"x": torch.ones(1)}] * 3, DistEnv(), grad_accum=2)
        >>> [(len(micro), feed.ended) for micro in feed.epoch(0)]
        [(2, False), (1, True)]
    """

    def __init__(self, loader: Iterable, env: DistEnv, grad_accum: int) -> None:
        self.loader, self.env, self.grad_accum = loader, env, grad_accum
        self.per_epoch = loader_length(loader)
        self.used = 0  # batches of the loader's current pass handed to the loop
        self.unread_examples = 0  # examples the ranks left unread when a stream's epoch ended (all epochs)
        self._batches: Staged | None = None

    def epoch(self, epoch: int) -> Iterator[list[Any]]:
        """The micro-batch lists of ``epoch``; a resumed loader continues where its state left it."""
        set_epoch(self.loader, epoch)
        agreed = (
            even_steps(self.loader, self.env) if self.per_epoch is None and self.env.distributed else None
        )
        self._batches = staged(agreed if agreed is not None else self.loader, self.env.device)
        self.used = 0
        if not self._batches.more:
            raise ValueError(
                f"the training loader yielded no batches in epoch {epoch} on rank {self.env.rank}; check the "
                "dataset is not empty (and, for streams, has a shard for every rank)"
            )
        while micro := list(islice(self._batches, self.grad_accum)):
            self.used += len(micro)
            yield micro
        if agreed is not None:  # the same count on every rank: what the ranks left unread this epoch
            self.unread_examples += agreed.unread_examples

    @property
    def ended(self) -> bool:
        """True when no batch follows the ones handed out: the step just taken is the epoch's last."""
        return self._batches is not None and not self._batches.more

    def steps_per_epoch(self) -> int | None:
        return None if self.per_epoch is None else -(-self.per_epoch // self.grad_accum)

    def steps_left(self) -> int | None:
        """Optimizer steps the current (possibly resumed) epoch still has on this rank; None for a stream."""
        left = self.loader.batches_left() if hasattr(self.loader, "batches_left") else self.per_epoch
        return None if left is None else -(-left // self.grad_accum)

    def position(self) -> int:
        """The epoch's global position: examples (or batches) of the global order for map-style data, batches
        taken over all ranks for a stream (0 once the epoch ended). A collective under DDP: call it on every rank."""
        state = self.state_dict()
        if state.get("kind") == "map":
            return int(state["sampler"]["position"])
        return int(all_reduce(0 if self.ended else self.used, self.env))

    def state_dict(self) -> dict[str, Any]:
        return self.loader.state_dict(consumed=self.used)

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.loader.load_state_dict(state)
