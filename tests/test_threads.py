"""hf_loop.threads: the intra-op thread count from the cores this process may use, its ranks and workers, and
the CPUs other processes leave idle (measured from /proc/stat with real busy processes)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

import hf_loop as hl
from hf_loop import threads

CPUS = os.sched_getaffinity(0)
QUIET = {}  # an environment without OMP_NUM_THREADS


def test_an_explicit_request_wins_and_is_checked():
    assert threads.choose(requested=3, environ={"OMP_NUM_THREADS": "1"}) == threads.ThreadChoice(
        3, "requested"
    )
    for bad in (0, -2, 1.5, True, "2"):
        with pytest.raises(ValueError, match=r"threads must be an int >= 1 \(or None to choose\), got"):
            threads.choose(requested=bad)
    with pytest.raises(ValueError, match=r"num_workers must be an int >= 0, got -1"):
        threads.choose(num_workers=-1, environ=QUIET)


def test_omp_num_threads_is_respected():
    choice = threads.choose(environ={"OMP_NUM_THREADS": "5"})
    assert (
        choice == threads.ThreadChoice(5, "OMP_NUM_THREADS")
        and str(choice) == "5 intra-op threads (OMP_NUM_THREADS)"
    )
    assert threads.choose(environ={"OMP_NUM_THREADS": "junk"}, sample_seconds=0).source == "cores"


def test_cores_are_shared_among_local_ranks_and_workers():
    cores = threads.physical_cores(CPUS)
    assert 1 <= cores <= len(CPUS)
    alone = threads.choose(sample_seconds=0, environ=QUIET)
    assert alone == threads.ThreadChoice(cores, "cores", cores=cores) and alone.idle is None
    env = hl.DistEnv(rank=1, world_size=8)
    local = hl.DistEnv(rank=1, world_size=8, local_world_size=2)  # 4 nodes x 2 ranks
    ranks = threads.choose(local, sample_seconds=0, environ=QUIET)
    assert (ranks.threads, ranks.ranks) == (max(1, cores // 2), 2)
    assert threads.choose(env, sample_seconds=0, environ=QUIET).ranks == 8  # unknown: all ranks are local
    assert threads.choose(num_workers=1, sample_seconds=0, environ=QUIET).threads == max(1, cores - 1)
    crowded = threads.choose(env, num_workers=cores, sample_seconds=0, environ=QUIET)
    assert crowded.threads == 1  # never below one
    assert (
        str(crowded)
        == f"1 intra-op thread ({cores} cores, shared by 8 local ranks, minus {cores} DataLoader workers)"
    )


@pytest.mark.skipif(not os.path.exists("/proc/stat"), reason="the idle-CPU sample reads Linux's /proc/stat")
def test_busy_cpus_leave_one_thread():
    spin = "import os, sys; os.sched_setaffinity(0, {int(sys.argv[1])})\nwhile True: pass"
    busy = [
        subprocess.Popen([sys.executable, "-c", spin, str(cpu)]) for cpu in sorted(CPUS) for _ in range(2)
    ]
    try:
        idle = threads.idle_cpus(CPUS, seconds=0.5)
        choice = threads.choose(environ=QUIET, sample_seconds=0.5)
    finally:
        for process in busy:
            process.kill()
            process.wait()
    assert idle is not None and idle < 0.5 * len(CPUS)  # two spinning processes per CPU
    assert choice.threads == 1 and choice.idle is not None and f"{choice.idle:.1f} idle" in str(choice)


def test_apply_sets_torch_threads():
    before = torch.get_num_threads()
    try:
        assert threads.apply(1).threads == torch.get_num_threads() == 1
        assert threads.apply(2).threads == torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def test_reachable_from_the_package():
    assert hl.threads.choose is threads.choose
