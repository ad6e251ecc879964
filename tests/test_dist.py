"""dist.py: topology validation, single-process fallbacks, and even_steps on real gloo ranks."""

from __future__ import annotations

import pytest
import torch

import hf_loop as hl
from hf_loop import dist
from tests.distributed import run_distributed


def test_single_process_environment(monkeypatch):
    for var in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    env = hl.init_distributed()
    assert (env.rank, env.world_size, env.is_main, env.distributed) == (0, 1, True, False)
    assert env.device == dist.default_device()
    hl.shutdown_distributed()  # nothing to destroy: a no-op


def test_dist_env_rejects_impossible_topologies():
    with pytest.raises(ValueError, match="world_size must be >= 1, got 0"):
        hl.DistEnv(world_size=0)
    with pytest.raises(ValueError, match=r"rank must be in \[0, 2\), got 2"):
        hl.DistEnv(rank=2, world_size=2)


def test_collectives_are_identities_on_one_process():
    env = hl.DistEnv()
    assert int(dist.all_reduce(3, env)) == 3
    assert dist.all_gather_object({"a": 1}, env) == [{"a": 1}]
    assert dist.broadcast_object("x", env) == "x"


def test_even_steps_on_one_process_yields_everything():
    steps = hl.even_steps([{"x": torch.zeros(2)}] * 5, hl.DistEnv())
    assert len(list(steps)) == 5
    assert (steps.steps, steps.leftover_batches) == (5, 0)


def test_batch_size_of():
    assert dist.batch_size_of({"input_ids": torch.zeros(3, 7), "id": ["a", "b", "c"]}) == 3
    assert dist.batch_size_of({"id": ["a", "b"]}) == 2
    assert dist.batch_size_of(torch.zeros(4, 2)) == 4


def _uneven(env):
    # rank 0 has 3 batches, rank 1 has 5: without agreement rank 1's extra all_reduce calls would hang.
    batches = [{"x": torch.ones(2)} for _ in range(3 + 2 * env.rank)]
    steps = hl.even_steps(batches, env)
    total = 0
    for batch in steps:
        total += int(dist.all_reduce(batch["x"].sum(), env))  # a collective every step
    return steps.steps, steps.leftover_batches, steps.leftover_examples, total, steps.unread_examples


def test_even_steps_stops_every_rank_together():
    results = run_distributed(_uneven, world_size=2)
    assert results[0][0] == results[1][0] == 3
    # rank 1 stopped with a batch in hand and one more unread: both counted, the total reported on every rank
    assert results[0][1:3] == (0, 0) and results[1][1:3] == (2, 4)
    assert results[0][3] == results[1][3] == 12
    assert results[0][4] == results[1][4] == 4
