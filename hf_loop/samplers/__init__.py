"""Samplers whose order is a pure function of (seed, epoch): resumable mid-epoch and distributable.

Each sampler computes an epoch's whole order with numpy (``order(epoch)``, from ``np.random.default_rng((seed,
epoch))``, never the global RNG) and yields ``order(epoch)[start:]``. Every rank therefore computes the same global
order, and resuming means recomputing the order and slicing it: no data is re-read. :class:`DistributedSampler`
gives rank r the positions r, r+W, r+2W, ... of that global order; its state is the *global* position, so a run
saved on W ranks continues the same order on W' ranks. The protocol is described in docs/internals.md.

Modules: ``_base`` (the :class:`Sampler` protocol, argument checks, state identity), ``basic`` (sequential, random,
weighted, subset, :func:`class_weights`), ``length`` (length-grouped and token-budget batching), ``distributed``
(rank shards).
"""

from hf_loop.samplers._base import Sampler
from hf_loop.samplers.basic import (
    RandomSampler,
    SequentialSampler,
    SubsetSampler,
    WeightedSampler,
    class_weights,
)
from hf_loop.samplers.distributed import DistributedSampler
from hf_loop.samplers.length import LengthGroupedSampler, TokenBudgetBatchSampler

__all__ = [
    "DistributedSampler",
    "LengthGroupedSampler",
    "RandomSampler",
    "Sampler",
    "SequentialSampler",
    "SubsetSampler",
    "TokenBudgetBatchSampler",
    "WeightedSampler",
    "class_weights",
]
