"""Evaluation, prediction and the parameter table.

Under DDP the distributed sampler pads each rank's share with duplicates so all ranks run the same number of
batches. Every row therefore travels with its global dataset index (``_index``); rows are gathered from all ranks,
duplicates dropped by index, and results returned in dataset order — metrics see exactly ``len(dataset)`` rows.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from hf_loop.data import INDEX_KEY
from hf_loop.dist import DistEnv, all_gather_object, batch_size_of, default_device
from hf_loop.feed import staged
from hf_loop.steps import (
    IGNORE_INDEX,
    ModelInputs,
    autocast,
    call_loss_fn,
    count_targets,
    loss_of,
    unwrap,
)

logger = logging.getLogger("hf_loop")

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


def _example_losses(outputs: Any, batch: Mapping[str, Any], kind: str, problem: str | None):
    """Per-example (loss sum, target count) for the standard heads, so duplicates can be removed exactly."""
    logits, labels = _logits(outputs), batch.get("labels")
    if logits is None or not isinstance(labels, torch.Tensor):
        return None
    logits = logits.float()
    if kind == "causal":
        logits, labels = logits[:, :-1], labels[:, 1:]
    if kind in ("causal", "token") or (labels.dim() >= 2 and not labels.is_floating_point()):
        if logits.shape[:-1] != labels.shape:
            return None
        per_token = F.cross_entropy(
            logits.transpose(1, -1), labels.transpose(1, -1), ignore_index=IGNORE_INDEX, reduction="none"
        )
        valid = labels != IGNORE_INDEX
        return per_token.flatten(1).sum(1), valid.flatten(1).sum(1)
    ones = torch.ones(labels.shape[0], device=labels.device)
    if labels.is_floating_point() and problem == "multi_label_classification":
        return F.binary_cross_entropy_with_logits(logits, labels, reduction="none").flatten(1).mean(1), ones
    if labels.is_floating_point():  # regression
        return (logits.view(labels.shape[0], -1) - labels.view(labels.shape[0], -1)).pow(2).mean(1), ones
    if logits.dim() == 2 and labels.dim() == 1:
        return F.cross_entropy(logits, labels, reduction="none"), ones
    return None


def _run(
    model, loader, env, *, loss_fn, reduce, keep_predictions, keep_labels, keep_loss, precision
) -> dict[str, Any]:
    """One pass over ``loader`` on this rank: global indices, per-row outputs and labels, and loss sums.

    Rows stay on the CPU in the order this rank saw them; :func:`_gathered` merges the ranks.
    """
    raw = unwrap(model)
    inputs = ModelInputs(raw)
    problem = getattr(getattr(raw, "config", None), "problem_type", None)
    out: dict[str, Any] = {
        "index": [],
        "pred": [],
        "labels": [],
        "ex_loss": [],
        "ex_count": [],
        "batch_loss": 0.0,
        "batch_count": 0.0,
        "exact": True,
        "has_index": True,
    }
    was_training = raw.training
    raw.eval()
    position = 0
    try:
        with torch.inference_mode():
            for batch in staged(loader, env.device):
                with autocast(env.device, precision):
                    outputs = raw(**inputs.select(batch, training=False))
                size = batch_size_of(batch)
                index = batch.get(INDEX_KEY)
                out["has_index"] &= isinstance(index, torch.Tensor)
                index = (
                    index.tolist()
                    if isinstance(index, torch.Tensor)
                    else list(range(position, position + size))
                )
                position += size
                out["index"].extend(index)
                mask = batch.get("attention_mask")
                if keep_predictions:
                    value = _reduced(outputs, batch, reduce)
                    if isinstance(value, Mapping):
                        out["pred"].extend(
                            dict(zip(value, r)) for r in zip(*(_rows(v, mask) for v in value.values()))
                        )
                    else:
                        out["pred"].extend(_rows(value, mask))
                if keep_labels:
                    labels = batch.get("labels")
                    if not isinstance(labels, torch.Tensor):
                        raise ValueError(
                            f"metrics compare predictions with 'labels', but an eval batch has none (keys: "
                            f"{sorted(batch)}); add a 'labels' column to the eval data or drop metrics="
                        )
                    out["labels"].extend(_rows(labels, mask if labels.dim() >= 2 else None))
                if keep_loss:
                    _add_loss(out, outputs, batch, inputs.kind, problem, loss_fn, size)
    finally:
        raw.train(was_training)
    return out


def _add_loss(out, outputs, batch, kind, problem, loss_fn, size: int) -> None:
    """Add a batch's loss: per example when the head is a standard one (exact de-duplication), else per batch."""
    if loss_fn is not None:
        loss, count = call_loss_fn(loss_fn, outputs, batch)
        n = (
            count
            if count is not None
            else count_targets(batch.get("labels"), kind, size, torch.device("cpu"))
        )
        out["batch_loss"] += float(loss) * (1.0 if count is not None else float(n))
        out["batch_count"] += float(n)
        out["exact"] = False
        return
    loss = loss_of(outputs)
    if loss is None:  # e.g. a batch without labels: the per-example rows would no longer line up
        out["exact"] = False
        return
    per_example = _example_losses(outputs, batch, kind, problem) if out["exact"] else None
    n = count_targets(batch.get("labels"), kind, size, torch.device("cpu"))
    if per_example is not None:
        sums, counts = per_example
        # Trust the per-example split only while it reproduces the model's own loss (custom losses differ).
        mean = sums.sum() / counts.sum().clamp(min=1)
        if torch.allclose(mean.float(), loss.float(), rtol=1e-3, atol=1e-5):
            out["ex_loss"].extend(sums.cpu().tolist())
            out["ex_count"].extend(counts.cpu().tolist())
            out["batch_loss"] += float(loss) * float(n)
            out["batch_count"] += float(n)
            return
    out["exact"] = False
    out["batch_loss"] += float(loss) * float(n)
    out["batch_count"] += float(n)


def _gathered(local: dict[str, Any], env: DistEnv, what: str) -> tuple[list[int], dict[int, int]]:
    """Gather every rank's rows; return them concatenated and, per unique index, the first row holding it."""
    if env.world_size > 1 and not local["has_index"]:
        raise ValueError(
            f"distributed {what} needs the '{INDEX_KEY}' column in every batch to remove the distributed sampler's "
            "duplicates and restore dataset order; hl.MapDataset adds it (keep it in the collated batch)."
        )
    parts = all_gather_object(local, env)
    merged: dict[str, list] = {
        k: [x for p in parts for x in p[k]] for k in ("index", "pred", "labels", "ex_loss", "ex_count")
    }
    local.update(
        merged,
        batch_loss=sum(p["batch_loss"] for p in parts),
        batch_count=sum(p["batch_count"] for p in parts),
        exact=all(p["exact"] for p in parts),
    )
    first: dict[int, int] = {}
    for row, index in enumerate(merged["index"]):
        first.setdefault(index, row)
    return merged["index"], first


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

    Args:
        metrics: name -> ``fn(predictions, labels) -> float``; predictions come from ``reduce`` over the
            outputs ("argmax" by default) in dataset order, padding duplicates removed.

    Example:
        >>> acc = lambda p, y: (p == y).float().mean().item()
        >>> evaluate(model, eval_loader, metrics={"accuracy": acc})      # doctest: +SKIP
        {'loss': 0.41, 'accuracy': 0.87, 'examples': 200}
    """
    env = env or DistEnv(device=default_device())
    local = _run(
        model,
        loader,
        env,
        loss_fn=loss_fn,
        reduce=reduce,
        keep_predictions=bool(metrics),
        keep_labels=bool(metrics),
        keep_loss=True,
        precision=precision,
    )
    indices, first = _gathered(local, env, "evaluate")
    result: dict[str, float] = {"examples": float(len(first))}
    duplicates = len(indices) - len(first)
    if local["exact"] and local["ex_count"]:
        rows = list(first.values())
        total = sum(local["ex_count"][r] for r in rows)
        result["loss"] = sum(local["ex_loss"][r] for r in rows) / max(total, 1)
    elif local["batch_count"]:
        result["loss"] = local["batch_loss"] / local["batch_count"]
        if duplicates:
            logger.warning(
                "evaluate: the loss includes %d padding duplicates (a custom loss cannot be split per "
                "example); metrics are exact",
                duplicates,
            )
    if metrics:
        order = [first[i] for i in sorted(first)]
        predictions = _assemble([local["pred"][r] for r in order])
        labels = _assemble([local["labels"][r] for r in order]) if local["labels"] else None
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
    """Model outputs for every row, in dataset order, padding removed, under ``inference_mode``.

    ``reduce`` is applied per batch on the device: ``"argmax"`` keeps token ids instead of N x L x V logits; a
    callable ``(outputs, batch) -> tensor | dict of tensors`` keeps anything else. Rows of equal shape are
    stacked into one tensor; sequences are trimmed to their real length and returned as a list.

    Example:
        >>> labels = predict(model, test_loader, reduce="argmax")      # doctest: +SKIP
        tensor([2, 0, 1, ...])
    """
    env = env or DistEnv(device=default_device())
    local = _run(
        model,
        loader,
        env,
        loss_fn=None,
        reduce=reduce,
        keep_predictions=True,
        keep_labels=False,
        keep_loss=False,
        precision=precision,
    )
    _, first = _gathered(local, env, "predict")
    return _assemble([local["pred"][first[i]] for i in sorted(first)])


@dataclass(frozen=True)
class ParameterTable:
    """Trainable and total parameter counts per module (``str()`` renders a table).

    Example:
        >>> table = count_parameters(model)          # doctest: +SKIP
        >>> table.trainable, table.total, table.rows[0]
        (36162, 36162, ('bert.embeddings', 17952, 17952))
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
        >>> print(count_parameters(model))          # doctest: +SKIP
        module         trainable        total
        bert.embeddings    2,432        2,432
        ...
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
