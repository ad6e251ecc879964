"""make_loader / Loader: determinism, exact resume for every strategy, simulated and real ranks, errors."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from datasets import Dataset

import hf_loop as hl
from hf_loop.dist import default_device
from tests.distributed import run_distributed

N = 45


def tokenized(n: int = N) -> Dataset:
    rng = np.random.default_rng(0)
    lengths = rng.integers(3, 40, size=n)
    return Dataset.from_dict(
        {
            "input_ids": [list(range(1, int(k) + 1)) for k in lengths],
            "label": [i % 3 for i in range(n)],
            "row": list(range(n)),  # the data's own row id: what a batch really holds
        }
    )


STRATEGIES = {
    "sequential": {},
    "random": {},
    "weighted": {"weights": [1.0 + (i % 3) for i in range(N)]},
    "subset": {"indices": list(range(0, N, 2))},
    "length": {},
    "tokens": {"max_tokens": 160},
}


def build(
    strategy: str,
    *,
    num_workers: int = 0,
    env: hl.DistEnv | None = None,
    batch_size: int = 4,
    epoch_hint: int | None = None,
    **kw,
):
    ds = hl.MapDataset(tokenized())
    options = {**STRATEGIES[strategy], **kw}
    size = None if strategy == "tokens" else batch_size
    loader = hl.make_loader(
        ds, batch_size=size, sampler=strategy, num_workers=num_workers, env=env, seed=7, **options
    )
    if epoch_hint is not None:
        loader.set_epoch(epoch_hint)
    return loader


def indices(loader: hl.Loader) -> list[list[int]]:
    """The rows of each batch of one pass, read from the data and checked against ``loader.indexed()``."""
    out = []
    for rows, batch in loader.indexed():
        assert batch["row"].tolist() == rows
        out.append(rows)
    return out


@pytest.mark.parametrize("strategy", list(STRATEGIES))
def test_same_seed_same_batches_and_epochs_differ(strategy):
    a, b = build(strategy), build(strategy)
    first, again = indices(a), indices(b)
    assert first == again
    second_epoch = indices(a)  # the loader advanced to epoch 1 after the complete pass
    assert a.epoch == 1
    if strategy != "sequential":
        assert second_epoch != first
    b.set_epoch(1)
    assert indices(b) == second_epoch


def test_iterating_never_touches_the_global_rng():
    loader = build("random", num_workers=2)
    before = torch.random.get_rng_state()
    np_before = np.random.get_state()[1].copy()
    list(loader)
    assert torch.equal(torch.random.get_rng_state(), before)
    assert np.array_equal(np.random.get_state()[1], np_before)


@pytest.mark.parametrize("num_workers", [0, 2])
@pytest.mark.parametrize("strategy", list(STRATEGIES))
def test_resume_at_every_position_yields_exactly_the_rest(strategy, num_workers):
    reference = build(strategy)
    reference.set_epoch(1)
    full = indices(reference)
    for cut in range(len(full) + 1):
        loader = build(strategy)
        loader.set_epoch(1)
        taken = []
        for batch in loader:  # run ahead of what was consumed, as prefetching and device staging do
            taken.append(batch)
            if len(taken) == min(cut + 2, len(full)):
                break
        state = loader.state_dict(consumed=cut)
        fresh = build(strategy, num_workers=num_workers if cut % 2 else 0)
        fresh.load_state_dict(state)
        rest = indices(fresh)
        if cut == len(full):  # a finished epoch resumes at the start of the next one
            assert fresh.epoch == 2 and state["epoch"] == 2
            nxt = build(strategy)
            nxt.set_epoch(2)
            assert rest == indices(nxt)
        else:
            assert rest == full[cut:], f"cut at {cut}"


def test_state_loads_with_weights_only(tmp_path):
    loader = build("weighted")
    next(iter(loader))
    torch.save(loader.state_dict(), tmp_path / "state.pt")
    state = torch.load(tmp_path / "state.pt", weights_only=True)
    fresh = build("weighted")
    fresh.load_state_dict(state)
    assert indices(fresh) == indices(build("weighted"))[1:]


@pytest.mark.parametrize("world_size", [1, 2, 3, 8])
@pytest.mark.parametrize("strategy", ["random", "weighted", "length", "tokens"])
def test_simulated_ranks_split_one_global_order(strategy, world_size):
    per_rank = [
        indices(build(strategy, env=hl.DistEnv(rank=r, world_size=world_size))) for r in range(world_size)
    ]
    assert len({len(batches) for batches in per_rank}) == 1, "every rank must run the same number of steps"
    seen = [i for batches in per_rank for batch in batches for i in batch]
    single = [i for batch in indices(build(strategy)) for i in batch]
    if strategy == "weighted":  # a draw with replacement: ranks cover the same multiset, padded by wrapping
        assert sorted(set(seen)) == sorted(set(single))
    elif strategy in ("random", "length"):
        assert sorted(set(seen)) == list(range(N)) and len(seen) - N < world_size * 4
    else:  # tokens: whole batches dealt to ranks, the tail padded with wrapped batches
        assert set(seen) == set(range(N))


def test_global_batch_equivalence_with_one_process():
    # DDP with per-rank batch b sees, step by step, the examples of one process with batch W*b.
    world_size, b = 3, 2
    ranks = [
        indices(build("random", env=hl.DistEnv(rank=r, world_size=world_size), batch_size=b))
        for r in range(3)
    ]
    single = indices(build("random", batch_size=world_size * b))
    for step, global_batch in enumerate(single[:-1]):
        assert sorted(global_batch) == sorted(i for r in range(world_size) for i in ranks[r][step])


@pytest.mark.parametrize("new_world", [1, 3, 4])
def test_elastic_resume_continues_the_global_order(new_world):
    old = [build("random", env=hl.DistEnv(rank=r, world_size=2), batch_size=2) for r in range(2)]
    for loader in old:
        it = iter(loader)
        for _ in range(3):
            next(it)
    state = old[0].state_dict(consumed=3)
    assert state == old[1].state_dict(consumed=3), "the state is the global position: the same on every rank"
    streams = []
    for r in range(new_world):
        fresh = build("random", env=hl.DistEnv(rank=r, world_size=new_world), batch_size=2)
        with pytest.warns(UserWarning, match="global batch of"):  # 2 x 2 examples before, 2 x new_world now
            fresh.load_state_dict(state)
        streams.append([i for batch in indices(fresh) for i in batch])
    interleaved = [streams[r][k] for k in range(len(streams[0])) for r in range(new_world)]
    global_order = [i for batch in indices(build("random", batch_size=1)) for i in batch]
    rest = global_order[12:]
    assert interleaved[: len(rest)] == rest


def test_transform_randomness_is_reproducible_and_survives_resume():
    ds = hl.MapDataset(tokenized(), transform=noisy)
    loaders = [hl.make_loader(ds, batch_size=4, seed=3) for _ in range(2)]
    a, b = list(loaders[0]), list(loaders[1])
    assert all(torch.equal(x["noise"], y["noise"]) for x, y in zip(a, b))
    interrupted = hl.make_loader(ds, batch_size=4, seed=3)
    next(iter(interrupted))
    resumed = hl.make_loader(ds, batch_size=4, seed=3)
    resumed.load_state_dict(interrupted.state_dict())
    rest = list(resumed)
    assert all(torch.equal(x["noise"], y["noise"]) for x, y in zip(rest, a[1:]))
    assert not torch.equal(a[0]["noise"], a[1]["noise"])


def noisy(batch, rng):
    return {**batch, "noise": rng.normal(size=len(batch["input_ids"])).tolist()}


def test_padding_statistics_count_real_and_padded_tokens():
    loader = build("sequential", batch_size=5)
    real = total = 0
    for batch in loader:
        real += int(batch["attention_mask"].sum())
        total += batch["attention_mask"].numel()
    assert loader.padding.real_tokens == real and loader.padding.total_tokens == total
    assert 0 < loader.padding.waste < 1
    assert loader.padding.waste == pytest.approx(1 - real / total)


def test_pin_memory_auto_is_off_on_cpu():
    assert build("random").pin_memory is False


def test_errors_name_the_problem():
    ds = hl.MapDataset(tokenized())
    with pytest.raises(ValueError, match="in_order=False is refused"):
        hl.make_loader(ds, batch_size=4, in_order=False)
    with pytest.raises(ValueError, match="sampler must be one of"):
        hl.make_loader(ds, batch_size=4, sampler="shuffled")
    with pytest.raises(ValueError, match="needs weights="):
        hl.make_loader(ds, batch_size=4, sampler="weighted")
    with pytest.raises(ValueError, match="weights has 3 entries but the dataset has 45"):
        hl.make_loader(ds, batch_size=4, sampler="weighted", weights=[1, 2, 3])
    with pytest.raises(ValueError, match="lengths has 2 entries"):
        hl.make_loader(ds, batch_size=4, sampler="length", lengths=[3, 4])
    with pytest.raises(ValueError, match="batch_size must be >= 1"):
        hl.make_loader(ds, batch_size=0)
    with pytest.raises(ValueError, match="needs batch_size"):
        hl.make_loader(ds, sampler="random")
    with pytest.raises(TypeError, match="only apply to a named sampler strategy"):
        hl.make_loader(ds, batch_size=4, sampler=hl.RandomSampler(N), weights=[1.0] * N)
    with pytest.raises(TypeError, match="sets batch_sampler itself"):
        hl.make_loader(ds, batch_size=4, batch_sampler=[[0, 1]])
    loader = build("random")
    with pytest.raises(ValueError, match="consumed must be between 0 and the 0 batches"):
        loader.state_dict(consumed=2)
    with pytest.raises(ValueError, match="state is for 'stream' data"):
        loader.load_state_dict({"kind": "stream", "epoch": 0})
    state = build("random").state_dict()
    other = hl.make_loader(hl.MapDataset(tokenized(30)), batch_size=4, seed=7)
    with pytest.raises(ValueError):
        other.load_state_dict(state)


def _weighted_on_two_ranks(env):
    loader = build("weighted", env=env, batch_size=3)
    loader.set_epoch(2)
    mine = indices(loader)
    gathered = [None] * env.world_size
    torch.distributed.all_gather_object(gathered, mine)
    return gathered


def test_real_two_process_weighted_run_matches_the_simulation():
    results = run_distributed(_weighted_on_two_ranks, world_size=2)
    assert results[0] == results[1]
    simulated = []
    for r in range(2):
        loader = build("weighted", env=hl.DistEnv(rank=r, world_size=2), batch_size=3)
        loader.set_epoch(2)
        simulated.append(indices(loader))
    assert results[0] == simulated


def test_subset_indices_past_the_dataset_are_refused():
    with pytest.raises(ValueError, match=str(N)):
        hl.make_loader(hl.MapDataset(tokenized()), batch_size=4, sampler="subset", indices=[0, N + 5])


def test_length_grouping_refuses_a_resume_with_another_global_batch():
    old = build("length", env=hl.DistEnv(rank=0, world_size=2), batch_size=2)
    next(iter(old))
    fresh = build("length", env=hl.DistEnv(rank=0, world_size=3), batch_size=2)
    with pytest.raises(ValueError, match="batch_size"), pytest.warns(UserWarning, match="global batch"):
        fresh.load_state_dict(old.state_dict())


def _stream(tmp_path):
    from datasets import load_dataset

    for shard in range(2):
        tokenized().select(range(shard * 20, shard * 20 + 20)).to_parquet(
            str(tmp_path / f"part-{shard}.parquet")
        )
    files = sorted(str(p) for p in tmp_path.glob("part-*.parquet"))
    return hl.StreamDataset(load_dataset("parquet", data_files=files, split="train", streaming=True))


def test_a_stream_takes_a_token_budget_but_refuses_a_sampler(tmp_path):
    stream = _stream(tmp_path)
    loader = hl.make_loader(stream, max_tokens=120)
    batches = list(loader)
    assert sum(len(b["input_ids"]) for b in batches) == 40
    assert all(b["input_ids"].numel() <= 120 for b in batches)
    with pytest.raises(TypeError, match="no length"):
        len(loader)
    with pytest.raises(ValueError, match="orders itself.*shuffle_buffer"):
        hl.make_loader(stream, batch_size=4, sampler="random")
    with pytest.raises(ValueError, match=r"orders itself.*\['weights'\]"):
        hl.make_loader(stream, batch_size=4, weights=[1.0] * 40)


def test_pin_memory_auto_follows_the_default_device_without_env():
    loader = hl.make_loader(hl.MapDataset(tokenized()), batch_size=4)
    assert loader.env.device == default_device()
    assert loader.pin_memory is (default_device().type == "cuda")


@pytest.mark.parametrize("strategy", ["random", "tokens"])
def test_in_process_fetch_equals_the_dataloader_path(strategy):
    # num_workers=0 without pinning fetches in process; pin_memory=True (a no-op without a GPU) takes
    # DataLoader's own single-process iterator. Batches, states and padding counts must not differ.
    fast = build(strategy)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch warns that pinning needs an accelerator
        slow = build(strategy, pin_memory=True)
        assert fast._fetches_in_process() and not slow._fetches_in_process()
        a, b = list(fast), list(slow)
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)
    assert fast.state_dict() == slow.state_dict()
    assert fast.padding.real_tokens == slow.padding.real_tokens


@pytest.mark.parametrize("strategy", ["random", "tokens", "weighted"])
@pytest.mark.parametrize("world_size", [1, 3])
def test_batches_left_counts_the_next_pass_without_reading_data(strategy, world_size):
    env = hl.DistEnv(rank=world_size - 1, world_size=world_size)
    loader = build(strategy, env=env)
    assert loader.batches_left() == len(loader) == len(indices(build(strategy, env=env)))
    for taken, _ in enumerate(loader, 1):
        if taken == 3:
            break
    resumed = build(strategy, env=env)
    resumed.load_state_dict(loader.state_dict(consumed=2))
    assert resumed.batches_left() == len(indices(resumed)) == len(loader) - 2
    assert resumed.batches_left() == len(indices(build(strategy, env=env, epoch_hint=1)))  # next epoch, full
    elastic = build(strategy, env=hl.DistEnv(rank=0, world_size=2))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # another global batch
        elastic.load_state_dict(loader.state_dict(consumed=2))
    if strategy != "tokens" or world_size == 1:  # (token budgets: 2 ranks' batches are other batches)
        assert elastic.batches_left() == len(indices(elastic))


def test_batches_left_is_none_for_a_stream(tmp_path):
    loader = hl.make_loader(_stream(tmp_path), batch_size=4)
    assert loader.batches_left() is None


def test_data_identity_names_the_data_and_strategy_not_the_topology(tmp_path):
    import json

    def identity(ds, **kw):
        return hl.make_loader(hl.MapDataset(ds), batch_size=4, seed=7, **kw).data_identity()

    same = identity(tokenized(), env=hl.DistEnv(rank=1, world_size=2))
    assert (
        same == identity(tokenized()) == json.loads(json.dumps(same))
    )  # re-created the same way; plain JSON
    assert same["rows"] == N and same["strategy"] == "RandomSampler(seed=7)" and same["fingerprint"]
    other = Dataset.from_dict({**tokenized().to_dict(), "label": [0] * N})  # same size, other content
    assert identity(other) != same
    assert identity(tokenized(), sampler="sequential") != same
    plain = hl.make_loader(list(range(10)), batch_size=2, collate_fn=lambda b: b).data_identity()
    assert plain["fingerprint"] is None and plain["rows"] == 10
    stream = hl.make_loader(_stream(tmp_path), batch_size=4).data_identity()
    assert stream == hl.make_loader(_stream(tmp_path), batch_size=4, num_workers=2).data_identity()
    assert stream["sources"][0]["files"] == ["part-0.parquet", "part-1.parquet"]
    assert stream["sources"][0]["counts"] == [20, 20] and json.loads(json.dumps(stream)) == stream
    (tmp_path / "part-1.parquet").unlink()
    tokenized().select(range(20, 45)).to_parquet(str(tmp_path / "part-1.parquet"))
    from datasets import load_dataset

    files = sorted(str(p) for p in tmp_path.glob("part-*.parquet"))
    changed = hl.StreamDataset(load_dataset("parquet", data_files=files, split="train", streaming=True))
    assert hl.make_loader(changed, batch_size=4).data_identity() != stream


@pytest.mark.parametrize("strategy", ["random", "tokens"])
def test_unpadded_twin_reads_every_row_once_and_leaves_the_loader_alone(strategy):
    world = 4
    loaders = [build(strategy, env=hl.DistEnv(rank=r, world_size=world), batch_size=4) for r in range(world)]
    before = [loader.state_dict() for loader in loaders]
    shares = [indices(loader.unpadded()) for loader in loaders]
    rows = [i for share in shares for batch in share for i in batch]
    assert sorted(rows) == list(range(N))  # no padding duplicates
    assert max(map(len, shares)) - min(map(len, shares)) <= 1  # at most one batch apart
    assert [loader.state_dict() for loader in loaders] == before and loaders[0].unpadded() is loaders[
        0
    ].unpadded()
    padded = [i for loader in loaders for batch in indices(loader) for i in batch]
    assert len(padded) > N  # the training loaders still pad to equal lengths
    single = build(strategy)
    assert single.unpadded() is single


def test_a_plain_module_takes_model_batch_as_keyword_arguments():
    # The hand loop everyone writes first: model(**batch) on a module with explicit forward arguments.
    class Classifier(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = torch.nn.EmbeddingBag(64, 8, mode="sum")
            self.head = torch.nn.Linear(8, 3)

        def forward(self, input_ids, attention_mask, labels, row):
            logits = self.head(self.embed(input_ids, per_sample_weights=attention_mask.float()))
            return torch.nn.functional.cross_entropy(logits, labels)

    model = Classifier()
    for batch in build("random"):
        model(**batch).backward()
    assert model.head.weight.grad is not None


def test_make_loader_options_are_typed():
    ds = hl.MapDataset(tokenized())
    with pytest.raises(TypeError, match="drop_last must be True or False, got str 'False'"):
        hl.make_loader(ds, batch_size=4, drop_last="False")
    with pytest.raises(TypeError, match="batch_size must be an int, got float 4.0"):
        hl.make_loader(ds, batch_size=4.0)
    with pytest.raises(TypeError, match="num_workers must be an int, got str '2'"):
        hl.make_loader(ds, batch_size=4, num_workers="2")
    with pytest.raises(TypeError, match="replacement must be True or False, got str 'False'"):
        hl.make_loader(ds, batch_size=4, sampler="weighted", weights=[1.0] * N, replacement="False")
    with pytest.raises(TypeError, match="epoch must be an int"):
        build("random").set_epoch("1")
    ranked = hl.DistributedSampler(hl.RandomSampler(N), num_replicas=4, rank=1)
    with pytest.raises(ValueError, match="rank 1 of 4 but env is rank 0 of 2; pass the global sampler"):
        hl.make_loader(ds, batch_size=4, sampler=ranked, env=hl.DistEnv(rank=0, world_size=2))
