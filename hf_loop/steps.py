"""One training step, and what it needs to know about a model and a batch.

Which batch keys reach ``model.forward``, how many loss targets a batch holds (the weight of its loss), how the
loss is turned into a correctly weighted contribution, the autocast context, and :class:`TrainStep`, which runs
forward/backward over one optimizer step's micro-batches and then the optimizer step. It holds no run state:
``loop.py`` composes it with the data feed (``feed.py``), the logs (``logs.py``) and checkpoints.
"""

from __future__ import annotations

import contextlib
import inspect
import typing
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch

from hf_loop.dist import DistEnv, all_reduce, batch_size_of
from hf_loop.fsdp import full_value, gradient_sync, is_sharded, param_dtype

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
        >>> inputs = ModelInputs(model)
        >>> with_ids = {**batch, "id": [f"row{i}" for i in range(8)]}
        >>> sorted(inputs.select(with_ids, training=True))   # "id" and other strings stay outside
        ['attention_mask', 'input_ids', 'labels']
        >>> loss = model(**inputs.select(with_ids, training=True)).loss
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


def count_targets(labels: Any, kind: str, batch_size: int, device: torch.device) -> int | torch.Tensor:
    """Number of loss targets in a batch: an int when it is the number of examples (known on the host), else a
    0-d tensor on ``device`` (counted there, no host sync).

    Causal LM: ``labels[..., 1:] != -100`` (position 0 never is a target once the model shifts). Token heads:
    ``labels != -100``. Otherwise integer labels with a sequence dimension count tokens, anything else examples.

    Example:
        >>> count_targets(torch.tensor([1, 0, 1]), "auto", batch_size=3, device=torch.device("cpu"))
        3
        >>> count_targets(torch.tensor([[5, 6, -100]]), "causal", batch_size=1, device=torch.device("cpu"))
        tensor(1)
    """
    if not isinstance(labels, torch.Tensor):
        return batch_size
    if kind == "causal":
        return (labels[..., 1:] != IGNORE_INDEX).sum().to(device)
    if kind == "token" or (labels.dim() >= 2 and not labels.is_floating_point()):
        return (labels != IGNORE_INDEX).sum().to(device)
    return labels.shape[0] if labels.dim() else 1


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
        device = loss_sum.device
        count = count.to(device) if isinstance(count, torch.Tensor) else torch.full((), count, device=device)
        return loss_sum, count
    if not isinstance(result, torch.Tensor):
        raise TypeError(
            f"loss_fn must return a scalar tensor or (loss_sum, count), got {type(result).__name__}"
        )
    return result, None


_NOTHING = contextlib.nullcontext()  # reusable


def grad_norm(params: list[torch.nn.Parameter], max_norm: float | None) -> torch.Tensor:
    """The global gradient norm (clipping to ``max_norm`` when given); over shards for a sharded model."""
    if max_norm is not None:
        return full_value(torch.nn.utils.clip_grad_norm_(params, max_norm))
    return full_value(torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None]))


def check_labels(batch: Mapping[str, Any]) -> None:
    """Refuse string labels before they reach the model (transformers fails on them deep inside its loss)."""
    labels = batch.get("labels")
    if isinstance(labels, list) and labels and isinstance(labels[0], str):
        raise TypeError(
            f"the batch's 'labels' are strings (first: {labels[0]!r}); a loss needs numbers. Map them to class "
            "ids first: ds = ds.class_encode_column('label') (datasets), or the CLI's --label-column, which "
            "maps string labels itself"
        )


class TrainStep:
    """One optimizer step: forward and backward over its micro-batches, then unscale, clip, check and step.

    Each micro-batch's loss is weighted by its share of the step's loss targets, counted over all micro-batches
    and ranks (DESIGN.md, "Loss weighting"), so accumulation and DDP average over real targets. The loss sums and
    target counts go to ``window`` (on the device) for the logs.

    Args:
        model: the model to call (DDP-wrapped or compiled, or the raw module).
        params: the parameters the optimizer updates (gradient norm and clipping are over these).
        want_norm: per call, whether to compute the gradient norm (log steps); clipping computes it anyway.

    Example:
        >>> from hf_loop.logs import Window
        >>> config, window = hl.TrainConfig(max_grad_norm=1.0), Window(env.device)
        >>> step = TrainStep(model, optimizer, scheduler=None, scaler=None, inputs=ModelInputs(model),
        ...                  loss_fn=None, config=config, env=env, window=window)
        >>> taken, norm = step([batch, batch], want_norm=True)   # two micro-batches, one optimizer step
        >>> taken, norm.shape
        (True, torch.Size([]))
        >>> stats = window.flush(env)
        >>> stats["samples"], stats["targets"]                # 2 x 8 examples, one loss target each
        (16.0, 16.0)
    """

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, *, scheduler: Any,
                 scaler: torch.amp.GradScaler | None, inputs: ModelInputs, loss_fn: Callable | None,
                 config: Any, env: DistEnv, window: Any) -> None:  # fmt: skip
        self.model, self.optimizer, self.scheduler, self.scaler = model, optimizer, scheduler, scaler
        self.inputs, self.loss_fn, self.config, self.env, self.window = inputs, loss_fn, config, env, window
        self.params = [p for p in unwrap(model).parameters() if p.requires_grad]
        self.ddp = isinstance(model, torch.nn.parallel.DistributedDataParallel)
        self.sharded = is_sharded(unwrap(model))
        # A sharded model with a mixed-precision policy computes in its parameter dtype: no autocast on top.
        self.precision = (
            "fp32" if self.sharded and param_dtype(unwrap(model)) is not None else config.precision
        )
        self.autocast = autocast(env.device, self.precision)  # reusable: entered once per micro-batch
        self.num_items = inputs.takes_num_items and loss_fn is None
        # The per-step non-finite check (one host sync per step) only when asked for; fp16's scaler has its own.
        self.check = config.max_bad_steps is not None and scaler is None

    def __call__(self, micro: list[dict], *, want_norm: bool) -> tuple[bool, torch.Tensor | None]:
        """Run one optimizer step; returns (whether it was taken, the gradient norm when computed)."""
        factor, losses = self.accumulate(micro)
        norm, skipped = self.update(factor, want_norm)
        if not skipped:  # a skipped step's (non-finite) loss stays out of the logs
            for (loss, weight, targets), batch in zip(losses, micro):
                self.window.add(loss, weight, targets, batch)
        return not skipped, norm

    def accumulate(self, micro: list[dict]) -> tuple[Any, list[tuple[torch.Tensor, Any, Any]]]:
        """Forward and backward over the micro-batches, each weighted by its share of the step's targets.

        Returns the factor the gradients still need when ``loss_fn`` reports its own counts (known only after the
        forward passes, else None), and per micro-batch (loss, weight, targets) for the logs: its loss sum is
        loss x weight. Counts known on the host (examples) stay Python ints: no device work for them.
        """
        device, world = self.env.device, self.env.world_size
        counts = [count_targets(b.get("labels"), self.inputs.kind, batch_size_of(b), device) for b in micro]
        # The global number of targets over micro-batches and ranks: every micro-batch's loss sum is divided by it,
        # so padding-heavy micro-batches weigh what their targets weigh. DDP averages gradients over ranks: x W.
        if world == 1 and not any(isinstance(c, torch.Tensor) for c in counts):
            total: Any = max(sum(counts), 1)
        else:
            total = all_reduce(
                torch.stack([torch.as_tensor(c, device=device) for c in counts]).sum(), self.env
            )
            total = total.clamp(min=1)
        alone = len(micro) == 1 and world == 1  # the step's only micro-batch: its mean is the step's mean
        reported, losses = [], []
        for i, batch in enumerate(micro):
            # Gradients are reduced only on the last micro-batch; earlier ones accumulate locally (no_sync).
            last = i == len(micro) - 1
            if self.sharded and len(micro) > 1:
                gradient_sync(unwrap(self.model), last)
            with self.model.no_sync() if self.ddp and not last else _NOTHING:
                loss, count = self.forward(batch, total)
                # A loss sum (loss_fn's count) is divided by the global count after backward, once it is known.
                if count is not None:
                    scaled, entry = loss, (loss, 1, count)
                    reported.append(count.to(device))
                elif self.num_items:  # the model already divided its sum by `total`
                    scaled, entry = (loss if world == 1 else loss * world), (loss, total, counts[i])
                else:
                    scaled = loss if alone else loss * (counts[i] * world / total)
                    entry = (loss, counts[i], counts[i])
                (self.scaler.scale(scaled) if self.scaler is not None else scaled).backward()
            losses.append(entry)
        if not reported:
            return None, losses
        # DDP averaged the gradients of the loss sums over ranks; * W / global count makes them the global mean.
        return world / all_reduce(torch.stack(reported).sum(), self.env).clamp(min=1), losses

    def forward(
        self, batch: Mapping[str, Any], total: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The micro-batch's loss (a 0-d tensor) and, when ``loss_fn`` returns ``(sum, count)``, its count."""
        check_labels(batch)
        with self.autocast:
            kwargs = self.inputs.select(batch, training=True)
            if self.num_items:
                kwargs["num_items_in_batch"] = total
            outputs = self.model(**kwargs)
            if self.loss_fn is not None:
                loss, count = call_loss_fn(self.loss_fn, outputs, batch)
            else:
                loss, count = loss_of(outputs), None
                if loss is None:
                    raise missing_loss_error(batch, self.model)
        if loss.dim() == 0:
            return loss, count
        if loss.numel() != 1:
            raise ValueError(f"the loss must be a single number, got a tensor of shape {tuple(loss.shape)}; "
                             "reduce it (mean or sum) in the model or loss_fn")  # fmt: skip
        return loss.reshape(()), count

    def update(self, factor: torch.Tensor | None, want_norm: bool) -> tuple[torch.Tensor | None, bool]:
        """Unscale, rescale, clip, check, step. Returns (grad norm or None, whether the step was skipped)."""
        optimizer, scaler, config = self.optimizer, self.scaler, self.config
        if scaler is not None:
            scaler.unscale_(optimizer)
        if factor is not None:
            torch._foreach_mul_([p.grad for p in self.params if p.grad is not None], factor)
        norm = None
        if want_norm or self.check or config.max_grad_norm is not None:
            # Under DDP the gradients are already all-reduced, so this norm is identical on every rank and all
            # ranks skip together; a per-rank loss check could let one rank skip alone and hang the next all-reduce.
            norm = grad_norm(self.params, config.max_grad_norm)
        skipped = self.check and not bool(torch.isfinite(norm))  # the one per-step host sync, opted into
        if (
            scaler is not None
        ):  # fp16: the GradScaler skips steps with inf/nan gradients (and lowers its scale)
            scaler.step(optimizer)
            scaler.update()
        elif not skipped:
            optimizer.step()
        if self.scheduler is not None and not skipped:
            self.scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        return norm, skipped

    def finite(self) -> bool:
        """Every rank's parameters and logged loss since the last log are finite (one host sync; checkpoints)."""
        norm = full_value(torch.nn.utils.get_total_norm([p.detach() for p in self.params]))
        local = int(torch.isfinite(norm) & self.window.finite())
        return bool(all_reduce(local, self.env, op="min"))
