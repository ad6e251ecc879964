"""Length-aware samplers: batches of similar length (little padding) and batches under a token budget."""

from __future__ import annotations

from typing import Any

import numpy as np

from hf_loop.checks import boolean, integer
from hf_loop.samplers._base import Sampler, _integers


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
        self.batch_size = integer("batch_size", batch_size, 1)
        self.megabatch = integer("megabatch", megabatch, 1)
        self.longest_first = boolean("longest_first", longest_first)

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
        self.max_tokens = integer("max_tokens", max_tokens, 1)
        longest = int(np.argmax(self.lengths))
        if self.lengths[longest] > self.max_tokens:
            raise ValueError(
                f"max_tokens={self.max_tokens} is smaller than the longest example (index {longest}, length "
                f"{self.lengths[longest]}): raise max_tokens to at least {self.lengths[longest]} or truncate "
                f"examples to at most {self.max_tokens} tokens"
            )
        self.megabatch = integer("megabatch", megabatch, 1)
        self.longest_first = boolean("longest_first", longest_first)
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
