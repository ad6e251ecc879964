"""PackCollator: layout, errors, and loss equality with padded batches on a real (tiny) transformers model."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import hf_loop as hl


def _rows(lengths, seed=0, vocab=64):
    rng = np.random.default_rng(seed)
    return [{"input_ids": rng.integers(1, vocab, n).tolist()} for n in lengths]


def test_single_row_layout():
    out = hl.PackCollator()([{"input_ids": [5, 6, 7], "_index": 4}, {"input_ids": [8, 9], "_index": 2}])
    assert out["input_ids"].tolist() == [[5, 6, 7, 8, 9]]
    assert out["position_ids"].tolist() == [[0, 1, 2, 0, 1]]
    assert out["labels"].tolist() == [[-100, 6, 7, -100, 9]]
    assert out["cu_seq_lens_q"].dtype == torch.int32 and out["cu_seq_lens_q"].tolist() == [0, 3, 5]
    assert out["cu_seq_lens_k"].tolist() == [0, 3, 5]
    assert out["max_length_q"] == out["max_length_k"] == 3
    assert out["_index"].tolist() == [4, 2]
    assert "attention_mask" not in out


def test_given_labels_get_minus_100_at_each_start_and_ones_mask_is_dropped():
    rows = [
        {"input_ids": [5, 6, 7], "labels": [1, 2, 3], "attention_mask": [1, 1, 1]},
        {"input_ids": [8, 9], "labels": [4, 5], "attention_mask": [1, 1]},
    ]
    out = hl.PackCollator()(rows)
    assert out["labels"].tolist() == [[-100, 2, 3, -100, 5]]
    assert "attention_mask" not in out


def test_max_length_rows_first_fit_with_padding_tails():
    rows = [{"input_ids": [1] * n, "_index": i} for i, n in enumerate([3, 4, 1, 2])]
    out = hl.PackCollator(max_length=5, pad_value=0)(rows)
    assert out["input_ids"].shape == (3, 5)
    # first-fit in order: row0 = seq0 (3) + seq2 (1), row1 = seq1 (4), row2 = seq3 (2)
    assert out["_index"].tolist() == [0, 2, 1, 3]
    assert out["position_ids"].tolist() == [[0, 1, 2, 0, 0], [0, 1, 2, 3, 0], [0, 1, 0, 1, 2]]
    assert out["input_ids"].tolist() == [[1, 1, 1, 1, 0], [1, 1, 1, 1, 0], [1, 1, 0, 0, 0]]
    assert out["labels"][0].tolist() == [-100, 1, 1, -100, -100]
    assert out["cu_seq_lens_q"].tolist() == [0, 3, 4, 5, 9, 10, 12, 15]  # tails are their own segments
    assert out["max_length_q"] == 4


def test_too_long_sequence_is_an_error_or_truncated():
    rows = [{"input_ids": [1, 2]}, {"input_ids": list(range(1, 9))}]
    with pytest.raises(ValueError, match=r"row 1 has 8 tokens, more than max_length=4.*truncate=True"):
        hl.PackCollator(max_length=4)(rows)
    out = hl.PackCollator(max_length=4, truncate=True)(rows)
    assert out["input_ids"].tolist() == [[1, 2, 0, 0], [1, 2, 3, 4]]


def test_errors_name_the_problem():
    with pytest.raises(ValueError, match="needs an 'input_ids' field"):
        hl.PackCollator()([{"x": [1]}])
    with pytest.raises(ValueError, match="row 1 has no tokens"):
        hl.PackCollator()([{"input_ids": [1]}, {"input_ids": []}])
    with pytest.raises(ValueError, match="'attention_mask' is not one value per token.*pre-padded"):
        hl.PackCollator()(
            [{"input_ids": [1, 2], "attention_mask": [1, 0]}, {"input_ids": [3], "attention_mask": [1, 1]}]
        )
    with pytest.raises(ValueError, match="builds position_ids itself"):
        hl.PackCollator()([{"input_ids": [1], "position_ids": [0]}])
    with pytest.raises(ValueError, match="max_length must be >= 1, got 0"):
        hl.PackCollator(max_length=0)
    with pytest.raises(TypeError, match="truncate must be True or False, got str 'False'"):
        hl.PackCollator(truncate="False")
    with pytest.raises(TypeError, match="pad_value must be an int, got float 0.0"):
        hl.PackCollator(pad_value=0.0)


@pytest.fixture(scope="module", params=["sdpa", "eager"])
def tiny_llama(request):
    """Both implementations build their mask in masking_utils, which splits packed rows by position_ids."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=128,
        attn_implementation=request.param,
    )
    return LlamaForCausalLM(config).eval()


def _target_loss(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Sum of next-token cross-entropy over real targets, and their count (computed here, not by the model)."""
    logits, targets = logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1)
    return F.cross_entropy(logits.float(), targets, ignore_index=-100, reduction="sum"), int(
        (targets != -100).sum()
    )


def _padded_loss(model, rows):
    batch = hl.PadCollator()([{"input_ids": r["input_ids"], "labels": r["input_ids"]} for r in rows])
    with torch.no_grad():
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)
    return _target_loss(out.logits, batch["labels"])


def _packed_loss(model, batch, **extra):
    with torch.no_grad():
        out = model(
            input_ids=batch["input_ids"],
            position_ids=extra.pop("position_ids", batch["position_ids"]),
            use_cache=False,
            **extra,
        )
    return _target_loss(out.logits, batch["labels"])


@pytest.mark.parametrize("max_length", [None, 24])
def test_packed_loss_equals_padded_loss(tiny_llama, max_length):
    rows = _rows([5, 17, 3, 11, 8, 20])
    padded_sum, padded_count = _padded_loss(tiny_llama, rows)
    packed_sum, packed_count = _packed_loss(tiny_llama, hl.PackCollator(max_length=max_length)(rows))
    assert packed_count == padded_count == sum(len(r["input_ids"]) - 1 for r in rows)
    assert abs(packed_sum / packed_count - padded_sum / padded_count) <= 1e-5


def test_packing_leaks_across_sequences_when_the_conditions_break(tiny_llama):
    rows = _rows([5, 17, 3, 11, 8, 20])
    padded = _padded_loss(tiny_llama, rows)
    padded_mean = padded[0] / padded[1]
    batch = hl.PackCollator()(rows)
    # An attention mask (even all ones) switches transformers to a plain causal mask over the whole row.
    with_mask = _packed_loss(tiny_llama, batch, attention_mask=torch.ones_like(batch["input_ids"]))
    assert abs(with_mask[0] / with_mask[1] - padded_mean) > 1e-3
    # Positions that do not restart hide the sequence boundaries.
    no_restart = _packed_loss(tiny_llama, batch, position_ids=torch.arange(batch["input_ids"].shape[1])[None])
    assert abs(no_restart[0] / no_restart[1] - padded_mean) > 1e-3


def test_packs_arrow_batches_from_map_dataset():
    from datasets import Dataset

    ds = Dataset.from_dict(
        {"input_ids": [[5, 6, 7], [8], [9, 10]], "attention_mask": [[1, 1, 1], [1], [1, 1]], "row": [0, 1, 2]}
    )
    out = hl.PackCollator()(hl.MapDataset(ds).__getitems__([2, 0]))
    assert out["input_ids"].tolist() == [[9, 10, 5, 6, 7]]
    assert out["labels"].tolist() == [[-100, 10, -100, 6, 7]]
    assert out["row"].tolist() == [2, 0] and "attention_mask" not in out
