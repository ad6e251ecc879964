"""Samplers: exact distributed splits, determinism, weighted frequencies, exact and elastic resume, errors."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import hf_loop as hl
from hf_loop import samplers as hs

# chi-square critical values at p = 0.001 (scipy is not a dependency): df -> threshold
CHI2_999 = {2: 13.816, 3: 16.266, 4: 18.467, 9: 27.877}


def lengths_for(n: int) -> np.ndarray:
    return (np.arange(n) * 7919 % 23) + 1  # varied, deterministic, max 23


def lognormal_lengths(n: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.clip(np.round(rng.lognormal(np.log(100), 0.8, n)), 8, 512).astype(np.int64)


def make(kind: str, n: int, seed: int = 0) -> hs.Sampler:
    if kind == "sequential":
        return hs.SequentialSampler(n)
    if kind == "random":
        return hs.RandomSampler(n, seed=seed)
    if kind == "weighted":
        return hs.WeightedSampler(np.arange(1, n + 1), seed=seed)
    if kind == "weighted_unique":
        return hs.WeightedSampler(np.arange(1, n + 1), replacement=False, seed=seed)
    if kind == "subset":
        return hs.SubsetSampler(np.arange(n) * 3 + 1, seed=seed)
    if kind == "length":
        return hs.LengthGroupedSampler(lengths_for(n), 4, seed=seed, megabatch=2)
    return hs.TokenBudgetBatchSampler(lengths_for(n), 40, seed=seed, megabatch=2)


KINDS = ["sequential", "random", "weighted", "weighted_unique", "subset", "length", "tokens"]


def items(order) -> list:
    return [a.tolist() for a in order] if isinstance(order, list) else order.tolist()


def interleave(streams: list[list]) -> list:
    """Rank streams back into global order: position j*W + r is rank r's j-th item."""
    assert len({len(s) for s in streams}) == 1, "ranks must have equal lengths"
    return [s[j] for j in range(len(streams[0])) for s in streams]


def expected_split(full: list, start: int, world: int, drop_last: bool) -> list:
    """The documented rule: the rest from `start`, padded by wrapping the full order (or cut) to a multiple of W."""
    rest = full[start:]
    if drop_last:
        return rest[: len(rest) // world * world]
    pad = -len(rest) % world
    return rest + [full[i % len(full)] for i in range(pad)]


def ranks(inner: hs.Sampler, world: int, drop_last: bool = False) -> list[hs.DistributedSampler]:
    return [
        hs.DistributedSampler(inner, num_replicas=world, rank=r, drop_last=drop_last) for r in range(world)
    ]


def chi_square(counts: np.ndarray, probabilities: np.ndarray) -> float:
    expected = probabilities / probabilities.sum() * counts.sum()
    return float(((counts - expected) ** 2 / expected).sum())


# --- single-process behaviour -------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_deterministic_pure_and_epoch_dependent(kind):
    a, b = make(kind, 30), make(kind, 30)
    first = list(a)
    assert first == list(b) == list(a)  # same seed, same order; iterating twice changes nothing
    assert first == items(a.order(0)) and len(a) == len(first)
    partial = iter(a)
    next(partial)
    assert list(a) == first  # a second iterator (DataLoader makes several) starts from the same place
    a.set_epoch(1)
    if kind != "sequential":
        assert list(a) != first and list(make(kind, 30, seed=1)) != first
    b.set_epoch(1)
    assert list(a) == list(b)


def test_orders_cover_what_they_should():
    assert sorted(make("random", 50)) == list(range(50))
    assert sorted(make("weighted_unique", 50)) == list(range(50))
    assert sorted(make("subset", 50)) == list(range(1, 150, 3))
    assert list(hs.SubsetSampler([5, 2, 9], shuffle=False)) == [5, 2, 9]
    assert sorted(make("length", 50)) == list(range(50))
    assert sorted(i for batch in make("tokens", 50) for i in batch) == list(range(50))
    assert all(isinstance(i, int) for i in make("random", 5))  # Python ints, not numpy scalars


def test_samplers_work_in_a_plain_dataloader_and_pickle():
    data = list(range(100, 110))
    loader = torch.utils.data.DataLoader(data, sampler=hs.RandomSampler(10, seed=4), batch_size=4)
    assert sorted(torch.cat(list(loader)).tolist()) == data
    budget = hs.TokenBudgetBatchSampler(lengths_for(10), 40, seed=4)
    batches = [b.tolist() for b in torch.utils.data.DataLoader(data, batch_sampler=budget)]
    assert batches == [[data[i] for i in batch] for batch in budget]
    assert list(pickle.loads(pickle.dumps(budget))) == list(budget)


def test_samplers_never_touch_the_global_rng():
    torch.manual_seed(0)
    np.random.seed(0)
    expected = (torch.rand(1), np.random.rand())
    torch.manual_seed(0)
    np.random.seed(0)
    for kind in KINDS:
        list(make(kind, 40))
    assert (torch.rand(1), np.random.rand()) == expected


# --- length grouping and token budgets ---------------------------------------------------------------------


def padding_waste(lengths: np.ndarray, batches: list) -> float:
    real = sum(int(lengths[b].sum()) for b in batches)
    padded = sum(len(b) * int(lengths[b].max()) for b in batches)
    return 1 - real / padded


def test_length_grouping_cuts_padding_keeps_batch_order_random_and_puts_the_longest_first():
    lengths = lognormal_lengths(20_000)
    sampler = hs.LengthGroupedSampler(lengths, 32, seed=3)
    order = sampler.order(0)
    batches = [order[i : i + 32] for i in range(0, len(order), 32)]
    assert lengths[batches[0]].max() == lengths.max()
    assert padding_waste(lengths, batches) < 0.05
    random_order = hs.RandomSampler(20_000).order(0)
    assert padding_waste(lengths, [random_order[i : i + 32] for i in range(0, 20_000, 32)]) > 0.4
    means = np.array([lengths[b].mean() for b in batches[1:-1]])
    assert abs(np.corrcoef(means[:-1], means[1:])[0, 1]) < 0.1  # consecutive batches are not monotone


def test_length_grouping_for_the_global_batch_keeps_each_rank_homogeneous():
    lengths, world, per_rank = lognormal_lengths(20_000), 8, 16
    for_global = hs.LengthGroupedSampler(lengths, world * per_rank, seed=0)
    for_rank = hs.LengthGroupedSampler(lengths, per_rank, seed=0)
    for inner, bound in ((for_global, 0.05), (for_rank, None)):
        for rank in ranks(inner, world):
            stream = np.array(list(rank))
            waste = padding_waste(
                lengths, [stream[i : i + per_rank] for i in range(0, len(stream), per_rank)]
            )
            assert waste < bound if bound else waste > 0.2  # striding a per-rank grouping mixes lengths


def test_token_budget_is_respected_with_little_padding():
    lengths = lognormal_lengths(20_000)
    max_tokens = int(32 * lengths.mean())
    batches = hs.TokenBudgetBatchSampler(lengths, max_tokens, seed=1).order(0)
    assert all(len(b) * lengths[b].max() <= max_tokens for b in batches)
    assert lengths[batches[0]].max() == lengths.max()
    assert np.sort(np.concatenate(batches)).tolist() == list(range(20_000))
    assert padding_waste(lengths, batches) < 0.03
    assert 25 < 20_000 / len(batches) < 40


@settings(max_examples=40, deadline=None)
@given(
    lengths=st.lists(st.integers(0, 30), min_size=1, max_size=80).filter(any),
    max_tokens=st.integers(30, 100),
    megabatch=st.integers(1, 4),
    seed=st.integers(0, 2**32),
)
def test_token_budget_property(lengths, max_tokens, megabatch, seed):
    lengths = np.array(lengths)
    batches = hs.TokenBudgetBatchSampler(lengths, max_tokens, seed=seed, megabatch=megabatch).order(0)
    assert sorted(np.concatenate(batches).tolist()) == list(range(len(lengths)))
    assert all(len(b) * lengths[b].max() <= max_tokens for b in batches)
    assert lengths[batches[0]].max() == lengths.max()


@settings(max_examples=40, deadline=None)
@given(
    lengths=st.lists(st.integers(0, 30), min_size=1, max_size=80).filter(any),
    batch_size=st.integers(1, 9),
    megabatch=st.integers(1, 4),
)
def test_length_grouped_property(lengths, batch_size, megabatch):
    lengths = np.array(lengths)
    order = hs.LengthGroupedSampler(lengths, batch_size, megabatch=megabatch).order(0)
    assert sorted(order.tolist()) == list(range(len(lengths)))
    assert lengths[order[:batch_size]].max() == lengths.max()
    full = len(lengths) // batch_size * batch_size  # the partial batch is last: ranks stay batch-aligned
    if full:
        assert lengths[order[full:]].max(initial=0) <= lengths[order[full - batch_size : full]].max()


# --- weighted draws and class balance -----------------------------------------------------------------------


def test_weighted_frequencies_match_the_weights_alone_and_across_ranks():
    weights = np.array([1.0, 2, 3, 4, 0, 5, 6, 7, 8, 9, 10])
    sampler = hs.WeightedSampler(weights, num_samples=60_000, seed=11)
    drawn = np.array(list(sampler))
    counts = np.bincount(drawn, minlength=len(weights))
    # draws come in random order, not sorted
    assert abs(np.corrcoef(np.arange(len(drawn)), drawn)[0, 1]) < 0.02
    assert counts[4] == 0
    keep = weights > 0
    assert chi_square(counts[keep], weights[keep]) < CHI2_999[9]
    union = [i for rank in ranks(sampler, 3) for i in rank]
    counts3 = np.bincount(union, minlength=len(weights))
    assert chi_square(counts3[keep], weights[keep]) < CHI2_999[9]
    assert interleave([list(r) for r in ranks(sampler, 3)]) == list(sampler)


def test_weighted_without_replacement_draws_proportionally_to_the_remaining_weights():
    weights = np.array([1.0, 2.0, 3.0, 4.0, 0.0])
    firsts = np.zeros(5)
    for epoch in range(3000):
        sampler = hs.WeightedSampler(weights, num_samples=3, replacement=False, seed=5)
        order = sampler.order(epoch)
        assert len(set(order.tolist())) == 3 and 4 not in order
        firsts[order[0]] += 1
    assert chi_square(firsts[:4], weights[:4]) < CHI2_999[3]


def test_weighted_works_beyond_the_torch_multinomial_limit():
    n = 2**24 + 10
    weights = np.zeros(n)
    weights[-10:] = 1.0
    weights[0] = 1.0
    with pytest.raises(RuntimeError):  # the limit hl.WeightedSampler avoids
        torch.multinomial(torch.ones(n), 1)
    drawn = np.array(list(hs.WeightedSampler(weights, num_samples=5000, seed=0)))
    assert set(np.unique(drawn).tolist()) == {0, *range(n - 10, n)}
    unique = hs.WeightedSampler(weights, num_samples=11, replacement=False, seed=0).order(0)
    assert sorted(unique.tolist()) == [0, *range(n - 10, n)]


def test_class_weights_balance_classes():
    labels = np.array(["cat"] * 700 + ["dog"] * 250 + ["eel"] * 50)
    weights = hl.class_weights(labels)
    assert np.isclose(weights.sum(), 1.0)
    for name in ("cat", "dog", "eel"):
        assert np.isclose(weights[labels == name].sum(), 1 / 3)
    drawn = labels[list(hs.WeightedSampler(weights, num_samples=30_000, seed=2))]
    counts = np.array([(drawn == c).sum() for c in ("cat", "dog", "eel")])
    assert chi_square(counts, np.ones(3)) < CHI2_999[2]
    ints = hl.class_weights([0, 0, 0, 1])
    assert ints.tolist() == pytest.approx([1 / 6, 1 / 6, 1 / 6, 1 / 2])
    assert hl.class_weights(torch.tensor([3, 3, 7]), power=0).tolist() == pytest.approx([1 / 3] * 3)
    half = hl.class_weights([0, 0, 0, 0, 1], power=0.5)
    assert half[4] / half[0] == pytest.approx(2.0)


# --- distributed splits -------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_ranks_split_one_global_order_for_every_world_and_size(kind):
    for n in (1, 3, 7, 20):
        inner = make(kind, n)
        full = items(inner.order(0))
        for world in range(1, 9):
            for drop_last in (False, True):
                streams = [list(r) for r in ranks(inner, world, drop_last)]
                assert [len(s) for s in streams] == [len(r) for r in ranks(inner, world, drop_last)]
                assert interleave(streams) == expected_split(full, 0, world, drop_last)


@settings(max_examples=60, deadline=None)
@given(
    n=st.integers(1, 60),
    world=st.integers(1, 8),
    start=st.integers(0, 70),
    drop_last=st.booleans(),
    kind=st.sampled_from(["random", "tokens"]),
)
def test_split_from_any_start_property(n, world, start, drop_last, kind):
    inner = make(kind, n, seed=n)
    full = items(inner.order(0))
    start = min(start, len(full))
    streams = []
    for rank in ranks(inner, world, drop_last):
        rank.load_state_dict({**inner.state_dict(), "position": start})
        streams.append(list(rank))
    expected = expected_split(full, start, world, drop_last)
    assert interleave(streams) == expected


@pytest.mark.parametrize("kind", ["random", "tokens"])
def test_unpadded_split_reads_every_item_once_with_shares_one_apart(kind):
    for n in (1, 3, 7, 20):
        inner = make(kind, n)
        full = items(inner.order(0))
        for world in range(1, 9):
            shares = [
                hs.DistributedSampler(inner, num_replicas=world, rank=r, pad=False) for r in range(world)
            ]
            streams = [list(s) for s in shares]
            assert [len(s) for s in streams] == [len(s) for s in shares]
            assert max(map(len, streams)) - min(map(len, streams)) <= 1
            merged = [s[j] for j in range(len(streams[0])) for s in streams if j < len(s)]
            assert merged == full  # each item exactly once, in the global order


def test_set_epoch_reaches_the_inner_sampler_and_changes_every_rank():
    inner = hs.RandomSampler(20, seed=0)
    rank0 = hs.DistributedSampler(inner, num_replicas=2, rank=0)
    before = list(rank0)
    rank0.set_epoch(3)
    assert inner.epoch == 3 and list(rank0) != before
    assert list(rank0) == inner.order(3)[0::2].tolist()


# --- exact and elastic resume -------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_resume_at_every_position_yields_the_rest_of_the_epoch(kind):
    sampler = make(kind, 23)
    sampler.set_epoch(2)
    full = list(sampler)
    for k in range(len(full) + 1):
        fresh = make(kind, 23)
        fresh.load_state_dict(sampler.state_dict(consumed=k))
        assert fresh.epoch == 2 and list(fresh) == full[k:]
        again = make(kind, 23)  # resume a resumed sampler: positions add up
        again.load_state_dict(fresh.state_dict(consumed=min(2, len(full) - k)))
        assert list(again) == full[k + min(2, len(full) - k) :]
    assert sampler.state_dict(consumed=10**6)["position"] == len(full)  # capped at the end of the epoch


@pytest.mark.parametrize("kind", KINDS)
def test_distributed_resume_with_the_same_world_size(kind):
    world = 3
    inner = make(kind, 17)
    streams = [list(r) for r in ranks(inner, world)]
    for k in range(len(streams[0]) + 1):
        state = ranks(inner, world)[0].state_dict(consumed=k)
        for rank, stream in zip(ranks(make(kind, 17), world), streams):
            rank.load_state_dict(state)
            assert list(rank) == stream[k:]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("new_world", [1, 3, 4])
def test_elastic_resume_continues_the_global_order(kind, new_world):
    inner = make(kind, 29)
    inner.set_epoch(1)
    full = items(inner.order(1))
    per_rank = len(ranks(inner, 2)[0])
    for consumed in sorted({0, 1, per_rank // 2, per_rank - 1, per_rank}):
        state = ranks(inner, 2)[1].state_dict(consumed=consumed)  # any rank: the position is global
        assert state["position"] == min(2 * consumed, len(expected_split(full, 0, 2, False)))
        resumed = ranks(make(kind, 29), new_world)
        for rank in resumed:
            rank.load_state_dict(state)
        assert interleave([list(r) for r in resumed]) == expected_split(
            full, state["position"], new_world, False
        )
        bare = make(kind, 29)  # one process resumes without a wrapper
        bare.load_state_dict(state)
        assert list(bare) == full[state["position"] :]
    padded = len(expected_split(full, 0, 2, False))
    assert ranks(inner, 2)[0].state_dict(consumed=10**6)["position"] == padded  # capped at the padded total


def test_a_single_process_state_loads_into_ranks():
    inner = make("tokens", 25)
    state = inner.state_dict(consumed=3)
    resumed = ranks(make("tokens", 25), 2)
    for rank in resumed:
        rank.load_state_dict(state)
    assert interleave([list(r) for r in resumed]) == expected_split(items(inner.order(0)), 3, 2, False)


def test_states_are_plain_values_that_load_with_weights_only(tmp_path):
    states = {kind: make(kind, 12).state_dict(consumed=2) for kind in KINDS}
    states["distributed"] = hs.DistributedSampler(make("weighted", 12), num_replicas=2, rank=1).state_dict(3)
    torch.save(states, tmp_path / "state.pt")
    loaded = torch.load(tmp_path / "state.pt", weights_only=True)
    assert loaded == states
    for kind in KINDS:
        fresh = make(kind, 12)
        fresh.load_state_dict(loaded[kind])
        assert list(fresh) == list(make(kind, 12))[2:]


# --- errors -------------------------------------------------------------------------------------------------


def test_bad_weights_are_refused():
    with pytest.raises(ValueError, match=r"weights\[1\] = -1.0: every weight must be finite and >= 0"):
        hs.WeightedSampler([1.0, -1.0])
    with pytest.raises(ValueError, match=r"weights\[2\] = nan"):
        hs.WeightedSampler([1.0, 1.0, float("nan")])
    with pytest.raises(ValueError, match=r"weights\[0\] = inf"):
        hs.WeightedSampler([float("inf")])
    with pytest.raises(ValueError, match="all weights are 0, so nothing can be drawn"):
        hs.WeightedSampler(np.zeros(4))
    with pytest.raises(TypeError, match="weights must be numbers, got dtype <U1"):
        hs.WeightedSampler(["a", "b"])
    with pytest.raises(ValueError, match=r"weights must be a non-empty 1-D sequence .* got shape \(0,\)"):
        hs.WeightedSampler([])
    with pytest.raises(
        ValueError, match="num_samples=4 but only 3 examples have a positive weight.*replacement=True"
    ):
        hs.WeightedSampler([1.0, 0.0, 1.0, 1.0], num_samples=4, replacement=False)
    with pytest.raises(ValueError, match="num_samples must be >= 1, got 0"):
        hs.WeightedSampler([1.0], num_samples=0)


def test_bad_subsets_lengths_and_sizes_are_refused():
    with pytest.raises(ValueError, match=r"indices\[1\] = -2 is out of range: subset indices must be >= 0$"):
        hs.SubsetSampler([0, -2])
    with pytest.raises(ValueError, match=r"indices\[2\] = 10 is out of range: .* >= 0 and < dataset_size=10"):
        hs.SubsetSampler([0, 9, 10], dataset_size=10)
    with pytest.raises(ValueError, match=r"index 4 appears 2 times in indices: pass each index once"):
        hs.SubsetSampler([4, 1, 4])
    with pytest.raises(TypeError, match="indices must hold integers, got dtype float64"):
        hs.SubsetSampler([0.5, 1.0])
    with pytest.raises(ValueError, match="every length is 0, so grouping by length would do nothing"):
        hs.LengthGroupedSampler([0, 0, 0], 2)
    with pytest.raises(ValueError, match=r"lengths\[1\] = -3: token counts must be >= 0"):
        hs.LengthGroupedSampler([1, -3], 2)
    with pytest.raises(ValueError, match=r"lengths must be a non-empty 1-D sequence .* got shape \(2, 2\)"):
        hs.LengthGroupedSampler([[1, 2], [3, 4]], 2)
    with pytest.raises(
        ValueError, match=r"lengths must be one number per example, got a sequence of sequences"
    ):
        hs.LengthGroupedSampler([[1, 2], [3]], 2)  # token ids instead of their counts
    with pytest.raises(ValueError, match="batch_size must be >= 1, got 0"):
        hs.LengthGroupedSampler([1, 2], 0)
    with pytest.raises(ValueError, match="megabatch must be >= 1, got 0"):
        hs.TokenBudgetBatchSampler([1, 2], 8, megabatch=0)
    with pytest.raises(
        ValueError,
        match=r"max_tokens=10 is smaller than the longest example \(index 2, length 12\): raise max_tokens to at "
        "least 12 or truncate",
    ):
        hs.TokenBudgetBatchSampler([3, 5, 12, 4], 10)
    with pytest.raises(ValueError, match=r"n \(the number of examples\) must be >= 1, got 0"):
        hs.RandomSampler(0)
    with pytest.raises(ValueError, match="seed must be >= 0, got -1"):
        hs.RandomSampler(3, seed=-1)
    with pytest.raises(TypeError, match="batch_size must be an int, got float 2.5"):
        hs.LengthGroupedSampler([1, 2], 2.5)
    with pytest.raises(ValueError, match="epoch must be >= 0, got -1"):
        hs.RandomSampler(3).set_epoch(-1)
    with pytest.raises(ValueError, match="power must be a finite number >= 0"):
        hl.class_weights([0, 1], power=-1)
    with pytest.raises(ValueError, match=r"labels must be a non-empty 1-D sequence .* got shape \(2, 2\)"):
        hl.class_weights([[0, 1], [1, 0]])


def test_bad_distributed_arguments_are_refused():
    with pytest.raises(
        ValueError, match=r"rank must be in \[0, 2\) for num_replicas=2, got 2: pass rank=env.rank"
    ):
        hs.DistributedSampler(hs.RandomSampler(4), num_replicas=2, rank=2)
    with pytest.raises(ValueError, match="num_replicas must be >= 1, got 0"):
        hs.DistributedSampler(hs.RandomSampler(4), num_replicas=0, rank=0)
    with pytest.raises(TypeError, match="DistributedSampler wraps an hf_loop sampler .* got RandomSampler"):
        hs.DistributedSampler(torch.utils.data.RandomSampler(range(4)), num_replicas=2, rank=0)
    twice = hs.DistributedSampler(hs.RandomSampler(4), num_replicas=2, rank=0)
    with pytest.raises(TypeError, match="already a DistributedSampler: wrap the global sampler once"):
        hs.DistributedSampler(twice, num_replicas=2, rank=0)
    with pytest.raises(ValueError, match="drop_last=True cuts .* pad=False leaves the shares uneven"):
        hs.DistributedSampler(hs.RandomSampler(4), num_replicas=2, rank=0, drop_last=True, pad=False)


def test_boolean_options_refuse_strings_and_numbers_instead_of_coercing_them():
    # bool("False") is True: torch raises on replacement="False" / drop_last="False", so do we
    with pytest.raises(TypeError, match="replacement must be True or False, got str 'False'"):
        hs.WeightedSampler([1.0, 2.0], replacement="False")
    with pytest.raises(TypeError, match="drop_last must be True or False, got str 'False'"):
        hs.DistributedSampler(hs.RandomSampler(4), num_replicas=2, rank=0, drop_last="False")
    with pytest.raises(TypeError, match="shuffle must be True or False, got int 0"):
        hs.SubsetSampler([0, 1], shuffle=0)
    with pytest.raises(TypeError, match="longest_first must be True or False, got NoneType None"):
        hs.LengthGroupedSampler([1, 2], 1, longest_first=None)
    with pytest.raises(TypeError, match="seed must be an int, got str '3'"):
        hs.RandomSampler(4, seed="3")
    assert hs.WeightedSampler([1.0, 2.0], replacement=np.bool_(False)).replacement is False


def test_states_from_another_sampler_are_refused_naming_what_differs():
    state = hs.RandomSampler(10, seed=1).state_dict(consumed=3)
    with pytest.raises(ValueError, match=r"different sampler — n: saved 10, here 11"):
        hs.RandomSampler(11, seed=1).load_state_dict(state)
    with pytest.raises(ValueError, match=r"seed: saved 1, here 2\. Rebuild the sampler"):
        hs.RandomSampler(10, seed=2).load_state_dict(state)
    with pytest.raises(ValueError, match="saved by a RandomSampler but this sampler is a SequentialSampler"):
        hs.SequentialSampler(10).load_state_dict(state)
    weighted = hs.WeightedSampler([1.0, 2.0, 3.0]).state_dict()
    with pytest.raises(ValueError, match=r"weights differ \(same count, other values\)"):
        hs.WeightedSampler([1.0, 2.0, 4.0]).load_state_dict(weighted)
    with pytest.raises(ValueError, match="replacement: saved True, here False"):
        hs.WeightedSampler([1.0, 2.0, 3.0], replacement=False).load_state_dict(weighted)
    grouped = hs.LengthGroupedSampler([1, 2, 3, 4], 2).state_dict()
    with pytest.raises(ValueError, match=r"batch_size: saved 2, here 4 \(under DDP it is the global batch"):
        hs.LengthGroupedSampler([1, 2, 3, 4], 4).load_state_dict(grouped)
    distributed = hs.DistributedSampler(hs.RandomSampler(10), num_replicas=2, rank=0).state_dict(1)
    with pytest.raises(ValueError, match=r"n: saved 10, here 12"):
        hs.DistributedSampler(hs.RandomSampler(12), num_replicas=3, rank=0).load_state_dict(distributed)
    with pytest.raises(ValueError, match=r"not an hf_loop sampler state: .* got \['epoch'\]"):
        hs.RandomSampler(10).load_state_dict({"epoch": 0})
    with pytest.raises(ValueError, match="consumed must be >= 0, got -1"):
        hs.RandomSampler(10).state_dict(consumed=-1)
