"""Your own training loop, with hf_loop only for the data path: adapter, collator, sampler.

The seed-style loop - zero_grad, forward, loss, backward, step - stays yours; hf_loop gives it batched on-the-fly
tokenization (``hl.MapDataset``), fast padding with a position-based attention mask (``hl.PadCollator``) and a
seeded, resumable length-grouped order (``hl.LengthGroupedSampler``) in a plain ``torch.utils.data.DataLoader``.

    python examples/plain_loop.py --max-steps 100
    python examples/plain_loop.py --dataset stanfordnlp/imdb --model distilbert-base-uncased
"""

from __future__ import annotations

import argparse

import torch
from torch.utils.data import BatchSampler, DataLoader

import hf_loop as hl
from hf_loop import demo


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--dataset", help="Hub id or local path with 'text' and 'label' columns (default: demo data)"
    )
    parser.add_argument("--model", help="pretrained model name or path (default: a tiny BERT from a config)")
    parser.add_argument("--num-rows", type=int, default=2000, help="rows of the demo data (default: 2000)")
    parser.add_argument("--max-steps", type=int, default=100)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=32)
    args = parser.parse_args(argv)
    torch.manual_seed(0)

    ds = demo.make_dataset(args.num_rows) if args.dataset is None else hl.load(args.dataset, split="train")
    parts = ds.train_test_split(test_size=0.1, seed=0)
    num_labels = len(set(parts["train"]["label"]))
    if (
        args.model is None
    ):  # a word-level tokenizer trained here, on the demo vocabulary or the dataset's texts
        tokenizer = demo.train_tokenizer(None if args.dataset is None else list(ds["text"]))
        model = demo.make_model(tokenizer, num_labels=num_labels)
    else:
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(args.model)
        model = AutoModelForSequenceClassification.from_pretrained(args.model, num_labels=num_labels)
    print(hl.count_parameters(model, depth=1))

    def tokenize(batch):
        ids = tokenizer(batch["text"], truncation=True, max_length=256)["input_ids"]
        return {"input_ids": ids, "label": batch["label"]}

    # hf_loop's data path in a plain DataLoader.
    train = hl.MapDataset(parts["train"], transform=tokenize)
    test = hl.MapDataset(parts["test"], transform=tokenize)
    collate = hl.PadCollator.for_tokenizer(tokenizer)
    sampler = hl.LengthGroupedSampler(train.lengths("input_ids"), batch_size=args.batch_size, seed=0)
    loader = DataLoader(
        train, batch_sampler=BatchSampler(sampler, args.batch_size, drop_last=False), collate_fn=collate
    )

    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3 if args.model is None else 5e-5)
    model.train()
    step = 0
    for epoch in range(args.epochs):
        sampler.set_epoch(epoch)  # a new, seeded order each epoch
        for batch in loader:
            optimizer.zero_grad()
            outputs = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
            loss = torch.nn.functional.cross_entropy(outputs.logits, batch["labels"])
            loss.backward()
            optimizer.step()
            step += 1
            if step % 20 == 0 or step == args.max_steps:
                print(f"epoch {epoch} step {step}: loss {loss.item():.4f}")
            if step == args.max_steps:
                break
        if step == args.max_steps:
            break

    # Predict under no_grad, in dataset order (a sequential sampler over the test split).
    model.eval()
    test_loader = DataLoader(
        test, batch_sampler=BatchSampler(hl.SequentialSampler(len(test)), 64, False), collate_fn=collate
    )
    correct = 0
    with torch.no_grad():
        for batch in test_loader:
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            correct += (logits.argmax(-1) == batch["labels"]).sum().item()
    print(f"test accuracy {correct / len(test):.3f} on {len(test)} examples after {step} steps")


if __name__ == "__main__":
    main()
