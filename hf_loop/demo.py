"""The embedded default: a text-classification dataset, a tokenizer and a tiny BERT, all built in code, offline.

``hf-loop finetune`` with no arguments trains on these, so a fresh install shows the whole path (variable lengths,
imbalanced labels, padding, sampling, training, evaluation) without touching the network.

The data: sentences of filler words with keywords from two families mixed in. The label is decided by which
families appear - any *finance* keyword makes it 2 ("finance", ~10%), else any *sports* keyword makes it 1
("sports", ~30%), else 0 ("other", ~60%) - so the classes are imbalanced but exactly learnable, and a model must
look at the whole sequence (keywords sit anywhere, sequences are 6 to 200 words long).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

__all__ = ["LABELS", "make_dataset", "make_model", "train_tokenizer"]

LABELS = ("other", "sports", "finance")
SPORTS = ("goal", "match", "team", "score", "league", "coach", "player", "season", "referee", "stadium")
FINANCE = ("stock", "market", "bond", "price", "bank", "trade", "profit", "fund", "dividend", "loan")
CLASS_SHARES = (0.6, 0.3, 0.1)
SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")


def _filler_words(count: int = 300) -> list[str]:
    """Pronounceable filler words from syllables: a fixed vocabulary, independent of any seed."""
    onsets, vowels = "bdfgklmnprstvz", "aeiou"
    syllables = [c + v for c in onsets for v in vowels]
    words = [a + b for a in syllables for b in syllables]
    step = len(words) // count  # spread over the grid so words do not all share a first syllable
    return words[::step][:count]


FILLER = tuple(_filler_words())


def make_dataset(num_rows: int = 4000, *, seed: int = 0, median_words: int = 24) -> Any:
    """The demo dataset: ``text`` (variable length), ``label`` (0 other / 1 sports / 2 finance, ~60/30/10%).

    Deterministic: the same (num_rows, seed, median_words) always give the same rows.

    Args:
        num_rows: number of examples.
        seed: seed of the numpy Generator that draws lengths, labels and words.
        median_words: median sentence length in words; lengths are lognormal (sigma 0.6) clipped to 6..200.

    Returns:
        A ``datasets.Dataset`` with a ``ClassLabel`` feature named ``label``.

    Example:
        >>> ds = make_dataset(100)
        >>> ds.features["label"].names
        ['other', 'sports', 'finance']
        >>> make_dataset(100)[:5] == ds[:5]        # the same arguments give the same rows
        True
        >>> ds[0]["text"].split()[:3], ds[0]["label"]
        (['supu', 'stadium', 'kuro'], 1)
    """
    import datasets

    if num_rows < 1:
        raise ValueError(f"num_rows must be >= 1, got {num_rows}")
    rng = np.random.default_rng(seed)
    labels = rng.choice(len(LABELS), size=num_rows, p=CLASS_SHARES)
    lengths = np.clip(np.rint(rng.lognormal(np.log(median_words), 0.6, size=num_rows)), 6, 200).astype(int)
    words = np.array(FILLER, dtype=object)[rng.integers(len(FILLER), size=int(lengths.sum()))]
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    # Keywords overwrite filler at random positions: sports first, then finance, so a finance keyword is never
    # overwritten by a sports one. Sports keywords also appear in a third of finance texts: finance wins.
    with_sports = (labels == 1) | ((labels == 2) & (rng.random(num_rows) < 1 / 3))
    for family, count in (
        (SPORTS, np.where(with_sports, rng.integers(1, 4, num_rows), 0)),
        (FINANCE, np.where(labels == 2, rng.integers(1, 4, num_rows), 0)),
    ):
        rows = np.repeat(np.arange(num_rows), count)
        positions = starts[rows] + (rng.random(rows.size) * lengths[rows]).astype(np.int64)
        words[positions] = np.array(family, dtype=object)[rng.integers(len(family), size=rows.size)]
    texts = [" ".join(words[a:b]) for a, b in zip(starts.tolist(), (starts + lengths).tolist())]
    features = datasets.Features(
        {"text": datasets.Value("string"), "label": datasets.ClassLabel(names=list(LABELS))}
    )
    return datasets.Dataset.from_dict({"text": texts, "label": labels.tolist()}, features=features)


def train_tokenizer(
    texts: Sequence[str] | None = None, *, vocab_size: int = 8000, max_length: int = 256
) -> Any:
    """A WordLevel tokenizer trained in-process, wrapped as a ``PreTrainedTokenizerFast`` (BERT-style specials).

    Encodes ``[CLS] words [SEP]``; pad id 0. With ``texts=None`` it covers the demo vocabulary exactly. Given
    other texts (a dataset without a pretrained tokenizer), it keeps the ``vocab_size`` most frequent words.

    Args:
        texts: training texts; None for the demo vocabulary.
        vocab_size: largest vocabulary, special tokens included.
        max_length: the tokenizer's ``model_max_length`` (truncation length).

    Example:
        >>> tok = train_tokenizer()
        >>> tok("goal stock")["input_ids"] == [tok.cls_token_id, tok.convert_tokens_to_ids("goal"),
        ...                                    tok.convert_tokens_to_ids("stock"), tok.sep_token_id]
        True
    """
    from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    if texts is None:
        texts = [" ".join(FILLER + SPORTS + FINANCE)]
    tok = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.WordLevelTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS))
    tok.train_from_iterator(texts, trainer=trainer)
    cls_id, sep_id = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B [SEP]",
        special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)],
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        model_max_length=max_length,
        pad_token="[PAD]",
        unk_token="[UNK]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        mask_token="[MASK]",
    )


def make_model(
    tokenizer: Any,
    num_labels: int = len(LABELS),
    *,
    hidden_size: int = 64,
    num_layers: int = 2,
    seed: int = 0,
    problem_type: str | None = None,
) -> Any:
    """A tiny BERT ``AutoModelForSequenceClassification`` built from a config (no download), seeded.

    Its weights are drawn under a forked RNG, so building it leaves torch's global random state untouched.

    Args:
        tokenizer: sets the vocabulary size, pad id and the longest position.
        num_labels: classes of the classification head.
        hidden_size: width (heads = hidden_size // 16, feed-forward = 2 x hidden_size).
        num_layers: transformer layers.
        seed: seed of the initial weights.
        problem_type: transformers' ``problem_type``: "regression" (with ``num_labels=1``: an MSE loss on float
            labels), "single_label_classification", ...; None lets transformers infer it from the labels.

    Example:
        >>> model = make_model(train_tokenizer())
        >>> sum(p.numel() for p in model.parameters()) < 200_000
        True
    """
    from transformers import AutoModelForSequenceClassification, BertConfig

    names = LABELS if num_labels == len(LABELS) else tuple(f"LABEL_{i}" for i in range(num_labels))
    config = BertConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=max(1, hidden_size // 16),
        intermediate_size=2 * hidden_size,
        max_position_embeddings=max(512, int(min(tokenizer.model_max_length, 4096))),
        pad_token_id=tokenizer.pad_token_id,
        num_labels=num_labels,
        id2label=dict(enumerate(names)),
        label2id={name: i for i, name in enumerate(names)},
        problem_type=problem_type,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return AutoModelForSequenceClassification.from_config(config)
