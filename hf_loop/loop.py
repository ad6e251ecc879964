"""The training loop: ``train``, plus re-exports of ``TrainConfig`` and ``evaluate``/``predict``.

``train`` reads top to bottom: setup -> resume -> epochs -> micro-steps -> optimizer step -> log/eval/checkpoint
-> teardown. Helpers sit above it. Per-batch bookkeeping (which keys reach the model, how many loss targets a batch
holds, device staging) lives in ``steps.py``; files in ``checkpoint.py``; evaluation in ``evaluation.py``;
settings in ``config.py``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import signal
import sys
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from hf_loop import checkpoint
from hf_loop.config import TrainConfig, TrainResult
from hf_loop.dist import DistEnv, all_reduce, broadcast_object, default_device, even_steps
from hf_loop.evaluation import ParameterTable, count_parameters, evaluate, predict
from hf_loop.steps import (
    ModelInputs,
    Window,
    accumulate,
    loader_length,
    optimizer_step,
    set_epoch,
    staged,
)

__all__ = ["TrainConfig", "TrainResult", "train", "evaluate", "predict", "count_parameters", "ParameterTable"]

logger = logging.getLogger("hf_loop")


def _build_scheduler(config: TrainConfig, optimizer: torch.optim.Optimizer, total_steps: int) -> Any:
    if config.scheduler is None or not isinstance(config.scheduler, str):
        return config.scheduler
    from transformers import get_scheduler

    return get_scheduler(
        config.scheduler, optimizer, num_warmup_steps=config.warmup_steps, num_training_steps=total_steps
    )


def _wrap(model: torch.nn.Module, config: TrainConfig, env: DistEnv) -> torch.nn.Module:
    if config.compile:
        model = torch.compile(model)
    if env.distributed:
        model = torch.nn.parallel.DistributedDataParallel(
            model,
            device_ids=[env.device.index] if env.device.type == "cuda" else None,
            find_unused_parameters=config.ddp_find_unused_parameters,
            static_graph=config.ddp_static_graph,
        )
    return model


@contextlib.contextmanager
def _sigterm_flag() -> Iterator[dict[str, bool]]:
    """Turn SIGTERM (preemption) into a flag the loop checks at step boundaries; restore the handler after."""
    flag = {"set": False}
    if threading.current_thread() is not threading.main_thread():
        yield flag
        return
    previous = signal.signal(signal.SIGTERM, lambda *_: flag.update(set=True))
    try:
        yield flag
    finally:
        signal.signal(signal.SIGTERM, previous)


@dataclass
class _Run:
    """The objects one ``train`` call works with, so the helpers below take one argument, not fifteen."""

    raw: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Any
    scaler: torch.amp.GradScaler | None
    loader: Iterable
    config: TrainConfig
    env: DistEnv
    eval_loader: Iterable | None
    loss_fn: Callable | None
    metrics: Mapping[str, Callable] | None
    on_log: Callable[[dict[str, Any]], None] | None
    identity: dict[str, Any] | None = None
    bar: Any = None
    progress: dict[str, Any] = field(
        default_factory=lambda: {
            "step": 0,
            "epoch": 0,
            "consumed": 0,
            "best": None,
            "best_path": None,
            "bad_evals": 0,
            "finished": None,
        }
    )
    model: torch.nn.Module | None = None  # raw, or wrapped by torch.compile / DDP
    inputs: ModelInputs | None = None
    params: list[torch.nn.Parameter] = field(default_factory=list)
    window: Window | None = None
    last_eval_step: int = -1
    taken: int = 0  # batches taken from the loader's current iteration (its state counts from there)
    last_eval: dict[str, float] = field(default_factory=dict)
    saved: Path | None = None
    saved_step: int = -1

    def resume(self, path: Path) -> None:
        """Load the checkpoint at ``path`` after checking it belongs to this model and data."""
        state = checkpoint.load(path)
        checkpoint.check_identity(state["identity"], self.identity, path)
        objects = {
            k: getattr(self, k) for k in ("raw", "optimizer", "scheduler", "scaler", "loader", "config")
        }
        checkpoint.restore(state, path=path, env=self.env, **objects)
        progress = self.progress
        progress.update({k: state[k] for k in progress})
        if getattr(self.loader, "epoch", progress["epoch"]) != progress["epoch"]:  # saved at an epoch's end
            progress.update(epoch=self.loader.epoch, consumed=0)
        self.saved, self.saved_step, self.last_eval_step = path, progress["step"], progress["step"]

    def step(self, micro: list[dict[str, Any]], log_now: bool) -> tuple[torch.Tensor | None, bool]:
        """Forward/backward over one optimizer step's micro-batches, then the optimizer step itself."""
        config = self.config
        factor, losses = accumulate(micro, model=self.model, inputs=self.inputs, loss_fn=self.loss_fn,
                                    scaler=self.scaler, config=config, env=self.env)  # fmt: skip
        norm, skipped = optimizer_step(optimizer=self.optimizer, scheduler=self.scheduler, scaler=self.scaler,
                                       params=self.params, config=config, factor=factor, want_norm=log_now)  # fmt: skip
        if skipped:
            bad = self.progress["bad_steps"] = self.progress.get("bad_steps", 0) + 1
            logger.warning(
                "step %d: non-finite gradient norm, step skipped (%d in a row)",
                self.progress["step"] + 1,
                bad,
            )
            if bad >= config.max_bad_steps:
                raise FloatingPointError(
                    f"{bad} optimizer steps in a row had a non-finite gradient norm (last at step "
                    f"{self.progress['step'] + 1}); lower the learning rate, use bf16 instead of fp16, or set "
                    "max_grad_norm"
                )
        else:  # a skipped step's (non-finite) loss stays out of the logs
            for (loss_sum, count), batch in zip(losses, micro):
                self.window.add(loss_sum, count, batch)
            self.progress["step"] += 1
            self.progress.pop("bad_steps", None)
        return norm, skipped

    def finish(self, stop_reason: str) -> None:
        """Final evaluation, final checkpoint and ``save_pretrained`` export, unless a rerun has nothing new."""
        if stop_reason == "sigterm" or (
            self.saved_step == self.progress["step"] and self.progress["finished"]
        ):
            return
        if self.eval_loader is not None and self.last_eval_step != self.progress["step"]:
            self.evaluate()
        self.progress["finished"] = stop_reason
        if self.config.out_dir is not None:
            self.save()
            if self.config.export and self.env.is_main and hasattr(self.raw, "save_pretrained"):
                self.raw.save_pretrained(Path(self.config.out_dir) / "final")

    def emit(self, record: dict[str, Any]) -> None:
        if not self.env.is_main:
            return
        if self.config.out_dir is not None:
            with open(Path(self.config.out_dir) / "metrics.jsonl", "a") as f:
                f.write(json.dumps(record) + "\n")
        if self.bar is not None and "loss" in record:
            self.bar.set_postfix(loss=f"{record['loss']:.4f}", refresh=False)
        if self.on_log is not None:
            self.on_log(record)

    def save(self) -> Path:
        path = checkpoint.path_for(self.config.out_dir, self.progress["step"])
        objects = {
            k: getattr(self, k) for k in ("raw", "optimizer", "scheduler", "scaler", "loader", "config")
        }
        self.saved = checkpoint.save_training(
            path, env=self.env, progress=self.progress, consumed=self.taken, identity=self.identity, **objects
        )
        self.saved_step = self.progress["step"]
        return self.saved

    def evaluate(self) -> dict[str, float]:
        """Evaluate, track the best metric and patience, and checkpoint a new best."""
        result = evaluate(
            self.raw,
            self.eval_loader,
            loss_fn=self.loss_fn,
            metrics=self.metrics,
            env=self.env,
            precision=self.config.precision,
        )
        self.last_eval_step = self.progress["step"]
        metric = self.config.best_metric
        if metric not in result:
            raise ValueError(
                f"TrainConfig.best_metric={metric!r} is not among the eval results {sorted(result)}; "
                "pass it in metrics= or choose one of those"
            )
        best = self.progress["best"]
        value = result[metric]
        if best is None or (value > best if self.config.greater_is_better else value < best):
            self.progress.update(best=value, bad_evals=0)
            if self.config.out_dir is not None:
                self.progress["best_path"] = str(
                    checkpoint.path_for(self.config.out_dir, self.progress["step"])
                )
                self.save()
        else:
            self.progress["bad_evals"] += 1
        self.emit({"step": self.progress["step"], **{f"eval_{k}": v for k, v in result.items()}})
        self.last_eval = result
        return result

    def log(self, window: Window, norm: torch.Tensor | None) -> dict[str, Any]:
        stats = window.flush(self.env)
        grad_norm = None if norm is None else float(norm)
        if not math.isfinite(stats["loss"]) or (
            self.scaler is None and grad_norm is not None and not math.isfinite(grad_norm)
        ):
            raise FloatingPointError(
                f"training diverged by step {self.progress['step']}: loss {stats['loss']}, gradient norm "
                f"{grad_norm}. Lower the learning rate, or set TrainConfig(max_bad_steps=N) to skip such steps"
            )
        record = {
            "step": self.progress["step"],
            "epoch": self.progress["epoch"],
            "loss": stats["loss"],
            "lr": self.optimizer.param_groups[0]["lr"],
            "grad_norm": grad_norm,
            "samples_per_s": stats["samples_per_s"],
            "tokens_per_s": stats["tokens_per_s"],
            "padding": stats["padding"],
        }
        if self.env.device.type == "cuda":
            record["peak_cuda_memory_gb"] = torch.cuda.max_memory_allocated(self.env.device) / 2**30
        self.emit(record)
        return stats


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
    """Train ``model``; resume from the newest checkpoint in ``config.out_dir`` when there is one.

    Under ``torchrun`` pass ``env=hl.init_distributed()`` and a loader built with ``make_loader(env=env)``: the
    model is wrapped in DistributedDataParallel, rank 0 logs and writes checkpoints. On SIGTERM (preemption)
    a checkpoint is written at the next optimizer step (under DDP: the next log step, where the ranks agree)
    and ``train`` returns with ``stop_reason="sigterm"``; the same command resumes.

    Args:
        loss_fn: ``fn(outputs, batch)`` returning the mean loss, or ``(loss_sum, count)``; default: the model's
            ``loss``. Either way the step's loss is the mean over all its targets (micro-batches and ranks).
        eval_loader: evaluated every ``eval_every`` steps (else at each epoch's end) and at the end.
        env: the process's place in the job; default one process on the best device.
        metrics: name -> ``fn(predictions, labels) -> float`` for the evaluations.
        on_log: called on rank 0 with each log record (the same dicts as ``out_dir/metrics.jsonl``).

    Example:
        >>> loader = hl.make_loader(hl.MapDataset(ds), batch_size=32)
        >>> optimizer = torch.optim.AdamW(model.parameters(), lr=3e-4)
        >>> result = hl.train(model, loader, optimizer, hl.TrainConfig(epochs=2, out_dir="runs/a"))
        >>> result.train_loss                                                     # doctest: +SKIP
        0.42
    """
    # -- setup: run length, device, which batch keys reach the model, scheduler, scaler
    env = env or DistEnv(device=default_device())
    per_epoch = loader_length(train_loader)
    if per_epoch is None and config.max_steps is None:
        raise ValueError(
            f"the training loader ({type(train_loader).__name__}) has no length (a stream), so the run length "
            "is unknown: set TrainConfig(max_steps=...)"
        )
    total_steps = config.max_steps or config.epochs * math.ceil(per_epoch / config.grad_accum)
    if config.patience is not None and eval_loader is None:
        raise ValueError("TrainConfig.patience (early stopping) needs eval_loader= to measure the metric")
    if config.out_dir is not None and not hasattr(train_loader, "state_dict"):
        raise TypeError(
            f"checkpoints in out_dir need a resumable loader with state_dict(consumed=...), got "
            f"{type(train_loader).__name__}; build it with hl.make_loader(...)"
        )
    raw = model.to(env.device)
    scaler = torch.amp.GradScaler(env.device.type) if config.precision == "fp16" else None  # loop owns it
    run = _Run(raw=raw, optimizer=optimizer, scheduler=_build_scheduler(config, optimizer, total_steps),
               scaler=scaler, loader=train_loader, config=config, env=env, eval_loader=eval_loader,
               loss_fn=loss_fn, metrics=metrics, on_log=on_log, inputs=ModelInputs(raw, config.model_inputs),
               window=Window(env.device), params=[p for p in raw.parameters() if p.requires_grad])  # fmt: skip
    progress = run.progress

    # -- resume: the newest complete checkpoint, refused when it belongs to another model or dataset
    torch.manual_seed(config.seed + env.rank)  # dropout masks differ across ranks, as with one seed per GPU
    # Rank 0 decides which checkpoint every rank resumes from, so no rank can pick another file.
    resumed_from = broadcast_object(checkpoint.latest(config.out_dir), env)
    if resumed_from is not None and not resumed_from.exists():
        raise FileNotFoundError(
            f"rank {env.rank} cannot see {resumed_from}, the checkpoint rank 0 resumes from: out_dir must be on a "
            "filesystem every node shares"
        )
    if config.out_dir is not None:
        Path(config.out_dir).mkdir(parents=True, exist_ok=True)
        if env.is_main:  # rank 0 alone writes, so it alone cleans up what a killed writer left
            checkpoint.remove_stale_temporaries(config.out_dir)
        run.identity = checkpoint.run_identity(raw, train_loader)
    if resumed_from is not None:
        run.resume(resumed_from)
    run.model = _wrap(raw, config, env)
    totals = {"loss_sum": 0.0, "targets": 0.0, "samples": 0.0, "tokens": 0.0, "seconds": 0.0}
    # A finished run can be extended (a larger max_steps or epochs); an early-stopped one stays stopped.
    stop_reason = "early_stopping" if progress["finished"] == "early_stopping" else None
    last_loss = None
    if config.progress and env.is_main and sys.stderr.isatty():
        from tqdm.auto import tqdm

        run.bar = tqdm(total=total_steps, initial=progress["step"], desc="train", dynamic_ncols=True)
    raw.train()
    resuming = resumed_from is not None
    with _sigterm_flag() as sigterm:
        try:
            # -- epochs
            while stop_reason is None and progress["step"] < total_steps:
                # A resumed Loader keeps its position when told the epoch it is already in.
                set_epoch(train_loader, progress["epoch"])
                if not resuming:
                    progress["consumed"] = 0
                resuming = False
                # Streams may run dry on one rank first: the ranks agree every step, so none hangs in DDP.
                batches = (
                    even_steps(train_loader, env) if per_epoch is None and env.distributed else train_loader
                )
                micro_batches = staged(batches, env.device)  # the next batch is copied while this step runs
                run.taken = 0
                epoch_done = False
                while not epoch_done and stop_reason is None and progress["step"] < total_steps:
                    # -- micro-steps: all of this optimizer step's batches first, so its target count is known
                    micro = [batch for _, batch in zip(range(config.grad_accum), micro_batches)]
                    if not micro:
                        epoch_done = True
                        break
                    progress["consumed"] += len(micro)
                    run.taken += len(micro)
                    epoch_done = per_epoch is not None and progress["consumed"] >= per_epoch

                    # -- optimizer step (a skipped one, with a non-finite gradient, is not counted)
                    upcoming = progress["step"] + 1
                    log_now = upcoming % config.log_every == 0 or upcoming == total_steps
                    norm, skipped = run.step(micro, log_now)
                    if skipped:
                        continue
                    if run.bar is not None:
                        run.bar.update(1)

                    # -- log (the only host sync of a default step), evaluate, checkpoint, stop
                    if log_now:
                        stats = run.log(run.window, norm)
                        last_loss = stats["loss"]
                        totals = {k: totals[k] + stats[k] for k in totals}
                        if env.distributed:  # preemption may reach the ranks at different steps: agree here
                            sigterm["set"] = bool(all_reduce(int(sigterm["set"]), env, op="max"))
                    every_eval = config.eval_every and progress["step"] % config.eval_every == 0
                    if eval_loader is not None and (every_eval or (epoch_done and not config.eval_every)):
                        run.evaluate()  # also checkpoints a new best
                    preempted = sigterm["set"] and (log_now or not env.distributed)
                    every_ckpt = config.checkpoint_every and progress["step"] % config.checkpoint_every == 0
                    if (
                        config.out_dir is not None
                        and (every_ckpt or preempted)
                        and run.saved_step != upcoming
                    ):
                        run.save()
                    if preempted:
                        stop_reason = "sigterm"
                    elif config.patience is not None and progress["bad_evals"] >= config.patience:
                        stop_reason = "early_stopping"
                if epoch_done:
                    if run.taken == 0 and progress["consumed"] == 0:  # a whole pass without one batch
                        raise ValueError(
                            f"the training loader yielded no batches in epoch {progress['epoch']} on rank "
                            f"{env.rank}; check the dataset is not empty (and, for streams, has a shard for "
                            "every rank)"
                        )
                    progress["epoch"] += 1
                    progress["consumed"] = 0

            # -- teardown: final eval, final checkpoint, export
            stop_reason = stop_reason or "completed"
            run.finish(stop_reason)
        finally:
            if run.bar is not None:
                run.bar.close()
    seconds = max(totals["seconds"], 1e-9)
    return TrainResult(
        steps=progress["step"], epochs=progress["epoch"], last_loss=last_loss, eval=run.last_eval,
        train_loss=totals["loss_sum"] / totals["targets"] if totals["targets"] else None,
        best_metric=progress["best"], best_checkpoint=Path(progress["best_path"]) if progress["best_path"] else None,
        checkpoint=run.saved, samples_per_s=totals["samples"] / seconds, tokens_per_s=totals["tokens"] / seconds,
        padding=getattr(getattr(train_loader, "padding", None), "waste", None), stop_reason=stop_reason,
        resumed_from=resumed_from,
    )  # fmt: skip
