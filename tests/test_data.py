"""MapDataset, Columns and to_torch: batched Arrow reads, transforms, column selection, lengths, pickling."""

from __future__ import annotations

import pickle

import numpy as np
import pyarrow as pa
import pytest
import torch
from datasets import Dataset, DatasetDict, concatenate_datasets, load_from_disk
from torch.utils.data import DataLoader, default_collate

import hf_loop as hl


class Keyed(list):
    """A batch of indices carrying an rng_key, as hl.make_loader's batches do."""

    rng_key: tuple[int, int, int]


def tokenize_lengths(batch):
    """Module-level transform (picklable): words -> ids."""
    return {"input_ids": [[len(w) for w in t.split()] for t in batch["text"]], "label": batch["label"]}


def noisy(batch, rng):
    return {"noise": rng.random(len(batch["x"])).tolist(), "x": batch["x"]}


def _chunked():
    """A dataset whose Arrow table has three record batches."""
    parts = [
        Dataset.from_dict(
            {"input_ids": [[i] * (i % 5 + 1) for i in range(s, s + 4)], "label": list(range(s, s + 4))}
        )
        for s in (0, 4, 8)
    ]
    ds = concatenate_datasets(parts)
    assert ds.data.table.column("input_ids").num_chunks == 3
    return ds


def _naive_rows(ds: Dataset, indices):
    return [{("labels" if k == "label" else k): v for k, v in ds[int(i)].items()} for i in indices]


@pytest.mark.parametrize("view", ["plain", "shuffled", "selected", "on_disk"])
def test_getitems_matches_the_hf_rows_in_every_view(view, tmp_path):
    ds = _chunked()
    if view == "shuffled":
        ds = ds.shuffle(seed=3)
    elif view == "selected":
        ds = ds.select([11, 2, 7, 7, 0])
    elif view == "on_disk":
        ds.save_to_disk(str(tmp_path / "ds"))
        ds = load_from_disk(str(tmp_path / "ds")).shuffle(seed=1)
    mds = hl.MapDataset(ds)
    for indices in ([0, 1, 2], [4, 0, 3], list(range(len(ds)))[::-1], [len(ds) - 1]):
        batch = mds.__getitems__(indices)
        assert isinstance(batch, hl.Columns) and isinstance(batch.columns["input_ids"], pa.Array)
        assert list(batch) == _naive_rows(ds, indices)
    assert mds[-1] == _naive_rows(ds, [len(ds) - 1])[0]
    assert mds.lengths().tolist() == [len(ids) for ids in ds["input_ids"]]


def test_multi_chunk_gather_handles_every_column_type():
    def part(s):
        return Dataset.from_dict(
            {
                "ids": [[i, i + 1] for i in range(s, s + 3)],
                "score": [0.5 * i for i in range(s, s + 3)],
                "maybe": [None if i % 4 == 0 else i for i in range(s, s + 3)],  # nulls: the generic path
                "text": [f"t{i}" for i in range(s, s + 3)],
                "nested": [[[i], [i, i]] for i in range(s, s + 3)],
                "floats": [[float(i)] * (i % 3) for i in range(s, s + 3)],
            }
        )

    ds = concatenate_datasets([part(0), part(3), part(6)]).shuffle(seed=0)
    mds = hl.MapDataset(ds)
    assert set(mds._arrow()["numeric"]) == {"ids", "score", "floats"}
    indices = [8, 0, 4, 4, 7, 1]
    assert list(mds.__getitems__(indices)) == [ds[i] for i in indices]
    assert list(mds.__getitems__([2, 3, 4])) == [ds[i] for i in (2, 3, 4)]  # contiguous run


def test_twin_mask_columns_gather_exactly_with_and_without_zeros():
    def part(s, zero):
        ids = [[i] * (i % 4 + 1) for i in range(s, s + 4)]
        mask = [[0 if zero and j == 0 else 1 for j in range(len(r))] for r in ids]
        return Dataset.from_dict(
            {"input_ids": ids, "attention_mask": mask, "other": [[7] * len(r) for r in ids]}
        )

    ds = concatenate_datasets([part(0, False), part(4, True), part(8, False)])
    mds = hl.MapDataset(ds)
    numeric = mds._arrow()["numeric"]
    assert numeric["attention_mask"].twin == "input_ids" and numeric["other"].twin == "input_ids"
    for indices in ([9, 1, 10], [9, 5, 1, 4], [11, 0, 6, 6]):
        assert list(mds.__getitems__(indices)) == [ds[i] for i in indices]


def test_one_arrow_read_and_one_transform_call_per_batch(text_dataset):
    calls = []

    def count(batch):
        calls.append(len(batch["text"]))
        return tokenize_lengths(batch)

    mds = hl.MapDataset(text_dataset, transform=count)
    loader = DataLoader(mds, batch_size=16, collate_fn=hl.PadCollator())
    batches = list(loader)
    assert calls == [16] * 6 + [4]
    assert sum(len(b["input_ids"]) for b in batches) == 100
    assert batches[0]["labels"].tolist() == text_dataset["label"][:16]


def test_columns_are_selected_after_the_transform_and_label_is_renamed(text_dataset):
    mds = hl.MapDataset(text_dataset, transform=tokenize_lengths, columns=["input_ids", "label"])
    row = mds[3]
    assert set(row) == {"input_ids", "labels"}
    assert row["input_ids"] == [len(w) for w in text_dataset[3]["text"].split()]
    kept = hl.MapDataset(text_dataset, rename_label=False)[0]
    assert "label" in kept and "labels" not in kept
    assert set(hl.MapDataset(text_dataset.with_format(None, columns=["text"]))[0]) == {"text"}


def test_missing_columns_name_the_available_ones(text_dataset):
    with pytest.raises(
        hl.DataError, match=r"asks for \['input_ids'\].*available: \['id', 'labels', 'text'\]"
    ):
        hl.MapDataset(text_dataset, columns=["input_ids", "text"])
    mds = hl.MapDataset(text_dataset, transform=tokenize_lengths, columns=["text"])
    with pytest.raises(
        hl.DataError, match=r"do not exist after the transform; available: \['input_ids', 'labels'\]"
    ):
        mds[0]
    with pytest.raises(TypeError, match="got the string 'text'"):
        hl.MapDataset(text_dataset, columns="text")


def test_transform_with_rng_is_seeded_from_the_batch_key():
    ds = Dataset.from_dict({"x": list(range(10))})
    mds = hl.MapDataset(ds, transform=noisy, seed=7)
    keyed = Keyed([2, 3, 4])
    keyed.rng_key = (7, 2, 40)
    expected = np.random.default_rng((7, 2, 40)).random(3).tolist()
    assert mds.__getitems__(keyed).columns["noise"] == expected
    assert mds.__getitems__(keyed).columns["noise"] == expected  # same key, same draw
    plain = mds.__getitems__([2, 3, 4]).columns["noise"]
    assert plain == np.random.default_rng((7, 0, 2)).random(3).tolist()


def test_transform_errors_are_typed_and_named():
    ds = Dataset.from_dict({"x": [1, 2, 3]})

    def returns_list(batch):
        return [1, 2]

    def changes_rows(batch):
        return {"x": batch["x"] * 2}

    with pytest.raises(TypeError, match="returns_list.*returned list; it must return a dict of columns"):
        hl.MapDataset(ds, transform=returns_list)[0]
    with pytest.raises(
        hl.DataError, match=r"changes_rows.*got 2 rows but returned columns of lengths \{'x': 4\}"
    ):
        hl.MapDataset(ds, transform=changes_rows).__getitems__([0, 1])
    with pytest.raises(TypeError, match="rename_label must be True or False, got str 'no'"):
        hl.MapDataset(ds, rename_label="no")
    with pytest.raises(TypeError, match="transform must be callable"):
        hl.MapDataset(ds, transform="tokenize")
    with pytest.raises(TypeError, match=r"set_transform.*MapDataset\(ds.with_format\(None\), transform=fn\)"):
        hl.MapDataset(ds.with_transform(changes_rows))
    with pytest.raises(TypeError, match="needs a datasets.Dataset, got list"):
        hl.MapDataset([1, 2])
    with pytest.raises(IndexError, match="index 3 is out of range for a dataset of 3 rows"):
        hl.MapDataset(ds).__getitems__([0, 3])


@pytest.mark.filterwarnings("ignore:Got pickle error")
def test_unpicklable_transform_fails_clearly_under_spawn_and_works_without_pickling(text_dataset):
    def local(batch):
        return tokenize_lengths(batch)

    mds = hl.MapDataset(text_dataset, transform=lambda b: tokenize_lengths(b))
    assert mds[0]["labels"] == text_dataset[0]["label"]  # fine in-process: nothing is pickled
    loader = DataLoader(
        mds, batch_size=8, num_workers=1, multiprocessing_context="spawn", collate_fn=hl.PadCollator()
    )
    with pytest.raises(
        TypeError, match=r"transform '.*<lambda>'.*cannot be pickled.*module level.*num_workers=0"
    ):
        next(iter(loader))
    with pytest.raises(TypeError, match=r"'.*local'.*cannot be pickled"):
        pickle.dumps(hl.MapDataset(text_dataset, transform=local))


def test_module_level_transform_works_in_a_spawned_worker(text_dataset):
    mds = hl.MapDataset(text_dataset, transform=tokenize_lengths, columns=["input_ids", "labels"])
    loader = DataLoader(
        mds, batch_size=50, num_workers=1, multiprocessing_context="spawn", collate_fn=hl.PadCollator()
    )
    batches = list(loader)
    assert [len(b["input_ids"]) for b in batches] == [50, 50]
    assert batches[1]["labels"].tolist() == text_dataset["label"][50:]


def test_lengths_are_vectorised_views_and_fall_back_to_the_transform(text_dataset):
    ds = _chunked().select([9, 0, 3, 3])
    assert hl.MapDataset(ds).lengths("input_ids").tolist() == [5, 1, 4, 4]
    assert hl.MapDataset(ds).lengths("input_ids").dtype == np.int64
    assert hl.MapDataset(text_dataset).lengths("text").tolist() == [len(t) for t in text_dataset["text"]]
    by_transform = hl.MapDataset(text_dataset, transform=tokenize_lengths).lengths("input_ids")
    assert by_transform.tolist() == [len(t.split()) for t in text_dataset["text"]]
    with pytest.raises(
        hl.DataError, match=r"lengths\('input_ids'\): no such column; available: \['id', 'labels'"
    ):
        hl.MapDataset(text_dataset).lengths()
    with pytest.raises(
        hl.DataError, match=r"neither in the dataset nor after the transform.*\['input_ids', 'labels'"
    ):
        hl.MapDataset(text_dataset, transform=tokenize_lengths).lengths("tokens")
    with pytest.raises(TypeError, match=r"lengths\('labels'\): the column holds int64"):
        hl.MapDataset(text_dataset).lengths("labels")


def test_columns_is_a_read_only_list_that_pickles_without_rows(tokenizer):
    from transformers import DataCollatorWithPadding

    ids = pa.array([[5, 6, 7], [8]])
    batch = hl.Columns(
        {"input_ids": ids, "attention_mask": pa.array([[1, 1, 1], [1]]), "n": np.array([3, 1])}
    )
    assert isinstance(batch, list) and len(batch) == 2 and batch
    assert repr(batch) == "Columns(num_rows=2, columns=['input_ids', 'attention_mask', 'n'])"
    copy = pickle.loads(pickle.dumps(batch))
    assert copy.columns["input_ids"].equals(ids) and copy == batch
    assert batch[1] == {"input_ids": [8], "attention_mask": [1], "n": 1}
    assert [r["n"] for r in batch] == [3, 1] and batch.index(batch[1]) == 1
    with pytest.raises(TypeError, match="read-only"):
        batch.append({})
    assert default_collate(hl.Columns({"x": np.array([1.0, 2.0])}))["x"].tolist() == [1.0, 2.0]
    padded = DataCollatorWithPadding(tokenizer)(hl.Columns({"input_ids": ids}))
    assert padded["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    with pytest.raises(ValueError, match=r"one per row.*\{'b': 1\}"):
        hl.Columns({"a": [1, 2], "b": [1]})


def test_map_batches_hold_only_data_columns_for_transformers_collators(tokenizer, text_dataset):
    from transformers import DataCollatorWithPadding

    def tokenize(batch):
        return {**tokenizer(batch["text"]), "label": batch["label"]}

    mds = hl.MapDataset(text_dataset, transform=tokenize, columns=["input_ids", "attention_mask", "label"])
    rows = mds.__getitems__([3, 1, 4])
    assert list(rows[0]) == ["input_ids", "attention_mask", "labels"]  # no row index among the keys
    theirs = DataCollatorWithPadding(tokenizer)(rows)
    ours = hl.PadCollator.for_tokenizer(tokenizer)(rows)
    assert set(theirs) == set(ours) == {"input_ids", "attention_mask", "labels"}
    assert all(torch.equal(theirs[k], ours[k]) for k in ours)


def test_to_torch_dispatches_by_type(text_dataset):
    assert isinstance(hl.to_torch(text_dataset, columns=["text"]), hl.MapDataset)
    with pytest.raises(TypeError, match=r"DatasetDict with splits \['test', 'train'\]; pick one split"):
        hl.to_torch(DatasetDict(train=text_dataset, test=text_dataset))
    with pytest.raises(TypeError, match="needs a datasets.Dataset or datasets.IterableDataset, got dict"):
        hl.to_torch({"a": [1]})
    stream = hl.to_torch(text_dataset.to_iterable_dataset(num_shards=2))
    assert type(stream).__name__ == "StreamDataset"


def test_make_loader_pads_map_batches_end_to_end(text_dataset):
    mds = hl.MapDataset(text_dataset, transform=tokenize_lengths, columns=["input_ids", "labels"])
    loader = hl.make_loader(mds, batch_size=10, sampler="random", seed=1)
    pairs = list(loader.indexed())
    assert sorted(i for rows, _ in pairs for i in rows) == list(range(100))
    rows, first = pairs[0]
    assert set(first) == {"input_ids", "attention_mask", "labels"}  # no bookkeeping key for model(**batch)
    assert first["input_ids"].shape[0] == 10 and first["attention_mask"].sum() == sum(
        len(text_dataset[i]["text"].split()) for i in rows
    )
    assert first["labels"].tolist() == [text_dataset[i]["label"] for i in rows]
