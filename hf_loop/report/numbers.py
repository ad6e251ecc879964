"""The numbers of a data report: length summary, padding waste per sampling strategy, label balance."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, is_dataclass
from typing import Any

import numpy as np

from hf_loop import samplers as hs

STRATEGIES = ("random", "length", "tokens")


def length_summary(lengths: Sequence[int] | np.ndarray) -> dict[str, float]:
    """Count, total, mean, min, percentiles (50/90/99) and max of per-example lengths.

    Example:
        >>> length_summary([1, 2, 3, 10])["p50"], length_summary([1, 2, 3, 10])["max"]
        (2.5, 10)
    """
    array = np.asarray(lengths, dtype=np.int64)
    if array.ndim != 1 or array.size == 0:
        raise ValueError(f"lengths must be a non-empty 1-D sequence, got shape {array.shape}")
    p50, p90, p99 = np.percentile(array, [50, 90, 99]).tolist()
    return {
        "count": int(array.size),
        "total": int(array.sum()),
        "mean": round(float(array.mean()), 2),
        "min": int(array.min()),
        "p50": round(p50, 2),
        "p90": round(p90, 2),
        "p99": round(p99, 2),
        "max": int(array.max()),
    }


def batch_waste(
    lengths: np.ndarray, batches: Sequence[Sequence[int]] | Sequence[np.ndarray]
) -> dict[str, float]:
    """Padding of a list of batches, each padded to its longest example.

    A batch of n examples pads ``n * max(len)`` slots for ``sum(len)`` real tokens; the waste over all batches is
    ``1 - real / padded`` (token-weighted, as the compute is).

    Example:
        >>> batch_waste(np.array([2, 4, 4, 4]), [[0, 1], [2, 3]])["waste"]   # (2+4+4+4) / (8+8)
        0.125
    """
    lengths = np.asarray(lengths, dtype=np.int64)
    sizes = np.fromiter((len(b) for b in batches), dtype=np.int64, count=len(batches))
    if sizes.size == 0 or sizes.min() == 0:
        raise ValueError("batches must be a non-empty list of non-empty batches")
    flat = lengths[np.concatenate([np.asarray(b, dtype=np.int64) for b in batches])]
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    longest = np.maximum.reduceat(flat, starts)
    real, padded = int(flat.sum()), int((longest * sizes).sum())
    return {
        "waste": 1.0 - real / padded if padded else 0.0,
        "batches": int(sizes.size),
        "mean_batch_size": round(float(sizes.mean()), 2),
        "real_tokens": real,
        "padded_tokens": padded,
    }


def default_max_tokens(lengths: np.ndarray, batch_size: int) -> int:
    """A token budget as large as an average batch of ``batch_size`` examples, never below the longest one."""
    return max(int(math.ceil(batch_size * float(np.mean(lengths)))), int(np.max(lengths)))


def padding_waste(
    lengths: Sequence[int] | np.ndarray,
    batch_size: int = 32,
    *,
    max_tokens: int | None = None,
    seed: int = 0,
    megabatch: int = 50,
) -> dict[str, dict[str, float]]:
    """Padding each strategy would cost over one epoch, from hf_loop's own samplers run on ``lengths``.

    ``random``: ``RandomSampler`` cut into batches of ``batch_size``; ``length``: ``LengthGroupedSampler``;
    ``tokens``: ``TokenBudgetBatchSampler`` with ``max_tokens`` (default: the tokens of an average batch).
    ``compute`` is each strategy's padded tokens relative to random batching (lower is faster).

    Example:
        >>> waste = padding_waste([5] * 64, batch_size=8)
        >>> [round(waste[s]["waste"], 3) for s in ("random", "length", "tokens")]
        [0.0, 0.0, 0.0]
    """
    array = np.asarray(lengths, dtype=np.int64)
    if array.ndim != 1 or array.size == 0:
        raise ValueError(f"lengths must be a non-empty 1-D sequence, got shape {array.shape}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    budget = default_max_tokens(array, batch_size) if max_tokens is None else int(max_tokens)
    random_order = hs.RandomSampler(array.size, seed=seed).order(0)
    length_order = hs.LengthGroupedSampler(array, batch_size, seed=seed, megabatch=megabatch).order(0)
    chunks = list(range(batch_size, array.size, batch_size))
    out = {
        "random": batch_waste(array, np.split(random_order, chunks)),
        "length": batch_waste(array, np.split(length_order, chunks)),
        "tokens": batch_waste(
            array, hs.TokenBudgetBatchSampler(array, budget, seed=seed, megabatch=megabatch).order(0)
        ),
    }
    out["tokens"]["max_tokens"] = budget
    base = out["random"]["padded_tokens"]
    for row in out.values():
        row["compute"] = round(row["padded_tokens"] / base, 4)
    return out


def label_balance(
    labels: Sequence[Any] | np.ndarray, names: Sequence[str] | None = None, *, power: float = 1.0
) -> list[dict[str, Any]]:
    """Per class: count, share, the weight ``hl.class_weights`` gives each of its examples, and the share of
    draws it gets under ``sampler="weighted"`` with those weights.

    Example:
        >>> [row["drawn_share"] for row in label_balance([0, 0, 0, 1])]
        [0.5, 0.5]
    """
    array = np.asarray(labels)
    weights = hs.class_weights(array, power=power)
    classes, inverse, counts = np.unique(array, return_inverse=True, return_counts=True)
    drawn = np.bincount(inverse.reshape(-1), weights=weights, minlength=classes.size)
    rows = []
    for i, label in enumerate(classes.tolist()):
        name = (
            names[label] if names is not None and isinstance(label, int) and 0 <= label < len(names) else None
        )
        rows.append(
            {
                "label": label,
                "name": name,
                "count": int(counts[i]),
                "share": round(float(counts[i] / array.size), 4),
                "weight": float(weights[inverse.reshape(-1) == i][0]),
                "drawn_share": round(float(drawn[i]), 4),
            }
        )
    return rows


@dataclass
class DataReport:
    """Everything ``hf-loop inspect`` shows; ``str(report)`` is the text form, ``to_dict()`` the JSON form.

    Example:
        >>> report = DataReport.from_lengths([3, 5, 8, 13], batch_size=2)
        >>> report.padding["random"]["waste"] >= report.padding["length"]["waste"]
        True
    """

    source: str
    column: str
    unit: str
    batch_size: int
    lengths: dict[str, float]
    padding: dict[str, dict[str, float]]
    labels: list[dict[str, Any]] | None = None
    label_column: str | None = None
    plan: Any = None
    histogram: str | None = None
    notes: list[str] = field(default_factory=list)

    @classmethod
    def from_lengths(
        cls,
        lengths: Sequence[int] | np.ndarray,
        *,
        batch_size: int = 32,
        max_tokens: int | None = None,
        labels: Sequence[Any] | None = None,
        label_names: Sequence[str] | None = None,
        seed: int = 0,
        source: str = "",
        column: str = "input_ids",
        unit: str = "tokens",
    ) -> DataReport:
        """Build the report from per-example lengths (and labels, when there are any)."""
        array = np.asarray(lengths, dtype=np.int64)
        return cls(
            source=source,
            column=column,
            unit=unit,
            batch_size=batch_size,
            lengths=length_summary(array),
            padding=padding_waste(array, batch_size, max_tokens=max_tokens, seed=seed),
            labels=None if labels is None else label_balance(labels, label_names),
        )

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        if is_dataclass(self.plan):
            out["plan"] = asdict(self.plan)
        elif self.plan is not None:
            out["plan"] = str(self.plan)
        return out

    def __str__(self) -> str:
        s = self.lengths
        lines = [
            f"dataset: {self.source}",
            f"lengths of {self.column!r} ({self.unit}), {s['count']} examples, {s['total']} in all:",
            f"  min {s['min']}  p50 {s['p50']:g}  mean {s['mean']:g}  p90 {s['p90']:g}  p99 {s['p99']:g}  "
            f"max {s['max']}",
            f"padding at batch size {self.batch_size} (one epoch, hf_loop's samplers):",
        ]
        described = {
            "random": "random",
            "length": "length-grouped",
            "tokens": f"token-budget (max_tokens={self.padding['tokens'].get('max_tokens')})",
        }
        for name in STRATEGIES:
            row = self.padding[name]
            lines.append(
                f"  {described[name]:<36} waste {row['waste']:6.1%}   {row['batches']:>6} batches of "
                f"{row['mean_batch_size']:g} on average   compute x{row['compute']:.2f}"
            )
        if self.labels is not None:
            lines.append(
                f"labels ({self.label_column}): {len(self.labels)} classes; weights of class_weights()"
            )
            for row in self.labels:
                name = f"{row['label']}" + (f" ({row['name']})" if row["name"] else "")
                lines.append(
                    f"  {name:<22} {row['count']:>8} ({row['share']:6.1%})   weight {row['weight']:.3g}   "
                    f"drawn {row['drawn_share']:6.1%} under sampler='weighted'"
                )
        if self.plan is not None:
            lines.append(str(self.plan))
        if self.histogram:
            lines.append(f"histogram: {self.histogram}")
        lines.extend(f"note: {note}" for note in self.notes)
        return "\n".join(lines)
