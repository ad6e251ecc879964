"""The training loop: ``train``, plus re-exports of ``TrainConfig`` and ``evaluate``/``predict``.

``train`` reads top to bottom: setup -> resume -> epochs -> optimizer steps -> log/evaluate/checkpoint -> export.
The components above it decide their own timing: the :class:`~hf_loop.logs.Reporter` knows its log steps, the
:class:`Evaluator` when to evaluate, the :class:`~hf_loop.checkpoint.Checkpointer` when to save, the
:class:`StopSignals` whether a signal asked the run to stop. The run's position is one
:class:`~hf_loop.state.TrainState` plus the training loader's own state (``feed.py``).
"""

from __future__ import annotations

import logging
import signal
import threading
import warnings
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import torch

from hf_loop import threads
from hf_loop.checkpoint import Checkpointer, run_identity
from hf_loop.config import TrainConfig, TrainResult
from hf_loop.dist import DistEnv, all_reduce, barrier, default_device
from hf_loop.evaluation import ParameterTable, count_parameters, evaluate, predict
from hf_loop.feed import Feed
from hf_loop.fsdp import check_optimizer, gathered, is_sharded
from hf_loop.logs import Reporter
from hf_loop.state import RandomState, TrainState
from hf_loop.steps import ModelInputs, TrainStep

__all__ = ["TrainConfig", "TrainResult", "train", "evaluate", "predict", "count_parameters", "ParameterTable"]

logger = logging.getLogger("hf_loop")


class StopSignals:
    """SIGTERM (preemption) and a first Ctrl-C (SIGINT) ask the run to stop at the next step boundary, after a
    checkpoint; a second Ctrl-C aborts at once (``KeyboardInterrupt``). The previous handlers come back on exit.

    Under DDP the ranks agree on a stop at log steps (``agree``), where they synchronise anyway.
    """

    CODES = {None: 0, "sigterm": 1, "interrupted": 2}

    def __init__(self, env: DistEnv) -> None:
        self.env = env
        self.reason: str | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():  # signal handlers live in the main thread
            for signum in (signal.SIGTERM, signal.SIGINT):
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc: Any) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)

    def _handle(self, signum: int, frame: Any) -> None:
        if signum == signal.SIGINT:
            if self.reason == "interrupted":
                raise KeyboardInterrupt  # the second Ctrl-C: stop now, without a checkpoint
            logger.warning(
                "Ctrl-C: stopping after this step (with a checkpoint); press Ctrl-C again to abort"
            )
        self.reason = self.reason or ("interrupted" if signum == signal.SIGINT else "sigterm")

    def agree(self) -> None:
        if self.env.distributed:
            code = int(all_reduce(self.CODES[self.reason], self.env, op="max"))
            self.reason = {v: k for k, v in self.CODES.items()}[code]

    def now(self, log_step: bool) -> str | None:
        """The stop asked for, if the ranks can act on it at this step (any step alone, log steps under DDP)."""
        return self.reason if log_step or not self.env.distributed else None


class Evaluator:
    """Evaluates every ``eval_every`` steps (else at each epoch's end) and at the end; tracks the best metric."""

    def __init__(self, model: torch.nn.Module, loader: Iterable | None, *, config: TrainConfig, env: DistEnv,
                 loss_fn: Callable | None, metrics: Mapping[str, Callable] | None, state: TrainState,
                 report: Reporter) -> None:  # fmt: skip
        self.model, self.loader, self.config, self.env = model, loader, config, env
        self.loss_fn, self.metrics, self.state, self.report = loss_fn, metrics, state, report
        self.last: dict[str, float] = {}
        self.last_step = -1

    def should_run(self, step: int, *, epoch_end: bool, final: bool) -> bool:
        if self.loader is None or step == self.last_step:
            return False
        every = self.config.eval_every
        return final or (step % every == 0 if every else epoch_end)

    def run(self, step: int) -> bool:
        """Evaluate; True when ``best_metric`` improved (the loop then checkpoints this step)."""
        result = evaluate(self.model, self.loader, loss_fn=self.loss_fn, metrics=self.metrics, env=self.env,
                          precision=self.config.precision)  # fmt: skip
        metric = self.config.best_metric
        if metric not in result:
            raise ValueError(
                f"TrainConfig.best_metric={metric!r} is not among the eval results {sorted(result)}; pass it in "
                "metrics= or choose one of those"
            )
        self.last, self.last_step = result, step
        improved = self.state.record_eval(result[metric], greater_is_better=self.config.greater_is_better)
        self.report.emit({"step": step, **{f"eval_{k}": v for k, v in result.items()}})
        return improved

    def patience_spent(self) -> bool:
        return self.config.patience is not None and self.state.bad_evals >= self.config.patience


def _build_scheduler(config: TrainConfig, optimizer: torch.optim.Optimizer, total_steps: int) -> Any:
    if config.scheduler is None or not isinstance(config.scheduler, str):
        return config.scheduler
    from transformers import get_scheduler

    if config.warmup_steps > total_steps:
        warnings.warn(
            f"TrainConfig.warmup_steps={config.warmup_steps} is longer than the run ({total_steps} steps): the "
            "learning rate never reaches its peak. Lower warmup_steps or train longer",
            stacklevel=3,
        )
    return get_scheduler(
        config.scheduler, optimizer, num_warmup_steps=config.warmup_steps, num_training_steps=total_steps
    )


def _wrap(model: torch.nn.Module, optimizer: torch.optim.Optimizer, config: TrainConfig, env: DistEnv) -> Any:
    """The module the steps call: compiled if asked, and DDP-wrapped under torchrun unless FSDP2 shards it."""
    sharded = is_sharded(model)
    if sharded:
        check_optimizer(model, optimizer)
    if config.compile:
        model = torch.compile(model)
    if env.distributed and not sharded:
        model = torch.nn.parallel.DistributedDataParallel(
            model,
            device_ids=[env.device.index] if env.device.type == "cuda" else None,
            find_unused_parameters=config.ddp_find_unused_parameters,
            static_graph=config.ddp_static_graph,
        )
    return model


def _check_arguments(config: TrainConfig, feed: Feed, loader: Iterable, eval_loader: Iterable | None) -> None:
    if feed.per_epoch is None and config.max_steps is None:
        raise ValueError(
            f"the training loader ({type(loader).__name__}) has no length (a stream), so the run length is "
            "unknown: set TrainConfig(max_steps=...)"
        )
    if feed.per_epoch == 0:
        dataset = getattr(loader, "dataset", None)
        rows = len(dataset) if hasattr(dataset, "__len__") else "?"
        batch_size = getattr(getattr(loader, "batch_sampler", None), "batch_size", None)
        raise ValueError(
            f"the training loader yields no batch (dataset of {rows} rows, batch_size={batch_size}): the dataset "
            "is empty, or drop_last=True with a batch_size larger than each rank's share. Lower batch_size or "
            "pass drop_last=False"
        )
    for option, what in (("patience", "early stopping"), ("eval_every", "periodic evaluation")):
        if getattr(config, option) is not None and eval_loader is None:
            raise ValueError(
                f"TrainConfig.{option} ({what}) needs eval_loader= to evaluate on; pass one or drop {option}"
            )
    if config.out_dir is not None and not hasattr(loader, "state_dict"):
        raise TypeError(
            f"checkpoints in out_dir need a resumable loader with state_dict(consumed=...), got "
            f"{type(loader).__name__}; build it with hl.make_loader(...)"
        )


def _run_length(state: TrainState, feed: Feed, config: TrainConfig) -> int:
    """Optimizer steps of the whole run, from global quantities, so a resume on another world size (or per-rank
    batch) continues the same global order and trains every example ``epochs`` times."""
    if config.max_steps is not None:
        return config.max_steps
    if state.epoch >= config.epochs:
        return state.step
    return state.step + feed.steps_left() + (config.epochs - state.epoch - 1) * feed.steps_per_epoch()


def _export(model: torch.nn.Module, config: TrainConfig, env: DistEnv) -> None:
    """``save_pretrained`` into ``out_dir/final``; a sharded model's weights are gathered from every rank first."""
    if not (config.export and config.out_dir is not None and hasattr(model, "save_pretrained")):
        return
    weights = gathered(model) if is_sharded(model) else None  # every rank takes part in the gather
    if env.is_main:  # save_pretrained pops entries from the dict it is given: give it a copy
        model.save_pretrained(Path(config.out_dir) / "final", state_dict=dict(weights) if weights else None)
    barrier(env)


def train(
    model: torch.nn.Module,
    train_loader: Iterable,
    optimizer: torch.optim.Optimizer,
    config: TrainConfig,
    *,
    loss_fn: Callable | None = None,
    eval_loader: Iterable | None = None,
    env: DistEnv | None = None,
    metrics: Mapping[str, Callable[[Any, Any], float]] | None = None,
    on_log: Callable[[dict[str, Any]], None] | None = None,
) -> TrainResult:
    """Train ``model``; resume from the newest checkpoint in ``config.out_dir`` that verifies, if any.

    Under ``torchrun`` pass ``env=hl.init_distributed()`` and a loader built with ``make_loader(env=env)``: the
    model is wrapped in DistributedDataParallel; rank 0 logs. On SIGTERM (preemption) or a first Ctrl-C a
    checkpoint is written at the next optimizer step (under DDP: the next log step, where the ranks agree) and
    ``train`` returns with ``stop_reason`` "sigterm" or "interrupted"; the same command resumes.

    Args:
        loss_fn: ``fn(outputs, batch)`` returning the mean loss, or ``(loss_sum, count)``; default: the model's
            ``loss``. Either way the step's loss is the mean over all its targets (micro-batches and ranks).
        eval_loader: evaluated every ``eval_every`` steps (else at each epoch's end) and at the end.
        env: the process's place in the job; default one process on the best device.
        metrics: name -> ``fn(predictions, labels) -> float`` for the evaluations.
        on_log: called on rank 0 with each log record (the same dicts as ``out_dir/metrics.jsonl``).

    Example:
        >>> loader = hl.make_loader(hl.MapDataset(ds), batch_size=8)     # ds: 32 rows with input_ids and label
        >>> optimizer = torch.optim.AdamW(model.parameters(), lr=3e-4)
        >>> result = hl.train(model, loader, optimizer, hl.TrainConfig(epochs=2, out_dir="runs/a"))
        >>> result.steps, result.checkpoint
        (8, PosixPath('runs/a/checkpoints/step-00000008'))
        >>> longer = hl.train(model, loader, optimizer, hl.TrainConfig(epochs=3, out_dir="runs/a"))
        >>> longer.steps, longer.resumed_from             # continued from step 8, one more epoch
        (12, PosixPath('runs/a/checkpoints/step-00000008'))
    """
    # -- setup: the data feed, the run's state, and every object a checkpoint holds
    env = env or DistEnv(device=default_device())
    feed = Feed(train_loader, env, config.grad_accum)
    _check_arguments(config, feed, train_loader, eval_loader)
    watch = _threads(config, env, train_loader)
    raw = model.to(env.device)
    state = TrainState()
    scaler = torch.amp.GradScaler(env.device.type) if config.precision == "fp16" else None  # the loop owns it
    states = {"model": raw, "optimizer": optimizer, "scheduler": None, "scaler": scaler, "loader": feed,
              "train_state": state, "rng": RandomState()}  # fmt: skip
    identity = run_identity(raw, train_loader, optimizer) if config.out_dir is not None else {}
    checkpoints = Checkpointer(config, env, states, identity=identity, finite=lambda: step.finite())

    with checkpoints.lock(), StopSignals(env) as signals:
        # -- resume from the newest checkpoint that verifies; the run length follows from its position
        torch.manual_seed(config.seed + env.rank)  # dropout masks differ across ranks, as with one per GPU
        total = _resume(checkpoints, states, feed, config)
        report = Reporter(config=config, env=env, total=total, start=state.step, on_log=on_log,
                          padding=getattr(train_loader, "padding", None))  # fmt: skip
        step = TrainStep(_wrap(raw, optimizer, config, env), optimizer, scheduler=states["scheduler"], scaler=scaler,
                         inputs=ModelInputs(raw, config.model_inputs), loss_fn=loss_fn, config=config, env=env,
                         window=report.window)  # fmt: skip
        evaluator = Evaluator(raw, eval_loader, config=config, env=env, loss_fn=loss_fn, metrics=metrics,
                              state=state, report=report)  # fmt: skip
        raw.train()
        start = state.step
        try:
            # -- epochs, then optimizer steps; the feed's look-ahead says when a step is its epoch's last
            while state.stop_reason is None:
                epoch = state.epoch
                for micro in feed.epoch(epoch):
                    log_now = report.due(state.step + 1)
                    stepped, norm = step(micro, want_norm=log_now)
                    if not stepped:  # a non-finite gradient: skipped, and not counted
                        _count_bad_step(state, config)
                        continue
                    state.step, state.bad_steps = state.step + 1, 0
                    report.stepped()
                    watch.check()  # threads="auto": at most once a second, fewer threads while others take CPUs
                    epoch_end = feed.ended
                    if log_now:  # the only host sync of a default step
                        report.log(state.step, epoch, optimizer.param_groups[0]["lr"], norm)
                        signals.agree()
                    if epoch_end:  # every rank agrees: map-style ranks have equal batches, streams even_steps
                        state.epoch = epoch + 1
                    state.stop_reason = "completed" if state.step >= total else signals.now(log_now)
                    final = state.stop_reason == "completed"
                    improved = evaluator.should_run(state.step, epoch_end=epoch_end, final=final) and (
                        evaluator.run(state.step)
                    )
                    if state.stop_reason is None and evaluator.patience_spent():
                        state.stop_reason = "early_stopping"
                    checkpoints.save(state.step, force=improved or state.stop_reason is not None)
                    if state.stop_reason is not None:
                        break
                if state.stop_reason is None:  # the epoch ended on a skipped (non-finite) step
                    state.epoch = epoch + 1

            # -- teardown: the last checkpoint complete on disk, and the final model, for from_pretrained
            checkpoints.wait()
            if state.stop_reason in ("completed", "early_stopping") and state.step > start:
                _export(raw, config, env)
        finally:
            report.close()
    return TrainResult(
        steps=state.step, epochs=state.epoch, train_loss=report.mean_loss(), last_loss=report.last_loss,
        eval=evaluator.last, best_metric=state.best, checkpoint=checkpoints.path,
        best_checkpoint=checkpoints.folder(state.best_step), samples_per_s=report.rate("samples"),
        tokens_per_s=report.rate("tokens"), padding=getattr(getattr(train_loader, "padding", None), "waste", None),
        stop_reason=state.stop_reason, resumed_from=checkpoints.resumed_from, unread_examples=feed.unread_examples,
    )  # fmt: skip


def _resume(checkpoints: Checkpointer, states: dict[str, Any], feed: Feed, config: TrainConfig) -> int:
    """Load the newest checkpoint: the position first (it decides the run length and so the scheduler), then
    everything else. Returns the run length in optimizer steps."""
    loaded = checkpoints.restore()
    if loaded is not None:
        checkpoints.apply(loaded, ("train_state", "loader"))
    state = states["train_state"]
    total = _run_length(state, feed, config)
    states["scheduler"] = _build_scheduler(config, states["optimizer"], total)
    if loaded is not None:
        checkpoints.apply(loaded)
    # A finished run can be extended (a larger max_steps or epochs); an early-stopped one stays stopped.
    if state.step >= total:
        state.stop_reason = "completed"
    elif state.stop_reason != "early_stopping":
        state.stop_reason = None
    return total


def _threads(config: TrainConfig, env: DistEnv, loader: Any) -> threads.Watch:
    """Apply ``TrainConfig.threads`` on CPU; the Watch keeps an "auto" choice fitted to the idle CPUs (for any
    other setting it does nothing)."""
    if config.threads is None or env.device.type != "cpu":
        return threads.Watch(None)
    if isinstance(config.threads, threads.ThreadChoice):  # applied already (the CLI prints it first)
        return threads.Watch(config.threads)
    requested = None if config.threads == "auto" else config.threads
    chosen = threads.apply(requested, env=env, num_workers=getattr(loader, "num_workers", 0))
    logger.info("cpu: %s", chosen)
    return threads.Watch(chosen)


def _count_bad_step(state: TrainState, config: TrainConfig) -> None:
    state.bad_steps += 1
    logger.warning(
        "step %d: non-finite gradient norm, step skipped (%d in a row)", state.step + 1, state.bad_steps
    )
    if state.bad_steps >= config.max_bad_steps:
        raise FloatingPointError(
            f"{state.bad_steps} optimizer steps in a row had a non-finite gradient norm (last at step "
            f"{state.step + 1}); lower the learning rate, use bf16 instead of fp16, or set max_grad_norm"
        )
