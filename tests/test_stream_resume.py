"""StreamDataset through hl.make_loader: exact resume, epochs in persistent workers, equal steps, 2 ranks."""

from __future__ import annotations

import pytest
import torch

import hf_loop as hl
from tests.distributed import run_distributed
from tests.test_stream import hf_stream, sizes_for, unsized_stream, write_shards

SIZES = [13, 7, 22, 9, 17]  # uneven shards, row groups of 4


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    return write_shards(tmp_path_factory.mktemp("resume"), SIZES)


def loader_for(files, num_workers: int, **kw):
    stream = hl.StreamDataset(hf_stream(files), shuffle_buffer=12, seed=4, bucket="input_ids")
    return hl.make_loader(stream, batch_size=4, num_workers=num_workers, collate_fn=hl.PadCollator(), **kw)


def ids(batches) -> list[list[int]]:
    return [b["id"].tolist() for b in batches]


@pytest.mark.parametrize("num_workers", [0, 1, 2])
def test_resume_yields_exactly_the_batches_not_consumed(files, num_workers):
    reference = loader_for(files, num_workers)
    reference.set_epoch(1)
    full = ids(reference)
    assert sorted(i for b in full for i in b) == list(range(sum(SIZES)))
    cuts = [0, 1, 2, 5, len(full) - 2, len(full) - 1, len(full)] if num_workers == 2 else [3, len(full) - 1]
    for cut in cuts:
        loader = loader_for(files, num_workers)
        loader.set_epoch(1)
        seen = []
        for batch in loader:  # run ahead of what was consumed, as prefetching does
            seen.append(batch)
            if len(seen) == cut + 3:  # near the end: the pass runs to completion
                break
        state = loader.state_dict(consumed=cut)
        assert ids(seen[:cut]) == full[:cut]
        resumed = loader_for(files, num_workers)
        resumed.load_state_dict(state)
        if cut == len(full):  # a finished pass resumes at the start of the next epoch
            assert state["epoch"] == 2
            reference.set_epoch(2)
            assert ids(resumed) == ids(reference)
        else:
            assert ids(resumed) == full[cut:], cut


@pytest.mark.parametrize("num_workers", [0, 2])
def test_a_state_taken_at_the_last_batch_inside_the_loop_resumes_at_the_next_epoch(files, num_workers):
    # torchdata's end-of-epoch case: the loop saves right after its last step, before the iterator is exhausted
    loader = loader_for(files, num_workers)
    total = len(ids(loader_for(files, num_workers)))
    for k, _ in enumerate(loader, 1):
        if k == total:
            state = loader.state_dict()
            break
    assert state["epoch"] == 1 and state["positions"] == [[0, 0, 0, 0]] * max(num_workers, 1)
    resumed = loader_for(files, num_workers)
    resumed.load_state_dict(state)
    expected = loader_for(files, num_workers)
    expected.set_epoch(1)
    assert ids(resumed) == ids(expected)  # the whole next epoch, not an empty pass
    earlier = loader_for(files, num_workers)
    for k, _ in enumerate(earlier, 1):
        if k == total - 1:  # one batch before the end: still this epoch
            assert earlier.state_dict()["epoch"] == 0
            break


def test_resume_twice_and_with_persistent_workers(files):
    reference = loader_for(files, 2)
    full = ids(reference)
    first = loader_for(files, 2, persistent_workers=True)
    taken = []
    for batch in first:
        taken.append(batch)
        if len(taken) == 3:
            break
    second = loader_for(files, 2, persistent_workers=True)
    second.load_state_dict(first.state_dict())
    more = []
    for batch in second:
        more.append(batch)
        if len(more) == 4:
            break
    third = loader_for(files, 2)
    third.load_state_dict(second.state_dict())  # a second resume continues, never restarts the epoch
    rest = ids(third)
    assert ids(taken) + ids(more) + rest == full
    assert rest == full[7:]
    assert third.state_dict()["epoch"] == 1


def test_set_epoch_reaches_persistent_workers(files):
    loader = loader_for(files, 2, persistent_workers=True)
    epochs = [ids(loader) for _ in range(3)]  # the Loader advances the epoch after each complete pass
    fresh = loader_for(files, 2)
    for epoch, seen in enumerate(epochs):
        assert sorted(i for b in seen for i in b) == list(range(sum(SIZES)))
        fresh.set_epoch(epoch)
        assert ids(fresh) == seen
    assert epochs[0] != epochs[1] != epochs[2]


def test_state_from_another_plan_is_refused(files):
    state = loader_for(files, 2).state_dict(consumed=0)
    with pytest.raises(ValueError, match="different plan.*num_workers: saved 2, now 1"):
        loader_for(files, 1).load_state_dict(state)
    other = hl.make_loader(
        hl.StreamDataset(hf_stream(files), shuffle_buffer=12, seed=5, bucket="input_ids"),
        batch_size=4,
        num_workers=2,
    )
    with pytest.raises(ValueError, match="seed: saved 4, now 5"):
        other.load_state_dict(state)
    state["plan"]["shards"] = 99
    with pytest.raises(ValueError, match="shards: saved 99, now 5"):
        loader_for(files, 2).load_state_dict(state)


def test_state_is_plain_and_loads_with_weights_only(files, tmp_path):
    loader = loader_for(files, 2)
    iterator = iter(loader)
    next(iterator), next(iterator)
    path = tmp_path / "state.pt"
    torch.save(loader.state_dict(), path)
    state = torch.load(path, weights_only=True)
    resumed = loader_for(files, 2)
    resumed.load_state_dict(state)
    assert ids(resumed) == ids(loader_for(files, 2))[2:]


def _epochs_with_even_steps(env, files, sized: bool, num_workers: int, batch_size: int, epochs: int) -> dict:
    """Epochs under even_steps (whose per-step all-reduce would hang if one rank ran an extra step): the ids
    each step used, the steps, and the reported unread counts."""
    stream = hl.StreamDataset((hf_stream if sized else unsized_stream)(files), shuffle_buffer=64, seed=0)
    # fork: a spawned rank would otherwise spawn its workers too (seconds of imports each)
    workers = {"multiprocessing_context": "fork", "persistent_workers": True} if num_workers else {}
    loader = hl.make_loader(stream, batch_size=batch_size, env=env, num_workers=num_workers, **workers)
    out = {"used": [], "steps": [], "unread": [], "mine": []}
    for _ in range(epochs):
        steps = hl.even_steps(loader, env)
        used = []
        for batch in steps:
            used += batch["id"].tolist()
        out["used"].append(used)
        out["steps"].append(steps.steps)
        out["unread"].append(steps.unread_examples)
        out["mine"].append(steps.leftover_examples)
    out["cumulative"] = loader.unread_examples
    return out


def _even_steps_cases(env, uneven: list[str], small: list[str]) -> dict:
    torch.set_num_threads(1)
    return {
        # the 8 uneven files (row groups of 500), 2 ranks x 2 workers, batch 8
        "balanced": _epochs_with_even_steps(env, uneven, sized=True, num_workers=2, batch_size=8, epochs=1),
        # sizes unknown: whole shards are dealt (40 + 4 rows on one rank, 4 on the other)
        "dealt": _epochs_with_even_steps(env, small, sized=False, num_workers=0, batch_size=4, epochs=2),
    }


def test_even_steps_on_two_real_ranks_counts_unread_examples_exactly(tmp_path):
    uneven = write_shards(tmp_path / "a", [213, 3502, 890, 1200, 455, 640, 700, 400], row_group=500)
    small = write_shards(tmp_path / "b", [40, 4, 4])
    ranks = run_distributed(_even_steps_cases, world_size=2, args=(uneven, small))
    for case, total in (("balanced", 8000), ("dealt", 48)):
        r0, r1 = ranks[0][case], ranks[1][case]
        assert r0["steps"] == r1["steps"]  # equal steps in every epoch
        for epoch in range(len(r0["steps"])):
            used = r0["used"][epoch] + r1["used"][epoch]
            assert len(used) == len(set(used))  # no duplicates
            unread = total - len(used)
            assert r0["unread"][epoch] == r1["unread"][epoch] == unread  # reported == real, on every rank
            assert r0["mine"][epoch] + r1["mine"][epoch] == unread
        assert r0["cumulative"] == r1["cumulative"] == sum(r0["unread"])
    assert max(ranks[0]["balanced"]["unread"]) <= 2 * 2 * 8  # at most a batch per reader
    assert min(ranks[0]["dealt"]["unread"]) >= 32  # whole shards of unknown size: 40 rows vs 8, or 44 vs 4


def test_plan_examples_match_the_sizes(files):
    plan = hl.StreamDataset(hf_stream(files)).plan(num_workers=2, world_size=3)
    assert plan.mode == "rows"
    assert sum(r.examples for r in plan.readers) == sum(sizes_for(0)) + sum(SIZES)


def write_jsonl(root, sizes: list[int]) -> list[str]:
    import json

    root.mkdir(parents=True, exist_ok=True)
    files, start = [], 0
    for k, n in enumerate(sizes):
        path = root / f"part-{k}.jsonl"
        lines = [
            json.dumps({"id": i, "input_ids": list(range(1, 2 + i % 9))}) for i in range(start, start + n)
        ]
        path.write_text("\n".join(lines) + "\n")
        files.append(str(path))
        start += n
    return files


def test_resume_with_unknown_shard_sizes_and_an_example_split(tmp_path):
    """jsonl: no footers, so sizes are unknown and a resume re-reads its shard up to the window; one file for
    two workers: the opted-in example split."""
    from datasets import load_dataset

    files = write_jsonl(tmp_path, [37])

    def build():
        hf = load_dataset("json", data_files=files, split="train", streaming=True)
        stream = hl.StreamDataset(hf, shuffle_buffer=8, seed=1, bucket="input_ids", split_examples=True)
        with pytest.warns(UserWarning, match="splitting by example"):
            return hl.make_loader(stream, batch_size=3, num_workers=2, collate_fn=hl.PadCollator())

    full = ids(build())
    assert sorted(i for b in full for i in b) == list(range(37))
    assert "?" in str(
        hl.StreamDataset(load_dataset("json", data_files=files, split="train", streaming=True)).plan()
    )  # sizes unknown: shown as "? examples"
    for cut in (1, 4, len(full) - 1):
        loader = build()
        iterator = iter(loader)
        for _ in range(cut):
            next(iterator)
        resumed = build()
        resumed.load_state_dict(loader.state_dict())
        assert ids(resumed) == full[cut:], cut


def test_positions_stay_exact_when_old_records_are_folded(files, monkeypatch):
    from hf_loop.stream import tracker

    monkeypatch.setattr(tracker, "_KEEP", 2)  # fold every few batches instead of every 50,000
    full = ids(loader_for(files, 2))
    loader = loader_for(files, 2)
    taken = []
    for batch in loader:
        taken.append(batch)
        if len(taken) == 9:
            break
    with pytest.raises(ValueError, match="consumed=1 is older than the last 2 batches this pass remembers"):
        loader.state_dict(consumed=1)
    resumed = loader_for(files, 2)
    resumed.load_state_dict(loader.state_dict(consumed=8))
    assert ids(resumed) == full[8:]


def test_tail_payloads_survive_pin_memory(files):
    from torch.utils.data._utils.pin_memory import pin_memory

    from hf_loop.stream.protocol import Kind

    bound = hl.StreamDataset(hf_stream(files)).bind(batch_size=5)
    collate = bound.wrap_collate(hl.PadCollator())
    tail = next(item for item in bound._batches(0, 0) if item[1].kind == Kind.TAIL)
    data, meta = pin_memory(collate(tail))  # no tensors in a tail: nothing needs a GPU here
    assert isinstance(data, dict) and data["id"].to_pylist() == tail[0].columns["id"].to_pylist()
    assert (meta.reader, meta.epoch, meta.kind, meta.rows) == tail[1][:4]


def test_spawned_persistent_workers_see_each_epoch(files):
    """Under 'spawn' the bound stream is pickled to the worker; the epoch still reaches it (shared memory)."""
    loader = loader_for(files, 1, multiprocessing_context="spawn", persistent_workers=True)
    epochs = [ids(loader), ids(loader)]
    in_process = loader_for(files, 0)  # one reader either way: the same plan and batches
    assert epochs == [ids(in_process), ids(in_process)]
    assert epochs[0] != epochs[1]


class Tokenize:
    """A module-level transform (picklable): text -> input_ids, batched as set_transform does."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer

    def __call__(self, batch: dict) -> dict:
        out = self.tokenizer(batch["text"], truncation=True, max_length=32)
        return {"input_ids": out["input_ids"], "label": batch["label"]}


def test_hub_folder_stream_with_a_tokenizing_transform(hub_folder, tokenizer):
    from datasets import load_dataset

    hf = load_dataset(str(hub_folder), split="train", streaming=True)  # 2 parquet shards, 60 rows

    def loader_with(bucket):
        stream = hl.StreamDataset(hf, transform=Tokenize(tokenizer), shuffle_buffer=24, bucket=bucket, seed=0)
        collate = hl.PadCollator.for_tokenizer(tokenizer)
        return hl.make_loader(stream, batch_size=8, num_workers=2, collate_fn=collate)

    loader, plain = loader_with("input_ids"), loader_with(None)
    batches = list(loader)
    assert sum(len(b["labels"]) for b in batches) == 60
    assert set(batches[0]) == {"input_ids", "attention_mask", "labels"}
    texts = load_dataset(str(hub_folder), split="train")["text"]
    expected = sorted(len(tokenizer(t, truncation=True, max_length=32)["input_ids"]) for t in texts)
    assert sorted(int(n) for b in batches for n in b["attention_mask"].sum(1)) == expected
    list(plain)
    assert loader.padding.waste < plain.padding.waste - 0.1  # bucketed within each window of 24


def test_resume_at_the_agreed_epoch_restarts_a_rank_that_still_had_data(tmp_path):
    # The loop's rule under even_steps: a rank that ran dry saved "next epoch", a rank with data left saved a
    # mid-epoch position; on resume every rank calls set_epoch(max of the saved epochs) and starts it fresh.
    files = write_shards(tmp_path, [40, 4, 4])

    def rank(r: int) -> hl.Loader:
        stream = hl.StreamDataset(unsized_stream(files), seed=2)  # whole shards: 44 rows vs 4
        return hl.make_loader(stream, batch_size=4, env=hl.DistEnv(rank=r, world_size=2))

    loaders = [rank(0), rank(1)]
    short = min(range(2), key=lambda r: len(ids(rank(r))))
    steps = len(ids(rank(short)))
    states = []
    for loader in loaders:
        for k, _ in enumerate(loader, 1):
            if k == steps:  # the ranks stop together after the short rank's last batch
                states.append(loader.state_dict())
                break
    assert states[short]["epoch"] == 1 and states[1 - short]["epoch"] == 0
    agreed = max(state["epoch"] for state in states)
    for r in range(2):
        resumed = rank(r)
        resumed.load_state_dict(states[r])
        resumed.set_epoch(agreed)
        fresh = rank(r)
        fresh.set_epoch(agreed)
        assert ids(resumed) == ids(fresh)  # epoch 1 from its start on both ranks
