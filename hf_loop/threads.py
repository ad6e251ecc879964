"""How many intra-op threads torch should use in this process, chosen from the cores it can really use.

torch starts one intra-op (OpenMP) thread per physical core, and libgomp lets a thread that waits for the others
spin 300,000 times before it sleeps. That is right on an idle machine and very wrong on a shared one: with other
processes on the cores, one of torch's threads is often descheduled and the other spins through its time slice
waiting for it. What was measured on 2 cores (``benchmarks/results/threads.md``; the demo fine-tune, tiny BERT):

- idle: 2 threads ~1.3x faster than 1; ``OMP_WAIT_POLICY=PASSIVE`` (sleep at once) ~1.5x slower than the
  default spin, ``GOMP_SPINCOUNT=1000`` ~5-8% slower, 3000 ~15%, 10000 no difference.
- four busy processes (two per core): torch's 2 threads 3-60x slower than 1 thread (6x in the benchmark); 2
  threads with PASSIVE as fast as 1 thread, with ``GOMP_SPINCOUNT=1000`` ~1.4x, 10000 ~4x.

No wait policy is free on an idle machine and none beats one thread on a busy one, so the thread count is what
is chosen, and OpenMP's waiting is left as it is:

1. an explicit request (``--threads``, ``TrainConfig(threads=...)``), else ``OMP_NUM_THREADS`` when it is set
   (the user's, or torchrun's 1 per process): torch already applied it;
2. else the physical cores of this process's CPU affinity (``os.sched_getaffinity``: taskset, cgroups, Slurm),
   shared among the ranks on this machine and minus one core per DataLoader worker;
3. capped by the CPUs other processes leave idle, sampled from ``/proc/stat`` for a quarter of a second when
   the choice is made (Linux; elsewhere no cap).
4. while training (``TrainConfig(threads="auto")``, the CLI's default), :class:`Watch` re-reads the idle CPUs
   after an optimizer step at most once a second: load that arrives later lowers the count at once, and once
   it has gone for two checks in a row the count goes back up (never above the choice of 2).

Example:
    >>> choice = choose(requested=2)
    >>> choice.threads, choice.source
    (2, 'requested')
    >>> str(choose(requested=1))
    '1 intra-op thread (requested)'
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Collection, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from hf_loop.dist import DistEnv

__all__ = ["ThreadChoice", "Watch", "apply", "choose", "idle_cpus", "physical_cores"]

SAMPLE_SECONDS = 0.25  # long enough for ~25 scheduler ticks per CPU, short enough to go unnoticed at start
logger = logging.getLogger("hf_loop")

CHECK_SECONDS = 1.0  # a Watch ignores checks closer together than this: too few ticks to tell load from noise


@dataclass(frozen=True)
class ThreadChoice:
    """A thread count and why: ``source`` is "requested", "OMP_NUM_THREADS" or "cores".

    ``cores`` (physical cores this process may use), ``ranks`` (local processes sharing them), ``workers``
    (DataLoader workers per rank) and ``idle`` (CPUs other processes left idle during the sample, None when not
    measured) are the inputs of a "cores" choice.
    """

    threads: int
    source: str
    cores: int | None = None
    ranks: int = 1
    workers: int = 0
    idle: float | None = None

    @property
    def ceiling(self) -> int:
        """The most threads the cores allow before looking at other processes (the count itself unless chosen
        from the cores)."""
        if self.source != "cores" or self.cores is None:
            return self.threads
        return max(1, self.cores // self.ranks - self.workers)

    def __str__(self) -> str:
        text = f"{self.threads} intra-op thread{'s' if self.threads != 1 else ''}"
        if self.source != "cores":
            return f"{text} ({self.source})"
        parts = [f"{self.cores} core{'s' if self.cores != 1 else ''}"]
        if self.ranks > 1:
            parts.append(f"shared by {self.ranks} local ranks")
        if self.workers:
            parts.append(f"minus {self.workers} DataLoader worker{'s' if self.workers != 1 else ''}")
        if self.idle is not None:
            parts.append(f"{self.idle:.1f} idle")
        return f"{text} ({', '.join(parts)})"


def physical_cores(cpus: Collection[int]) -> int:
    """How many physical cores the logical ``cpus`` span (hyper-threads share one), from sysfs on Linux.

    Elsewhere, or when sysfs does not say, every logical CPU counts as a core.

    Example:
        >>> physical_cores({0}) == 1
        True
    """
    cores = set()
    for cpu in cpus:
        siblings = Path(f"/sys/devices/system/cpu/cpu{cpu}/topology/thread_siblings_list")
        try:
            cores.add(siblings.read_text().strip())
        except OSError:
            cores.add(str(cpu))
    return max(1, len(cores))


def _cpu_ticks(cpus: Collection[int]) -> tuple[int, int] | None:
    """(idle, total) scheduler ticks of ``cpus`` since boot, from /proc/stat; None where it cannot be read."""
    try:
        lines = Path("/proc/stat").read_text().splitlines()
    except OSError:
        return None
    idle = total = 0
    names = {f"cpu{c}" for c in cpus}
    for line in lines:
        fields = line.split()
        if fields and fields[0] in names:
            ticks = [int(x) for x in fields[1:9]]  # user nice system idle iowait irq softirq steal
            idle += ticks[3] + ticks[4]
            total += sum(ticks)
    return (idle, total) if total else None


@dataclass(frozen=True)
class _Sample:
    """The CPUs' tick counters, this process's CPU seconds and the clock, at one moment."""

    ticks: tuple[int, int]  # (idle, total) of the CPUs, from /proc/stat
    own: float  # this process's user + system seconds, every thread
    wall: float

    @classmethod
    def now(cls, cpus: Collection[int]) -> _Sample | None:
        ticks, own = _cpu_ticks(cpus), os.times()
        return None if ticks is None else cls(ticks, own.user + own.system, time.monotonic())

    def idle_since(self, before: _Sample, cpus: int, ranks: int = 1) -> float | None:
        """CPUs that other processes left idle between ``before`` and this sample. Ours count as idle, and so
        do the other local ranks' (``ranks`` - 1 processes, assumed to use what this one does): the ranks
        share the CPUs, they do not compete for them."""
        if self.ticks[1] == before.ticks[1]:
            return None
        # a share of ticks, so no clock rate is needed
        share_idle = (self.ticks[0] - before.ticks[0]) / (self.ticks[1] - before.ticks[1])
        own = (self.own - before.own) / max(self.wall - before.wall, 1e-9)
        return min(float(cpus), share_idle * cpus + own * ranks)


def idle_cpus(cpus: Collection[int], seconds: float = SAMPLE_SECONDS) -> float | None:
    """How many of ``cpus`` other processes leave idle: sampled from /proc/stat over ``seconds``.

    This process's own CPU time in the sample is counted as idle (it is not competition). Returns None where
    /proc/stat is unavailable (not Linux).

    Example:
        >>> idle = idle_cpus({0}, seconds=0.05)
        >>> idle is None or 0.0 <= idle <= 1.0
        True
    """
    before = _Sample.now(cpus)
    if before is None:
        return None
    time.sleep(seconds)
    after = _Sample.now(cpus)
    return None if after is None else after.idle_since(before, len(cpus))


def _fit(ceiling: int, idle: float | None, ranks: int) -> int:
    """At most ``ceiling`` threads, and no more than this rank's share of the idle CPUs: half an idle CPU or
    less is no room for a thread that must keep pace with the others."""
    if idle is None:
        return ceiling
    return max(1, min(ceiling, math.floor(idle / ranks + 0.5)))


def _affinity() -> set[int]:
    return os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else set(range(os.cpu_count() or 1))


def _local_ranks(env: DistEnv | None) -> int:
    if env is None or env.world_size == 1:
        return 1
    # torchrun's processes on this machine; without it, every rank is assumed to be local (the safe side)
    return max(1, env.local_world_size or env.world_size)


def choose(
    env: DistEnv | None = None,
    num_workers: int = 0,
    *,
    requested: int | None = None,
    sample_seconds: float = SAMPLE_SECONDS,
    environ: Mapping[str, str] | None = None,
) -> ThreadChoice:
    """The intra-op thread count for this process (see the module docstring for the rule and measurements).

    Args:
        env: this process's place in the job (its ranks share the machine); default one process.
        num_workers: DataLoader worker processes of this rank (each gets a core of its own).
        requested: an explicit count (``--threads``); wins over everything else.
        sample_seconds: length of the idle-CPU sample; 0 skips it (the choice then ignores other processes).
        environ: the environment to read ``OMP_NUM_THREADS`` from (OpenMP's own setting); default
            ``os.environ``. The ranks on this machine come from ``env.local_world_size``.

    Example:
        >>> choose(environ={"OMP_NUM_THREADS": "3"}).threads
        3
        >>> choose(num_workers=64, sample_seconds=0).threads   # workers take every core: one thread is left
        1
    """
    if requested is not None:
        if isinstance(requested, bool) or not isinstance(requested, int) or requested < 1:
            raise ValueError(f"threads must be an int >= 1 (or None to choose), got {requested!r}")
        return ThreadChoice(requested, "requested")
    if isinstance(num_workers, bool) or not isinstance(num_workers, int) or num_workers < 0:
        raise ValueError(f"num_workers must be an int >= 0, got {num_workers!r}")
    environ = os.environ if environ is None else environ
    omp = environ.get("OMP_NUM_THREADS", "").strip()
    if omp.isdigit() and int(omp) >= 1:
        return ThreadChoice(int(omp), "OMP_NUM_THREADS")
    cpus = _affinity()
    cores, ranks = physical_cores(cpus), _local_ranks(env)
    idle = idle_cpus(cpus, sample_seconds) if sample_seconds > 0 else None
    threads = _fit(max(1, cores // ranks - num_workers), idle, ranks)
    return ThreadChoice(threads, "cores", cores=cores, ranks=ranks, workers=num_workers, idle=idle)


def apply(
    requested: int | None = None,
    *,
    env: DistEnv | None = None,
    num_workers: int = 0,
    sample_seconds: float = SAMPLE_SECONDS,
) -> ThreadChoice:
    """Choose the intra-op thread count (:func:`choose`) and set it with ``torch.set_num_threads``.

    Call it from the thread that runs the model: OpenMP keeps the count per calling thread.

    Example:
        >>> import torch
        >>> before = torch.get_num_threads()
        >>> apply(1).threads == torch.get_num_threads() == 1
        True
        >>> torch.set_num_threads(before)
    """
    import torch

    choice = choose(env, num_workers, requested=requested, sample_seconds=sample_seconds)
    if torch.get_num_threads() != choice.threads:
        torch.set_num_threads(choice.threads)
    return choice


class Watch:
    """Keeps an automatic choice (source "cores") fitted to the idle CPUs while training; see the module docstring.

    ``check()`` compares the CPU counters with those of the previous check (at least ``CHECK_SECONDS`` earlier)
    and sets torch's thread count: lower at once when other processes took CPUs (two threads that wait for each
    other on shared cores can run 5-60x slower), higher again only when two checks in a row found the room (one
    busy interval should not make the count swing). Any other choice (requested, ``OMP_NUM_THREADS``, a single
    core) is the user's or leaves nothing to adjust: ``check()`` then does nothing. Call it from the thread
    that runs the model; the loop calls it after every optimizer step (a clock read, unless a second passed).

    Example:
        >>> watch = Watch(choose(requested=2))      # a requested count is never changed
        >>> watch.active, watch.check()
        (False, None)
    """

    def __init__(self, choice: ThreadChoice | None, cpus: Collection[int] | None = None) -> None:
        self.choice = choice  # None: threads were not chosen here (torch's own count): nothing to watch
        self.active = choice is not None and choice.source == "cores" and choice.ceiling > 1
        self._cpus = set(cpus) if cpus is not None else _affinity()
        self._last = _Sample.now(self._cpus) if self.active else None
        self.active = self._last is not None  # no /proc/stat (not Linux): nothing to measure, ever
        self._room = 0  # checks in a row that found room for more threads

    def check(self) -> ThreadChoice | None:
        """Re-fit the thread count to the CPUs idle since the last check; the new choice when it changed."""
        last = self._last
        if last is None or self.choice is None or time.monotonic() - last.wall < CHECK_SECONDS:
            return None
        now = _Sample.now(self._cpus)
        if now is None:  # /proc/stat became unreadable: stop, rather than retry it after every step
            self.active, self._last = False, None
            return None
        self._last = now
        return self.fit(now.idle_since(last, len(self._cpus), self.choice.ranks))

    def fit(self, idle: float | None) -> ThreadChoice | None:
        """Apply a measured number of idle CPUs (what ``check`` measured); the new choice when it changed.

        Example:
            >>> import torch
            >>> before = torch.get_num_threads()
            >>> watch = Watch(ThreadChoice(2, "cores", cores=2, idle=2.0), cpus={0, 1})
            >>> watch.fit(0.4).threads                  # others took the CPUs: down at once
            1
            >>> watch.fit(2.0), watch.fit(2.0).threads  # room again: up on the second check in a row
            (None, 2)
            >>> torch.set_num_threads(before)
        """
        choice = self.choice
        if choice is None or not self.active:
            return None
        target = _fit(choice.ceiling, idle, choice.ranks)
        self._room = self._room + 1 if target > choice.threads else 0
        if target == choice.threads or (target > choice.threads and self._room < 2):
            return None
        import torch

        torch.set_num_threads(target)
        self._room = 0
        self.choice = replace(choice, threads=target, idle=idle)
        if target < choice.threads:
            logger.warning("hf_loop: other processes took CPUs: %s (was %d)", self.choice, choice.threads)
        else:
            logger.info("hf_loop: the CPUs are idle again: %s (was %d)", self.choice, choice.threads)
        return self.choice
