"""Where a training run stands: one :class:`TrainState`, and the process's random number generators.

The run's position in the data is NOT kept here: the training loader's own state (a global position in the
epoch's order) is the one truth about data, and a checkpoint saves it beside this state. ``TrainState`` holds the
rest — the optimizer step, the epoch, the best evaluation so far, patience and why the run stopped — as plain
values, so it saves itself into a ``weights_only`` file and every rank holds the same copy.
"""

from __future__ import annotations

import math
import random
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from typing import Any

import numpy as np
import torch

STOP_REASONS = ("completed", "early_stopping", "sigterm", "interrupted")


@dataclass
class TrainState:
    """The run's counters, identical on every rank.

    ``step`` counts optimizer steps taken (skipped non-finite steps are not counted), ``epoch`` the epoch the next
    step belongs to (it advances at an epoch's end, before that step's checkpoint is written), ``position`` the
    epoch's global position in the loader's order when the state was last saved (examples, or batches for batch
    samplers and streams; for reports), ``best``/``best_step`` the best evaluation of ``best_metric``,
    ``bad_evals`` evaluations since it improved, ``bad_steps`` consecutive skipped steps, ``stop_reason`` one of
    ``STOP_REASONS`` once the run stopped.

    Example:
        >>> state = TrainState(step=12, epoch=1)
        >>> state.record_eval(0.5, greater_is_better=False)
        True
        >>> TrainState().load_state_dict(state.state_dict()) or state.best
        0.5
    """

    step: int = 0
    epoch: int = 0
    position: int = 0
    best: float | None = None
    best_step: int | None = None
    bad_evals: int = 0
    bad_steps: int = 0
    stop_reason: str | None = None

    def record_eval(self, value: float, *, greater_is_better: bool) -> bool:
        """Track the best metric and patience; True when ``value`` is a new best."""
        better = self.best is None or (value > self.best if greater_is_better else value < self.best)
        if better and math.isfinite(value):
            self.best, self.best_step, self.bad_evals = float(value), self.step, 0
            return True
        self.bad_evals += 1
        return False

    def state_dict(self) -> dict[str, Any]:
        return asdict(self)

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        names = {f.name for f in fields(self)}
        unknown = sorted(set(state) - names)
        if unknown:
            raise ValueError(f"not a TrainState: unknown fields {unknown}")
        for name in names & set(state):
            setattr(self, name, state[name])


class RandomState:
    """Every global RNG this process draws from (torch, CUDA, numpy, random), as a stateful object.

    The state is tensors and plain values, so it loads with ``weights_only=True``.

    Example:
        >>> rng = RandomState()
        >>> saved = rng.state_dict(); first = torch.rand(1)
        >>> rng.load_state_dict(saved); bool(torch.rand(1) == first)   # the same draw happens again
        True
    """

    def state_dict(self) -> dict[str, Any]:
        _, keys, pos, has_gauss, cached = np.random.get_state()
        version, py_state, gauss_next = random.getstate()
        return {
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            # numpy's legacy tuple holds a str and an ndarray; as a tensor and ints it survives weights_only.
            "numpy": {
                "keys": torch.from_numpy(keys.astype(np.int64)),
                "pos": int(pos),
                "has_gauss": int(has_gauss),
                "cached_gaussian": float(cached),
            },
            "python": {"version": version, "state": list(py_state), "gauss_next": gauss_next},
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        torch.set_rng_state(state["torch"])
        if state["cuda"] and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(state["cuda"])
        numpy = state["numpy"]
        np.random.set_state(
            ("MT19937", numpy["keys"].numpy().astype(np.uint32), numpy["pos"], numpy["has_gauss"],
             numpy["cached_gaussian"])
        )  # fmt: skip
        py = state["python"]
        random.setstate((py["version"], tuple(py["state"]), py["gauss_next"]))
