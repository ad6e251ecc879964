"""``hf-loop finetune``: sequence classification from a dataset (or the embedded demo) to a trained model.

The recipe is the library's own path, step by step: ``hl.load`` -> a validation split (the dataset's, else carved
from train, seeded) -> an on-the-fly tokenizing transform -> ``hl.MapDataset`` / ``hl.StreamDataset`` ->
``hl.make_loader`` with the chosen sampler -> ``hl.train`` -> ``hl.evaluate``. Printing stays in ``__init__.py``.
"""

from __future__ import annotations

import time
import zlib
from argparse import Namespace
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

import numpy as np
import torch

import hf_loop as hl
from hf_loop import demo
from hf_loop.dist import DistEnv, broadcast_object
from hf_loop.report import default_max_tokens, padding_waste

VALIDATION_SPLITS = ("validation", "valid", "dev")
TEXT_COLUMNS = ("text", "sentence", "content", "review", "document")
EVAL_SAMPLE = 2000  # examples of a stream held out for evaluation


class Tokenize:
    """The transform: text -> ``input_ids``, label -> ``labels`` (ids), once per batch. A class, not a closure,
    so DataLoader workers started with ``spawn`` can pickle it.

    Example:
        >>> tokenize = Tokenize(demo.train_tokenizer(), "text", "label", None, max_length=128)
        >>> tokenize({"text": ["goal stock"], "label": [2]})["labels"]
        [2]
    """

    def __init__(
        self,
        tokenizer: Any,
        text_column: str,
        label_column: str,
        label2id: Mapping[Any, int] | None,
        max_length: int,
    ) -> None:
        self.tokenizer, self.text_column, self.label_column = tokenizer, text_column, label_column
        self.label2id, self.max_length = label2id, max_length

    def __call__(self, batch: Mapping[str, list]) -> dict[str, list]:
        encoded = self.tokenizer(list(batch[self.text_column]), truncation=True, max_length=self.max_length)
        labels = list(batch[self.label_column])
        if self.label2id is not None:
            unknown = [label for label in labels if label not in self.label2id]
            if unknown:
                raise hl.DataError(
                    f"label {unknown[0]!r} was not seen when the label set was built ({sorted(self.label2id)})"
                )
            labels = [self.label2id[label] for label in labels]
        return {"input_ids": encoded["input_ids"], "labels": labels}


@dataclass
class Data:
    """The training and validation data of a run, and what the labels are."""

    source: str
    train: Any  # datasets.Dataset or IterableDataset
    val: Any  # datasets.Dataset
    text_column: str
    label_column: str
    label_names: list[str]
    label2id: dict[Any, int] | None  # None: the labels already are ids 0..K-1
    notes: list[str] = field(default_factory=list)

    @property
    def streaming(self) -> bool:
        return not hasattr(self.train, "__getitems__")


def _column(ds: Any, given: str | None, candidates: tuple[str, ...], what: str, flag: str) -> str:
    names = list(ds.column_names or [])
    if given is not None:
        if given not in names:
            raise hl.DataError(f"no {what} column {given!r}; columns: {names}. Fix: {flag} NAME")
        return given
    found = next((c for c in candidates if c in names), None)
    if found is None and what == "text":
        found = next((c for c in names if getattr(ds.features[c], "dtype", None) == "string"), None)
    if found is None:
        raise hl.DataError(f"found no {what} column among {names}. Fix: {flag} NAME")
    return found


def _arrow_values(ds: Any, column: str) -> np.ndarray:
    return ds.with_format("arrow", columns=[column])[:].column(column).to_numpy(zero_copy_only=False)


class HeldOut:
    """Row filter for a stream's validation share. A hash of the text, not a position, decides: the same rows
    are held out on every rank, worker and epoch, and never reach training.

    Example:
        >>> row = {"text": "a b c"}
        >>> HeldOut("text", 0.1, keep_held_out=True)(row) != HeldOut("text", 0.1, keep_held_out=False)(row)
        True
    """

    def __init__(self, text_column: str, fraction: float, *, keep_held_out: bool) -> None:
        self.text_column, self.fraction, self.keep_held_out = text_column, fraction, keep_held_out

    def __call__(self, row: Mapping[str, Any]) -> bool:
        held_out = zlib.crc32(str(row[self.text_column]).encode()) % 10_000 < self.fraction * 10_000
        return held_out == self.keep_held_out


def load_data(args: Namespace) -> Data:
    """The train split, a validation split (the dataset's own, else carved from train), and the label set."""
    notes: list[str] = []
    if args.dataset is None:
        loaded, source = (
            demo.make_dataset(args.num_rows, seed=args.seed),
            f"embedded demo ({args.num_rows} rows)",
        )
    elif args.split is not None and any(c in args.split for c in "[+"):  # "train[:2000]": that slice only
        loaded = hl.load(args.dataset, args.config, split=args.split, streaming=args.streaming)
        source = f"{args.dataset} [{args.split}]"
    else:
        loaded, source = hl.load(args.dataset, args.config, streaming=args.streaming), args.dataset
    val = None
    if hasattr(loaded, "keys"):  # a DatasetDict: pick train, and a validation split when there is one
        split = args.split or "train"
        if split not in loaded:
            raise hl.DataError(f"no split {split!r} in {source}; splits: {list(loaded)}. Fix: --split NAME")
        val_name = next((s for s in VALIDATION_SPLITS if s in loaded and s != split), None)
        train, val = loaded[split], loaded[val_name] if val_name else None
        notes.append(f"train split {split!r}" + (f", validation split {val_name!r}" if val_name else ""))
    else:
        train = loaded
    text = _column(train, args.text_column, TEXT_COLUMNS, "text", "--text-column")
    label = _column(train, args.label_column, ("label", "labels"), "label", "--label-column")
    streaming = not hasattr(train, "__getitems__")
    if val is None and streaming:
        pct = args.val_fraction
        val = datasets_from_rows(
            train.filter(HeldOut(text, pct, keep_held_out=True)).take(EVAL_SAMPLE), train.features
        )
        train = train.filter(HeldOut(text, pct, keep_held_out=False))
        notes.append(f"validation: {len(val)} streamed rows held out by a hash of {text!r} ({pct:.0%})")
    elif val is None:
        feature = train.features[label]
        stratify = label if type(feature).__name__ == "ClassLabel" else None
        parts = train.train_test_split(
            test_size=args.val_fraction, seed=args.seed, stratify_by_column=stratify
        )
        train, val = parts["train"], parts["test"]
        notes.append(
            f"validation: {len(val)} rows carved from train (--val-fraction {args.val_fraction}, seeded)"
        )
    elif streaming:
        val = datasets_from_rows(val.take(EVAL_SAMPLE), val.features)
    names, label2id = _label_set(train, val, label, streaming)
    return Data(source, train, val, text, label, names, label2id, notes)


def datasets_from_rows(rows: Any, features: Any) -> Any:
    import datasets

    rows = list(rows)
    if not rows:
        raise hl.DataError(
            "the validation stream is empty; pass a dataset with more rows or a larger --val-fraction"
        )
    return datasets.Dataset.from_list(rows, features=features)


def _label_set(train: Any, val: Any, column: str, streaming: bool) -> tuple[list[str], dict[Any, int] | None]:
    feature = (train.features or {}).get(column)
    if getattr(feature, "names", None):
        return list(feature.names), None
    seen = _arrow_values(val if streaming else train, column)
    values = np.unique(seen)
    if values.dtype.kind in "iu":
        if values.min() < 0:
            raise hl.DataError(f"labels in {column!r} must be >= 0 class ids, found {values.min()}")
        return [str(i) for i in range(int(values.max()) + 1)], None
    return [str(v) for v in values], {v: i for i, v in enumerate(values.tolist())}


def _label_ids(data: Data, ds: Any) -> np.ndarray:
    """Class ids of a map-style split, in its order (string labels mapped through the label set)."""
    values = _arrow_values(ds, data.label_column)
    if data.label2id is not None:
        return np.array([data.label2id[v] for v in values.tolist()], dtype=np.int64)
    return values.astype(np.int64)


def build_model(args: Namespace, data: Data) -> tuple[Any, Any]:
    """The tokenizer and the model: pretrained from ``--model``, else a tiny BERT with an in-process tokenizer."""
    num_labels = len(data.label_names)
    if args.model is None:
        if args.dataset is None:
            tokenizer = demo.train_tokenizer(max_length=args.max_length)
        else:
            sample = data.val if data.streaming else data.train.select(range(min(20_000, len(data.train))))
            tokenizer = demo.train_tokenizer(
                _arrow_values(sample, data.text_column).tolist(), max_length=args.max_length
            )
        return tokenizer, demo.make_model(tokenizer, num_labels, seed=args.seed)
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(args.model)
    if tokenizer.pad_token is None:  # decoder-only models: padding is masked by position, so eos is safe
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForSequenceClassification.from_pretrained(
        args.model,
        num_labels=num_labels,
        id2label=dict(enumerate(data.label_names)),
        label2id={n: i for i, n in enumerate(data.label_names)},
        ignore_mismatched_sizes=True,  # a new classification head when the checkpoint has another one
    )
    model.config.pad_token_id = tokenizer.pad_token_id
    return tokenizer, model


def build_loaders(
    args: Namespace, data: Data, tokenizer: Any, env: DistEnv
) -> tuple[Any, Any, dict[str, Any]]:
    """Train and eval loaders for the chosen sampler, and what the summary reports about them."""
    transform = Tokenize(tokenizer, data.text_column, data.label_column, data.label2id, args.max_length)
    columns = ["input_ids", "labels"]
    collate = hl.PadCollator.for_tokenizer(tokenizer)
    info: dict[str, Any] = {}
    common = {"collate_fn": collate, "env": env, "num_workers": args.num_workers, "seed": args.seed}
    if data.streaming:
        bucket = "input_ids" if args.sampler in ("length", "tokens") else None
        stream = hl.StreamDataset(
            data.train,
            transform=transform,
            columns=columns,
            shuffle_buffer=1000,
            seed=args.seed,
            bucket=bucket,
        )
        info["plan"] = str(stream.plan(num_workers=args.num_workers, world_size=env.world_size))
        if args.sampler == "tokens":
            # A stream's lengths are unknown up front: size the budget from the held-out sample; truncation at
            # --max-length bounds every example, so the budget never has to grow past it.
            sample = transform(data.val[:])
            lengths = np.array([len(ids) for ids in sample["input_ids"]])
            info["max_tokens"] = args.max_tokens or max(
                default_max_tokens(lengths, args.batch_size), args.max_length
            )
            train = hl.make_loader(stream, max_tokens=info["max_tokens"], **common)
        else:
            train = hl.make_loader(stream, batch_size=args.batch_size, **common)
    else:
        dataset = hl.MapDataset(data.train, transform=transform, columns=columns)
        options: dict[str, Any] = {}
        lengths = (
            dataset.lengths("input_ids")
            if args.sampler in ("length", "tokens") or len(dataset) <= 200_000
            else None
        )
        if args.sampler == "weighted":
            options["weights"] = hl.class_weights(_label_ids(data, data.train))
        if args.sampler in ("length", "tokens"):
            options["lengths"] = lengths
        if args.sampler == "tokens":
            options["max_tokens"] = args.max_tokens or default_max_tokens(lengths, args.batch_size)
            info["max_tokens"] = options["max_tokens"]
        if lengths is not None:
            info["expected_padding"] = {
                k: v["waste"]
                for k, v in padding_waste(lengths, args.batch_size, max_tokens=args.max_tokens).items()
            }
        batch_size = None if args.sampler == "tokens" else args.batch_size
        train = hl.make_loader(dataset, batch_size=batch_size, sampler=args.sampler, **options, **common)
    val = hl.MapDataset(data.val, transform=transform, columns=columns)
    evaluation = hl.make_loader(val, batch_size=2 * args.batch_size, sampler="sequential", **common)
    return train, evaluation, info


def accuracy(predictions: torch.Tensor, labels: torch.Tensor) -> float:
    return (predictions == labels).float().mean().item()


def macro_f1(predictions: torch.Tensor, labels: torch.Tensor) -> float:
    scores = []
    for c in torch.unique(torch.cat([predictions, labels])).tolist():
        tp = ((predictions == c) & (labels == c)).sum().item()
        denominator = (predictions == c).sum().item() + (labels == c).sum().item()
        scores.append(2 * tp / denominator if denominator else 0.0)
    return float(np.mean(scores))


def default_out_dir(env: DistEnv) -> str:
    stamp = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
    return broadcast_object(f"runs/finetune-{stamp}", env)  # every rank writes to rank 0's folder


def run(args: Namespace, env: DistEnv, say: Callable[[str], None]) -> dict[str, Any]:
    """Train and evaluate; returns the numbers of the final summary."""
    data = load_data(args)
    tokenizer, model = build_model(args, data)
    train_loader, eval_loader, info = build_loaders(args, data, tokenizer, env)
    val_labels = torch.tensor(_label_ids(data, data.val))
    if data.streaming:
        majority = int(torch.mode(val_labels).values)
    else:
        majority = int(np.bincount(_label_ids(data, data.train)).argmax())
    baseline = float((val_labels == majority).float().mean())
    lr = args.lr if args.lr is not None else (3e-3 if args.model is None else 5e-5)
    steps = args.max_steps or args.epochs * -(-len(train_loader) // args.grad_accum)
    config = hl.TrainConfig(
        epochs=args.epochs,
        max_steps=args.max_steps,
        grad_accum=args.grad_accum,
        precision=args.precision,
        max_grad_norm=1.0,
        scheduler="linear",
        warmup_steps=max(1, steps // 20),
        out_dir=args.out_dir,
        seed=args.seed,
        log_every=args.log_every,
        progress=False,  # the CLI prints its own log lines
    )
    say(_header(args, data, model, env, steps, lr, info))
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    started = time.perf_counter()
    result = hl.train(
        model,
        train_loader,
        optimizer,
        config,
        eval_loader=eval_loader,
        env=env,
        metrics={"accuracy": accuracy, "macro_f1": macro_f1},
        on_log=lambda record: say(_log_line(record, steps)),
    )
    seconds = time.perf_counter() - started
    metrics = result.eval
    if not metrics:  # the run in out_dir had already finished: report the restored model, not nothing
        metrics = hl.evaluate(
            model, eval_loader, env=env, metrics={"accuracy": accuracy, "macro_f1": macro_f1}
        )
    return {
        "data": data,
        "result": result,
        "eval": metrics,
        "baseline": baseline,
        "majority": data.label_names[majority],
        "seconds": seconds,
        "info": info,
        "out_dir": args.out_dir,
    }


def _header(args: Namespace, data: Data, model: Any, env: DistEnv, steps: int, lr: float, info: dict) -> str:
    size = "stream" if data.streaming else f"{len(data.train)} train rows"
    params = sum(p.numel() for p in model.parameters())
    lines = [
        f"data: {data.source} - {size}, {len(data.val)} validation rows; text {data.text_column!r}, "
        f"label {data.label_column!r} ({len(data.label_names)} classes: {', '.join(data.label_names[:8])})",
        *(f"      {note}" for note in data.notes),
        f"model: {args.model or 'tiny BERT from a config (demo)'} - {params:,} parameters, {type(model).__name__}",
        f"training: {steps} optimizer steps, batch {args.batch_size} x {env.world_size} rank(s) x grad_accum "
        f"{args.grad_accum}, sampler {args.sampler}"
        + (f" (max_tokens {info['max_tokens']})" if "max_tokens" in info else "")
        + f", lr {lr:g}, {args.precision}, device {env.device}",
    ]
    if "plan" in info:
        lines.append(info["plan"])
    return "\n".join(lines)


def _log_line(record: Mapping[str, Any], steps: int) -> str:
    if "eval_loss" in record:
        extra = "".join(
            f"  {k[5:]} {v:.4f}"
            for k, v in record.items()
            if k.startswith("eval_") and k not in ("eval_loss", "eval_examples")
        )
        return f"step {record['step']:>5}/{steps}  eval loss {record['eval_loss']:.4f}{extra}"
    padding = record.get("padding")
    return (
        f"step {record['step']:>5}/{steps}  loss {record['loss']:.4f}  lr {record['lr']:.2e}  "
        f"{record.get('samples_per_s', 0):7.1f} samples/s"
        + ("" if padding is None else f"  padding {padding:.1%}")
    )
