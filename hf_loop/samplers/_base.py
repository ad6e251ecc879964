"""The sampler protocol: the :class:`Sampler` base class, argument checks, state identity and data hashes.

Every concrete sampler subclasses :class:`Sampler` and implements ``_draw(epoch)``; this module owns how an order is
cached, yielded from ``start``, saved and reloaded (docs/internals.md, "Sampler protocol").
"""

from __future__ import annotations

import hashlib
from abc import ABC, abstractmethod
from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np
from torch.utils.data import Sampler as TorchSampler

from hf_loop.checks import integer

_CHUNK = 1 << 16  # indices converted to Python ints per step: bounded memory on 10M-example epochs


def _array(values: Any, name: str) -> np.ndarray:
    if hasattr(values, "detach"):  # a torch tensor, possibly on an accelerator
        values = values.detach().cpu().numpy()
    try:
        array = np.asarray(values)
    except ValueError:  # ragged nested lists, e.g. token ids instead of their counts
        array = np.asarray(values, dtype=object)
    if array.ndim == 1 and array.size and isinstance(array[0], (list, tuple, np.ndarray)):
        raise ValueError(
            f"{name} must be one number per example, got a sequence of sequences (first item "
            f"{str(array[0])[:40]}); for lengths pass their counts, e.g. [len(ids) for ids in column]"
        )
    if array.ndim != 1 or array.size == 0:
        raise ValueError(
            f"{name} must be a non-empty 1-D sequence (one value per example), got shape {array.shape}"
        )
    return array


def _integers(values: Any, name: str) -> np.ndarray:
    array = _array(values, name)
    if array.dtype.kind == "f" and np.isfinite(array).all() and (array == np.round(array)).all():
        array = array.astype(np.int64)
    if array.dtype.kind not in "iu":
        raise TypeError(f"{name} must hold integers, got dtype {array.dtype} (first value {array[0]!r})")
    return array.astype(np.int64, copy=True)


def _fingerprint(array: np.ndarray) -> int:
    """A 63-bit hash of an array's values: identifies the data in a state without storing it."""
    digest = hashlib.blake2b(np.ascontiguousarray(array).data, digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


def _stream(items: Any, batches: bool) -> Iterator[Any]:
    if batches:
        for batch in items:
            yield batch.tolist()
        return
    for i in range(0, len(items), _CHUNK):
        yield from items[i : i + _CHUNK].tolist()


class Sampler(TorchSampler, ABC):
    """Base class: an epoch order computed from (seed, epoch), yielded from position ``start``.

    Subclasses implement ``_draw(epoch)``. ``__iter__`` never changes the sampler (DataLoader calls ``iter()`` on
    its batch sampler more than once per epoch), and ``state_dict`` holds only ints, bools and strings.

    Example:
        >>> from hf_loop.samplers import RandomSampler
        >>> s = RandomSampler(6, seed=0)
        >>> state = s.state_dict(consumed=4)  # the caller used 4 items of this epoch
        >>> fresh = RandomSampler(6, seed=0)
        >>> fresh.load_state_dict(state)
        >>> list(fresh) == list(s)[4:]
        True
    """

    yields_batches = False
    _options: tuple[str, ...] = ()  # attributes a state must match, besides kind, n and seed
    # (name, attribute) of the data array whose hash a state must match, e.g. ("lengths", "lengths")
    _hashed: tuple[str, str] | None = None

    def __init__(self, n: int, seed: int = 0, size: int | None = None) -> None:
        super().__init__()
        self.n = integer("n (the number of examples)", n, 1)
        self.seed = integer("seed", seed, 0)
        self.epoch = 0
        self.start = 0
        self._size = size  # items per epoch when known without drawing the order
        self._cached: tuple[int, Any] | None = None
        self._hash: int | None = None

    @abstractmethod
    def _draw(self, epoch: int) -> np.ndarray | list[np.ndarray]:
        """The epoch's order: indices, or a list of index arrays (one per batch) when ``yields_batches``."""

    def order(self, epoch: int) -> np.ndarray | list[np.ndarray]:
        """The full global order of ``epoch`` (read-only arrays; the same on every rank and every call)."""
        epoch = integer("epoch", epoch, 0)
        if self._cached is None or self._cached[0] != epoch:
            drawn = self._draw(epoch)
            for array in drawn if self.yields_batches else [drawn]:
                array.flags.writeable = False
            self._cached = (epoch, drawn)
        drawn = self._cached[1]
        return list(drawn) if self.yields_batches else drawn

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose order the next ``__iter__`` yields, from its start."""
        self.epoch = integer("epoch", epoch, 0)
        self.start = 0

    def _epoch_size(self, epoch: int) -> int:
        return self._size if self._size is not None else len(self.order(epoch))

    def __len__(self) -> int:
        return self._epoch_size(self.epoch)

    def remaining(self, epoch: int | None = None, start: int | None = None) -> int:
        """Items an iteration from ``start`` of ``epoch`` yields (default: the current epoch and start).

        Example:
            >>> from hf_loop.samplers import RandomSampler
            >>> RandomSampler(10).remaining(start=4)
            6
        """
        epoch = self.epoch if epoch is None else epoch
        return max(self._epoch_size(epoch) - (self.start if start is None else start), 0)

    def items(self) -> np.ndarray | list[np.ndarray]:
        """What the next ``__iter__`` yields, at once: an index array (or a list of batch arrays)."""
        return self.order(self.epoch)[self.start :]

    def __iter__(self) -> Iterator[Any]:
        # Slice now, not lazily in a generator: the iterator is a snapshot of (epoch, start).
        return _stream(self.items(), self.yields_batches)

    def identity(self) -> dict[str, Any]:
        """What a state must match to load here: kind, n, seed, options and a hash of the data (plain values)."""
        extra = {name: getattr(self, name) for name in self._options}
        if self._hashed is not None:
            if self._hash is None:
                self._hash = _fingerprint(getattr(self, self._hashed[1]))
            extra[f"{self._hashed[0]}_hash"] = self._hash
        return {"kind": type(self).__name__, "n": self.n, "seed": self.seed, **extra}

    def state_dict(self, consumed: int = 0) -> dict[str, Any]:
        """The position after ``consumed`` items (ints, or batches for batch samplers) of the current iteration."""
        consumed = integer("consumed", consumed, 0)
        position = self.start + min(consumed, max(self._epoch_size(self.epoch) - self.start, 0))
        return {**self.identity(), "epoch": self.epoch, "position": position}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Continue from a state saved by an identical sampler (also one saved inside a DistributedSampler).

        Raises:
            ValueError: the state is not a sampler state, or comes from another strategy, dataset size, seed,
                options or data; the message names each difference.
        """
        _check_identity(_saved_identity(state), self._core_identity())
        self.set_epoch(state["epoch"])
        self.start = integer("position", state["position"], 0)

    def _core_identity(self) -> dict[str, Any]:
        return self.identity()


def _saved_identity(state: Any) -> dict[str, Any]:
    if not isinstance(state, Mapping) or not {"kind", "epoch", "position"} <= set(state):
        got = sorted(state) if isinstance(state, Mapping) else type(state).__name__
        raise ValueError(
            f"not an hf_loop sampler state: expected a dict with 'kind', 'epoch' and 'position' (from "
            f"sampler.state_dict()), got {got}"
        )
    if state["kind"] == "DistributedSampler":
        return dict(state["inner"])
    return {key: value for key, value in state.items() if key not in ("epoch", "position")}


def _check_identity(saved: dict[str, Any], expected: dict[str, Any]) -> None:
    if saved.get("kind") != expected["kind"]:
        raise ValueError(
            f"this state was saved by a {saved.get('kind')} but this sampler is a {expected['kind']}: load it "
            "into a sampler built with the same strategy and arguments"
        )
    diffs = []
    for key, value in expected.items():
        if saved.get(key) != value:
            what = f"{key[:-5]} differ (same count, other values)" if key.endswith("_hash") else key
            diffs.append(f"{what}: saved {saved.get(key)!r}, here {value!r}")
    if diffs:
        hint = ""
        if any(d.startswith("batch_size") for d in diffs):
            hint = " (under DDP it is the global batch world_size x batch_size: keep that product)"
        raise ValueError(
            f"this {expected['kind']} state belongs to a different sampler — {'; '.join(diffs)}{hint}. Rebuild "
            "the sampler with the saved data, seed and options, or start without load_state_dict"
        )
