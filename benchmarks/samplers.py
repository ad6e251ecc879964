"""Sampler benchmark: padding waste with a randomness measure beside it, and sampler throughput.

Padding waste on lognormal token lengths (n=100k, median 100, sigma 0.8, clipped to 8..512, batch 32) for a random
order, transformers' LengthGroupedSampler (its default megabatch, 50 batches here), hf_loop's LengthGroupedSampler
(megabatch 50) and TokenBudgetBatchSampler (max_tokens = 32 x the mean length, so a batch holds ~32 examples). Waste
alone can be bought by giving up randomness, so each row also shows:

- epoch-to-epoch Spearman: rank correlation of every example's position in epoch 0 and epoch 1 (0 = independent);
- lag-1 batch correlation: correlation of consecutive batches' mean lengths within an epoch (0 = no drift; a sorted
  mega-batch gives a high value, which shows up as loss spikes/drift).

Then indices/s on 10M examples for hf_loop's RandomSampler / WeightedSampler against torch's RandomSampler /
WeightedRandomSampler, and the 2^24-category limit of torch.multinomial.

Run: python benchmarks/samplers.py [--out benchmarks/results/samplers.md]
"""

from __future__ import annotations

import argparse
import collections
import datetime
import platform
import time

import numpy as np
import torch

import hf_loop as hl

N, BATCH, WORLD = 100_000, 32, 8


def lognormal_lengths(n: int = N, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.clip(np.round(rng.lognormal(np.log(100), 0.8, n)), 8, 512).astype(np.int64)


def fixed_batches(order: np.ndarray, size: int = BATCH) -> list[np.ndarray]:
    return [order[i : i + size] for i in range(0, len(order), size)]


def waste(lengths: np.ndarray, batches: list[np.ndarray]) -> float:
    real = sum(int(lengths[b].sum()) for b in batches)
    padded = sum(len(b) * int(lengths[b].max()) for b in batches)
    return 1 - real / padded


def epoch_spearman(first: np.ndarray, second: np.ndarray) -> float:
    """Rank correlation of each example's position in two epochs' flat orders (positions are already ranks)."""
    pos_a, pos_b = np.empty(len(first)), np.empty(len(second))
    pos_a[first], pos_b[second] = np.arange(len(first)), np.arange(len(second))
    return float(np.corrcoef(pos_a, pos_b)[0, 1])


def lag1(lengths: np.ndarray, batches: list[np.ndarray]) -> float:
    means = np.array([lengths[b].mean() for b in batches])
    return float(np.corrcoef(means[:-1], means[1:])[0, 1])


def transformers_order(lengths: np.ndarray, epoch: int) -> np.ndarray:
    from transformers.trainer_pt_utils import LengthGroupedSampler

    # The Trainer passes no generator in training (global RNG); a seeded one makes this run reproducible.
    generator = torch.Generator().manual_seed(epoch)
    return np.array(list(LengthGroupedSampler(BATCH, lengths=lengths.tolist(), generator=generator)))


def timed(fn):
    start = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - start


def waste_table(lengths: np.ndarray) -> list[str]:
    max_tokens = int(round(BATCH * lengths.mean()))
    grouped = hl.LengthGroupedSampler(lengths, BATCH, seed=0, megabatch=50)
    budget = hl.TokenBudgetBatchSampler(lengths, max_tokens, seed=0, megabatch=50)
    rows = {
        "random order (hl.RandomSampler)": lambda e: fixed_batches(hl.RandomSampler(N, seed=0).order(e)),
        "transformers LengthGroupedSampler (megabatch 50)": lambda e: fixed_batches(
            transformers_order(lengths, e)
        ),
        "hf_loop LengthGroupedSampler (megabatch 50)": lambda e: fixed_batches(grouped.order(e)),
        f"hf_loop TokenBudgetBatchSampler (max_tokens {max_tokens}, megabatch 50)": budget.order,
    }
    lines = [
        "| strategy | padding waste | mean batch size | epoch-to-epoch Spearman | lag-1 batch corr. | order build (s) |",
        "|---|---|---|---|---|---|",
    ]
    results = {}
    for name, draw in rows.items():
        batches, seconds = timed(lambda draw=draw: draw(0))
        second = draw(1)
        results[name] = waste(lengths, batches)
        spearman = epoch_spearman(np.concatenate(batches), np.concatenate(second))
        lines.append(
            f"| {name} | {results[name]:.2%} | {N / len(batches):.1f} | {spearman:+.3f} | "
            f"{lag1(lengths, batches):+.3f} | {seconds:.3f} |"
        )
    for name, per_rank_batch in (
        (f"hf_loop length-grouped for the global batch {WORLD}x{BATCH}", WORLD * BATCH),
        (f"hf_loop length-grouped for the per-rank batch {BATCH}, strided", BATCH),
    ):
        inner = hl.LengthGroupedSampler(lengths, per_rank_batch, seed=0)
        wastes = []
        for rank in range(WORLD):
            stream = np.array(list(hl.DistributedSampler(inner, num_replicas=WORLD, rank=rank)))
            wastes.append(waste(lengths, fixed_batches(stream)))
        lines.append(f"| {name} (W={WORLD}, mean over ranks) | {np.mean(wastes):.2%} | {BATCH} | | | |")
    grouped_waste = results["hf_loop LengthGroupedSampler (megabatch 50)"]
    budget_waste = results[list(rows)[-1]]
    lines += [
        "",
        f"Targets: length-grouped <= 5% ({'met' if grouped_waste <= 0.05 else 'MISSED'}: {grouped_waste:.2%}), "
        f"token-budget <= 3% ({'met' if budget_waste <= 0.03 else 'MISSED'}: {budget_waste:.2%}). "
        f"Waste ratio transformers / hf_loop length-grouped: "
        f"{results[list(rows)[1]] / grouped_waste:.2f}x.",
    ]
    return lines


def best_rate(make_iterable, count: int, repeats: int = 2) -> float:
    """Indices per second to build and fully consume a fresh iterator (best of `repeats`)."""
    best = float("inf")
    for _ in range(repeats):
        iterable = make_iterable()
        start = time.perf_counter()
        consumed = collections.deque(iter(iterable), maxlen=0)
        best = min(best, time.perf_counter() - start)
        del consumed
    return count / best


def throughput_table() -> list[str]:
    n = 10_000_000
    weights = np.random.default_rng(0).random(n) + 0.01
    weights_t = torch.from_numpy(weights)
    generator = torch.Generator().manual_seed(0)
    pairs = [
        (
            "random permutation",
            lambda: torch.utils.data.RandomSampler(range(n), generator=generator),
            lambda: hl.RandomSampler(n, seed=0),
        ),
        (
            "weighted, with replacement",
            lambda: torch.utils.data.WeightedRandomSampler(
                weights_t, n, replacement=True, generator=generator
            ),
            lambda: hl.WeightedSampler(weights, num_samples=n, seed=0),
        ),
    ]
    lines = [
        "| 10M indices | torch (indices/s) | hf_loop (indices/s) | hf_loop / torch |",
        "|---|---|---|---|",
    ]
    for name, torch_make, hl_make in pairs:
        torch_rate, hl_rate = best_rate(torch_make, n), best_rate(hl_make, n)
        lines.append(
            f"| {name} | {torch_rate / 1e6:.2f}M | {hl_rate / 1e6:.2f}M | {hl_rate / torch_rate:.2f}x |"
        )
    # hf_loop draws one epoch order up front and is then sliced on resume: show that cost separately.
    _, order_s = timed(lambda: hl.WeightedSampler(weights, num_samples=n, seed=0).order(0))
    _, unique_s = timed(
        lambda: hl.WeightedSampler(weights, num_samples=n, replacement=False, seed=0).order(0)
    )
    big = 2**24 + 1
    try:
        torch.multinomial(torch.ones(big, dtype=torch.float64), 10, replacement=True)
        torch_big = "works"
    except RuntimeError as error:
        torch_big = f"raises RuntimeError: `{str(error).splitlines()[0][:90]}`"
    drawn, big_s = timed(lambda: hl.WeightedSampler(np.ones(big), num_samples=1_000_000, seed=0).order(0))
    lines += [
        "",
        f"hf_loop weighted order for 10M draws (sorted uniforms, one searchsorted into the cumulative weights, one shuffle): {order_s:.2f} s; "
        f"without replacement (Efraimidis-Spirakis keys + argsort): {unique_s:.2f} s.",
        "",
        f"Beyond 2^24 categories ({big:,} examples): torch.multinomial {torch_big}; hf_loop.WeightedSampler "
        f"draws 1M indices in {big_s:.2f} s (max index drawn {int(drawn.max()):,}).",
    ]
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", help="write the markdown report here as well")
    args = parser.parse_args()
    torch.set_num_threads(1)
    lengths = lognormal_lengths()
    report = [
        "# Samplers: padding waste, randomness, throughput",
        "",
        f"Run `python benchmarks/samplers.py --out benchmarks/results/samplers.md` on "
        f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC; {platform.processor() or platform.machine()}, "
        f"torch {torch.__version__}, numpy {np.__version__}, torch threads 1; the CPU was shared with other jobs.",
        "",
        f"## Padding waste (n={N:,}, lognormal median 100, sigma 0.8, clipped 8..512, batch {BATCH})",
        "",
        *waste_table(lengths),
        "",
        "## Throughput (build the epoch order and consume every index, best of 2)",
        "",
        *throughput_table(),
        "",
        "## Reading the numbers",
        "",
        "- Both length-grouped samplers cut padding the same way (sorted mega-batches of 50 batches); the "
        "difference is the batch order. transformers emits each mega-batch longest-to-shortest, so consecutive "
        "batches drift in length (lag-1 correlation ~0.8, the loss-spike pattern reported in transformers#20810); "
        "hf_loop shuffles all full batches of the epoch (lag-1 ~0) and still puts the longest batch first.",
        "- Epoch-to-epoch Spearman is ~0 for every strategy: each epoch is an independent draw from (seed, epoch).",
        "- Under DDP the grouping must be built for the global batch (W x b): rank strides then take b examples "
        "from one length-sorted global batch. Striding a grouping built for the per-rank batch mixes W unrelated "
        "batches into every rank batch (near-random waste here, because hf_loop's batch order is shuffled).",
        "- Throughput rows include building the epoch order and converting every index to a Python int; the "
        "machine had 2 cores shared with other jobs, so rates vary by up to ~2x between runs (best of 2 shown).",
    ]
    text = "\n".join(report) + "\n"
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)


if __name__ == "__main__":
    main()
