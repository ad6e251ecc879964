"""Samplers whose order is a pure function of (seed, epoch): resumable mid-epoch and distributable.

Each sampler computes an epoch's whole order with numpy (``order(epoch)``, from ``np.random.default_rng((seed,
epoch))``, never the global RNG) and yields ``order(epoch)[start:]``. Every rank therefore computes the same global
order, and resuming means recomputing the order and slicing it: no data is re-read. :class:`DistributedSampler`
gives rank r the positions r, r+W, r+2W, ... of that global order; its state is the *global* position, so a run
saved on W ranks continues the same order on W' ranks. The protocol is described in docs/internals.md.
"""

from __future__ import annotations

import hashlib
from abc import ABC, abstractmethod
from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np
from torch.utils.data import Sampler as TorchSampler

_CHUNK = 1 << 16  # indices converted to Python ints per step: bounded memory on 10M-example epochs


def _count(value: Any, name: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return int(value)


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


def _lengths(values: Any) -> np.ndarray:
    lengths = _integers(values, "lengths")
    if (lengths < 0).any():
        i = int(np.argmax(lengths < 0))
        raise ValueError(f"lengths[{i}] = {lengths[i]}: token counts must be >= 0")
    if not lengths.any():
        raise ValueError(
            "every length is 0, so grouping by length would do nothing: compute lengths after tokenizing "
            "(e.g. MapDataset.lengths('input_ids')), not from an empty or missing column"
        )
    return lengths


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
        self.n = _count(n, "n (the number of examples)", 1)
        self.seed = _count(seed, "seed", 0)
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
        epoch = _count(epoch, "epoch", 0)
        if self._cached is None or self._cached[0] != epoch:
            drawn = self._draw(epoch)
            for array in drawn if self.yields_batches else [drawn]:
                array.flags.writeable = False
            self._cached = (epoch, drawn)
        drawn = self._cached[1]
        return list(drawn) if self.yields_batches else drawn

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose order the next ``__iter__`` yields, from its start."""
        self.epoch = _count(epoch, "epoch", 0)
        self.start = 0

    def _epoch_size(self, epoch: int) -> int:
        return self._size if self._size is not None else len(self.order(epoch))

    def __len__(self) -> int:
        return self._epoch_size(self.epoch)

    def __iter__(self) -> Iterator[Any]:
        # Slice now, not lazily in a generator: the iterator is a snapshot of (epoch, start).
        return _stream(self.order(self.epoch)[self.start :], self.yields_batches)

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
        consumed = _count(consumed, "consumed", 0)
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
        self.start = _count(state["position"], "position", 0)

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


class SequentialSampler(Sampler):
    """0, 1, ..., n-1 every epoch (evaluation, prediction).

    Example:
        >>> list(SequentialSampler(4))
        [0, 1, 2, 3]
    """

    def __init__(self, n: int) -> None:
        super().__init__(n, 0, size=n)

    def _draw(self, epoch: int) -> np.ndarray:
        return np.arange(self.n)


class RandomSampler(Sampler):
    """A fresh permutation of ``range(n)`` each epoch, from (seed, epoch).

    Example:
        >>> s = RandomSampler(5, seed=0)
        >>> sorted(s) == list(range(5)), list(s) == list(s)
        (True, True)
    """

    def __init__(self, n: int, *, seed: int = 0) -> None:
        super().__init__(n, seed, size=n)

    def _draw(self, epoch: int) -> np.ndarray:
        return np.random.default_rng((self.seed, epoch)).permutation(self.n)


class WeightedSampler(Sampler):
    """``num_samples`` indices drawn with probability proportional to ``weights``.

    With replacement: sorted uniforms, one ``searchsorted`` into the cumulative weights, then a shuffle (no
    2^24 limit, unlike ``torch.multinomial``). Without replacement: Efraimidis-Spirakis keys ``Exp(1) / w``, smallest first, which
    draws successively proportional to the remaining weights. Zero weights are never drawn.

    Example:
        >>> s = WeightedSampler([0.0, 1.0, 3.0], num_samples=6, seed=0)
        >>> len(s), 0 in list(s)
        (6, False)
        >>> sorted(WeightedSampler([1.0, 2.0, 3.0], replacement=False))
        [0, 1, 2]
    """

    _options = ("num_samples", "replacement")
    _hashed = ("weights", "_values")

    def __init__(
        self, weights: Any, *, num_samples: int | None = None, replacement: bool = True, seed: int = 0
    ) -> None:
        w = _array(weights, "weights")
        if w.dtype.kind not in "biuf":
            raise TypeError(f"weights must be numbers, got dtype {w.dtype} (first value {w[0]!r})")
        w = w.astype(np.float64)
        bad = ~np.isfinite(w) | (w < 0)
        if bad.any():
            i = int(np.argmax(bad))
            raise ValueError(f"weights[{i}] = {w[i]}: every weight must be finite and >= 0 (0 = never drawn)")
        positive = np.flatnonzero(w)
        if positive.size == 0:
            raise ValueError(
                "all weights are 0, so nothing can be drawn: give some examples a positive weight"
            )
        super().__init__(len(w), seed)
        self.replacement = bool(replacement)
        self.num_samples = self.n if num_samples is None else _count(num_samples, "num_samples", 1)
        self._size = self.num_samples
        if not self.replacement and self.num_samples > positive.size:
            raise ValueError(
                f"num_samples={self.num_samples} but only {positive.size} examples have a positive weight: "
                "without replacement each is drawn at most once; lower num_samples or pass replacement=True"
            )
        # Keep only what the draw needs: the cumulative sums (replacement) or the weights themselves.
        self._values = np.cumsum(w) if self.replacement else w
        self._last = int(positive[-1])

    def _draw(self, epoch: int) -> np.ndarray:
        rng = np.random.default_rng((self.seed, epoch))
        if self.replacement:
            # Sorted queries make searchsorted cache-friendly (~20x faster at 10M draws); shuffling the result
            # restores the iid order, since iid draws are exchangeable. u * total can round up to total: clip to
            # the last example that can be drawn.
            u = np.sort(rng.random(self.num_samples)) * self._values[-1]
            drawn = np.minimum(np.searchsorted(self._values, u, side="right"), self._last)
            rng.shuffle(drawn)
            return drawn
        with np.errstate(divide="ignore"):
            keys = rng.standard_exponential(self.n) / self._values
        if self.num_samples < self.n:
            chosen = np.argpartition(keys, self.num_samples - 1)[: self.num_samples]
            return chosen[np.argsort(keys[chosen], kind="stable")]
        return np.argsort(keys, kind="stable")


class SubsetSampler(Sampler):
    """The given dataset indices, shuffled each epoch (or in the given order with ``shuffle=False``).

    Args:
        indices: distinct dataset indices.
        dataset_size: when given, indices must be below it.

    Example:
        >>> sorted(SubsetSampler([7, 3, 5], seed=1))
        [3, 5, 7]
    """

    _options = ("shuffle",)
    _hashed = ("indices", "indices")

    def __init__(
        self, indices: Any, *, shuffle: bool = True, seed: int = 0, dataset_size: int | None = None
    ) -> None:
        idx = _integers(indices, "indices")
        limit = ""
        bad = idx < 0
        if dataset_size is not None:
            limit = f" and < dataset_size={_count(dataset_size, 'dataset_size', 1)}"
            bad |= idx >= dataset_size
        if bad.any():
            i = int(np.argmax(bad))
            raise ValueError(f"indices[{i}] = {idx[i]} is out of range: subset indices must be >= 0{limit}")
        ordered = np.sort(idx)
        repeated = ordered[1:][ordered[1:] == ordered[:-1]]
        if repeated.size:
            raise ValueError(
                f"index {repeated[0]} appears {int((idx == repeated[0]).sum())} times in indices: pass each "
                "index once (np.unique(indices)), or use WeightedSampler to draw examples more than once"
            )
        super().__init__(len(idx), seed, size=len(idx))
        self.indices, self.shuffle = idx, bool(shuffle)

    def _draw(self, epoch: int) -> np.ndarray:
        if not self.shuffle:
            return self.indices.copy()
        return self.indices[np.random.default_rng((self.seed, epoch)).permutation(self.n)]


def _grouped(lengths: np.ndarray, rng: np.random.Generator, group_size: int) -> np.ndarray:
    """A random permutation cut into groups of ``group_size`` (the tail joins the last full group), each group
    sorted by length, longest first. Ties keep the random order."""
    perm = rng.permutation(len(lengths))
    groups = max(len(lengths) // group_size, 1)
    group = np.minimum(np.arange(len(lengths)) // group_size, groups - 1)
    return perm[np.lexsort((-lengths[perm], group))]


def _shuffled(count: int, rng: np.random.Generator, longest: int | None) -> np.ndarray:
    """A random order of ``count`` batches, with batch ``longest`` moved to the front when given."""
    order = rng.permutation(count)
    if longest is not None:
        where = int(np.flatnonzero(order == longest)[0])
        order[0], order[where] = order[where], order[0]
    return order


class LengthGroupedSampler(Sampler):
    """Indices in batches of similar length: little padding, random batch order.

    Each epoch: a random permutation is cut into mega-batches of ``megabatch`` batches, each sorted by length
    (longest first) and cut into batches of ``batch_size``; then the order of all full batches is shuffled, with
    the batch holding the epoch's longest example first so out-of-memory shows at step 0. A partial batch comes
    last. Under DDP build it for the global batch (world_size x batch_size): rank strides keep each rank's
    batches length-homogeneous.

    Example:
        >>> s = LengthGroupedSampler([5, 1, 9, 2, 8, 3], batch_size=2, seed=0)
        >>> first = list(s)[:2]
        >>> sorted(first)   # the batch with the longest example comes first
        [2, 4]
    """

    _options = ("batch_size", "megabatch", "longest_first")
    _hashed = ("lengths", "lengths")

    def __init__(
        self, lengths: Any, batch_size: int, *, seed: int = 0, megabatch: int = 50, longest_first: bool = True
    ) -> None:
        self.lengths = _lengths(lengths)
        super().__init__(len(self.lengths), seed, size=len(self.lengths))
        self.batch_size = _count(batch_size, "batch_size", 1)
        self.megabatch = _count(megabatch, "megabatch", 1)
        self.longest_first = bool(longest_first)

    def _draw(self, epoch: int) -> np.ndarray:
        rng = np.random.default_rng((self.seed, epoch))
        b = self.batch_size
        order = _grouped(self.lengths, rng, self.megabatch * b)
        full = self.n // b
        if full == 0:
            return order
        # Mega-batch edges are multiples of b, so each full batch is sorted: its first example is its longest.
        batches = order[: full * b].reshape(full, b)
        longest = int(np.argmax(self.lengths[batches[:, 0]])) if self.longest_first else None
        return np.concatenate([batches[_shuffled(full, rng, longest)].ravel(), order[full * b :]])


class TokenBudgetBatchSampler(Sampler):
    """Batches of varying size with ``len(batch) * longest <= max_tokens``.

    Each epoch: a random permutation is cut into mega-chunks of about ``megabatch`` batches' worth of tokens,
    each sorted by length (longest first) and cut greedily into the largest batches the budget allows; then the
    batch order is shuffled, with the batch holding the epoch's longest example first (``longest_first``).

    Example:
        >>> s = TokenBudgetBatchSampler([4, 4, 2, 2, 2, 8], max_tokens=8, seed=0)
        >>> list(s)[0], sorted(i for batch in s for i in batch)
        ([5], [0, 1, 2, 3, 4, 5])
    """

    yields_batches = True
    _options = ("max_tokens", "megabatch", "longest_first")
    _hashed = ("lengths", "lengths")

    def __init__(
        self, lengths: Any, max_tokens: int, *, seed: int = 0, megabatch: int = 50, longest_first: bool = True
    ) -> None:
        self.lengths = _lengths(lengths)
        super().__init__(len(self.lengths), seed)
        self.max_tokens = _count(max_tokens, "max_tokens", 1)
        longest = int(np.argmax(self.lengths))
        if self.lengths[longest] > self.max_tokens:
            raise ValueError(
                f"max_tokens={self.max_tokens} is smaller than the longest example (index {longest}, length "
                f"{self.lengths[longest]}): raise max_tokens to at least {self.lengths[longest]} or truncate "
                f"examples to at most {self.max_tokens} tokens"
            )
        self.megabatch = _count(megabatch, "megabatch", 1)
        self.longest_first = bool(longest_first)
        # A chunk holds about `megabatch` batches: megabatch * max_tokens tokens at the mean length.
        self._chunk = max(1, round(self.megabatch * self.max_tokens / max(float(self.lengths.mean()), 1.0)))

    def _draw(self, epoch: int) -> list[np.ndarray]:
        rng = np.random.default_rng((self.seed, epoch))
        order = _grouped(self.lengths, rng, self._chunk)
        sizes = self.lengths[order].tolist()
        last_chunk = (max(self.n // self._chunk, 1) - 1) * self._chunk
        starts, i = [], 0
        while i < self.n:  # one step per batch; a batch never crosses its chunk's end (that would unsort it)
            starts.append(i)
            end = self.n if i >= last_chunk else (i // self._chunk + 1) * self._chunk
            i = min(i + self.max_tokens // max(sizes[i], 1), end)
        batches = np.split(order, starts[1:])
        longest = None
        if self.longest_first:
            first = np.asarray(starts)
            counts = np.diff(np.append(first, self.n))
            longest = int(np.argmax(self.lengths[order[first]] * (self.n + 1) + counts))
        return [batches[i] for i in _shuffled(len(batches), rng, longest)]


class DistributedSampler(Sampler):
    """Rank ``rank``'s share of any hf_loop sampler: positions rank, rank+W, rank+2W, ... of the global order.

    Every rank computes the same global order. The tail is padded by wrapping to the start of the epoch's order
    so every rank has the same length (or cut with ``drop_last``). Batch samplers are split by whole batches.
    ``start`` and the saved ``position`` are GLOBAL, so a state saved on W ranks loads on W' ranks (or into the
    bare inner sampler on one process) and continues the same global order.

    Example:
        >>> ranks = [list(DistributedSampler(SequentialSampler(5), num_replicas=2, rank=r)) for r in (0, 1)]
        >>> ranks
        [[0, 2, 4], [1, 3, 0]]
    """

    def __init__(self, inner: Sampler, *, num_replicas: int, rank: int, drop_last: bool = False) -> None:
        if isinstance(inner, DistributedSampler):
            raise TypeError("inner is already a DistributedSampler: wrap the global sampler once, not twice")
        if not isinstance(inner, Sampler):
            raise TypeError(
                f"DistributedSampler wraps an hf_loop sampler (hl.RandomSampler, hl.WeightedSampler, ...), got "
                f"{type(inner).__name__}: build the global order with one of them"
            )
        self.num_replicas = _count(num_replicas, "num_replicas", 1)
        rank = _count(rank, "rank", 0)
        if rank >= self.num_replicas:
            raise ValueError(
                f"rank must be in [0, {self.num_replicas}) for num_replicas={self.num_replicas}, got {rank}: pass "
                "rank=env.rank and num_replicas=env.world_size"
            )
        super().__init__(inner.n, inner.seed)
        self.inner, self.rank, self.drop_last = inner, rank, bool(drop_last)
        self.yields_batches = inner.yields_batches
        self.epoch, self.start = inner.epoch, inner.start

    def _draw(self, epoch: int) -> np.ndarray | list[np.ndarray]:
        return self.inner.order(epoch)

    def set_epoch(self, epoch: int) -> None:
        super().set_epoch(epoch)
        self.inner.set_epoch(epoch)

    def _epoch_size(self, epoch: int) -> int:
        return self.inner._epoch_size(epoch)  # the GLOBAL count

    def _positions(self) -> np.ndarray:
        """This rank's global positions from ``start``: wrapped past the end, or cut with ``drop_last``."""
        total, world = self._epoch_size(self.epoch), self.num_replicas
        rest = max(total - self.start, 0)
        count = rest // world if self.drop_last else -(-rest // world)
        positions = self.start + self.rank + world * np.arange(count)
        return np.where(positions < total, positions, (positions - total) % total)

    def __iter__(self) -> Iterator[Any]:
        full, positions = self.order(self.epoch), self._positions()
        items = [full[i] for i in positions] if self.yields_batches else full[positions]
        return _stream(items, self.yields_batches)

    def __len__(self) -> int:
        total = self._epoch_size(self.epoch)
        return total // self.num_replicas if self.drop_last else -(-total // self.num_replicas)

    def identity(self) -> dict[str, Any]:
        return {"kind": "DistributedSampler", "n": self.n, "seed": self.seed, "inner": self.inner.identity()}

    def _core_identity(self) -> dict[str, Any]:
        return self.inner.identity()

    def state_dict(self, consumed: int = 0) -> dict[str, Any]:
        """The GLOBAL position after this rank consumed ``consumed`` items: start + consumed x num_replicas."""
        consumed = _count(consumed, "consumed", 0)
        position = self.start + min(consumed, len(self._positions())) * self.num_replicas
        return {**self.identity(), "world_size": self.num_replicas, "epoch": self.epoch, "position": position}


def class_weights(labels: Any, *, power: float = 1.0) -> np.ndarray:
    """Per-example weights ``(1 / count(label)) ** power``, normalised to sum to 1, for :class:`WeightedSampler`.

    ``power=1`` draws every class equally often; ``power=0`` is uniform over examples; values in between soften
    the rebalancing. Labels may be ints, strings or any sortable values.

    Example:
        >>> w = class_weights(["a", "a", "a", "b"])
        >>> w.round(3).tolist(), float(w[:3].sum()), float(w[3])
        ([0.167, 0.167, 0.167, 0.5], 0.5, 0.5)
    """
    array = _array(labels, "labels")
    if isinstance(power, bool) or not isinstance(power, (int, float)) or not np.isfinite(power) or power < 0:
        raise ValueError(
            f"power must be a finite number >= 0 (1 = balanced classes, 0 = no change), got {power!r}"
        )
    try:
        _, inverse, counts = np.unique(array, return_inverse=True, return_counts=True)
    except TypeError as error:
        raise TypeError(
            f"labels must be mutually comparable (ints or strings), got {array.dtype}: {error}"
        ) from None
    weights = counts[inverse.reshape(-1)].astype(np.float64) ** -float(power)
    return weights / weights.sum()
