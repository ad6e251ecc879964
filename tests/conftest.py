"""Shared fixtures: data and a tokenizer built in-process (never fetched)."""

from __future__ import annotations

import os
import random
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

WORDS = [f"w{i}" for i in range(40)]


def make_texts(n: int, seed: int = 0, min_len: int = 2, max_len: int = 30) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choices(WORDS, k=rng.randint(min_len, max_len))) for _ in range(n)]


def train_tokenizer():
    """A WordLevel tokenizer trained in-process, as a transformers fast tokenizer (pad id 0)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.WordLevelTrainer(special_tokens=["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[EOS]"])
    tok.train_from_iterator(make_texts(200) + [" ".join(WORDS)], trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="[PAD]",
        unk_token="[UNK]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        eos_token="[EOS]",
    )


@pytest.fixture(scope="session")
def tokenizer():
    return train_tokenizer()


@pytest.fixture
def text_dataset():
    """100 rows: text, label (0/1/2, imbalanced) and a string id."""
    from datasets import Dataset

    texts = make_texts(100)
    labels = [i % 5 % 3 for i in range(100)]
    return Dataset.from_dict({"text": texts, "label": labels, "id": [f"row{i}" for i in range(100)]})


def write_hub_folder(root: Path) -> Path:
    """A folder laid out like a Hub dataset repo: README.md with a `configs:` block and parquet shards.

    Config "default": train (2 shards, 60 rows) and test (1 shard, 20 rows). Config "small": train only (10 rows).
    """
    from datasets import Dataset

    root.mkdir(parents=True, exist_ok=True)
    (root / "data").mkdir(exist_ok=True)
    (root / "small").mkdir(exist_ok=True)

    def rows(n, offset):
        texts = make_texts(n, seed=offset)
        return Dataset.from_dict({"text": texts, "label": [(i + offset) % 2 for i in range(n)]})

    rows(30, 0).to_parquet(str(root / "data" / "train-00000-of-00002.parquet"))
    rows(30, 30).to_parquet(str(root / "data" / "train-00001-of-00002.parquet"))
    rows(20, 60).to_parquet(str(root / "data" / "test-00000-of-00001.parquet"))
    rows(10, 80).to_parquet(str(root / "small" / "train-00000-of-00001.parquet"))
    (root / "README.md").write_text(
        "---\n"
        "configs:\n"
        "- config_name: default\n"
        "  data_files:\n"
        "  - split: train\n"
        "    path: data/train-*\n"
        "  - split: test\n"
        "    path: data/test-*\n"
        "- config_name: small\n"
        "  data_files:\n"
        "  - split: train\n"
        "    path: small/train-*\n"
        "---\n"
        "# A test dataset\n"
    )
    return root


@pytest.fixture
def hub_folder(tmp_path):
    return write_hub_folder(tmp_path / "org__name")
