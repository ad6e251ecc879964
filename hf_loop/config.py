"""Training settings and results: ``TrainConfig`` (frozen, checked on construction) and ``TrainResult``."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hf_loop.checks import boolean, integer, optional_integer
from hf_loop.steps import PRECISIONS
from hf_loop.threads import ThreadChoice


def _positive(name: str, value: Any, *, allow_none: bool = False, minimum: int = 1) -> None:
    """An int option of at least ``minimum``: a TypeError for another type (2.0, "2", True), a ValueError below."""
    check = optional_integer if allow_none else integer
    check(f"TrainConfig.{name}", value, minimum)


@dataclass(frozen=True, kw_only=True)
class TrainConfig:
    """Everything ``train`` needs besides the model, data and optimizer. Checked on construction.

    ``max_steps``, when set, overrides ``epochs`` (streams have no length and require it). ``scheduler`` is a
    torch LR scheduler object or a ``transformers.get_scheduler`` name ("linear", "cosine", ...) used with
    ``warmup_steps``. ``max_bad_steps`` turns on the per-step non-finite gradient check (one host sync per
    optimizer step): steps with a non-finite gradient norm are skipped, and that many in a row stop training.
    Without it, a non-finite loss or norm is reported at the next log step as an error.

    Fields beyond DESIGN.md's list: ``keep_last`` checkpoints (plus the best by ``best_metric``, lower is better
    unless ``greater_is_better``), ``patience`` evaluations without improvement before early stopping,
    ``ddp_find_unused_parameters`` / ``ddp_static_graph`` (DistributedDataParallel options), ``model_inputs``
    (the batch keys passed to the model; default: what ``forward`` names), ``export`` (``save_pretrained`` of the
    final model into ``out_dir/final`` for transformers models), ``resume_allow`` (identity parts — "model",
    "data", "optimizer" — that may differ from the checkpoint's when resuming on purpose: another copy of the
    pretrained weights, re-created data, a new optimizer class, which then starts fresh), ``async_checkpoint``
    (sharded checkpoints written in the background). ``threads`` sets torch's intra-op threads on CPU: an int,
    "auto" (chosen from the cores this process may use and those other processes leave idle, then kept fitted
    to the idle CPUs, checked at most once a second; see ``hf_loop.threads``), a ``ThreadChoice`` from
    ``hf_loop.threads.apply`` (already applied, e.g. to print it first; kept fitted like "auto"), or None
    (torch's own count, untouched).

    Example:
        >>> config = TrainConfig(epochs=3, grad_accum=4, precision="bf16", max_grad_norm=1.0, out_dir="runs/a")
        >>> config.grad_accum
        4
    """

    epochs: int = 1
    max_steps: int | None = None
    grad_accum: int = 1
    precision: str = "fp32"
    max_grad_norm: float | None = None
    scheduler: Any = None
    warmup_steps: int = 0
    eval_every: int | None = None
    checkpoint_every: int | None = None
    out_dir: str | Path | None = None
    seed: int = 0
    compile: bool = False
    progress: bool = True
    log_every: int = 10
    keep_last: int = 2
    best_metric: str = "loss"
    greater_is_better: bool = False
    patience: int | None = None
    max_bad_steps: int | None = None
    ddp_find_unused_parameters: bool = False
    ddp_static_graph: bool = False
    model_inputs: Sequence[str] | None = None
    export: bool = True
    resume_allow: Sequence[str] = ()
    async_checkpoint: bool = False
    threads: int | str | ThreadChoice | None = None

    def __post_init__(self) -> None:
        for name in ("epochs", "grad_accum", "log_every", "keep_last"):
            _positive(name, getattr(self, name))
        for name in ("max_steps", "eval_every", "checkpoint_every", "patience", "max_bad_steps"):
            _positive(name, getattr(self, name), allow_none=True)
        _positive("warmup_steps", self.warmup_steps, minimum=0)
        if self.max_grad_norm is not None and not (
            isinstance(self.max_grad_norm, (int, float)) and self.max_grad_norm > 0
        ):
            raise ValueError(
                f"TrainConfig.max_grad_norm must be a number > 0 or None, got {self.max_grad_norm!r}"
            )
        if self.precision not in PRECISIONS:
            raise ValueError(
                f"TrainConfig.precision must be one of {sorted(PRECISIONS)}, got {self.precision!r}"
            )
        if isinstance(self.scheduler, str):
            from transformers import SchedulerType

            names = [s.value for s in SchedulerType]
            if self.scheduler not in names:
                raise ValueError(
                    f"TrainConfig.scheduler must be one of {names} or a torch LR scheduler, "
                    f"got {self.scheduler!r}"
                )
        elif self.scheduler is not None and not (
            hasattr(self.scheduler, "step") and hasattr(self.scheduler, "state_dict")
        ):
            raise TypeError(
                f"TrainConfig.scheduler must be a scheduler name or a torch LR scheduler object, "
                f"got {type(self.scheduler).__name__}"
            )
        integer("TrainConfig.seed", self.seed, 0)
        if isinstance(self.threads, str) and self.threads != "auto":
            raise ValueError(
                f"TrainConfig.threads must be an int >= 1, 'auto' (chosen from the idle cores) or None (torch's "
                f"own count), got {self.threads!r}"
            )
        if self.threads != "auto" and not isinstance(self.threads, ThreadChoice):
            optional_integer("TrainConfig.threads", self.threads, 1)
        for name in ("compile", "progress", "greater_is_better", "ddp_find_unused_parameters",
                     "ddp_static_graph", "export", "async_checkpoint"):  # fmt: skip
            boolean(f"TrainConfig.{name}", getattr(self, name))
        if self.checkpoint_every is not None and self.out_dir is None:
            raise ValueError(
                "TrainConfig.checkpoint_every needs out_dir: set out_dir='runs/name' to say where "
                "checkpoints go"
            )
        if not isinstance(self.best_metric, str) or not self.best_metric:
            raise ValueError(
                f"TrainConfig.best_metric must be a metric name such as 'loss', got {self.best_metric!r}"
            )
        if isinstance(self.model_inputs, str):
            raise TypeError(
                f"TrainConfig.model_inputs must be a list of key names, got the string "
                f"{self.model_inputs!r}; write model_inputs=[{self.model_inputs!r}]"
            )
        if self.model_inputs is not None:
            object.__setattr__(self, "model_inputs", tuple(self.model_inputs))
        allowed = ("model", "data", "optimizer")
        if isinstance(self.resume_allow, str) or not all(part in allowed for part in self.resume_allow):
            raise ValueError(
                f"TrainConfig.resume_allow must be a tuple of identity parts from {allowed} (what may differ "
                f"from the checkpoint when resuming), got {self.resume_allow!r}"
            )
        object.__setattr__(self, "resume_allow", tuple(self.resume_allow))
        if self.out_dir is not None:
            object.__setattr__(self, "out_dir", Path(self.out_dir))

    def fingerprint(self) -> dict[str, Any]:
        """The settings that shape the training trajectory (compared on resume)."""
        sched = (
            self.scheduler
            if isinstance(self.scheduler, str) or self.scheduler is None
            else type(self.scheduler).__name__
        )
        return {
            "grad_accum": self.grad_accum,
            "precision": self.precision,
            "max_grad_norm": self.max_grad_norm,
            "scheduler": sched,
            "warmup_steps": self.warmup_steps,
            "seed": self.seed,
            "max_steps": self.max_steps,
            "epochs": self.epochs,
        }


@dataclass
class TrainResult:
    """What a ``train`` call did.

    ``train_loss`` is the mean over every logged step of this call (weighted by loss targets), ``last_loss`` the
    last log window's; ``eval`` the last evaluation; ``checkpoint`` the last file written and
    ``best_checkpoint`` the one with the best ``best_metric``; ``padding`` the loader's share of padded token
    slots; ``unread_examples`` the examples a distributed stream's epochs ended without (``even_steps``).
    ``stop_reason``: "completed" | "early_stopping" | "sigterm" | "interrupted" (Ctrl-C; for both a checkpoint
    was written: rerun the same command to continue).

    Example:
        >>> len(loader)                     # batches per epoch
        4
        >>> result = hl.train(model, loader, optimizer, TrainConfig(epochs=2))
        >>> result.steps, result.epochs, result.stop_reason, result.checkpoint    # no out_dir: no checkpoint
        (8, 2, 'completed', None)
    """

    steps: int
    epochs: int
    train_loss: float | None
    last_loss: float | None
    eval: dict[str, float] = field(default_factory=dict)
    best_metric: float | None = None
    best_checkpoint: Path | None = None
    checkpoint: Path | None = None
    samples_per_s: float = 0.0
    tokens_per_s: float = 0.0
    padding: float | None = None
    stop_reason: str = "completed"
    resumed_from: Path | None = None
    unread_examples: int = 0

    @property
    def stopped_early(self) -> bool:
        return self.stop_reason == "early_stopping"
