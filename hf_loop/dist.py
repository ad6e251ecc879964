"""Process topology and the few collectives hf_loop needs.

This is the only module that reads the launcher's environment (``RANK``, ``WORLD_SIZE``, ...) or calls
``torch.distributed``. Everything else takes a :class:`DistEnv` as an argument, so one process can test any rank.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

logger = logging.getLogger("hf_loop")

# How long shutdown_distributed lets gloo's worker threads take the GIL to free their last collectives:
# ten GIL switch intervals (5 ms each).
_GLOO_DRAIN_S = 0.05


def default_device(local_rank: int = 0) -> torch.device:
    """The best device here: CUDA (the process's local GPU), then MPS, then CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", local_rank % torch.cuda.device_count())
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


@dataclass(frozen=True, kw_only=True)
class DistEnv:
    """Where this process sits: its rank among ``world_size`` processes and the device it computes on.

    Example:
        >>> env = DistEnv()                      # one process on CPU
        >>> env.is_main, env.world_size
        (True, 1)
        >>> DistEnv(rank=1, world_size=4).is_main  # a simulated rank, e.g. in a test
        False
    """

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    # the ranks on this machine (torchrun's LOCAL_WORLD_SIZE); None: unknown
    local_world_size: int | None = None

    def __post_init__(self) -> None:
        if self.world_size < 1:
            raise ValueError(f"world_size must be >= 1, got {self.world_size}")
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank must be in [0, {self.world_size}), got {self.rank}")
        object.__setattr__(self, "device", torch.device(self.device))

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        """True when collectives must run: several processes in an initialised process group."""
        return self.world_size > 1 and dist.is_available() and dist.is_initialized()


def init_distributed(backend: str | None = None, timeout: float | timedelta | None = None) -> DistEnv:
    """Join the process group that ``torchrun`` describes, or return a single-process environment.

    Reads ``WORLD_SIZE``, ``RANK``, ``LOCAL_RANK`` and ``LOCAL_WORLD_SIZE`` (set by ``torchrun``; ``MASTER_ADDR``/``MASTER_PORT`` are
    read by torch itself). Without them, or with ``WORLD_SIZE=1``, no process group is created.

    Args:
        backend: "nccl" or "gloo"; default nccl when CUDA is available, else gloo.
        timeout: seconds (or a timedelta) collectives wait before failing; torch's default when None.

    Example:
        >>> env = init_distributed()    # under `torchrun --nproc_per_node=2 train.py`: rank 0 or 1
        >>> env.world_size
        1
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", str(rank)))
    device = default_device(local_rank)
    if world_size == 1:
        return DistEnv(device=device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        if isinstance(timeout, (int, float)):
            timeout = timedelta(seconds=timeout)
        backend = backend or ("nccl" if device.type == "cuda" else "gloo")
        kwargs: dict[str, Any] = {"backend": backend, "rank": rank, "world_size": world_size}
        if timeout is not None:
            kwargs["timeout"] = timeout
        if backend == "nccl":
            kwargs["device_id"] = device
        dist.init_process_group(**kwargs)
    local = os.environ.get("LOCAL_WORLD_SIZE", "")
    return DistEnv(rank=rank, local_rank=local_rank, world_size=world_size, device=device,
                   local_world_size=int(local) if local.isdigit() else None)  # fmt: skip


def shutdown_distributed() -> None:
    """Destroy the process group if one exists (safe to call twice, or when none was created).

    On gloo, when no exception is on its way out, the ranks first meet at a barrier, then this thread sleeps
    for a moment with the GIL released. gloo's worker threads free each finished collective (and the barrier
    holds the ones still in flight when it began) just *after* waking the caller, and freeing a tensor that
    Python once saw needs the GIL; a rank that ran from its last collective to interpreter exit within one
    GIL switch interval left that worker waiting for the GIL during Python's shutdown, which aborts the
    process ("terminate called without an active exception"). The pause hands the worker the GIL while Python
    is still whole. A rank leaving with an exception skips both, so it never waits for peers that may be stuck.

    Example:
        >>> env = init_distributed()            # under torchrun: joins the job's process group
        >>> try:
        ...     pass                            # build the loader, train
        ... finally:
        ...     shutdown_distributed()          # on errors too; without a process group it does nothing
    """
    if dist.is_available() and dist.is_initialized():
        if dist.get_backend() == "gloo" and sys.exc_info()[0] is None:
            with contextlib.suppress(RuntimeError):  # a peer that left with an error closed the connection
                dist.barrier()
            time.sleep(_GLOO_DRAIN_S)
        dist.destroy_process_group()


def process_group_size() -> int:
    """World size of the initialised process group (one created by another tool, e.g. accelerate, included);
    1 when there is none."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def _device_for_collectives() -> torch.device:
    # NCCL only moves CUDA tensors; gloo only CPU ones.
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce(value: float | int | torch.Tensor, env: DistEnv, op: str = "sum") -> torch.Tensor:
    """Reduce a number or tensor over all ranks ("sum", "min" or "max"); identity on one process."""
    tensor = torch.as_tensor(value)
    if not env.distributed:
        return tensor
    reduce_op = {"sum": dist.ReduceOp.SUM, "min": dist.ReduceOp.MIN, "max": dist.ReduceOp.MAX}[op]
    work = tensor.detach().to(_device_for_collectives(), copy=True)
    dist.all_reduce(work, op=reduce_op)
    return work.to(tensor.device)


def all_gather_object(obj: Any, env: DistEnv) -> list[Any]:
    """Gather one picklable object from every rank, in rank order; ``[obj]`` on one process."""
    if not env.distributed:
        return [obj]
    out: list[Any] = [None] * env.world_size
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: Any, env: DistEnv, src: int = 0) -> Any:
    """Rank ``src``'s object on every rank."""
    if not env.distributed:
        return obj
    box = [obj if env.rank == src else None]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def barrier(env: DistEnv) -> None:
    """Wait for every rank; no-op on one process."""
    if env.distributed:
        dist.barrier()


def batch_size_of(batch: Any) -> int:
    """Number of examples in a collated batch (first dimension of its first tensor, or its length)."""
    if isinstance(batch, dict):
        for value in batch.values():
            if isinstance(value, torch.Tensor) and value.dim() > 0:
                return int(value.shape[0])
        for value in batch.values():
            if isinstance(value, list):
                return len(value)
        return 0
    if isinstance(batch, torch.Tensor):
        return int(batch.shape[0]) if batch.dim() else 1
    if isinstance(batch, (list, tuple)):
        return batch_size_of(batch[0]) if batch and isinstance(batch[0], (dict, torch.Tensor)) else len(batch)
    return 1


class even_steps:  # noqa: N801 - used like a function: `for batch in hl.even_steps(loader, env)`
    """Iterate ``loader`` so that every rank runs the same number of steps.

    Before each step the ranks agree (all-reduce MIN of a "have a batch" flag) and all stop as soon as one runs
    dry, so uneven streams cannot hang DDP. A rank that stops with data left reads the rest of its pass (without
    yielding it) to count it exactly. After the loop:

    - ``steps``: steps every rank ran;
    - ``leftover_batches`` / ``leftover_examples``: this rank's batches and examples left unread this pass;
    - ``unread_examples``: examples left unread this pass over ALL ranks (the same value on every rank), also
      added to ``loader.unread_examples`` (the run's running total) when the loader is an ``hl.Loader``.

    Rank 0 logs a warning when ``unread_examples`` > 0. A balanced stream plan (``stream.plan(...,
    batch_size=...)`` shows the expected count) leaves at most about one batch per reader.

    Example:
        >>> steps = even_steps(loader, env)            # env = init_distributed(), here one process
        >>> for batch in steps:
        ...     loss = model(**batch).loss; loss.backward(); optimizer.step(); optimizer.zero_grad()
        >>> steps.steps, steps.unread_examples         # 32 rows in batches of 8, none left unread
        (4, 0)
    """

    def __init__(self, loader: Iterable, env: DistEnv) -> None:
        self.loader = loader
        self.env = env
        self.steps = 0
        self.leftover_batches = 0
        self.leftover_examples = 0
        self.unread_examples = 0
        self._seen = 0

    def _rows(self, batch: Any) -> int:
        """Examples yielded so far this pass, ``batch`` included: the Loader counts them before collation
        (packing changes the batch's shape); any other iterable by the batches' first dimension."""
        counted = getattr(self.loader, "pass_rows", None)
        if counted is not None:
            return counted
        self._seen += batch_size_of(batch)
        return self._seen

    def __iter__(self) -> Iterator[Any]:
        iterator = iter(self.loader)
        self._seen = used = 0
        while True:
            batch = next(iterator, _END)
            have = 0 if batch is _END else 1
            if int(all_reduce(have, self.env, op="min")) == 0:
                if batch is not _END:
                    total = self._rows(batch)
                    self.leftover_batches = 1
                    for rest in iterator:  # read the rest of this rank's pass, to count it exactly
                        total = self._rows(rest)
                        self.leftover_batches += 1
                    self.leftover_examples = total - used
                self._report()
                return
            used = self._rows(batch)
            self.steps += 1
            yield batch

    def _report(self) -> None:
        mine = [int(self.leftover_batches > 0), self.leftover_batches, self.leftover_examples]
        ranks, batches, examples = all_reduce(torch.tensor(mine), self.env, op="sum").tolist()
        self.unread_examples = int(examples)
        if hasattr(self.loader, "unread_examples"):
            self.loader.unread_examples += self.unread_examples
        if self.env.is_main and ranks:
            logger.warning(
                "even_steps: ranks stopped together after %d steps; %d rank(s) still had data: %d batch(es), "
                "%d example(s) left unread this pass",
                self.steps,
                ranks,
                batches,
                self.unread_examples,
            )


_END = object()
