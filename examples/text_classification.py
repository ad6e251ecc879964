"""Text classification: tokenize on the fly, class-weighted sampling, fine-tune, evaluate, predict.

Offline it trains a tiny BERT on hf_loop's embedded demo data (imbalanced: ~60/30/10%); online, name a Hub
dataset and a pretrained model:

    python examples/text_classification.py --max-steps 200
    python examples/text_classification.py --dataset stanfordnlp/imdb --model distilbert-base-uncased
"""

from __future__ import annotations

import argparse

import numpy as np
import torch

import hf_loop as hl
from hf_loop import demo


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--dataset", help="Hub id or local path with 'text' and 'label' columns (default: demo data)"
    )
    parser.add_argument("--model", help="pretrained model name or path (default: a tiny BERT from a config)")
    parser.add_argument("--num-rows", type=int, default=3000, help="rows of the demo data (default: 3000)")
    parser.add_argument("--max-steps", type=int, default=150, help="optimizer steps (default: 150)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--out-dir", default=None, help="checkpoints and metrics.jsonl; resumes from it")
    args = parser.parse_args(argv)

    # 1. Data: a train split and a seeded validation split carved from it.
    ds = demo.make_dataset(args.num_rows) if args.dataset is None else hl.load(args.dataset, split="train")
    parts = ds.train_test_split(test_size=0.1, seed=0)
    train, val = parts["train"], parts["test"]
    num_labels = len(set(val["label"]) | set(train.select(range(min(len(train), 5000)))["label"]))

    # 2. Tokenizer and model.
    if (
        args.model is None
    ):  # a word-level tokenizer trained here, on the demo vocabulary or the dataset's texts
        tokenizer = demo.train_tokenizer(None if args.dataset is None else list(ds["text"]))
        model = demo.make_model(tokenizer, num_labels=num_labels)
    else:
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(args.model)
        model = AutoModelForSequenceClassification.from_pretrained(args.model, num_labels=num_labels)

    # 3. Tokenize on the fly: called once per batch with a dict of columns, returning the columns the batch
    #    keeps (set_transform semantics); "label" becomes "labels", the name transformers models expect.
    def tokenize(batch):
        ids = tokenizer(batch["text"], truncation=True, max_length=256)["input_ids"]
        return {"input_ids": ids, "label": batch["label"]}

    train_ds = hl.MapDataset(train, transform=tokenize, columns=["input_ids", "label"])
    val_ds = hl.MapDataset(val, transform=tokenize, columns=["input_ids", "label"])
    collate = hl.PadCollator.for_tokenizer(tokenizer)

    # 4. Class-weighted sampling: every class is drawn equally often.
    labels = np.asarray(train["label"])
    weights = hl.class_weights(labels)
    print(
        "train label counts:",
        np.bincount(labels).tolist(),
        "-> weight per example:",
        np.unique(weights).round(5),
    )
    train_loader = hl.make_loader(
        train_ds, batch_size=args.batch_size, sampler="weighted", weights=weights, collate_fn=collate, seed=0
    )
    val_loader = hl.make_loader(val_ds, batch_size=64, sampler="sequential", collate_fn=collate)

    # 5. Fine-tune, then evaluate.
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3 if args.model is None else 5e-5)
    config = hl.TrainConfig(
        max_steps=args.max_steps,
        scheduler="linear",
        warmup_steps=10,
        out_dir=args.out_dir,
        log_every=max(1, args.max_steps // 5),
        progress=False,
    )
    result = hl.train(
        model,
        train_loader,
        optimizer,
        config,
        on_log=lambda r: print(f"step {r['step']}: loss {r['loss']:.4f}") if "loss" in r else None,
    )

    def accuracy(predictions, targets):
        return (predictions == targets).float().mean().item()

    metrics = hl.evaluate(model, val_loader, metrics={"accuracy": accuracy})
    majority = float(np.mean(np.asarray(val["label"]) == np.bincount(labels).argmax()))
    print(
        f"trained {result.steps} steps; eval loss {metrics['loss']:.4f}, accuracy {metrics['accuracy']:.3f} "
        f"(majority class: {majority:.3f})"
    )

    # 6. Predict: outputs come back in dataset order, padding removed.
    predictions = hl.predict(model, val_loader, reduce="argmax")
    print("first predictions:", predictions[:10].tolist(), "labels:", list(val["label"][:10]))


if __name__ == "__main__":
    main()
