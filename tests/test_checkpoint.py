"""checkpoint.py: atomic writes, RNG capture, weights_only loading, identity checks, keeping the last K + best."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from _train_script import classification_dataset, tiny_bert

import hf_loop as hl
from hf_loop import checkpoint


class NotATensor:
    """Any object that is not a tensor or a plain value (a pickle payload could run code on load)."""

    def __init__(self) -> None:
        self.payload = "anything"


def quick_run(out_dir, *, model=None, n=16, sampler="random", seed=0, max_steps=2, **kw) -> hl.TrainResult:
    model = model or tiny_bert()
    loader = hl.make_loader(classification_dataset(n), batch_size=4, sampler=sampler, seed=seed)
    config = hl.TrainConfig(max_steps=max_steps, out_dir=out_dir, progress=False, export=False, **kw)
    return hl.train(model, loader, torch.optim.SGD(model.parameters(), lr=0.1), config)


def test_save_is_atomic_and_leaves_the_previous_file_intact(tmp_path):
    path = checkpoint.path_for(tmp_path, 1)
    checkpoint.save({"format": checkpoint.FORMAT, "value": torch.arange(3)}, path)
    with pytest.raises(Exception):  # noqa: B017 - torch.save fails on a lambda, mid-write
        checkpoint.save({"format": checkpoint.FORMAT, "value": lambda: 0}, path)
    assert torch.equal(checkpoint.load(path)["value"], torch.arange(3))
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temp file left behind


def test_rng_state_round_trips_through_a_weights_only_file(tmp_path):
    torch.manual_seed(1), np.random.seed(2), random.seed(3)
    path = checkpoint.save({"format": checkpoint.FORMAT, "rng": checkpoint.rng_state()}, tmp_path / "rng.pt")
    expected = (torch.rand(3), np.random.rand(3), random.random(), np.random.randn())
    torch.manual_seed(9), np.random.seed(9), random.seed(9)
    checkpoint.set_rng_state(checkpoint.load(path)["rng"])
    again = (torch.rand(3), np.random.rand(3), random.random(), np.random.randn())
    assert torch.equal(expected[0], again[0]) and np.array_equal(expected[1], again[1])
    assert expected[2:] == again[2:]


def test_a_checkpoint_with_a_pickled_object_is_refused(tmp_path):
    path = checkpoint.path_for(tmp_path, 5)
    path.parent.mkdir(parents=True)
    torch.save({"format": checkpoint.FORMAT, "step": 5, "model": NotATensor()}, path)
    with pytest.raises(
        ValueError, match=r"refusing to load checkpoint .*step-00000005.pt: it holds pickled objects"
    ):
        quick_run(tmp_path)
    torch.save([1, 2], path)
    with pytest.raises(ValueError, match=r"is not an hf_loop checkpoint"):
        checkpoint.load(path)


def test_a_mismatched_checkpoint_is_refused_with_what_differs(tmp_path):
    quick_run(tmp_path)
    with pytest.raises(
        ValueError, match=r"does not belong to this run: model: checkpoint has 'BertForSequence"
    ):
        quick_run(tmp_path, model=tiny_bert(num_labels=3))
    with pytest.raises(ValueError, match=r"dataset_size: checkpoint has 16, this run has 24.*fresh out_dir"):
        quick_run(tmp_path, n=24)
    with pytest.raises(
        ValueError, match=r"strategy: checkpoint has 'map/RandomSampler\(seed=0\)', this run has"
    ):
        quick_run(tmp_path, sampler="sequential")
    with pytest.raises(ValueError, match=r"strategy: .*RandomSampler\(seed=0\).*RandomSampler\(seed=7\)"):
        quick_run(tmp_path, seed=7)


def test_keeps_the_last_k_checkpoints_and_rejects_nothing_valid(tmp_path):
    result = quick_run(tmp_path, max_steps=7, checkpoint_every=1, keep_last=3)
    assert [p.name for p in checkpoint.list_checkpoints(tmp_path)] == [
        "step-00000005.pt", "step-00000006.pt", "step-00000007.pt",
    ]  # fmt: skip
    state = checkpoint.load(result.checkpoint)
    assert state["step"] == 7 and state["finished"] == "completed" and state["world_size"] == 1
    assert state["loader"][0]["kind"] == "map" and isinstance(state["rng"][0]["torch"], torch.Tensor)
    assert state["identity"]["dataset_size"] == 16
    # A stale temp file from a killed writer is ignored, then cleaned up by the next resume.
    stale = result.checkpoint.with_name(".tmp-step-00000008.pt-123")
    stale.write_bytes(b"half a checkpoint")
    assert checkpoint.latest(tmp_path) == result.checkpoint
    quick_run(tmp_path, max_steps=8, checkpoint_every=1, keep_last=3)
    assert not stale.exists() and checkpoint.latest(tmp_path).name == "step-00000008.pt"


def test_resuming_with_another_global_batch_warns(tmp_path):
    model = tiny_bert()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    config = hl.TrainConfig(max_steps=1, out_dir=tmp_path, progress=False, export=False)
    hl.train(model, hl.make_loader(classification_dataset(16), batch_size=4, seed=0), opt, config)
    bigger = hl.make_loader(classification_dataset(16), batch_size=8, seed=0)
    with pytest.warns(UserWarning, match=r"global batch of 8 examples \(saved with 4\)"):
        result = hl.train(model, bigger, opt, hl.TrainConfig(max_steps=2, out_dir=tmp_path, progress=False))
    assert result.steps == 2 and result.resumed_from.name == "step-00000001.pt"
