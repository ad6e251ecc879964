"""The embedded default: deterministic data whose labels follow the keyword rule, tokenizer, tiny model."""

from __future__ import annotations

import numpy as np
import torch

from hf_loop import demo


def rule(text: str) -> int:
    words = set(text.split())
    if words & set(demo.FINANCE):
        return 2
    return 1 if words & set(demo.SPORTS) else 0


def test_dataset_is_deterministic_and_seeded():
    a, b, c = demo.make_dataset(300), demo.make_dataset(300), demo.make_dataset(300, seed=1)
    assert a["text"][:] == b["text"][:] and a["label"][:] == b["label"][:]
    assert a["text"][:] != c["text"][:]


def test_labels_follow_the_keyword_rule_and_are_imbalanced():
    ds = demo.make_dataset(2000)
    texts, labels = list(ds["text"]), list(ds["label"])
    assert [rule(t) for t in texts] == labels
    shares = np.bincount(labels, minlength=3) / len(labels)
    np.testing.assert_allclose(shares, demo.CLASS_SHARES, atol=0.04)
    lengths = np.array([len(t.split()) for t in texts])
    assert lengths.min() >= 6 and lengths.max() <= 200 and 18 <= np.median(lengths) <= 30
    assert ds.features["label"].names == list(demo.LABELS)


def test_tokenizer_covers_the_vocabulary_and_adds_cls_sep():
    tok = demo.train_tokenizer()
    assert tok.get_vocab() == demo.train_tokenizer().get_vocab()
    assert len(tok) == len(demo.SPECIAL_TOKENS) + len(demo.FILLER) + len(demo.SPORTS) + len(demo.FINANCE)
    assert tok.pad_token_id == 0
    ids = tok("goal stock")["input_ids"]
    assert ids[0] == tok.cls_token_id and ids[-1] == tok.sep_token_id
    assert tok.unk_token_id not in ids
    assert tok.convert_tokens_to_ids("nothere") == tok.unk_token_id


def test_tokenizer_trained_on_other_texts_keeps_frequent_words():
    tok = demo.train_tokenizer(["a a a b b c"] * 3, vocab_size=len(demo.SPECIAL_TOKENS) + 2)
    assert set(tok.get_vocab()) == set(demo.SPECIAL_TOKENS) | {"a", "b"}


def test_model_is_tiny_seeded_and_leaves_the_global_rng_alone():
    tok = demo.train_tokenizer()
    state = torch.random.get_rng_state()
    m1, m2 = demo.make_model(tok), demo.make_model(tok)
    assert torch.equal(torch.random.get_rng_state(), state)
    for p1, p2 in zip(m1.parameters(), m2.parameters()):
        assert torch.equal(p1, p2)
    assert sum(p.numel() for p in m1.parameters()) < 200_000
    batch = tok(["goal w", "bank loan stock"], padding=True, return_tensors="pt")
    out = m1(**batch, labels=torch.tensor([1, 2]))
    assert out.logits.shape == (2, 3) and torch.isfinite(out.loss)
    assert m1.config.id2label == {0: "other", 1: "sports", 2: "finance"}


def test_regression_model_has_one_output_and_an_mse_loss():
    tok = demo.train_tokenizer()
    model = demo.make_model(tok, num_labels=1, problem_type="regression")
    batch = tok(["goal w", "bank loan stock"], padding=True, return_tensors="pt")
    targets = torch.tensor([0.5, 2.0])
    out = model(**batch, labels=targets)
    assert out.logits.shape == (2, 1) and model.config.problem_type == "regression"
    torch.testing.assert_close(out.loss, torch.nn.functional.mse_loss(out.logits.squeeze(-1), targets))
