"""Tiny models and data for the loop tests, and a training script the kill -9 tests run as a subprocess.

    python tests/_train_script.py OUT_DIR

trains a tiny BERT classifier (dropout on, num_workers=2, a random augmentation in the transform) with
checkpoints every 2 steps, and writes OUT_DIR/final_weights.pt at the end. Environment variables make it die
on purpose: HF_LOOP_TEST_KILL_AT_STEP=k sends SIGKILL to itself when step k is logged; HF_LOOP_TEST_KILL_IN_SAVE=n
sends it halfway through writing the n-th checkpoint of this process (in its second file).
"""

from __future__ import annotations

import io
import os
import signal
import sys

import numpy as np
import torch

VOCAB = 64


def token_rows(n: int = 64, *, seed: int = 0, min_len: int = 3, max_len: int = 24) -> dict[str, list]:
    """Pre-tokenized rows of varied length; the label is learnable (is the first token in the lower half?)."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(min_len, max_len + 1, n)
    ids = [rng.integers(5, VOCAB, int(k)).tolist() for k in lengths]
    return {
        "input_ids": ids,
        "label": [int(row[0] < VOCAB // 2) for row in ids],
        "id": [f"r{i}" for i in range(n)],
    }


def classification_dataset(n: int = 64, seed: int = 0):
    from datasets import Dataset

    import hf_loop as hl

    return hl.MapDataset(Dataset.from_dict(token_rows(n, seed=seed)))


def lm_dataset(n: int = 32, seed: int = 0):
    """Causal LM rows: labels are the input ids (the model shifts them)."""
    from datasets import Dataset

    import hf_loop as hl

    rows = token_rows(n, seed=seed)
    return hl.MapDataset(Dataset.from_dict({"input_ids": rows["input_ids"], "labels": rows["input_ids"]}))


def tiny_bert(dropout: float = 0.0, seed: int = 0, num_labels: int = 2):
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
        num_labels=num_labels,
        hidden_dropout_prob=dropout,
        attention_probs_dropout_prob=dropout,
    )
    return BertForSequenceClassification(config)


def tiny_llama(seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=64,
        pad_token_id=0,
    )
    return LlamaForCausalLM(config)


def augment(batch: dict, rng: np.random.Generator) -> dict:
    """Randomly replace ~10% of tokens (seeded per batch by MapDataset, so it survives resume)."""
    ids = [
        [t if rng.random() > 0.1 else int(rng.integers(5, VOCAB)) for t in row] for row in batch["input_ids"]
    ]
    return {"input_ids": ids, "labels": batch["label"]}


def weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


FILES_PER_CHECKPOINT = 4  # model.pt, optimizer.pt, train.pt, rank-00000.pt (one process)


def _die_in_save(n: int) -> None:
    """Replace torch.save so that, in the n-th checkpoint, the second file gets half its bytes, then SIGKILL."""
    original = torch.save
    calls = {"n": 0}
    fatal = (n - 1) * FILES_PER_CHECKPOINT + 2

    def save(obj, f, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] < fatal:
            return original(obj, f, *args, **kwargs)
        buffer = io.BytesIO()
        original(obj, buffer, *args, **kwargs)
        data = buffer.getvalue()
        f.write(data[: len(data) // 2])
        f.flush()
        os.kill(os.getpid(), signal.SIGKILL)

    torch.save = save


def main(out_dir: str) -> None:
    from datasets import Dataset

    import hf_loop as hl

    torch.set_num_threads(1)  # the test machine's cores are shared; one thread keeps runs steady
    if "HF_LOOP_TEST_KILL_IN_SAVE" in os.environ:
        _die_in_save(int(os.environ["HF_LOOP_TEST_KILL_IN_SAVE"]))
    kill_at = int(os.environ.get("HF_LOOP_TEST_KILL_AT_STEP", "-1"))

    def on_log(record: dict) -> None:
        if record.get("step") == kill_at and "loss" in record:
            os.kill(os.getpid(), signal.SIGKILL)

    dataset = hl.MapDataset(Dataset.from_dict(token_rows(48)), transform=augment)
    loader = hl.make_loader(dataset, batch_size=8, sampler="random", seed=3, num_workers=2)
    model = tiny_bert(dropout=0.1)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    config = hl.TrainConfig(
        epochs=3,
        grad_accum=2,
        checkpoint_every=2,
        out_dir=out_dir,
        log_every=1,
        progress=True,  # a tqdm bar only when stderr is a terminal (the reference run's is)
        scheduler="linear",
        warmup_steps=2,
        max_grad_norm=1.0,
        keep_last=2,
        export=False,
    )
    hl.train(model, loader, optimizer, config, on_log=on_log)
    torch.save(weights(model), os.path.join(out_dir, "final_weights.pt"))


if __name__ == "__main__":
    main(sys.argv[1])
