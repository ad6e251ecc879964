"""Index samplers over examples: in order, shuffled, weighted, a subset; and class-balancing weights."""

from __future__ import annotations

from typing import Any

import numpy as np

from hf_loop.checks import boolean, integer
from hf_loop.samplers._base import Sampler, _array, _integers


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
        self.replacement = boolean("replacement", replacement)
        self.num_samples = self.n if num_samples is None else integer("num_samples", num_samples, 1)
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
            limit = f" and < dataset_size={integer('dataset_size', dataset_size, 1)}"
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
        self.indices, self.shuffle = idx, boolean("shuffle", shuffle)

    def _draw(self, epoch: int) -> np.ndarray:
        if not self.shuffle:
            return self.indices.copy()
        return self.indices[np.random.default_rng((self.seed, epoch)).permutation(self.n)]


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
