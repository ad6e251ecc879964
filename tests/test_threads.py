"""hf_loop.threads: the intra-op thread count from the cores this process may use, its ranks and workers, and
the CPUs other processes leave idle (measured from /proc/stat with real busy processes)."""

from __future__ import annotations

import contextlib
import logging
import os
import subprocess
import sys
import time

import pytest
import torch
from _train_script import classification_dataset, tiny_bert

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


LINUX = pytest.mark.skipif(not os.path.exists("/proc/stat"), reason="the idle-CPU sample reads /proc/stat")


@contextlib.contextmanager
def busy_cpus():
    """Two spinning processes on each CPU of this process, until the block ends."""
    spin = "import os, sys; os.sched_setaffinity(0, {int(sys.argv[1])})\nwhile True: pass"
    busy = [
        subprocess.Popen([sys.executable, "-c", spin, str(cpu)]) for cpu in sorted(CPUS) for _ in range(2)
    ]
    try:
        yield
    finally:
        for process in busy:
            process.kill()
            process.wait()


@pytest.fixture
def torch_threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


@LINUX
def test_busy_cpus_leave_one_thread():
    with busy_cpus():
        idle = threads.idle_cpus(CPUS, seconds=0.5)
        choice = threads.choose(environ=QUIET, sample_seconds=0.5)
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


# -- Watch: an automatic choice kept fitted to the idle CPUs while training -------------------------------------


def two_cores(**kw) -> threads.ThreadChoice:
    return threads.ThreadChoice(2, "cores", cores=2, idle=2.0, **kw)


def test_only_an_automatic_choice_with_room_to_adjust_is_watched(torch_threads):
    torch.set_num_threads(3)
    for choice in (
        None,  # threads left to torch
        threads.ThreadChoice(2, "requested"),
        threads.ThreadChoice(2, "OMP_NUM_THREADS"),
        threads.ThreadChoice(1, "cores", cores=2, workers=1),  # the worker took the other core: ceiling 1
        threads.ThreadChoice(1, "cores", cores=4, ranks=4),
    ):
        watch = threads.Watch(choice, cpus={0, 1})
        assert not watch.active and watch.check() is None and watch.fit(0.0) is None
    assert torch.get_num_threads() == 3  # never touched
    assert threads.Watch(two_cores(), cpus={0, 1}).active
    assert threads.ThreadChoice(1, "cores", cores=2, idle=0.3).ceiling == 2  # busy at start: watched too


def test_fewer_threads_at_once_more_only_after_two_checks_in_a_row_never_above_the_ceiling(
    torch_threads, caplog
):
    torch.set_num_threads(2)
    watch = threads.Watch(two_cores(), cpus={0, 1})
    with caplog.at_level(logging.INFO, logger="hf_loop"):
        lowered = watch.fit(0.4)
    assert lowered is not None and (lowered.threads, lowered.idle) == (1, 0.4)
    assert torch.get_num_threads() == 1
    assert "other processes took CPUs: 1 intra-op thread (2 cores, 0.4 idle) (was 2)" in caplog.text
    assert watch.fit(1.0) is None  # one idle CPU: the one thread has it
    assert watch.fit(2.0) is None and watch.fit(0.9) is None  # room once, then busy again: the count resets
    assert watch.fit(2.0) is None and torch.get_num_threads() == 1
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="hf_loop"):
        raised = watch.fit(2.0)  # room on two checks in a row
    assert raised is not None and raised.threads == 2 and torch.get_num_threads() == 2
    assert "the CPUs are idle again: 2 intra-op threads (2 cores, 2.0 idle) (was 1)" in caplog.text
    assert watch.fit(8.0) is None and watch.fit(8.0) is None and watch.choice.threads == 2  # the ceiling
    assert watch.fit(None) is None  # nothing measured: the ceiling, which it already has


def test_local_ranks_share_the_idle_cpus_and_do_not_count_as_load(torch_threads):
    torch.set_num_threads(2)
    watch = threads.Watch(threads.ThreadChoice(2, "cores", cores=4, ranks=2, idle=4.0), cpus={0, 1, 2, 3})
    assert watch.fit(2.2).threads == 1  # 2.2 idle CPUs for 2 ranks: one thread each
    # One second on 4 CPUs (100 ticks each): the 2 ranks kept every CPU busy, this one used 2 CPU-seconds.
    before, after = threads._Sample((0, 0), own=0.0, wall=0.0), threads._Sample((0, 400), own=2.0, wall=1.0)
    assert after.idle_since(before, cpus=4, ranks=2) == 4.0  # the other rank is no competition
    assert after.idle_since(before, cpus=4) == 2.0  # a process alone: the other 2 CPUs were taken
    spinners = threads._Sample((100, 400), own=0.5, wall=1.0)  # 1 CPU idle, this rank got half a CPU
    assert spinners.idle_since(before, cpus=4, ranks=2) == 2.0  # 1 idle + 2 x 0.5: one thread per rank


@LINUX
@pytest.mark.skipif(threads.physical_cores(CPUS) < 2, reason="needs 2 cores: one thread is all there is")
def test_load_that_arrives_while_training_lowers_the_thread_count(torch_threads):
    """A run that chose 2 threads on idle cores; from step 2 other processes spin on every CPU. The watch reads
    the idle CPUs after the next step at least a second later, and the steps after run on 1 thread."""
    cores = threads.physical_cores(CPUS)
    choice = threads.ThreadChoice(cores, "cores", cores=cores, idle=float(len(CPUS)))
    torch.set_num_threads(cores)
    counts, load = {}, contextlib.ExitStack()

    def on_log(record):
        counts[record["step"]] = torch.get_num_threads()
        if record["step"] == 2:
            load.enter_context(busy_cpus())
        if record["step"] in (2, 3):
            time.sleep(threads.CHECK_SECONDS * 1.2)  # checks closer together than this are skipped

    model = tiny_bert()
    data = hl.make_loader(classification_dataset(64), batch_size=8)
    config = hl.TrainConfig(max_steps=6, log_every=1, progress=False, threads=choice)
    with load:
        hl.train(model, data, torch.optim.AdamW(model.parameters(), lr=1e-3), config, on_log=on_log)
    # lowered at the check of step 3 at the latest (earlier when the machine was busy before the spinners);
    # without the watch every step would run on the threads the choice set
    assert counts[4] == counts[5] == counts[6] == 1 < cores


def test_train_config_threads(torch_threads):
    with pytest.raises(ValueError, match=r"TrainConfig.threads must be an int >= 1, 'auto' .* got 'Auto'"):
        hl.TrainConfig(threads="Auto")
    with pytest.raises(ValueError, match=r"TrainConfig.threads must be >= 1, got 0"):
        hl.TrainConfig(threads=0)
    model = tiny_bert()
    data = hl.make_loader(classification_dataset(16), batch_size=8)

    def run(setting):
        config = hl.TrainConfig(max_steps=1, progress=False, threads=setting)
        hl.train(model, data, torch.optim.SGD(model.parameters(), lr=0.1), config)
        return torch.get_num_threads()

    torch.set_num_threads(3)
    assert run(None) == 3  # torch's own count, untouched
    assert run(1) == 1
    assert 1 <= run("auto") <= threads.physical_cores(CPUS)
    torch.set_num_threads(1)
    assert run(threads.ThreadChoice(2, "requested")) == 1  # a choice is applied by whoever made it
