"""``hf-loop finetune``'s data: the train split, a validation split (the dataset's, else carved from train,
seeded), the text and label columns, and the tokenizing transform.

Problems found only once the data is loaded (no rows, a missing column, rows without a label) are
``hl.DataError``s naming the flag that fixes them; the command prints them as one line and exits with status 2.
"""

from __future__ import annotations

import math
import zlib
from argparse import Namespace
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa

import hf_loop as hl
from hf_loop import demo
from hf_loop.cli.parser import DEMO_ROWS
from hf_loop.report.labels import LabelSet, describe_missing, label_set, missing_rows

VALIDATION_SPLITS = ("validation", "valid", "dev")
TEXT_COLUMNS = ("text", "sentence", "content", "review", "document")
EVAL_SAMPLE = 2000  # examples of a stream held out for evaluation


class Tokenize:
    """The transform: text -> ``input_ids``, label -> ``labels`` (class ids, or floats for regression), once
    per batch. A class, not a closure, so DataLoader workers started with ``spawn`` can pickle it.

    Example:
        >>> tokenize = Tokenize(demo.train_tokenizer(), "text", "label", LabelSet(False, ("a", "b", "c")), 128)
        >>> tokenize({"text": ["goal stock"], "label": [2]})["labels"]
        [2]
    """

    def __init__(
        self, tokenizer: Any, text_column: str, label_column: str, labels: LabelSet, max_length: int
    ) -> None:
        self.tokenizer, self.text_column, self.label_column = tokenizer, text_column, label_column
        self.labels, self.max_length = labels, max_length

    def __call__(self, batch: Mapping[str, list]) -> dict[str, list]:
        encoded = self.tokenizer(list(batch[self.text_column]), truncation=True, max_length=self.max_length)
        labels = list(batch[self.label_column])
        missing = [i for i, v in enumerate(labels) if v is None or (isinstance(v, float) and math.isnan(v))]
        if missing:  # a stream is only checked as it is read
            raise hl.DataError(
                f"label column {self.label_column!r}: a batch has {len(missing)} row(s) without a label (NaN "
                "or null). Fix: filter them out of the dataset (ds.filter) before training"
            )
        if self.labels.regression:
            labels = [float(v) for v in labels]
        elif self.labels.label2id is not None:
            unknown = [v for v in labels if v not in self.labels.label2id]
            if unknown:
                raise hl.DataError(
                    f"label {unknown[0]!r} was not seen when the label set was built "
                    f"({sorted(self.labels.label2id)}); the stream's held-out sample sets it"
                )
            labels = [self.labels.label2id[v] for v in labels]
        elif labels and not 0 <= min(labels) <= max(labels) < len(self.labels.names):
            raise hl.DataError(
                f"label column {self.label_column!r}: class id {max(labels)} (or {min(labels)}) is outside the "
                f"{len(self.labels.names)} classes seen in the stream's held-out sample. Fix: declare the "
                "classes with a ClassLabel feature (ds.cast_column)"
            )
        return {"input_ids": encoded["input_ids"], "labels": labels}


@dataclass
class Data:
    """The training and validation data of a run, and what the labels are."""

    source: str
    train: Any  # datasets.Dataset or IterableDataset
    val: Any  # datasets.Dataset
    text_column: str
    label_column: str
    labels: LabelSet
    notes: list[str] = field(default_factory=list)

    @property
    def streaming(self) -> bool:
        return not hasattr(self.train, "__getitems__")

    def label_ids(self, ds: Any) -> np.ndarray:
        """Class ids of a map-style split, in its order."""
        return self.labels.ids(arrow_column(ds, self.label_column))

    def targets(self, ds: Any) -> np.ndarray:
        """Regression targets of a map-style split, as float64."""
        return np.asarray(
            arrow_column(ds, self.label_column).to_numpy(zero_copy_only=False), dtype=np.float64
        )


def arrow_column(ds: Any, column: str) -> pa.ChunkedArray:
    return ds.with_format("arrow", columns=[column])[:].column(column)


def _column(ds: Any, given: str | None, candidates: tuple[str, ...], what: str, flag: str) -> str:
    names = list(ds.column_names or [])
    if given is not None:
        if given not in names:
            raise hl.DataError(f"{flag} {given}: no such column; columns: {names}. Fix: {flag} NAME")
        return given
    found = next((c for c in candidates if c in names), None)
    if found is None and what == "text":
        found = next((c for c in names if getattr(ds.features[c], "dtype", None) == "string"), None)
    if found is None:
        raise hl.DataError(f"found no {what} column among {names}. Fix: {flag} NAME")
    return found


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


def datasets_from_rows(rows: Any, features: Any) -> Any:
    import datasets

    rows = list(rows)
    if not rows:
        raise hl.DataError(
            "the validation stream is empty. Fix: pass a dataset with more rows or a larger --val-fraction"
        )
    return datasets.Dataset.from_list(rows, features=features)


def _carve_validation(train: Any, label: str, args: Namespace, notes: list[str]) -> tuple[Any, Any]:
    """Split a validation share off a map-style train split: seeded, stratified by class when every class
    has two rows or more (datasets refuses a stratified split otherwise)."""
    n = len(train)
    val_rows = math.ceil(args.val_fraction * n)
    if n - val_rows < 1:
        raise hl.DataError(
            f"--val-fraction {args.val_fraction} of {n} rows leaves no training rows. Fix: a smaller "
            "--val-fraction, or more rows"
        )
    stratify = None
    if type(train.features[label]).__name__ == "ClassLabel":
        counts = np.bincount(arrow_column(train, label).to_numpy(zero_copy_only=False))
        stratify = label if counts[counts > 0].min() >= 2 and val_rows >= np.count_nonzero(counts) else None
    parts = train.train_test_split(test_size=val_rows, seed=args.seed, stratify_by_column=stratify)
    notes.append(
        f"validation: {val_rows} rows carved from train (--val-fraction {args.val_fraction}, seeded)"
    )
    return parts["train"], parts["test"]


def _check_labels_present(ds: Any, column: str, where: str) -> None:
    """Refuse rows without a label, naming them by their position in the split as loaded."""
    missing = missing_rows(arrow_column(ds, column))
    if missing.size:
        raise hl.DataError(
            f"label column {column!r} of {where}: {describe_missing(missing, len(ds))}. Fix: drop those rows "
            "(ds.filter) or fill them in"
        )


def _labels(train: Any, val: Any, column: str, streaming: bool) -> LabelSet:
    """The label set, from train (a stream: its held-out sample), with the validation labels checked against it."""
    names = getattr((train.features or {}).get(column), "names", None)
    if streaming:
        return label_set(arrow_column(val, column), names, name=column)
    labels = label_set(arrow_column(train, column), names, name=column)
    held_out = arrow_column(val, column)
    if not labels.regression:
        known = set(labels.label2id) if labels.label2id is not None else set(range(len(labels.names)))
        unseen = sorted(set(held_out.to_numpy(zero_copy_only=False).tolist()) - known, key=str)
        if unseen:
            shown = ", ".join(repr(v)[:40] for v in unseen[:3]) + (
                f" and {len(unseen) - 3} more" if len(unseen) > 3 else ""
            )
            raise hl.DataError(
                f"label column {column!r}: the validation split has labels train never has: {shown}. Fix: "
                "a validation split drawn from the same classes, or --val-fraction on train alone"
            )
    return labels


def _load(args: Namespace) -> tuple[Any, str]:
    """What ``--dataset`` (and ``--config``, ``--split``) name, as loaded, and how the header calls it."""
    if args.dataset is None:
        rows = args.num_rows or DEMO_ROWS
        return demo.make_dataset(rows, seed=args.seed), f"embedded demo ({rows} rows)"
    if args.split is None or not any(c in args.split for c in "[+"):
        return hl.load(args.dataset, args.config, streaming=args.streaming), args.dataset
    try:  # "train[:2000]": that slice only
        loaded = hl.load(args.dataset, args.config, split=args.split, streaming=args.streaming)
    except hl.DataError as error:
        if "split syntax" not in str(error):
            raise
        raise hl.DataError(
            f"--split {args.split}: not datasets' split syntax. Fix: e.g. --split 'train[:2000]', "
            "--split 'train[10%:50%]' or --split 'train+validation'"
        ) from None
    return loaded, f"{args.dataset} [{args.split}]"


def _text_and_label(train: Any, args: Namespace) -> tuple[str, str]:
    """The text and label columns: given by the flags, else found by name; the text must be strings."""
    text = _column(train, args.text_column, TEXT_COLUMNS, "text", "--text-column")
    label = _column(train, args.label_column, ("label", "labels"), "label", "--label-column")
    if getattr(train.features[text], "dtype", None) not in ("string", "large_string"):
        raise hl.DataError(
            f"--text-column {text}: the column holds {train.features[text]}, not text. Fix: --text-column NAME "
            "of a string column"
        )
    if label == text:
        raise hl.DataError(
            f"--label-column {label} is also the text column. Fix: --label-column NAME of the labels"
        )
    return text, label


def load_data(args: Namespace) -> Data:
    """The train split, a validation split (the dataset's own, else carved from train), and the label set."""
    notes: list[str] = []
    loaded, source = _load(args)
    val = None
    if hasattr(loaded, "keys"):  # a DatasetDict: pick train, and a validation split when there is one
        split = args.split or "train"
        if split not in loaded:
            raise hl.DataError(f"--split {split}: no such split in {source}; splits: {list(loaded)}")
        val_name = next((s for s in VALIDATION_SPLITS if s in loaded and s != split), None)
        train, val = loaded[split], loaded[val_name] if val_name else None
        notes.append(f"train split {split!r}" + (f", validation split {val_name!r}" if val_name else ""))
    else:
        train = loaded
    streaming = not hasattr(train, "__getitems__")
    if not streaming and len(train) == 0:
        raise hl.DataError(f"--dataset {args.dataset}: {source} has 0 rows. Fix: a split or file with data")
    text, label = _text_and_label(train, args)
    if not streaming:  # before any split, so the rows named are the file's
        _check_labels_present(train, label, f"{source} (train)")
        if val is not None:
            _check_labels_present(val, label, f"{source} (validation)")
    if val is None and streaming:
        pct = args.val_fraction
        val = datasets_from_rows(
            train.filter(HeldOut(text, pct, keep_held_out=True)).take(EVAL_SAMPLE), train.features
        )
        train = train.filter(HeldOut(text, pct, keep_held_out=False))
        notes.append(f"validation: {len(val)} streamed rows held out by a hash of {text!r} ({pct:.0%})")
    elif val is None:
        train, val = _carve_validation(train, label, args, notes)
    elif streaming:
        val = datasets_from_rows(val.take(EVAL_SAMPLE), val.features)
    if len(val) == 0:
        raise hl.DataError(f"the validation split of {source} has 0 rows. Fix: a larger --val-fraction")
    return Data(source, train, val, text, label, _labels(train, val, label, streaming), notes)
