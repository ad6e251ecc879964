"""Evaluation, prediction and the parameter table.

Under DDP the ranks evaluate disjoint shares of the data without padding: a Loader's :meth:`~hf_loop.Loader.unpadded`
twin gives every row to exactly one rank (ranks' shares differ by at most one batch), and its
:meth:`~hf_loop.Loader.indexed` pairs carry each batch's dataset row indices from the batch sampler, outside the
batch. The loss is the sum of the batches' loss sums over the sum of their target counts, over all ranks — exact;
predictions and labels are gathered and put back in dataset order by those indices.
"""

from __future__ import annotations

import itertools
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from hf_loop.dist import DistEnv, all_gather_object, all_reduce, batch_size_of, default_device
from hf_loop.feed import staged
from hf_loop.fsdp import is_sharded, param_dtype
from hf_loop.loader import Loader
from hf_loop.steps import ModelInputs, autocast, call_loss_fn, count_targets, loss_of, unwrap

Reduce = str | Callable[[Any, Mapping[str, Any]], Any] | None


def _logits(outputs: Any) -> torch.Tensor | None:
    if isinstance(outputs, torch.Tensor):
        return outputs
    if isinstance(outputs, Mapping):
        return outputs.get("logits")
    return getattr(outputs, "logits", None)


def _reduced(outputs: Any, batch: Mapping[str, Any], reduce: Reduce) -> Any:
    if callable(reduce):
        return reduce(outputs, batch)
    logits = _logits(outputs)
    if logits is None:
        raise ValueError(
            f"predict needs the model to return logits (or a tensor); got {type(outputs).__name__}. "
            "Pass reduce=lambda outputs, batch: ... to choose what to keep."
        )
    if reduce == "argmax":
        return logits.argmax(-1)
    if reduce is None:
        return logits
    raise ValueError(
        f"reduce must be None, 'argmax' or a callable (outputs, batch) -> tensor, got {reduce!r}"
    )


def _rows(value: torch.Tensor, mask: torch.Tensor | None) -> list[torch.Tensor]:
    """Split a batch tensor into per-example rows; sequences are cut to their real (unpadded) positions."""
    value = value.detach().cpu()
    if mask is not None and value.dim() >= 2 and value.shape[:2] == mask.shape:
        keep = mask.bool().cpu()
        return [value[i][keep[i]] for i in range(value.shape[0])]
    return list(value.unbind(0))


def _split(loader: Iterable, env: DistEnv, what: str) -> tuple[Iterator[tuple[Any, Any]], bool]:
    """This rank's ``(row indices or None, batch)`` pairs, and whether rows carry dataset indices.

    An hl.Loader over map-style data runs its unpadded twin (each row on exactly one rank); a stream loader
    reads each example once by construction. Any other loader cannot be split safely over several ranks."""
    if isinstance(loader, Loader) and loader.position.has_indices:
        return loader.unpadded().indexed(), True
    if env.world_size > 1 and not isinstance(loader, Loader):
        raise ValueError(
            f"distributed {what} needs an hl.Loader built with env= (hl.make_loader(..., env=env)): it splits "
            f"the rows over the ranks without duplicates and restores dataset order; got {type(loader).__name__}"
        )
    if env.world_size > 1 and what == "predict":
        raise ValueError(
            "distributed predict over a stream has no dataset order to restore; predict on one process, or "
            "evaluate (which needs no order)"
        )
    return ((None, batch) for batch in loader), False


@dataclass
class _Collected:
    """What one rank's pass produced: row keys, per-row predictions and labels, and the loss sum and count."""

    rows: list[int] = field(default_factory=list)
    pred: list[Any] = field(default_factory=list)
    labels: list[Any] = field(default_factory=list)
    loss_sum: float = 0.0
    loss_count: float = 0.0


def _run(
    model, loader, env, *, what, loss_fn, reduce, keep_predictions, keep_labels, keep_loss, precision
) -> tuple[_Collected, bool]:
    """One pass over this rank's share of ``loader``, one batch at a time; rows stay on the CPU in the order
    this rank saw them. Returns what was collected and whether the rows are dataset indices."""
    raw = unwrap(model)
    inputs = ModelInputs(raw)
    pairs, indexed = _split(loader, env, what)
    sharded = is_sharded(raw)
    if sharded and param_dtype(raw) is not None:
        precision = "fp32"  # the model's precision policy computes in its dtype: no autocast on top
    if sharded and env.distributed:
        pairs = _in_step(pairs, env)
    keys: deque = deque()  # the row keys of the batches staged ahead (None: a throwaway pass)

    def batches() -> Iterator[Any]:
        for rows, batch in pairs:
            keys.append(rows)
            yield batch

    out = _Collected()
    was_training = raw.training
    raw.eval()
    try:
        with torch.inference_mode():
            for batch in staged(batches(), env.device):
                rows = keys.popleft()
                with autocast(env.device, precision):
                    outputs = raw(**inputs.select(batch, training=False))
                if rows is _THROWAWAY:
                    continue
                size = batch_size_of(batch)
                out.rows.extend(rows if rows is not None else range(len(out.rows), len(out.rows) + size))
                _collect(
                    out,
                    outputs,
                    batch,
                    inputs.kind,
                    size,
                    loss_fn,
                    reduce,
                    keep_predictions,
                    keep_labels,
                    keep_loss,
                )
    finally:
        raw.train(was_training)
    return out, indexed


_THROWAWAY = object()


def _in_step(pairs: Iterator[tuple[Any, Any]], env: DistEnv) -> Iterator[tuple[Any, Any]]:
    """Under FSDP every forward pass gathers parameters from every rank, so all ranks must run as many passes as
    the rank with the most batches: a rank whose share ran out repeats its last batch and drops the outputs
    (rows marked ``_THROWAWAY``). The ranks agree before each batch, as ``even_steps`` does."""
    last = None
    for item in itertools.chain(pairs, itertools.repeat(None)):
        if int(all_reduce(int(item is not None), env, op="max")) == 0:
            return
        if item is not None:
            last = item
            yield item
        elif last is None:
            raise ValueError(
                f"rank {env.rank} has no evaluation rows: the eval data has fewer rows than the {env.world_size} "
                "ranks, so a sharded model cannot run its forward passes in step. Evaluate more rows"
            )
        else:
            yield _THROWAWAY, last[1]


def _collect(
    out: _Collected, outputs, batch, kind, size, loss_fn, reduce, keep_predictions, keep_labels, keep_loss
) -> None:
    """Add one batch's predictions, labels and loss (sum and target count) to ``out``."""
    mask = batch.get("attention_mask")
    if keep_predictions:
        value = _reduced(outputs, batch, reduce)
        if isinstance(value, Mapping):
            out.pred.extend(dict(zip(value, r)) for r in zip(*(_rows(v, mask) for v in value.values())))
        else:
            out.pred.extend(_rows(value, mask))
    if keep_labels:
        labels = batch.get("labels")
        if not isinstance(labels, torch.Tensor):
            raise ValueError(
                f"metrics compare predictions with 'labels', but an eval batch has none (keys: "
                f"{sorted(batch)}); add a 'labels' column to the eval data or drop metrics="
            )
        out.labels.extend(_rows(labels, mask if labels.dim() >= 2 else None))
    if not keep_loss:
        return
    count = None
    if loss_fn is not None:
        loss, count = call_loss_fn(loss_fn, outputs, batch)
    else:
        loss = loss_of(outputs)
        if loss is None:  # e.g. a batch without labels
            return
    if count is None:  # a mean over the batch's targets: weight it by their number
        count = count_targets(batch.get("labels"), kind, size, loss.device)
        loss = loss * count
    out.loss_sum += float(loss)
    out.loss_count += float(count)


def _gathered(local: _Collected, indexed: bool, env: DistEnv) -> tuple[_Collected, list[int]]:
    """Every rank's rows (rank order) and the order that sorts them by dataset index (the order seen on one
    process for a loader without indices); the loss sums are all-reduced."""
    totals = all_reduce(torch.tensor([local.loss_sum, local.loss_count], dtype=torch.float64), env)
    parts = all_gather_object((local.rows, local.pred, local.labels), env)
    merged = _Collected(
        [r for p in parts for r in p[0]],
        [x for p in parts for x in p[1]],
        [x for p in parts for x in p[2]],
        float(totals[0]),
        float(totals[1]),
    )
    order = list(range(len(merged.rows)))
    if indexed:
        order.sort(key=merged.rows.__getitem__)  # stable: repeated rows keep their order
    return merged, order


def _assemble(rows: list[Any]) -> Any:
    if rows and isinstance(rows[0], dict):
        return {k: _assemble([r[k] for r in rows]) for k in rows[0]}
    if rows and all(r.shape == rows[0].shape for r in rows):
        return torch.stack(rows)
    return rows


def evaluate(
    model: torch.nn.Module,
    loader: Iterable,
    *,
    loss_fn: Callable | None = None,
    metrics: Mapping[str, Callable[[Any, Any], float]] | None = None,
    env: DistEnv | None = None,
    reduce: Reduce = "argmax",
    precision: str = "fp32",
) -> dict[str, float]:
    """Loss (mean over loss targets) and metrics over exactly the dataset's rows, under ``inference_mode``.

    Under DDP each row is evaluated on exactly one rank (no padding duplicates), and the loss is the sum of every
    batch's loss sum over the sum of their target counts, across ranks.

    Args:
        metrics: name -> ``fn(predictions, labels) -> float``; predictions come from ``reduce`` over the
            outputs ("argmax" by default) in dataset order.

    Example:
        >>> acc = lambda p, y: (p == y).float().mean().item()
        >>> scores = evaluate(model, eval_loader, metrics={"accuracy": acc})
        >>> sorted(scores), scores["examples"]        # each of the 32 rows once
        (['accuracy', 'examples', 'loss'], 32.0)
    """
    env = env or DistEnv(device=default_device())
    local, indexed = _run(
        model,
        loader,
        env,
        what="evaluate",
        loss_fn=loss_fn,
        reduce=reduce,
        keep_predictions=bool(metrics),
        keep_labels=bool(metrics),
        keep_loss=True,
        precision=precision,
    )
    merged, order = _gathered(local, indexed, env)
    result: dict[str, float] = {"examples": float(len(merged.rows))}
    if merged.loss_count:
        result["loss"] = merged.loss_sum / merged.loss_count
    if metrics:
        predictions = _assemble([merged.pred[r] for r in order])
        labels = _assemble([merged.labels[r] for r in order]) if merged.labels else None
        for name, fn in metrics.items():
            result[name] = float(fn(predictions, labels))
    return result


def predict(
    model: torch.nn.Module,
    loader: Iterable,
    *,
    env: DistEnv | None = None,
    reduce: Reduce = None,
    precision: str = "fp32",
) -> Any:
    """Model outputs for every row, in dataset order, under ``inference_mode`` (each row once, also under DDP).

    ``reduce`` is applied per batch on the device: ``"argmax"`` keeps token ids instead of N x L x V logits; a
    callable ``(outputs, batch) -> tensor | dict of tensors`` keeps anything else. Rows of equal shape are
    stacked into one tensor; sequences are trimmed to their real length and returned as a list.

    Example:
        >>> labels = predict(model, test_loader, reduce="argmax")
        >>> labels.shape, labels.dtype                # one class id per row, in dataset order
        (torch.Size([32]), torch.int64)
    """
    env = env or DistEnv(device=default_device())
    local, indexed = _run(
        model,
        loader,
        env,
        what="predict",
        loss_fn=None,
        reduce=reduce,
        keep_predictions=True,
        keep_labels=False,
        keep_loss=False,
        precision=precision,
    )
    merged, order = _gathered(local, indexed, env)
    return _assemble([merged.pred[r] for r in order])


@dataclass(frozen=True)
class ParameterTable:
    """Trainable and total parameter counts per module (``str()`` renders a table).

    Example:
        >>> table = count_parameters(torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.Linear(3, 1)))
        >>> table.trainable, table.total, table.rows[0]
        (13, 13, ('0', 9, 9))
    """

    rows: list[tuple[str, int, int]]
    trainable: int
    total: int

    def __str__(self) -> str:
        width = max([len("module")] + [len(r[0]) for r in self.rows])
        lines = [f"{'module':<{width}}  {'trainable':>12}  {'total':>12}"]
        lines += [f"{name:<{width}}  {t:>12,}  {n:>12,}" for name, t, n in self.rows]
        lines.append(
            f"{'(all)':<{width}}  {self.trainable:>12,}  {self.total:>12,}  "
            f"({100 * self.trainable / max(self.total, 1):.2f}% trainable)"
        )
        return "\n".join(lines)


def count_parameters(model: torch.nn.Module, depth: int = 2) -> ParameterTable:
    """Trainable and total parameters per module, down to ``depth`` levels of module names.

    Shared (tied) parameters are counted once. Works on wrapped models (DDP, compile, PEFT): it reads
    ``named_parameters()``, which gradient checkpointing does not change.

    Example:
        >>> _ = model.bert.requires_grad_(False)     # train the classifier head only
        >>> print(count_parameters(model))
        module              trainable         total
        bert.embeddings             0         4,224
        bert.encoder                0        17,088
        bert.pooler                 0         1,056
        classifier                 66            66
        (all)                      66        22,434  (0.29% trainable)
    """
    groups: dict[str, list[int]] = {}
    for name, param in unwrap(model).named_parameters():
        parts = name.split(".")
        key = ".".join(parts[: min(depth, len(parts) - 1)]) or "(root)"
        counts = groups.setdefault(key, [0, 0])
        counts[0] += param.numel() if param.requires_grad else 0
        counts[1] += param.numel()
    rows = [(k, t, n) for k, (t, n) in groups.items()]
    return ParameterTable(rows, sum(r[1] for r in rows), sum(r[2] for r in rows))
