"""A run's checkpoints: what they hold, identity checks, retention, damaged checkpoints, diverged models.

The storage protocol itself (step folders, manifests, hashing, locks, a full disk) is tested in test_store.py.
"""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch
from _train_script import classification_dataset, tiny_bert

import hf_loop as hl
from hf_loop.state import RandomState


def quick_run(out_dir, *, model=None, data=None, n=16, sampler="random", seed=0, max_steps=2, optimizer=None,
              **kw) -> hl.TrainResult:  # fmt: skip
    model = model or tiny_bert()
    loader = hl.make_loader(data or classification_dataset(n), batch_size=4, sampler=sampler, seed=seed)
    config = hl.TrainConfig(max_steps=max_steps, out_dir=out_dir, progress=False, export=False, **kw)
    optimizer = (optimizer or torch.optim.SGD)(model.parameters(), lr=0.1)
    return hl.train(model, loader, optimizer, config)


def steps_on_disk(out_dir) -> list[str]:
    return sorted(p.name for p in (out_dir / "checkpoints").iterdir() if not p.name.startswith("."))


def test_random_state_round_trips_through_a_weights_only_file(tmp_path):
    torch.manual_seed(1), np.random.seed(2), random.seed(3)
    torch.save(RandomState().state_dict(), tmp_path / "rng.pt")
    expected = (torch.rand(3), np.random.rand(3), random.random(), np.random.randn())
    torch.manual_seed(9), np.random.seed(9), random.seed(9)
    RandomState().load_state_dict(torch.load(tmp_path / "rng.pt", weights_only=True))
    again = (torch.rand(3), np.random.rand(3), random.random(), np.random.randn())
    assert torch.equal(expected[0], again[0]) and np.array_equal(expected[1], again[1])
    assert expected[2:] == again[2:]


def test_a_checkpoint_is_a_step_folder_of_stateful_objects_with_a_manifest(tmp_path):
    result = quick_run(tmp_path, max_steps=3, checkpoint_every=1, keep_last=2)
    assert steps_on_disk(tmp_path) == ["step-00000002", "step-00000003"]
    folder = result.checkpoint
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["step"] == 3 and manifest["world_size"] == 1
    assert set(manifest["files"]) == {"model.pt", "optimizer.pt", "train.pt", "rank-00000.pt"}
    assert all(manifest["files"][f]["size"] == (folder / f).stat().st_size for f in manifest["files"])
    assert manifest["identity"]["model"]["class"] == "BertForSequenceClassification"
    train = torch.load(folder / "train.pt", weights_only=True)
    assert train["train_state"]["step"] == 3 and train["train_state"]["stop_reason"] == "completed"
    assert train["train_state"]["position"] == 12  # 3 batches of 4 in the epoch's global order
    rank = torch.load(folder / "rank-00000.pt", weights_only=True)
    assert rank["loader"]["kind"] == "map" and isinstance(rank["rng"]["torch"], torch.Tensor)


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"model": "labels3"}, r"model\.shapes: checkpoint has '[0-9a-f]+', this run has"),
        ({"n": 24}, r"data\.rows: checkpoint has 16, this run has 24"),
        ({"data": "other"}, r"data\.fingerprint: checkpoint has '[0-9a-f]+', this run has '[0-9a-f]+'"),
        ({"sampler": "sequential"}, r"data\.strategy: checkpoint has 'RandomSampler\(seed=0\)'"),
        ({"seed": 7}, r"data\.strategy: .*RandomSampler\(seed=0\).*RandomSampler\(seed=7\)"),
        ({"optimizer": torch.optim.AdamW}, r"optimizer\.class: checkpoint has 'SGD', this run has 'AdamW'"),
    ],
)
def test_a_checkpoint_of_another_run_is_refused_naming_what_differs(tmp_path, change, match):
    quick_run(tmp_path)
    kwargs = dict(change)
    if kwargs.pop("model", None):
        kwargs["model"] = tiny_bert(num_labels=3)
    if kwargs.pop("data", None):
        kwargs["data"] = classification_dataset(16, seed=1)  # the same size, other rows
    with pytest.raises(hl.CheckpointError, match=match + r".*another out_dir.*resume_allow"):
        quick_run(tmp_path, **kwargs)


def test_another_pretrained_model_of_the_same_architecture_is_refused(tmp_path):
    from transformers import BertForSequenceClassification

    tiny_bert(seed=0).save_pretrained(tmp_path / "bert_a")
    tiny_bert(seed=1).save_pretrained(tmp_path / "bert_b")
    quick_run(tmp_path / "run", model=BertForSequenceClassification.from_pretrained(tmp_path / "bert_a"))
    other = BertForSequenceClassification.from_pretrained(tmp_path / "bert_b")
    with pytest.raises(
        hl.CheckpointError, match=r"model\.source: checkpoint has '.*bert_a', this run has '.*bert_b'"
    ):
        quick_run(tmp_path / "run", model=other, max_steps=3)
    # Said on purpose, the checkpoint's weights continue (the same shapes), and the run goes on.
    result = quick_run(tmp_path / "run", model=other, max_steps=3, resume_allow=("model",))
    assert result.steps == 3 and result.resumed_from.name == "step-00000002"


def test_a_new_optimizer_class_is_allowed_on_request_and_starts_fresh(tmp_path, caplog):
    quick_run(tmp_path)
    result = quick_run(tmp_path, optimizer=torch.optim.AdamW, max_steps=3, resume_allow=("optimizer",))
    assert result.steps == 3 and "with a fresh AdamW" in caplog.text


def test_a_model_recreated_from_scratch_resumes(tmp_path):
    first = quick_run(tmp_path, max_steps=1)
    second = quick_run(tmp_path, max_steps=2)  # a new tiny_bert(), the same data re-created: the same run
    assert second.resumed_from == first.checkpoint and second.steps == 2


def test_keeps_the_last_k_checkpoints_and_cleans_what_a_killed_writer_left(tmp_path):
    result = quick_run(tmp_path, max_steps=7, checkpoint_every=1, keep_last=3)
    assert steps_on_disk(tmp_path) == ["step-00000005", "step-00000006", "step-00000007"]
    stale = tmp_path / "checkpoints" / ".tmp-step-00000008-1-dead"
    stale.mkdir()
    (stale / "model.pt").write_bytes(b"half a checkpoint")
    quick_run(tmp_path, max_steps=8, checkpoint_every=1, keep_last=3)
    assert not stale.exists() and steps_on_disk(tmp_path)[-1] == "step-00000008"
    assert result.checkpoint.name == "step-00000007"


@pytest.mark.parametrize("damage", ["truncated", "empty", "flipped", "no manifest"])
def test_a_damaged_newest_checkpoint_falls_back_to_the_previous_one(tmp_path, damage, caplog):
    quick_run(tmp_path, max_steps=3, checkpoint_every=1, keep_last=3)
    newest = tmp_path / "checkpoints" / "step-00000003"
    target = newest / "model.pt"
    data = target.read_bytes()
    if damage == "truncated":
        target.write_bytes(data[: len(data) // 2])
    elif damage == "empty":
        target.write_bytes(b"")
    elif damage == "flipped":  # the same size: only the checksum can tell
        target.write_bytes(data[:100] + bytes([data[100] ^ 0x01]) + data[101:])
    else:
        (newest / "manifest.json").unlink()
    result = quick_run(tmp_path, max_steps=4)
    assert result.resumed_from.name == "step-00000002" and result.steps == 4
    if damage != "no manifest":
        assert "step-00000003" in caplog.text and "model.pt" in caplog.text


def test_resuming_with_another_global_batch_warns(tmp_path):
    model = tiny_bert()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    config = hl.TrainConfig(max_steps=1, out_dir=tmp_path, progress=False, export=False)
    hl.train(model, hl.make_loader(classification_dataset(16), batch_size=4, seed=0), opt, config)
    bigger = hl.make_loader(classification_dataset(16), batch_size=8, seed=0)
    with pytest.warns(UserWarning, match=r"global batch of 8 examples \(saved with 4\)"):
        result = hl.train(model, bigger, opt, hl.TrainConfig(max_steps=2, out_dir=tmp_path, progress=False))
    assert result.steps == 2 and result.resumed_from.name == "step-00000001"


class NaNAt(torch.nn.Module):
    """A regressor whose loss turns NaN at one step (a bad batch): everything after it is NaN too."""

    def __init__(self, bad_step: int) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.linear = torch.nn.Linear(1, 1)
        self.bad_step, self.calls = bad_step, 0

    def forward(self, input_ids, labels):
        self.calls += 1
        x = input_ids.float().mean(1, keepdim=True) / 64
        if self.calls == self.bad_step:
            x = x * float("nan")
        return {"loss": ((self.linear(x).squeeze(1) - labels.float()) ** 2).mean()}


def test_a_diverged_model_is_never_checkpointed_and_a_finite_one_stays(tmp_path):
    with pytest.raises(
        FloatingPointError, match=r"diverged by step 8.*no checkpoint was written.*step-00000007"
    ):
        quick_run(tmp_path, model=NaNAt(bad_step=8), n=64, max_steps=12, checkpoint_every=1, keep_last=2)
    assert steps_on_disk(tmp_path) == ["step-00000006", "step-00000007"]
    weights = torch.load(tmp_path / "checkpoints" / "step-00000007" / "model.pt", weights_only=True)
    assert all(torch.isfinite(v).all() for v in weights.values())
    # The rerun resumes from the finite checkpoint (and, with a healthy model, finishes).
    result = quick_run(tmp_path, model=NaNAt(bad_step=0), n=64, max_steps=12, checkpoint_every=1, keep_last=2)
    assert result.resumed_from.name == "step-00000007" and result.steps == 12


HOLD_LOCK = """
import sys, time
from hf_loop.checkpoint import OutDirLock
with OutDirLock(sys.argv[1]):
    print("locked", flush=True)
    time.sleep(60)
"""


def test_a_second_live_run_on_the_same_out_dir_is_refused(tmp_path):
    import subprocess
    import sys

    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD_LOCK, str(tmp_path)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout.readline().strip() == "locked"  # a live run holds out_dir
        with pytest.raises(hl.CheckpointError, match=rf"pid {holder.pid}.*another out_dir"):
            quick_run(tmp_path)
    finally:
        holder.kill()
        holder.wait()
    assert quick_run(tmp_path).steps == 2  # the holder is gone: its lock is taken over


DISK_FULL_RUN = """
import json, sys
sys.path.insert(0, sys.argv[2])
import torch
from _train_script import classification_dataset, tiny_bert
import hf_loop as hl

def run(max_steps):
    model = tiny_bert()
    loader = hl.make_loader(classification_dataset(64), batch_size=4, sampler="random")
    config = hl.TrainConfig(max_steps=max_steps, out_dir=sys.argv[1], checkpoint_every=1, keep_last=1,
                            progress=False, export=False)
    return hl.train(model, loader, torch.optim.AdamW(model.parameters()), config)

try:
    run(12)
    error = None
except hl.CheckpointError as exc:
    error = str(exc)
resumed = run(1)  # a finished run's rerun: it loads the newest checkpoint left on the full disk
print(json.dumps({"error": error, "resumed": resumed.resumed_from.name}))
"""


def test_a_full_disk_stops_the_run_with_a_clear_error_and_the_last_checkpoint_loads(tmp_path):
    """On a real 500 kB tmpfs (a user + mount namespace): one tiny-BERT checkpoint (~340 kB) fits, two do not."""
    import shutil
    import subprocess
    import sys
    from pathlib import Path

    unshare = ["unshare", "--user", "--map-root-user", "--mount"]
    if shutil.which("unshare") is None or subprocess.run([*unshare, "true"], capture_output=True).returncode:
        pytest.skip("user namespaces are not available here to mount a small tmpfs")
    disk = tmp_path / "disk"
    disk.mkdir()
    mount = 'mount -t tmpfs -o size=500k tmpfs "$0" && exec "$1" -c "$2" "$0" "$3"'
    tests = str(Path(__file__).parent)
    done = subprocess.run([*unshare, "sh", "-c", mount, disk, sys.executable, DISK_FULL_RUN, tests],
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert (
        f"the disk holding {disk} is full" in result["error"]
        and "Earlier checkpoints are untouched" in result["error"]
    )
    assert result["resumed"] == "step-00000001"  # the second checkpoint did not fit; the first one loads
