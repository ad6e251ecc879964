"""What ``hf-loop finetune`` prints: the header, a line per log record, the summary, and the one line that
explains a stop (Ctrl-C, SIGTERM). Printing never stops training: a closed stdout (``hf-loop finetune | head``)
silences the output and the run goes on to its checkpoints and final model.
"""

from __future__ import annotations

import contextlib
import math
import os
import sys
from argparse import Namespace
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from hf_loop.cli.data import Data
    from hf_loop.dist import DistEnv


@dataclass
class Plan:
    """What the run will do, as the header and the summary report it."""

    steps: int
    lr: float
    checkpoint_every: int
    cpu: str  # the thread choice, as the header prints it
    max_tokens: int | None = None
    expected_padding: dict[str, float] | None = None
    shard_plan: str | None = None
    baseline: dict[str, Any] = field(default_factory=dict)


@dataclass
class Outcome:
    """The numbers of the final summary."""

    data: Data
    plan: Plan
    result: Any  # hl.TrainResult
    eval: dict[str, float]
    seconds: float
    out_dir: str


# stop reasons after which the same command continues the run, with the exit status the command returns
STOPPED = {"interrupted": 130, "sigterm": 143}  # 128 + SIGINT, 128 + SIGTERM


class Console:
    """Prints lines to stdout on rank 0. When the reader of stdout has gone (``| head`` exited), the output is
    sent to the null device instead: later prints, and Python's final flush, then cannot raise.

    Example:
        >>> say = Console(enabled=True)
        >>> say("step 1")
        step 1
    """

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled

    def __call__(self, text: str) -> None:
        if not self.enabled:
            return
        try:
            print(text, flush=True)
        except BrokenPipeError:
            self.enabled = False
            _silence(sys.stdout)


class RunLog:
    """The run's lines on rank 0: the header, then one per log record (``hl.train``'s ``on_log``). Remembers
    the plan and the last logged step, for the line printed when a second Ctrl-C aborts the run."""

    def __init__(self, say: Console) -> None:
        self.say, self.plan, self.step = say, None, None

    def start(self, text: str, plan: Plan) -> None:
        self.plan = plan
        self.say(text)

    def __call__(self, record: Mapping[str, Any]) -> None:
        self.step = record.get("step", self.step)
        self.say(log_line(record, self.plan))


def _silence(stream: Any) -> None:
    """Point ``stream``'s file descriptor (and stderr's, when it is the same pipe) at the null device."""
    try:
        fd = stream.fileno()
        null = os.open(os.devnull, os.O_WRONLY)
        if os.path.samestat(os.fstat(fd), os.fstat(sys.stderr.fileno())):  # `2>&1 | head`: stderr too
            os.dup2(null, sys.stderr.fileno())
        os.dup2(null, fd)
        os.close(null)
    except (OSError, ValueError):  # no file descriptor (a captured stream in tests): nothing to redirect
        pass


@contextlib.contextmanager
def progress_bars_on_a_terminal_only(*, models: bool) -> Iterator[None]:
    """Off, for datasets (and transformers with ``models``), while stderr is not a terminal: in a log file or a
    pipe their bars are noise between the command's lines and before its one-line errors. Restored afterwards."""
    if sys.stderr.isatty():
        yield
        return
    import datasets

    data_bars = not datasets.are_progress_bars_disabled()
    datasets.disable_progress_bars()
    model_bars = False
    if models:
        from transformers.utils import logging as transformers_logging

        model_bars = transformers_logging.is_progress_bar_enabled()
        transformers_logging.disable_progress_bar()
    try:
        yield
    finally:
        if data_bars:
            datasets.enable_progress_bars()
        if model_bars:
            transformers_logging.enable_progress_bar()


def error_line(command: str, message: object) -> None:
    """A user's mistake or a stop, as one line on stderr."""
    with contextlib.suppress(BrokenPipeError, ValueError):
        print(f"hf-loop {command}: {message}", file=sys.stderr, flush=True)


def header(args: Namespace, data: Data, model: Any, env: DistEnv, plan: Plan) -> str:
    from hf_loop.fsdp import model_class  # torch is loaded by now; the module is imported before it

    size = "stream" if data.streaming else f"{len(data.train)} train rows"
    params = sum(p.numel() for p in model.parameters())
    if data.labels.regression:
        target = f"label {data.label_column!r} (float: regression, MSE loss, reported as RMSE and R^2)"
    else:
        names = data.labels.names
        target = f"label {data.label_column!r} ({len(names)} classes: {', '.join(names[:8])})"
    lines = [
        f"data: {data.source} - {size}, {len(data.val)} validation rows; text {data.text_column!r}, {target}",
        *(f"      {note}" for note in data.notes),
        f"model: {args.model or 'tiny BERT from a config (demo)'} - {params:,} parameters, {model_class(model).__name__}"
        + (f", sharded over {env.world_size} rank(s) with FSDP2" if args.fsdp else ""),
        f"training: {plan.steps} optimizer steps, batch {args.batch_size} x {env.world_size} rank(s) x grad_accum "
        f"{args.grad_accum}, sampler {args.sampler}"
        + (f" (max_tokens {plan.max_tokens})" if plan.max_tokens else "")
        + f", lr {plan.lr:g}, {args.precision}, device {env.device}",
        f"cpu: {plan.cpu}" + ("" if args.threads else "; --threads N to choose"),
        f"checkpoints: every {plan.checkpoint_every} steps in {args.out_dir} (Ctrl-C: checkpoint and stop; run "
        "the same command to continue)",
    ]
    if plan.shard_plan:
        lines.append(plan.shard_plan)
    return "\n".join(lines)


def regression_scores(mse: float, variance: float) -> dict[str, float]:
    """RMSE and R^2 from a mean squared error and the variance of the targets it was measured on.

    Example:
        >>> regression_scores(0.25, 1.0)
        {'rmse': 0.5, 'r2': 0.75}
    """
    return {"rmse": math.sqrt(mse), "r2": 1 - mse / variance if variance > 0 else float("nan")}


def _eval_text(record: Mapping[str, Any], baseline: Mapping[str, Any]) -> str:
    """The metrics of an eval record (``eval_*`` keys): regression scores come from the eval MSE."""
    if "variance" in baseline:
        scores = regression_scores(record["eval_loss"], baseline["variance"])
        return f"  rmse {scores['rmse']:.4f}  r2 {scores['r2']:.4f}"
    skip = ("eval_loss", "eval_examples")
    return "".join(f"  {k[5:]} {v:.4f}" for k, v in record.items() if k.startswith("eval_") and k not in skip)


def log_line(record: Mapping[str, Any], plan: Plan) -> str:
    if "eval_loss" in record:
        return f"step {record['step']:>5}/{plan.steps}  eval loss {record['eval_loss']:.4f}" + _eval_text(
            record, plan.baseline
        )
    padding = record.get("padding")
    return (
        f"step {record['step']:>5}/{plan.steps}  loss {record['loss']:.4f}  lr {record['lr']:.2e}  "
        f"{record.get('samples_per_s', 0):7.1f} samples/s"
        + ("" if padding is None else f"  padding {padding:.1%}")
    )


def stop_line(outcome: Outcome) -> str:
    """The one line for a run stopped by a signal, with the checkpoint that continues it."""
    result = outcome.result
    why = "interrupted (Ctrl-C)" if result.stop_reason == "interrupted" else "stopped by SIGTERM"
    return (
        f"{why} at step {result.steps}: checkpoint written to {result.checkpoint}; run the same command to "
        "continue"
    )


def _scores(outcome: Outcome) -> list[str]:
    ev, base = outcome.eval, outcome.plan.baseline
    examples = int(ev.get("examples", 0))
    if outcome.data.labels.regression:
        scores = regression_scores(ev.get("loss", float("nan")), base["variance"])
        return [
            f"  eval RMSE         {scores['rmse']:.4f} on {examples} examples  (predicting the train mean "
            f"{base['mean']:.4g}: {base['rmse']:.4f})",
            f"  eval R^2          {scores['r2']:.4f}   eval loss (MSE) {ev.get('loss', float('nan')):.4f}",
        ]
    return [
        f"  eval accuracy     {ev.get('accuracy', float('nan')):.4f} on {examples} examples"
        f"  (majority-class baseline {base['accuracy']:.4f}: always {base['majority']!r})",
        f"  eval macro-F1     {ev.get('macro_f1', float('nan')):.4f}   eval loss {ev.get('loss', float('nan')):.4f}",
    ]


def summary(outcome: Outcome) -> str:
    result, plan, run = outcome.result, outcome.plan, outcome.out_dir
    lines = [
        "",
        f"done in {outcome.seconds:.1f} s: {result.steps} optimizer steps, {result.epochs} full epoch(s), "
        f"stop: {result.stop_reason}"
        + (f" (resumed from {result.resumed_from})" if result.resumed_from else ""),
        f"  train loss        {result.train_loss:.4f} (mean of logged windows), last {result.last_loss:.4f}"
        if result.train_loss is not None
        else f"  train loss        (no step to run: {run} holds a finished run; raise --max-steps or "
        "--epochs to continue it, or pass a new --out-dir)",
        *_scores(outcome),
    ]
    if result.train_loss is not None:
        lines.append(
            f"  throughput        {result.samples_per_s:.1f} samples/s, {result.tokens_per_s:.0f} tokens/s"
        )
    if result.padding is not None and result.train_loss is not None:
        line = f"  padding           {result.padding:.1%} of batch tokens were padding"
        if plan.expected_padding:
            expected = plan.expected_padding
            line += (
                f" (one-epoch estimate: random {expected['random']:.1%}, length {expected['length']:.1%}, "
                f"tokens {expected['tokens']:.1%})"
            )
        lines.append(line)
    lines += [
        f"  checkpoint        {result.checkpoint}",
        f"  final model       {os.path.join(run, 'final')} (save_pretrained)",
        f'  metrics log       {os.path.join(run, "metrics.jsonl")} (plot: python -c "import hf_loop as hl; '
        f"hl.plot_run('{run}')\")",
    ]
    return "\n".join(lines)
