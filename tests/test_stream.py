"""StreamDataset: shard plans, exactly once over ranks x workers x shards, bucketing, transforms, errors."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from datasets import Dataset, load_dataset
from torch.utils.data import DataLoader

import hf_loop as hl
from hf_loop.stream.protocol import Kind, ReaderPosition
from hf_loop.stream.tracker import StreamTracker

ROW_GROUP = 4


def write_shards(root: Path, sizes: list[int], row_group: int = ROW_GROUP, first_id: int = 0) -> list[str]:
    """Parquet shards of consecutive ids; ``input_ids`` lengths vary (1..24) so bucketing has work to do."""
    root.mkdir(parents=True, exist_ok=True)
    files, start = [], first_id
    for k, n in enumerate(sizes):
        ids = np.arange(start, start + n)
        lengths = (ids * 7919) % 24 + 1
        table = pa.table(
            {
                "id": ids,
                "input_ids": [list(range(1, int(m) + 1)) for m in lengths],
                "label": ids % 3,
            }
        )
        path = root / f"train-{k:05d}.parquet"
        pq.write_table(table, path, row_group_size=row_group)
        files.append(str(path))
        start += n
    return files


def hf_stream(files: list[str]):
    return load_dataset("parquet", data_files=files, split="train", streaming=True)


def unsized_stream(files: list[str]):
    """The same rows through a parquet filter that keeps them all: the plan cannot count the examples (as for
    json, csv or remote files), so it deals whole shards, row groups or examples."""
    return load_dataset("parquet", data_files=files, split="train", streaming=True, filters=[("id", ">=", 0)])


def sizes_for(shards: int) -> list[int]:
    return [3 + (5 * k) % 11 for k in range(shards)]  # uneven: 3, 8, 13, 7, 12, 6, ...


def ids_of(rows) -> list[int]:
    return rows.columns["id"].to_pylist()


def simulate(stream, world_size: int, num_workers: int, batch_size: int, epoch: int = 0) -> dict:
    """Every reader's batches, read in-process: reader (rank, worker) is simulated by binding rank and calling
    the worker loop with the worker id, exactly what a DataLoader worker runs."""
    out = {}
    for rank in range(world_size):
        bound = stream.bind(rank=rank, world_size=world_size, num_workers=num_workers, batch_size=batch_size)
        for local in range(max(num_workers, 1)):
            out[(rank, local)] = [(ids_of(rows), meta.kind) for rows, meta in bound._batches(local, epoch)]
    return out


@pytest.fixture(scope="module")
def shard_sets(tmp_path_factory):
    root = tmp_path_factory.mktemp("shards")
    return {n: write_shards(root / f"n{n}", sizes_for(n)) for n in range(1, 10)}


@pytest.mark.parametrize("shards", range(1, 10))
def test_exactly_once_over_ranks_workers_and_shard_counts(shard_sets, shards):
    files = shard_sets[shards]
    total = sum(sizes_for(shards))
    for world_size in range(1, 5):
        for num_workers in range(4):
            shuffled = (world_size + num_workers) % 2 == 1
            options = {"shuffle_buffer": 6, "seed": 3, "bucket": "input_ids"} if shuffled else {}
            readers = world_size * max(num_workers, 1)
            sized = (world_size + num_workers + shards) % 3 != 0  # a third of the cases: counts unknown
            stream = hl.StreamDataset((hf_stream if sized else unsized_stream)(files), **options)
            try:
                plan = stream.plan(num_workers=num_workers, world_size=world_size)
                stream.bind(world_size=world_size, num_workers=num_workers, batch_size=4)
            except hl.DataError as err:
                if sized:  # split by rows: only fewer examples than readers leaves a reader idle
                    assert total < readers and "would get no examples" in str(err), err
                    continue
                # fewer row groups than readers: only the explicit example split helps
                assert f"= {readers} readers" in str(err)
                stream = hl.StreamDataset(unsized_stream(files), split_examples=True, **options)
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    plan = stream.plan(num_workers=num_workers, world_size=world_size)
                assert plan.mode == "examples"
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # idle-reader warnings are asserted in their own test
                got = simulate(stream, world_size, num_workers, batch_size=4)
            seen = [i for batches in got.values() for ids, _ in batches for i in ids]
            assert sorted(seen) == list(range(total)), (shards, world_size, num_workers)
            read = [sum(len(ids) for ids, _ in got[(r.rank, r.worker)]) for r in plan.readers]
            if sized:
                assert plan.mode == "rows" and [r.examples for r in plan.readers] == read
                assert max(read) - min(read) <= 1  # balanced to one row


def test_plan_is_readable_and_splits_by_rows_when_counts_are_known(shard_sets):
    stream = hl.StreamDataset(hf_stream(shard_sets[3]))  # files of 3, 8 and 13 rows
    plan = stream.plan(num_workers=2, world_size=2, batch_size=4)
    assert plan.mode == "rows" and [r.examples for r in plan.readers] == [6, 6, 6, 6]
    assert [[str(p) for p in r.pieces] for r in plan.readers] == [
        ["0", "1[0:3]"],
        ["1[3:8]", "2[0:1]"],
        ["2[1:7]"],
        ["2[7:13]"],
    ]
    text = str(plan)
    assert "2 rank(s) x 2 reader(s) over 3 shards, split by rows" in text
    assert "rank 0 worker 1: 2 shard(s) [1[3:8], 2[0:1]], 6 examples" in text
    assert "rank 1 worker 1: 1 shard(s) [2[7:13]], 6 examples" in text
    assert "under even_steps (batch 4): 0 example(s) left unread per epoch" in text
    unsized = hl.StreamDataset(unsized_stream(shard_sets[3]))
    whole = unsized.plan(num_workers=1, world_size=2)
    assert whole.mode == "shards" and whole.shards == 3 and whole.readers[0].examples is None
    finer = unsized.plan(num_workers=2, world_size=2)  # 4 readers > 3 files: split into row groups
    assert finer.mode == "row groups" and finer.shards == sum(-(-n // ROW_GROUP) for n in sizes_for(3))
    assert "rank 1 worker 1:" in str(finer) and "? examples" in str(finer)


def test_uneven_files_balance_ranks_and_even_steps_leaves_at_most_a_batch_per_reader(tmp_path):
    # The case: 8 uneven parquet files, row groups of 500, 2 ranks x 2 workers, batch 8. Dealing whole
    # files left 2,118 of 8,000 rows unread per epoch; split by rows the ranks hold 4,000 each.
    sizes = [213, 3502, 890, 1200, 455, 640, 700, 400]
    files = write_shards(tmp_path, sizes, row_group=500)
    for shuffle in (0, 64):
        plan = hl.StreamDataset(hf_stream(files), shuffle_buffer=shuffle).plan(2, 2, batch_size=8)
        assert plan.rank_examples == [4000, 4000] and plan.expected_unread == 0
        assert max(r.examples for r in plan.readers) - min(r.examples for r in plan.readers) <= 1
    odd = hl.StreamDataset(hf_stream(files[1:])).plan(2, 2, batch_size=8)  # 7,787 rows
    assert odd.rank_examples == [3893, 3894] and odd.expected_unread <= 2 * 2 * 8


def test_four_equal_shards_over_three_ranks_are_within_one_row_group(tmp_path):
    # datasets' split_dataset_by_node gives 4/4/4 shards' worth; whole-shard dealing gave 6/3/3 row groups.
    files = write_shards(tmp_path, [12, 12, 12, 12], row_group=4)
    plan = hl.StreamDataset(hf_stream(files)).plan(num_workers=0, world_size=3)
    assert plan.rank_examples == [16, 16, 16]


def test_shard_order_and_windows_follow_seed_and_epoch(shard_sets):
    stream = hl.StreamDataset(hf_stream(shard_sets[6]), shuffle_buffer=8, seed=5)
    first = simulate(stream, 1, 0, batch_size=4, epoch=0)
    assert first == simulate(stream, 1, 0, batch_size=4, epoch=0)
    second = simulate(stream, 1, 0, batch_size=4, epoch=1)
    assert second != first
    assert sorted(i for b in second.values() for ids, _ in b for i in ids) == list(range(sum(sizes_for(6))))
    other_seed = hl.StreamDataset(hf_stream(shard_sets[6]), shuffle_buffer=8, seed=6)
    assert simulate(other_seed, 1, 0, batch_size=4) != first
    plain = simulate(hl.StreamDataset(hf_stream(shard_sets[6])), 1, 0, batch_size=4)
    assert [i for ids, _ in plain[(0, 0)] for i in ids] == list(range(sum(sizes_for(6))))  # file order


# rows of 5 files for 4 readers; whole files of unknown size; row groups of unknown size
@pytest.mark.parametrize(
    ("shards", "world_size", "num_workers", "read"),
    [(5, 2, 2, hf_stream), (5, 2, 2, unsized_stream), (3, 2, 2, unsized_stream)],
)
def test_real_workers_read_exactly_once_and_merge_tails(shard_sets, shards, world_size, num_workers, read):
    stream = hl.StreamDataset(read(shard_sets[shards]), shuffle_buffer=8, seed=1)
    total = sum(sizes_for(shards))
    seen = []
    for rank in range(world_size):
        bound = stream.bind(rank=rank, world_size=world_size, num_workers=num_workers, batch_size=4)
        loader = DataLoader(
            bound, batch_size=None, num_workers=num_workers, collate_fn=bound.wrap_collate(ids_of)
        )
        batches = [batch for _, _, batch in StreamTracker(bound).iterate(iter(loader))]
        assert all(len(b) == 4 for b in batches[:-1]), batches  # only the rank's very last batch may be short
        seen += [i for b in batches for i in b]
    assert sorted(seen) == list(range(total))


def test_drop_last_drops_only_the_merged_remainder(shard_sets):
    stream = hl.StreamDataset(hf_stream(shard_sets[4]))
    bound = stream.bind(num_workers=2, batch_size=5, drop_last=True)
    loader = DataLoader(bound, batch_size=None, num_workers=2, collate_fn=bound.wrap_collate(ids_of))
    batches = [batch for _, _, batch in StreamTracker(bound).iterate(iter(loader))]
    total = sum(sizes_for(4))
    assert all(len(b) == 5 for b in batches) and len(batches) == total // 5


def padding(batches: list[list[int]]) -> float:
    real = sum(sum(b) for b in batches)
    slots = sum(len(b) * max(b) for b in batches)
    return 1 - real / slots


def test_bucketing_cuts_padding_and_keeps_every_example(tmp_path):
    files = write_shards(tmp_path, [200, 200], row_group=50)

    def lengths_of(rows):
        return np.diff(np.asarray(rows.columns["input_ids"].offsets)).tolist()

    def run(**kw):
        bound = hl.StreamDataset(hf_stream(files), shuffle_buffer=64, seed=0, **kw).bind(batch_size=8)
        return [lengths_of(rows) for rows, meta in bound._batches(0, 0)]

    plain, bucketed = run(), run(bucket="input_ids")
    assert sorted(x for b in plain for x in b) == sorted(x for b in bucketed for x in b)
    assert padding(bucketed) < padding(plain) / 3


def test_token_budget_batches_fit_the_budget(shard_sets):
    stream = hl.StreamDataset(hf_stream(shard_sets[4]), shuffle_buffer=16, seed=2)
    bound = stream.bind(max_tokens=40)
    loader = DataLoader(bound, batch_size=None, collate_fn=bound.wrap_collate(hl.PadCollator()))
    batches = [batch for _, _, batch in StreamTracker(bound).iterate(iter(loader))]
    ids = sorted(i for b in batches for i in b["id"].tolist())
    assert ids == list(range(sum(sizes_for(4))))
    for b in batches:
        assert b["input_ids"].numel() <= 40 or len(b["id"]) == 1
    assert len({len(b["id"]) for b in batches}) > 1  # short sequences share a batch, long ones do not


def test_transform_runs_once_per_window_with_set_transform_semantics(shard_sets):
    calls = []

    def tokenize(batch, rng):
        calls.append(len(batch["id"]))
        return {
            "id": batch["id"],
            "input_ids": [[t + 1 for t in ids] for ids in batch["input_ids"]],
            "noise": rng.integers(0, 1000, len(batch["id"])).tolist(),
            "label": batch["label"],
        }

    stream = hl.StreamDataset(
        hf_stream(shard_sets[2]),
        transform=tokenize,
        columns=["id", "noise", "labels"],
        shuffle_buffer=8,
        seed=0,
    )
    got = [rows for rows, meta in stream.bind(batch_size=4)._batches(0, 0)]
    assert calls == [8, 3]  # 11 examples, windows of 8: one transform call each
    assert list(got[0].columns) == ["id", "noise", "labels"]
    again = [rows for rows, meta in stream.bind(batch_size=4)._batches(0, 0)]
    assert [r.columns["noise"] for r in got] == [r.columns["noise"] for r in again]  # seeded per window
    assert got[-1][0]["labels"] == got[-1].columns["labels"][0]
    kinds = [meta.kind for _, meta in stream.bind(batch_size=4)._batches(0, 0)]
    assert kinds[-1] == Kind.TAIL  # 11 rows in batches of 4: the short last batch is handed over as a tail


# --- errors and warnings ---


def test_refuses_what_it_cannot_split_exactly(shard_sets):
    from datasets import interleave_datasets
    from datasets.distributed import split_dataset_by_node

    with pytest.raises(TypeError, match="expects a datasets.IterableDataset, got Dataset.*hl.MapDataset"):
        hl.StreamDataset(Dataset.from_dict({"x": [1]}))
    with pytest.raises(hl.DataError, match=r"shuffle\(\).*shuffle_buffer=N"):
        hl.StreamDataset(hf_stream(shard_sets[2]).shuffle(seed=0))
    with pytest.raises(hl.DataError, match="split_dataset_by_node.*Pass the unsplit stream"):
        hl.StreamDataset(split_dataset_by_node(hf_stream(shard_sets[2]), rank=0, world_size=2))
    mixed = interleave_datasets(
        [hf_stream(shard_sets[2]), hf_stream(shard_sets[3])], probabilities=[0.3, 0.7], seed=0
    )
    with pytest.raises(
        hl.DataError,
        match=r"interleave_datasets.*not supported.*StreamDataset\(\[a, b\], weights=\[\.\.\.\]\)",
    ):
        hl.StreamDataset(mixed)


def test_concatenated_streams_stay_exact(shard_sets):
    from datasets import concatenate_datasets

    both = concatenate_datasets([hf_stream(shard_sets[2]), hf_stream(shard_sets[3])])
    got = simulate(hl.StreamDataset(both, shuffle_buffer=4), 1, 2, batch_size=2)
    seen = sorted(i for b in got.values() for ids, _ in b for i in ids)
    assert seen == sorted(list(range(sum(sizes_for(2)))) + list(range(sum(sizes_for(3)))))


def test_too_few_shards_is_an_error_naming_the_numbers_and_the_fix(shard_sets):
    one = hl.StreamDataset(unsized_stream(shard_sets[1]))  # 1 file of 3 rows: one row group
    with pytest.raises(
        hl.DataError,
        match=r"1 shard\(s\) \(1 after.*world_size=2 x num_workers=2 = 4 readers.*no worker count helps with "
        r"fewer shards than the 2 ranks.*split_examples=True",
    ):
        one.bind(world_size=2, num_workers=2, batch_size=2)
    with pytest.raises(hl.DataError, match=r"= 2 readers.*Fix: use num_workers=0 \(one reader per rank\)"):
        one.bind(num_workers=2, batch_size=2)
    three = hl.StreamDataset(unsized_stream(shard_sets[3]))  # 3 files, 7 row groups
    with pytest.raises(hl.DataError, match=r"3 shard\(s\) \(7 after.*= 8 readers.*use num_workers=3 \("):
        three.bind(world_size=2, num_workers=4, batch_size=2)
    counted = hl.StreamDataset(hf_stream(shard_sets[1]))  # sizes known: 3 rows for 3 readers is fine
    assert counted.plan(num_workers=3).rank_examples == [3]
    with pytest.raises(hl.DataError, match=r"1 of 4 readers would get no examples \(rank 0 worker 0\)"):
        counted.bind(num_workers=4, batch_size=2)


def test_split_examples_warns(shard_sets):
    stream = hl.StreamDataset(unsized_stream(shard_sets[1]), split_examples=True)
    with pytest.warns(UserWarning, match="splitting by example.*keeps 1 example in 2"):
        stream.bind(num_workers=2, batch_size=2)


def test_an_empty_shard_leaves_no_reader_idle_when_split_by_rows(tmp_path):
    files = write_shards(tmp_path, [5, 0, 1])  # (the first file's schema types the stream)
    stream = hl.StreamDataset(hf_stream(files))
    assert stream.plan(world_size=2).rank_examples == [3, 3]
    seen = simulate(stream, 2, 0, batch_size=2)
    assert sorted(i for batches in seen.values() for ids, _ in batches for i in ids) == list(range(6))


def test_argument_errors(shard_sets):
    hf = hf_stream(shard_sets[2])
    stream = hl.StreamDataset(hf)
    with pytest.raises(ValueError, match="exactly one of batch_size or max_tokens, got batch_size=None"):
        stream.bind()
    with pytest.raises(ValueError, match="exactly one of batch_size or max_tokens"):
        stream.bind(batch_size=2, max_tokens=10)
    with pytest.raises(ValueError, match=r"rank must be in \[0, 2\), got 2"):
        stream.bind(rank=2, world_size=2, batch_size=2)
    with pytest.raises(ValueError, match="shuffle_buffer must be >= 0, got -1"):
        hl.StreamDataset(hf, shuffle_buffer=-1)
    with pytest.raises(TypeError, match="split_examples must be True or False, got str 'yes'"):
        hl.StreamDataset(hf, split_examples="yes")
    with pytest.raises(TypeError, match="drop_last must be True or False, got str 'False'"):
        stream.bind(batch_size=2, drop_last="False")
    with pytest.raises(TypeError, match="batch_size must be an int, got float 2.0"):
        stream.bind(batch_size=2.0)
    with pytest.raises(TypeError, match="bucket must be a column name"):
        hl.StreamDataset(hf, bucket=True)
    with pytest.raises(TypeError, match="columns must be a list of column names, got the string 'id'"):
        hl.StreamDataset(hf, columns="id")
    with pytest.raises(
        hl.DataError, match=r"asks for \['nope'\].*available: \['id', 'input_ids', 'labels'\]"
    ):
        hl.StreamDataset(hf, columns=["id", "nope"])
    with pytest.raises(TypeError, match="yields whole batches once bound.*make_loader"):
        iter(stream).__next__()


def test_bad_transforms_and_columns_fail_with_what_was_returned(shard_sets):
    hf = hf_stream(shard_sets[2])

    def first(stream, **kw):
        return next(stream.bind(batch_size=2, **kw)._batches(0, 0))

    with pytest.raises(TypeError, match="returned list; it must return a dict of columns"):
        first(hl.StreamDataset(hf, transform=lambda b: [1]))
    with pytest.raises(hl.DataError, match=r"got 11 rows but returned columns of lengths \{'x': 1\}"):
        first(hl.StreamDataset(hf, transform=lambda b: {"x": [1]}))
    with pytest.raises(
        hl.DataError, match=r"bucketing by 'tokens'.*available: \['id', 'input_ids', 'labels'\]"
    ):
        first(hl.StreamDataset(hf, bucket="tokens"))
    with pytest.raises(hl.DataError, match=r"asks for \['x'\], which do not exist after the transform"):
        first(hl.StreamDataset(hf, transform=lambda b: b, columns=["x"]))
    with pytest.raises(hl.DataError, match="both 'label' and 'labels'"):
        first(hl.StreamDataset(hf, transform=lambda b: {**b, "labels": b["label"]}))
    assert "label" in first(hl.StreamDataset(hf, rename_label=False))[0].columns


def test_bound_for_other_worker_count_is_refused(shard_sets):
    bound = hl.StreamDataset(hf_stream(shard_sets[4])).bind(num_workers=2, batch_size=2)
    with pytest.raises(
        RuntimeError, match="bound for num_workers=2 but runs in a DataLoader with num_workers=0"
    ):
        list(DataLoader(bound, batch_size=None))


def test_unpicklable_transform_is_named_when_sent_to_spawned_workers(shard_sets):
    import pickle

    stream = hl.StreamDataset(hf_stream(shard_sets[2]), transform=lambda b: b)
    with pytest.raises(TypeError, match="cannot be pickled.*module level"):
        pickle.dumps(stream)


@pytest.mark.parametrize(
    ("shards", "options", "bind"),
    [
        (4, {}, {"batch_size": 3}),
        (4, {"shuffle_buffer": 7, "seed": 2}, {"batch_size": 3}),
        (
            6,
            {"shuffle_buffer": 10, "bucket": "input_ids"},
            {"batch_size": 4, "world_size": 2, "num_workers": 1},
        ),
        (2, {"shuffle_buffer": 9, "window": 5}, {"max_tokens": 30, "num_workers": 3}),
        (1, {"split_examples": True, "shuffle_buffer": 4}, {"batch_size": 2, "num_workers": 2}),
        (5, {"shuffle_buffer": 6}, {"batch_size": 2, "world_size": 3, "num_workers": 2}),
    ],
)
def test_every_recorded_position_restarts_a_reader_exactly(shard_sets, shards, options, bind):
    """A reader restarted from the position recorded after any of its batches yields exactly its remaining
    batches: window cuts, piece and shard boundaries, row-group seeks, example splits and token budgets."""
    read = unsized_stream if options.get("split_examples") else hf_stream
    stream = hl.StreamDataset(read(shard_sets[shards]), **options)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        bound = stream.bind(**bind)
    for local in range(bound.local_readers):
        items = [(ids_of(rows), meta) for rows, meta in bound._batches(local, 1)]
        for k, (_, meta) in enumerate(items):
            if meta.kind != Kind.TAIL:
                position = ReaderPosition.from_flat(meta.position)
                again = [ids_of(rows) for rows, _ in bound._batches(local, 1, position)]
                assert again == [ids for ids, _ in items[k + 1 :]], (local, k)


def test_plan_counts_examples_of_a_hub_layout_folder(hub_folder):
    # A Hub-layout folder loads through a renamed subclass of datasets' Parquet builder: counts must still show.
    stream = hl.StreamDataset(hl.load(str(hub_folder), split="train", streaming=True))
    text = str(stream.plan(num_workers=1, world_size=2))
    assert "rank 0 worker 0: 1 shard(s) [0], 30 examples" in text
    assert "rank 1 worker 0: 1 shard(s) [1], 30 examples" in text
