"""From a strategy name (``make_loader(sampler="weighted", weights=...)``) to the global sampler it means."""

from __future__ import annotations

from typing import Any

from hf_loop.samplers.basic import RandomSampler, SequentialSampler, SubsetSampler, WeightedSampler
from hf_loop.samplers.length import LengthGroupedSampler, TokenBudgetBatchSampler

STRATEGIES = ("sequential", "random", "weighted", "subset", "length", "tokens")


def build_sampler(
    strategy: str,
    n: int,
    dataset: Any,
    *,
    batch_size: int | None,
    seed: int,
    world_size: int = 1,
    options: dict[str, Any],
) -> Any:
    """The global (all-rank) sampler for a named ``make_loader`` strategy and its options.

    Example:
        >>> build_sampler("random", 10, None, batch_size=4, seed=0, options={}).n
        10
    """

    def need(name: str) -> Any:
        if options.get(name) is None:
            raise ValueError(f"sampler={strategy!r} needs {name}=...; got none")
        return options[name]

    if strategy == "sequential":
        return SequentialSampler(n)
    if strategy == "random":
        return RandomSampler(n, seed=seed)
    if strategy == "weighted":
        weights = need("weights")
        if len(weights) != n:
            raise ValueError(f"weights has {len(weights)} entries but the dataset has {n} examples")
        return WeightedSampler(
            weights,
            num_samples=options.get("num_samples"),
            replacement=options.get("replacement", True),
            seed=seed,
        )
    if strategy == "subset":
        return SubsetSampler(need("indices"), shuffle=options.get("shuffle", True), seed=seed, dataset_size=n)
    lengths = options.get("lengths")
    if lengths is None:
        if not hasattr(dataset, "lengths"):
            raise ValueError(
                f"sampler={strategy!r} needs lengths=...; {type(dataset).__name__} cannot "
                "compute them (hl.MapDataset can)"
            )
        lengths = dataset.lengths(options.get("length_column", "input_ids"))
    if len(lengths) != n:
        raise ValueError(f"lengths has {len(lengths)} entries but the dataset has {n} examples")
    if strategy == "length":
        # Built for the GLOBAL batch: striding by rank then keeps each rank's batch length-homogeneous.
        return LengthGroupedSampler(
            lengths, batch_size * world_size, seed=seed, megabatch=options.get("megabatch", 50)
        )
    # "tokens": batches of at most max_tokens each, dealt whole to the ranks (each rank's batch is one budget).
    return TokenBudgetBatchSampler(lengths, need("max_tokens"), seed=seed)


STRATEGY_OPTIONS = (
    "weights",
    "num_samples",
    "replacement",
    "indices",
    "shuffle",
    "lengths",
    "length_column",
    "megabatch",
    "max_tokens",
)
