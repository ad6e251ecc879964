"""What one training step needs to know about a model and a batch.

Which batch keys reach ``model.forward``, how many loss targets a batch holds (the weight of its loss), how the
loss is turned into a correctly weighted contribution, the autocast context, and staging the next batch on the
device while the current step runs. ``loop.py`` composes these; they hold no training state.
"""

from __future__ import annotations

import contextlib
import inspect
import time
import typing
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import torch

from hf_loop.dist import DistEnv, all_reduce, batch_size_of

IGNORE_INDEX = -100
PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The user's module under DDP (``.module``) and ``torch.compile`` (``._orig_mod``) wrappers."""
    while True:
        if isinstance(model, torch.nn.parallel.DistributedDataParallel):
            model = model.module
        elif hasattr(model, "_orig_mod"):
            model = model._orig_mod
        else:
            return model


def described(model: torch.nn.Module) -> torch.nn.Module:
    """The module whose ``forward`` signature and class describe ``model``.

    Looks through DDP and ``torch.compile`` wrappers, and through PEFT wrappers to their base model (a plain
    ``PeftModel.forward`` is ``(*args, **kwargs)``, which names nothing).
    """
    model = unwrap(model)
    base = getattr(model, "get_base_model", None)
    return base() if callable(base) else model


def forward_parameters(model: torch.nn.Module) -> frozenset[str] | None:
    """Names ``model.forward`` accepts; None when it is fully open (only ``*args, **kwargs``).

    Hugging Face models type their ``**kwargs`` as ``Unpack[TransformersKwargs]``; the TypedDict's keys
    (``position_ids``, ``cu_seq_lens_q``, ``num_items_in_batch``...) count as named, so packed batches keep working.
    """
    params = inspect.signature(described(model).forward).parameters
    names = {n for n, p in params.items() if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)}
    for p in params.values():
        if p.kind is p.VAR_KEYWORD:
            for arg in typing.get_args(p.annotation):  # Unpack[SomeTypedDict]
                names.update(getattr(arg, "__annotations__", {}))
    return frozenset(names) if names else None


class ModelInputs:
    """Selects the batch keys a model takes and knows how its loss targets are counted.

    Args:
        model: the (possibly wrapped) model.
        names: explicit list of keys to pass (``TrainConfig.model_inputs``); default: what ``forward`` names, or,
            for a fully open ``forward(*args, **kwargs)``, every tensor.

    Example:
        >>> inputs = ModelInputs(model)                       # doctest: +SKIP
        >>> model(**inputs.select(batch, training=True))      # "id" and other strings stay outside
    """

    def __init__(self, model: torch.nn.Module, names: Iterable[str] | None = None) -> None:
        raw = described(model)
        accepted = forward_parameters(raw)
        self.names = frozenset(names) if names is not None else accepted
        explicit = "num_items_in_batch" in inspect.signature(raw.forward).parameters
        self.kind = target_kind(raw)
        # Only pass the global count where the loss is known to honour it: a forward that names it, or a
        # transformers causal LM (ForCausalLMLoss divides its sum by it). BERT-style classifiers accept it through
        # **kwargs and silently ignore it, which would make the loss a per-micro-batch mean again.
        self.takes_num_items = explicit or (
            self.kind == "causal"
            and "num_items_in_batch" in (accepted or ())
            and getattr(raw, "accepts_loss_kwargs", True)
        )
        self.use_cache_off = "use_cache" in (accepted or ())

    def select(self, batch: Mapping[str, Any], *, training: bool) -> dict[str, Any]:
        if self.names is None:
            kwargs = {k: v for k, v in batch.items() if isinstance(v, torch.Tensor)}
        else:
            kwargs = {k: v for k, v in batch.items() if k in self.names}
        if training and self.use_cache_off:
            kwargs["use_cache"] = False  # no KV cache while training: saves memory, and packing needs it off
        return kwargs


def target_kind(model: torch.nn.Module) -> str:
    """How a model's loss is averaged: "causal" (labels shifted inside), "token" or "auto" (decided per batch)."""
    name = type(model).__name__
    config = getattr(model, "config", None)
    encoder_decoder = bool(getattr(config, "is_encoder_decoder", False))
    if name.endswith("ForCausalLM") or (getattr(config, "is_decoder", False) and not encoder_decoder):
        return "causal"
    if name.endswith(("ForTokenClassification", "ForMaskedLM")) or encoder_decoder:
        return "token"
    return "auto"


def scalar(value: int | float, device: torch.device) -> torch.Tensor:
    """A 0-d tensor on ``device`` without a host sync (``torch.tensor(x, device="cuda")`` copies and waits)."""
    return torch.full((), value, device=device)


def count_targets(labels: Any, kind: str, batch_size: int, device: torch.device) -> torch.Tensor:
    """Number of loss targets in a batch, as a 0-d tensor on ``device`` (no host sync).

    Causal LM: ``labels[..., 1:] != -100`` (position 0 never is a target once the model shifts). Token heads:
    ``labels != -100``. Otherwise integer labels with a sequence dimension count tokens, anything else examples.
    """
    if not isinstance(labels, torch.Tensor):
        return scalar(batch_size, device)
    if kind == "causal":
        return (labels[..., 1:] != IGNORE_INDEX).sum().to(device)
    if kind == "token" or (labels.dim() >= 2 and not labels.is_floating_point()):
        return (labels != IGNORE_INDEX).sum().to(device)
    return scalar(labels.shape[0] if labels.dim() else 1, device)


def loss_of(outputs: Any) -> torch.Tensor | None:
    """The ``loss`` a model returned (ModelOutput, dict, tuple with the loss first, or a bare tensor)."""
    if isinstance(outputs, torch.Tensor):
        return outputs if outputs.dim() == 0 else None
    if isinstance(outputs, Mapping):
        return outputs.get("loss")
    return getattr(outputs, "loss", None)


def missing_loss_error(batch: Mapping[str, Any], model: torch.nn.Module) -> ValueError:
    has_labels = "labels" in batch
    why = (
        "the batch has 'labels' but the model returned loss=None"
        if has_labels
        else f"the batch has no 'labels' (keys: {sorted(batch)})"
    )
    return ValueError(
        f"training needs a loss, but {type(unwrap(model)).__name__} returned none: {why}. Add a 'labels' column "
        "(a 'label' column is renamed automatically), or pass loss_fn=lambda outputs, batch: ... to hl.train."
    )


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """``torch.autocast`` for bf16/fp16; a no-op for fp32."""
    dtype = PRECISIONS[precision]
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def to_device(batch: Any, device: torch.device, non_blocking: bool = False) -> Any:
    """Move every tensor of a (nested) batch; lists of strings and other values stay as they are."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=non_blocking)
    if isinstance(batch, Mapping):
        return {k: to_device(v, device, non_blocking) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)) and batch and isinstance(batch[0], torch.Tensor):
        return type(batch)(to_device(v, device, non_blocking) for v in batch)
    return batch


def _record_stream(batch: Any, stream: torch.cuda.Stream) -> None:
    if isinstance(batch, torch.Tensor):
        batch.record_stream(stream)
    elif isinstance(batch, Mapping):
        for v in batch.values():
            _record_stream(v, stream)


_END = object()


def staged(batches: Iterable[Any], device: torch.device) -> Iterator[Any]:
    """Yield batches on ``device``, the next one already being copied while the caller computes on this one.

    On CUDA the copy runs on a side stream (from pinned memory, ``non_blocking``) and the compute stream waits on
    it only when the batch is used; ``record_stream`` keeps the caching allocator from reusing its memory early.
    Elsewhere it is a one-batch look-ahead with a plain copy. The loop counts consumed batches itself, so the
    look-ahead never shifts a checkpoint's data position.
    """
    iterator = iter(batches)
    side = torch.cuda.Stream(device) if device.type == "cuda" else None

    def fetch() -> Any:
        batch = next(iterator, _END)
        if batch is _END:
            return _END
        if side is None:
            return to_device(batch, device)
        with torch.cuda.stream(side):
            return to_device(batch, device, non_blocking=True)

    upcoming = fetch()
    while upcoming is not _END:
        current = upcoming
        if side is not None:
            compute = torch.cuda.current_stream(device)
            compute.wait_stream(side)
            _record_stream(current, compute)
        upcoming = fetch()
        yield current


def tokens_in(batch: Mapping[str, Any]) -> tuple[torch.Tensor | None, int]:
    """(real tokens as a device tensor, padded slots) from ``attention_mask``, else ``input_ids``; None if neither."""
    mask = batch.get("attention_mask")
    if isinstance(mask, torch.Tensor) and mask.dim() >= 2:
        return mask.sum(), mask.numel()
    ids = batch.get("input_ids")
    if isinstance(ids, torch.Tensor) and ids.dim() >= 2:
        return scalar(ids.numel(), ids.device), ids.numel()
    return None, 0


def call_loss_fn(
    loss_fn: Callable, outputs: Any, batch: Mapping[str, Any]
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Run a user ``loss_fn(outputs, batch)``: a scalar mean, or ``(loss_sum, count)`` (count as returned)."""
    result = loss_fn(outputs, batch)
    if isinstance(result, tuple):
        if len(result) != 2:
            raise ValueError(
                f"loss_fn must return a scalar loss or (loss_sum, count), got a {len(result)}-tuple"
            )
        loss_sum, count = result
        count = (
            count.to(loss_sum.device) if isinstance(count, torch.Tensor) else scalar(count, loss_sum.device)
        )
        return loss_sum, count
    if not isinstance(result, torch.Tensor):
        raise TypeError(
            f"loss_fn must return a scalar tensor or (loss_sum, count), got {type(result).__name__}"
        )
    return result, None


class Window:
    """Loss, counts and throughput since the last log, kept on the device: one host sync per log, not per step."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.dtype = torch.float32 if device.type == "mps" else torch.float64  # MPS has no float64
        self.loss = torch.zeros((), device=device, dtype=self.dtype)
        self.targets = torch.zeros((), device=device, dtype=self.dtype)
        self.tokens = torch.zeros((), device=device, dtype=self.dtype)
        self.samples = self.slots = 0
        self.started = time.perf_counter()

    def add(self, loss_sum: torch.Tensor, targets: torch.Tensor, batch: Mapping[str, Any]) -> None:
        self.loss += loss_sum.detach().to(self.dtype)
        self.targets += targets.to(self.dtype)
        self.samples += batch_size_of(batch)
        real, slots = tokens_in(batch)
        if real is not None:
            self.tokens += real.to(self.device, self.dtype)
            self.slots += slots

    def flush(self, env: DistEnv) -> dict[str, float]:
        stats = torch.stack(
            [
                self.loss,
                self.targets,
                self.tokens,
                torch.tensor(float(self.samples), device=self.device, dtype=self.dtype),
                torch.tensor(float(self.slots), device=self.device, dtype=self.dtype),
            ]
        )
        loss, targets, tokens, samples, slots = all_reduce(stats, env).tolist()  # the one sync per log
        seconds = max(time.perf_counter() - self.started, 1e-9)
        self.__init__(self.device)
        return {
            "loss": loss / max(targets, 1.0),
            "loss_sum": loss,
            "targets": targets,
            "samples": samples,
            "tokens": tokens,
            "samples_per_s": samples / seconds,
            "tokens_per_s": tokens / seconds,
            "padding": 1.0 - tokens / slots if slots else None,
            "seconds": seconds,
        }


def loader_length(loader: Iterable) -> int | None:
    try:
        return len(loader)  # type: ignore[arg-type]
    except TypeError:  # streams have no length
        return None


def set_epoch(loader: Iterable, epoch: int) -> None:
    for owner in (loader, getattr(loader, "batch_sampler", None), getattr(loader, "sampler", None)):
        if hasattr(owner, "set_epoch"):
            owner.set_epoch(epoch)
            return


def grad_norm(params: list[torch.nn.Parameter], max_norm: float | None) -> torch.Tensor:
    if max_norm is not None:
        return torch.nn.utils.clip_grad_norm_(params, max_norm)
    return torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])


def accumulate(
    micro: list[dict], *, model, inputs: ModelInputs, loss_fn, scaler, config, env: DistEnv
) -> tuple[torch.Tensor | None, list[tuple[torch.Tensor, torch.Tensor]]]:
    """Forward and backward over one optimizer step's micro-batches, each weighted by its share of targets.

    Returns the factor the gradients still need when ``loss_fn`` reports its own counts (known only after the
    forward passes, else None), and each micro-batch's (loss sum, target count) for logging.
    """
    device = env.device
    counts = [count_targets(b.get("labels"), inputs.kind, batch_size_of(b), device) for b in micro]
    # The global number of targets over micro-batches and ranks: every micro-batch's loss sum is divided by it,
    # so padding-heavy micro-batches weigh what their targets weigh. DDP averages gradients over ranks, hence * W.
    total = all_reduce(torch.stack(counts).sum(), env).clamp(min=1)
    reported, losses = [], []
    for i, batch in enumerate(micro):
        is_ddp = isinstance(model, torch.nn.parallel.DistributedDataParallel)
        # Gradients are all-reduced only on the last micro-batch; earlier ones accumulate locally (no_sync).
        sync = model.no_sync() if is_ddp and i < len(micro) - 1 else contextlib.nullcontext()
        with sync:
            with autocast(device, config.precision):
                kwargs = inputs.select(batch, training=True)
                if inputs.takes_num_items and loss_fn is None:
                    kwargs["num_items_in_batch"] = total
                outputs = model(**kwargs)
                if loss_fn is not None:
                    loss, count = call_loss_fn(loss_fn, outputs, batch)
                else:
                    loss, count = loss_of(outputs), None
                    if loss is None:
                        raise missing_loss_error(batch, model)
            if loss.numel() != 1:
                raise ValueError(f"the loss must be a single number, got a tensor of shape {tuple(loss.shape)}; "
                                 "reduce it (mean or sum) in the model or loss_fn")  # fmt: skip
            loss = loss.reshape(())
            if count is not None:  # divided by the global count after backward, once it is known
                loss_sum, scaled = loss, loss
                reported.append(count.to(device))
            elif inputs.takes_num_items and loss_fn is None:  # the model already divided its sum by `total`
                loss_sum, scaled = loss * total, loss * env.world_size
            else:
                loss_sum = loss * counts[i]
                scaled = loss_sum * (env.world_size / total)
            (scaler.scale(scaled) if scaler is not None else scaled).backward()
        losses.append((loss_sum.detach(), count if count is not None else counts[i]))
    if not reported:
        return None, losses
    # DDP averaged the gradients of the loss sums over ranks; * W / global count makes them the global mean.
    return env.world_size / all_reduce(torch.stack(reported).sum(), env).clamp(min=1), losses


def optimizer_step(
    *, optimizer, scheduler, scaler, params, config, factor, want_norm: bool
) -> tuple[torch.Tensor | None, bool]:
    """Unscale, rescale, clip, check, step. Returns (grad norm or None, whether the step was skipped)."""
    if scaler is not None:
        scaler.unscale_(optimizer)
    if factor is not None:
        for p in params:
            if p.grad is not None:
                p.grad.mul_(factor)
    # fp16: the GradScaler already skips steps with inf/nan gradients (and lowers its scale).
    check = config.max_bad_steps is not None and scaler is None
    norm = None
    if want_norm or check or config.max_grad_norm is not None:
        # Under DDP the gradients are already all-reduced, so this norm is identical on every rank and all
        # ranks skip together; a per-rank loss check could let one rank skip alone and hang the next all-reduce.
        norm = grad_norm(params, config.max_grad_norm)
    skipped = check and not bool(torch.isfinite(norm))  # the one per-step host sync, opted into
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    elif not skipped:
        optimizer.step()
    if scheduler is not None and not skipped:
        scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return norm, skipped
