"""The data report: numbers on known lengths, padding from hf_loop's samplers, label balance, plots."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest
import torch
from datasets import Dataset

import hf_loop as hl
from hf_loop import report


def lognormal(n: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.clip(rng.lognormal(np.log(100), 0.8, n), 8, 512).astype(np.int64)


def reference_waste(lengths: np.ndarray, batches: list) -> float:
    real = sum(int(lengths[b].sum()) for b in batches)
    padded = sum(len(b) * int(lengths[b].max()) for b in batches)
    return 1 - real / padded


def test_length_summary_on_known_lengths():
    s = report.length_summary([1, 2, 3, 4, 100])
    assert (s["count"], s["total"], s["min"], s["max"], s["p50"], s["mean"]) == (5, 110, 1, 100, 3.0, 22.0)
    with pytest.raises(ValueError, match=r"non-empty 1-D sequence, got shape \(0,\)"):
        report.length_summary([])


def test_batch_waste_matches_the_definition():
    lengths = np.array([2, 4, 4, 4, 1])
    out = report.batch_waste(lengths, [[0, 1], [2, 3, 4]])
    assert out["real_tokens"] == 15 and out["padded_tokens"] == 2 * 4 + 3 * 4
    assert out["waste"] == pytest.approx(1 - 15 / 20)
    assert out["batches"] == 2 and out["mean_batch_size"] == 2.5


def test_equal_lengths_waste_nothing_under_every_strategy():
    waste = report.padding_waste([7] * 100, batch_size=8)
    assert set(waste) == set(report.STRATEGIES)
    for row in waste.values():
        assert row["waste"] == 0.0 and row["real_tokens"] == 700
    assert waste["random"]["batches"] == 13  # ceil(100 / 8): the tail batch counts


def test_padding_waste_comes_from_the_samplers():
    lengths = lognormal(3000)
    waste = report.padding_waste(lengths, batch_size=32, seed=3)
    order = hl.RandomSampler(len(lengths), seed=3).order(0)
    random_batches = [order[i : i + 32] for i in range(0, len(order), 32)]
    assert waste["random"]["waste"] == pytest.approx(reference_waste(lengths, random_batches))
    grouped = hl.LengthGroupedSampler(lengths, 32, seed=3).order(0)
    assert waste["length"]["waste"] == pytest.approx(
        reference_waste(lengths, [grouped[i : i + 32] for i in range(0, len(grouped), 32)])
    )
    budget = waste["tokens"]["max_tokens"]
    assert budget == max(int(np.ceil(32 * lengths.mean())), int(lengths.max()))
    token_batches = hl.TokenBudgetBatchSampler(lengths, budget, seed=3).order(0)
    assert waste["tokens"]["waste"] == pytest.approx(reference_waste(lengths, token_batches))
    # The point of the report: grouping removes most of the padding random batches carry.
    assert waste["random"]["waste"] > 0.4 > 0.05 > waste["length"]["waste"]
    assert waste["tokens"]["compute"] < waste["length"]["compute"] < 1.0 == waste["random"]["compute"]


def test_label_balance_uses_class_weights():
    labels = np.array([0] * 6 + [1] * 3 + [2])
    rows = report.label_balance(labels, names=["a", "b", "c"])
    weights = hl.class_weights(labels)
    assert [r["count"] for r in rows] == [6, 3, 1]
    assert [r["name"] for r in rows] == ["a", "b", "c"]
    assert [r["weight"] for r in rows] == pytest.approx([weights[0], weights[6], weights[9]])
    assert [r["drawn_share"] for r in rows] == pytest.approx([1 / 3] * 3, abs=1e-4)
    assert [r["share"] for r in report.label_balance(["x", "y", "y", "y"])] == [0.25, 0.75]


def test_inspect_hub_folder_with_tokenizer(hub_folder, tokenizer, tmp_path):
    rep = report.inspect(hub_folder, tokenizer=tokenizer, batch_size=8, out=tmp_path)
    train = Dataset.from_parquet([str(p) for p in sorted((hub_folder / "data").glob("train-*"))])
    expected = [len(ids) for ids in tokenizer(list(train["text"]))["input_ids"]]
    assert rep.lengths == report.length_summary(expected)
    assert rep.unit == "tokens" and rep.column == "text" and rep.label_column == "label"
    assert [r["count"] for r in rep.labels] == [30, 30]
    assert (tmp_path / "lengths.png").stat().st_size > 1000
    assert "split 'train' of ['train', 'test']" in rep.notes[0]
    text = str(rep)
    assert "length-grouped" in text and "token-budget (max_tokens=" in text and "lengths.png" in text
    assert json.loads(json.dumps(rep.to_dict()))["padding"]["random"]["batches"] == 8


def test_inspect_dataset_object_with_token_column_and_words():
    ds = Dataset.from_dict({"input_ids": [[1] * n for n in (3, 5, 9, 2)], "label": ["a", "b", "a", "a"]})
    rep = report.inspect(ds, batch_size=2, out=None)
    assert rep.column == "input_ids" and rep.lengths["total"] == 19 and rep.histogram is None
    assert [r["label"] for r in rep.labels] == ["a", "b"]
    words = report.inspect(Dataset.from_dict({"text": ["a b c", " d  e ", ""]}), out=None)
    assert (words.unit, words.lengths["total"], words.labels) == ("words", 5, None)
    scores = report.inspect(Dataset.from_dict({"text": ["a", "b c"], "label": [0.5, 1.5]}), out=None)
    assert scores.labels is None and "holds floats: regression targets" in scores.notes[0]


def test_inspect_notes_rows_without_a_label_and_balances_the_rest():
    ds = Dataset.from_dict({"text": ["a", "b", "c", "d"], "label": [0, None, 1, 1]})
    rep = report.inspect(ds, out=None)
    assert rep.notes == ["label column 'label': 1 of 4 rows have no label (NaN or null): rows 1"]
    assert [(r["label"], r["count"]) for r in rep.labels] == [(0, 1), (1, 2)]
    nan = report.inspect(
        Dataset.from_dict({"text": ["a", "b", "c"], "label": [0.5, float("nan"), 1.0]}), out=None
    )
    assert "1 of 3 rows have no label (NaN or null): rows 1" in nan.notes[0] and "regression" in nan.notes[1]


def test_label_set_kinds_and_refusals():
    import pyarrow as pa

    assert report.label_set(pa.array([2, 0, 2])) == report.LabelSet(False, ("0", "1", "2"))
    strings = report.label_set(pa.chunked_array([["pos", "neg"], ["pos"]]))
    assert strings.names == ("neg", "pos") and strings.ids(pa.array(["pos", "neg"])).tolist() == [1, 0]
    assert report.label_set(pa.array([0, 1]), ["no", "yes"]).names == ("no", "yes")  # a ClassLabel's names
    assert report.label_set(pa.array([0.25, 3.0])) == report.LabelSet(True)
    assert report.is_regression(pa.array([1.0])) and not report.is_regression(pa.array(["1.0"]))
    with pytest.raises(hl.DataError, match=r"label column 'y' holds -1: class ids must be >= 0"):
        report.label_set(pa.array([0, -1]), name="y")
    values = [float("nan") if i % 4 == 1 else 1.0 for i in range(40)]
    message = (
        r"label column 'y': 10 of 40 rows have no label \(NaN or null\): rows 1, 5, 9, 13, 17 and 5 more"
    )
    with pytest.raises(hl.DataError, match=message):
        report.label_set(pa.array(values), name="y")
    assert report.missing_rows(pa.array(["a", None, "b"])).tolist() == [1]


def test_inspect_errors_name_what_exists(hub_folder):
    with pytest.raises(hl.DataError, match=r"unknown split 'dev'; available splits: \['train', 'test'\]"):
        report.inspect(hl.load(hub_folder), split="dev", out=None)
    with pytest.raises(hl.DataError, match=r"no column 'tokens' to measure; columns: \['text', 'label'\]"):
        report.inspect(hub_folder, split="train", column="tokens", out=None)
    with pytest.raises(hl.DataError, match=r"no label column 'y'"):
        report.inspect(hub_folder, split="train", label_column="y", out=None)


def test_plot_run_errors_and_missing_matplotlib(tmp_path, monkeypatch):
    with pytest.raises(hl.DataError, match=r"no metrics log at .*metrics.jsonl.*--out-dir"):
        hl.plot_run(tmp_path)
    (tmp_path / "metrics.jsonl").write_text(json.dumps({"step": 1, "loss": 1.0, "lr": 0.1}) + "\n")
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if it were not installed
    with pytest.raises(ImportError, match=r"pip install 'hf-loop\[plot\]'"):
        hl.plot_run(tmp_path)
    rep = report.inspect(Dataset.from_dict({"input_ids": [[1], [1, 2]]}), out=tmp_path / "r")
    assert rep.histogram is None and "pip install 'hf-loop[plot]'" in rep.notes[-1]


class TinyClassifier(torch.nn.Module):
    def __init__(self, vocab: int, classes: int = 3) -> None:
        super().__init__()
        self.embed = torch.nn.EmbeddingBag(vocab, 8, mode="sum")
        self.head = torch.nn.Linear(8, classes)

    def forward(self, input_ids, attention_mask, labels=None):
        logits = self.head(self.embed(input_ids, per_sample_weights=attention_mask.float()))
        loss = None if labels is None else torch.nn.functional.cross_entropy(logits, labels)
        return {"loss": loss, "logits": logits}


def test_plot_run_reads_the_metrics_the_loop_writes(text_dataset, tokenizer, tmp_path):
    def tokenize(batch):
        return {"input_ids": tokenizer(batch["text"])["input_ids"], "label": batch["label"]}

    data = hl.MapDataset(text_dataset, transform=tokenize)
    loader = hl.make_loader(data, batch_size=10, collate_fn=hl.PadCollator.for_tokenizer(tokenizer))
    torch.manual_seed(0)
    model = TinyClassifier(len(tokenizer))
    config = hl.TrainConfig(max_steps=6, log_every=2, out_dir=tmp_path, progress=False, scheduler="linear")
    hl.train(model, loader, torch.optim.SGD(model.parameters(), lr=0.1), config, eval_loader=loader)
    records = report.read_metrics(tmp_path)
    assert [r["step"] for r in records if "loss" in r] == [2, 4, 6] and any("eval_loss" in r for r in records)
    png = hl.plot_run(tmp_path)
    assert png == tmp_path / "run.png" and png.stat().st_size > 1000
