"""StreamDataset through hl.make_loader: exact resume, epochs in persistent workers, equal steps, 2 ranks."""

from __future__ import annotations

import pytest
import torch

import hf_loop as hl
from tests.distributed import run_distributed
from tests.test_stream import hf_stream, sizes_for, write_shards

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


def _even_steps_on_two_ranks(env, files):
    stream = hl.StreamDataset(hf_stream(files), shuffle_buffer=8, seed=0)
    # num_workers=0: under a spawned rank DataLoader workers would spawn too (seconds of imports each)
    loader = hl.make_loader(stream, batch_size=4, env=env, num_workers=0, collate_fn=hl.PadCollator())
    own = sum(len(b["id"]) for b in loader)  # this rank's share: the shards are uneven
    steps = hl.even_steps(loader, env)
    for batch in steps:
        total = torch.tensor([len(batch["id"])])
        torch.distributed.all_reduce(total)  # a collective every step: an extra step on one rank would hang
    return {"steps": steps.steps, "own": own, "left": steps.leftover_examples}


def test_even_steps_on_two_real_ranks_with_uneven_shards(tmp_path):
    files = write_shards(tmp_path, [40, 4, 4])  # rank 0 gets 40 examples, rank 1 gets 8
    results = run_distributed(_even_steps_on_two_ranks, world_size=2, args=(files,))
    assert results[0]["steps"] == results[1]["steps"] == 2
    big, small = sorted(results, key=lambda r: -r["own"])
    assert (big["own"], small["own"]) == (40, 8)
    assert (big["left"], small["left"]) == (4, 0)  # the rank with data left stopped with a batch in hand


def test_plan_examples_match_the_sizes(files):
    plan = hl.StreamDataset(hf_stream(files)).plan(num_workers=2, world_size=3)
    assert plan.mode == "row groups"
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

    from hf_loop.stream.reader import TAIL

    bound = hl.StreamDataset(hf_stream(files)).bind(batch_size=5)
    collate = bound.wrap_collate(hl.PadCollator())
    tail = next(item for item in bound._batches(0, 0) if item[1][2] == TAIL)
    data, meta = pin_memory(collate(tail))  # no tensors in a tail: nothing needs a GPU here
    assert isinstance(data, dict) and data["id"].to_pylist() == tail[0].columns["id"].to_pylist()
    assert list(meta) == list(tail[1])


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
