"""What a training run reports: loss and throughput windows, log records, the progress bar or log lines.

The loss of each step stays on the device in a :class:`Window`; a log step flushes it with one all-reduce and one
host sync, so a default step never waits for the device. Records go to ``out_dir/metrics.jsonl``, to ``on_log``
and, on rank 0, to a tqdm bar on a terminal or one line per log step elsewhere (a pipe, a batch job's log file).
"""

from __future__ import annotations

import json
import logging
import math
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch

from hf_loop.dist import DistEnv, all_reduce, batch_size_of

logger = logging.getLogger("hf_loop")


def tokens_in(batch: Mapping[str, Any]) -> tuple[torch.Tensor | int | None, int]:
    """(real tokens, token slots) of a batch: the mask's sum (a device tensor) when it has an
    ``attention_mask``, every slot of ``input_ids`` otherwise; (None, 0) without either."""
    mask = batch.get("attention_mask")
    if isinstance(mask, torch.Tensor) and mask.dim() >= 2:
        return mask.sum(), mask.numel()
    ids = batch.get("input_ids")
    if isinstance(ids, torch.Tensor) and ids.dim() >= 2:
        return ids.numel(), ids.numel()
    return None, 0


class Window:
    """Loss, counts and throughput since the last log: one host sync per log, not per step.

    ``add`` only appends (a step's loss stays a device tensor); ``flush`` stacks the window, all-reduces it and
    reads it once. Token counts come from the loader's padding counter when it has one (``hl.Loader.padding``,
    counted on the host as batches are made; it runs one look-ahead batch early), else from each batch's mask.

    Example:
        >>> window = Window(torch.device("cpu"))
        >>> window.add(torch.tensor(2.0), 3, 3, {"input_ids": torch.ones(3, 4)})
        >>> stats = window.flush(DistEnv())
        >>> stats["loss"], stats["samples"], stats["tokens"]
        (2.0, 3.0, 12.0)
    """

    def __init__(self, device: torch.device, padding: Any = None) -> None:
        self.device, self.padding = device, padding
        self.dtype = torch.float32 if device.type == "mps" else torch.float64  # MPS has no float64
        self.reset()

    def reset(self) -> None:
        self.values: list[torch.Tensor] = []  # per micro-batch: loss x weight is its loss sum
        self.weights: list[int | torch.Tensor] = []
        self.targets: list[int | torch.Tensor] = []
        self.tokens: list[int | torch.Tensor] = []
        self.samples = self.slots = 0
        self.counted = (
            (self.padding.real_tokens, self.padding.total_tokens) if self.padding is not None else None
        )
        self.started = time.perf_counter()

    def add(self, loss: torch.Tensor, weight: Any, targets: Any, batch: Mapping[str, Any]) -> None:
        self.values.append(loss.detach())
        self.weights.append(weight)
        self.targets.append(targets)
        self.samples += batch_size_of(batch)
        if self.padding is None:
            real, slots = tokens_in(batch)
            if real is not None:
                self.tokens.append(real)
                self.slots += slots

    def finite(self) -> torch.Tensor:
        """A 0-d bool tensor on the device: is every loss since the last flush finite? (No host sync.)"""
        if not self.values:
            return torch.ones((), dtype=torch.bool, device=self.device)
        return torch.isfinite(torch.stack(self.values)).all()

    def flush(self, env: DistEnv) -> dict[str, float]:
        # Every device number of the window in one stack and one read (the one host sync per log); the
        # arithmetic on them is a handful of Python floats.
        tensors = [
            x
            for x in (*self.values, *self.weights, *self.targets, *self.tokens)
            if isinstance(x, torch.Tensor)
        ]
        read = iter(torch.stack(tensors).to(self.dtype).tolist() if tensors else [])
        numbers = {}
        for name in ("values", "weights", "targets", "tokens"):
            numbers[name] = [next(read) if isinstance(x, torch.Tensor) else x for x in getattr(self, name)]
        totals = [
            sum(v * w for v, w in zip(numbers["values"], numbers["weights"])),
            sum(numbers["targets"]),
            sum(numbers["tokens"]),
            self.samples,
            self.slots,
        ]
        if self.counted is not None:
            totals[2] += self.padding.real_tokens - self.counted[0]
            totals[4] = self.padding.total_tokens - self.counted[1]
        if env.distributed:
            totals = all_reduce(torch.tensor(totals, dtype=torch.float64), env).tolist()
        loss, targets, tokens, samples, slots = map(float, totals)
        seconds = max(time.perf_counter() - self.started, 1e-9)
        self.reset()
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


class Reporter:
    """Log records of one run: the window's statistics, the JSONL file, ``on_log``, and the bar or lines.

    ``due(step)`` says whether ``step`` is a log step (every ``log_every`` steps and the last one); ``log`` flushes
    the window and raises ``FloatingPointError`` when the loss or gradient norm is no longer finite.
    """

    def __init__(self, *, config: Any, env: DistEnv, total: int, start: int, padding: Any,
                 on_log: Callable[[dict[str, Any]], None] | None) -> None:  # fmt: skip
        self.config, self.env, self.total, self.on_log = config, env, total, on_log
        self.window = Window(env.device, padding)
        self.totals = {"loss_sum": 0.0, "targets": 0.0, "samples": 0.0, "tokens": 0.0, "seconds": 0.0}
        self.last_loss: float | None = None
        self.bar = None
        self.lines = False
        if config.progress and env.is_main:
            if sys.stderr.isatty():
                from tqdm.auto import tqdm

                self.bar = tqdm(total=total, initial=start, desc="train", dynamic_ncols=True)
            else:
                self.lines = True

    def due(self, step: int) -> bool:
        return step % self.config.log_every == 0 or step == self.total

    def stepped(self) -> None:
        if self.bar is not None:
            self.bar.update(1)

    def log(self, step: int, epoch: int, lr: float, norm: torch.Tensor | None) -> None:
        stats = self.window.flush(self.env)
        grad_norm = None if norm is None else float(norm)
        if not math.isfinite(stats["loss"]) or (grad_norm is not None and not math.isfinite(grad_norm)):
            raise FloatingPointError(
                f"training diverged by step {step}: loss {stats['loss']}, gradient norm {grad_norm}. Lower the "
                "learning rate, or set TrainConfig(max_bad_steps=N) to skip such steps"
            )
        self.last_loss = stats["loss"]
        self.totals = {k: self.totals[k] + stats[k] for k in self.totals}
        record = {
            "step": step, "epoch": epoch, "loss": stats["loss"], "lr": lr, "grad_norm": grad_norm,
            "samples_per_s": stats["samples_per_s"], "tokens_per_s": stats["tokens_per_s"],
            "padding": stats["padding"],
        }  # fmt: skip
        if self.env.device.type == "cuda":
            record["peak_cuda_memory_gb"] = torch.cuda.max_memory_allocated(self.env.device) / 2**30
        self.emit(record)

    def emit(self, record: dict[str, Any]) -> None:
        """Write a record (a log step or an evaluation) everywhere it goes; rank 0 only."""
        if not self.env.is_main:
            return
        if self.config.out_dir is not None:
            with open(Path(self.config.out_dir) / "metrics.jsonl", "a") as f:
                f.write(json.dumps(record) + "\n")
        if self.bar is not None and "loss" in record:
            self.bar.set_postfix(loss=f"{record['loss']:.4f}", refresh=False)
        if self.lines:
            print(_line(record, self.total), file=sys.stderr, flush=True)
        if self.on_log is not None:
            self.on_log(record)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()

    def mean_loss(self) -> float | None:
        return self.totals["loss_sum"] / self.totals["targets"] if self.totals["targets"] else None

    def rate(self, key: str) -> float:
        return self.totals[key] / max(self.totals["seconds"], 1e-9)


def _line(record: Mapping[str, Any], total: int) -> str:
    """One log line for a non-terminal: 'step 20/90 | loss 0.6931 | lr 1.0e-03 | 812 samples/s'."""
    parts = [f"step {record['step']}/{total}"]
    for key, value in record.items():
        if key in ("step", "epoch") or value is None or not isinstance(value, (int, float)):
            continue
        if key == "samples_per_s":
            parts.append(f"{value:.0f} samples/s")
        elif key == "lr":
            parts.append(f"lr {value:.1e}")
        elif key.endswith("_per_s") or key in ("padding", "grad_norm", "peak_cuda_memory_gb"):
            continue
        else:
            parts.append(f"{key} {value:.4f}")
    return " | ".join(parts)
