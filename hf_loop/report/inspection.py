"""``inspect``: load or take a dataset, measure it, and build its :class:`DataReport` (``hf-loop inspect``)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from hf_loop.errors import DataError
from hf_loop.report.labels import describe_missing, is_regression, missing_rows
from hf_loop.report.numbers import DataReport
from hf_loop.report.plots import plot_lengths


def _is_text(ds: Any, column: str) -> bool:
    return getattr((ds.features or {}).get(column), "dtype", None) in ("string", "large_string")


def _arrow_column(ds: Any, column: str) -> Any:
    """One column as Arrow, in dataset order (a select/shuffle view's indices applied), without Python rows."""
    return ds.with_format("arrow", columns=[column])[:].column(column)


def measure(ds: Any, column: str, tokenizer: Any = None) -> tuple[np.ndarray, str]:
    """Per-example lengths of ``column`` in a map-style dataset, and their unit.

    A list column is measured from its Arrow offsets; a text column is tokenized in large batches when a
    tokenizer is given (the number of tokens the model would see), else counted in whitespace-separated words.
    """
    from hf_loop.data import MapDataset

    if column not in ds.column_names:
        raise DataError(f"no column {column!r} to measure; columns: {ds.column_names}. Fix: --column NAME")
    if not _is_text(ds, column):
        if not pa.types.is_list(_arrow_column(ds, column).type) and not pa.types.is_large_list(
            _arrow_column(ds, column).type
        ):
            raise DataError(
                f"column {column!r} holds {ds.features[column]}, which has no length per row. Fix: --column with "
                "text or token ids"
            )
        unit = "tokens" if column in ("input_ids", "labels") else "items"
        return MapDataset(ds, rename_label=False).lengths(column), unit
    if tokenizer is None:
        text = _arrow_column(ds, column)
        words = pc.count_substring_regex(text, r"\S+").fill_null(0)
        return np.asarray(words, dtype=np.int64), "words"

    def tokenize(batch: Mapping[str, Any]) -> dict[str, Any]:
        return {"input_ids": tokenizer(list(batch[column]), truncation=True)["input_ids"]}

    return MapDataset(ds, transform=tokenize, rename_label=False).lengths("input_ids"), "tokens"


def _pick_split(ds: Any, split: str | None, notes: list[str]) -> tuple[Any, str | None]:
    import datasets

    if not isinstance(ds, (datasets.DatasetDict, datasets.IterableDatasetDict)):
        return ds, split
    if split is not None:
        if split not in ds:
            raise DataError(
                f"unknown split {split!r}; available splits: {list(ds)}. Fix: --split {next(iter(ds))}"
            )
        return ds[split], split
    chosen = "train" if "train" in ds else next(iter(ds))
    notes.append(f"split {chosen!r} of {list(ds)} (choose with --split)")
    return ds[chosen], chosen


def _pick_column(ds: Any, column: str | None) -> str:
    names = list(ds.column_names or [])
    if column is not None:
        return column
    for candidate in ("input_ids", "text", "sentence", "content"):
        if candidate in names:
            return candidate
    texts = [c for c in names if _is_text(ds, c)]
    if not texts:
        raise DataError(f"found no token or text column to measure among {names}. Fix: --column NAME")
    return texts[0]


def _pick_labels(ds: Any, label_column: str | None) -> str | None:
    if label_column is not None:
        if label_column not in ds.column_names:
            raise DataError(f"no label column {label_column!r}; columns: {ds.column_names}")
        return label_column
    return next((c for c in ("label", "labels") if c in (ds.column_names or [])), None)


def inspect(
    dataset: Any,
    *,
    name: str | None = None,
    split: str | None = None,
    column: str | None = None,
    label_column: str | None = None,
    tokenizer: Any = None,
    batch_size: int = 32,
    max_tokens: int | None = None,
    streaming: bool = False,
    world_size: int = 1,
    num_workers: int = 0,
    out: str | Path | None = ".",
    sample: int = 10_000,
    seed: int = 0,
) -> DataReport:
    """Build the data report for a dataset (name, path, or a loaded ``datasets`` object).

    Args:
        dataset: anything :func:`hl.load` takes, or a ``Dataset`` / ``IterableDataset`` (or a dict of them).
        name, split: the config and split; by default "train" (or the first split).
        column: what to measure; default ``input_ids``, else the first text column.
        label_column: default ``label``/``labels`` when present.
        tokenizer: a tokenizer, or a name/path for ``AutoTokenizer``, to count tokens of a text column.
        batch_size, max_tokens: the batching whose padding is computed (``max_tokens`` for token-budget).
        streaming: read lazily; lengths and labels then come from the first ``sample`` examples, and the
            report shows the shard plan for ``world_size`` x ``num_workers`` readers.
        out: folder for ``lengths.png``; None skips the plot.
        seed: the samplers' seed.

    Example:
        >>> print(inspect("org/name", tokenizer="bert-base-uncased", out=None, streaming=True, world_size=2,
        ...               num_workers=2))
        dataset: org/name [train]
        lengths of 'text' (tokens), 60 examples, 872 in all:
        ...
        shard plan, epoch 0: 2 rank(s) x 2 reader(s) over 2 shards, split by rows
          rank 0 worker 0: 1 shard(s) [0[0:15]], 15 examples
          rank 0 worker 1: 1 shard(s) [0[15:30]], 15 examples
          rank 1 worker 0: 1 shard(s) [1[0:15]], 15 examples
          rank 1 worker 1: 1 shard(s) [1[15:30]], 15 examples
        note: split 'train' of ['train', 'test'] (choose with --split)
        note: streamed: lengths and labels from the first 60 examples
    """
    from hf_loop.hub import load

    notes: list[str] = []
    source = (
        str(dataset) + (f" ({name})" if name else "")
        if isinstance(dataset, (str, Path))
        else type(dataset).__name__
    )
    if isinstance(dataset, (str, Path)):
        dataset = load(dataset, name, split=split, streaming=streaming)
    ds, split = _pick_split(dataset, split, notes)
    if isinstance(tokenizer, (str, Path)):
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(str(tokenizer))
    plan = None
    if not hasattr(ds, "__getitems__"):  # a stream: measure a prefix, show how readers would split it
        import datasets

        from hf_loop.stream import StreamDataset

        try:
            plan = StreamDataset(ds).plan(num_workers=num_workers, world_size=world_size)
        except DataError as error:  # the layout cannot work: say why in the report, keep the other numbers
            notes.append(f"no shard plan for world size {world_size} x {num_workers} worker(s): {error}")

        rows = list(ds.take(sample))
        if not rows:
            raise DataError(f"the stream {source!r} is empty")
        ds = datasets.Dataset.from_list(rows, features=ds.features)
        notes.append(f"streamed: lengths and labels from the first {len(rows)} examples")
    column = _pick_column(ds, column)
    lengths, unit = measure(ds, column, tokenizer)
    if max_tokens is not None and lengths.size and max_tokens < lengths.max():
        raise DataError(
            f"max_tokens {max_tokens} is below the longest example ({lengths.max()} {unit}): it would fit no "
            f"batch. Fix: --max-tokens {lengths.max()} or more"
        )
    label_column = _pick_labels(ds, label_column)
    labels = names = None
    if label_column is not None:
        values = _arrow_column(ds, label_column)
        names = getattr(ds.features[label_column], "names", None)
        missing = missing_rows(values)
        if pa.types.is_nested(values.type):
            notes.append(
                f"label column {label_column!r} holds {values.type}, not one label per row: no class balance"
            )
            values = values.slice(0, 0)
        elif missing.size:
            notes.append(f"label column {label_column!r}: {describe_missing(missing, len(values))}")
            values = values.filter(pc.invert(pc.is_null(values, nan_is_null=True)))
        if is_regression(values):  # class balance would list every distinct value
            notes.append(
                f"label column {label_column!r} holds floats: regression targets (hf-loop finetune trains an "
                "MSE head), no class balance"
            )
        elif len(values):
            labels = values.to_numpy(zero_copy_only=False)
    report = DataReport.from_lengths(
        lengths,
        batch_size=batch_size,
        max_tokens=max_tokens,
        labels=labels,
        label_names=names,
        seed=seed,
        source=source + (f" [{split}]" if split else ""),
        column=column,
        unit=unit,
    )
    report.label_column, report.plan, report.notes = label_column, plan, notes
    if out is not None:
        try:
            report.histogram = str(
                plot_lengths(lengths, Path(out) / "lengths.png", title=report.source, unit=unit)
            )
        except ImportError as error:
            notes.append(f"no histogram: {error}")
    return report
