"""Local stand-ins for the Hub names that the README and the docstring examples use, built in-process.

The examples call ``hl.load("stanfordnlp/imdb")`` or ``from_pretrained("bert-base-uncased")``. datasets and
transformers look for a local folder of that name first, so a working directory that holds folders named like
those Hub ids runs the examples as written, offline, on tiny data. ``build(root)`` writes:

- ``stanfordnlp/imdb``, ``org/corpus``: Hub-layout dataset folders (parquet shards named by split) of ``text``
  and a binary ``label``;
- ``org/name``, ``my_data``: Hub-layout folders with a ``configs:`` block (tests/conftest.py's layout);
- ``data/*.parquet``: two shards of ``text``, ``label`` and pre-tokenized ``input_ids``;
- ``bert-base-uncased``: a tokenizer trained in-process and a tiny BERT classifier (save_pretrained);
- ``org/model``: the same tokenizer and a tiny Llama causal LM; ``my_tokenizer``: the tokenizer alone.
"""

from __future__ import annotations

from pathlib import Path

from _train_script import tiny_bert, tiny_llama
from conftest import make_texts, train_tokenizer, write_hub_folder

MAX_LENGTH = 64  # the tiny models' max_position_embeddings


def tokenizer():
    tok = train_tokenizer()
    tok.model_max_length = MAX_LENGTH
    return tok


def text_rows(n: int, seed: int = 0) -> dict[str, list]:
    """``n`` rows of ``text`` (2-30 words) and a binary ``label``."""
    return {"text": make_texts(n, seed=seed), "label": [(i * 7 + seed) % 3 % 2 for i in range(n)]}


def token_dataset(n: int = 32, seed: int = 0):
    """A ``datasets.Dataset`` of ``text``, ``label`` and the text's ``input_ids``."""
    from datasets import Dataset

    rows = text_rows(n, seed)
    return Dataset.from_dict({**rows, "input_ids": tokenizer()(rows["text"])["input_ids"]})


def _split_folder(root: Path, splits: dict[str, list[int]]) -> None:
    """A Hub-layout dataset folder: ``data/{split}-0000i-of-0000n.parquet``, one file per shard size given."""
    from datasets import Dataset

    (root / "data").mkdir(parents=True)
    seed = 0
    for split, shards in splits.items():
        for i, rows in enumerate(shards):
            seed += 1
            path = root / "data" / f"{split}-{i:05d}-of-{len(shards):05d}.parquet"
            Dataset.from_dict(text_rows(rows, seed)).to_parquet(str(path))


def build(root: Path) -> Path:
    """Write every stand-in under ``root`` (see the module docstring); returns ``root``."""
    root.mkdir(parents=True, exist_ok=True)
    _split_folder(root / "stanfordnlp" / "imdb", {"train": [64, 64], "test": [32]})
    _split_folder(root / "org" / "corpus", {"train": [64, 64]})
    write_hub_folder(root / "org" / "name")
    write_hub_folder(root / "my_data")
    (root / "data").mkdir()
    for i in range(2):
        token_dataset(32, seed=i).to_parquet(str(root / "data" / f"train-{i:05d}.parquet"))
    tok = tokenizer()
    for folder, model in (("bert-base-uncased", tiny_bert()), ("org/model", tiny_llama())):
        model.save_pretrained(root / folder)
        tok.save_pretrained(root / folder)
    tok.save_pretrained(root / "my_tokenizer")
    return root
