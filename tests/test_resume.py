"""Exact resume: kill -9 at several points (one mid-checkpoint-write), SIGTERM, reruns of a finished run.

The kill tests run tests/_train_script.py (dropout, num_workers=2, a seeded augmentation, device staging) as a
subprocess and compare the final weights bit for bit with ONE uninterrupted reference run, which is started in
the background when the module begins so that it overlaps with the interrupted runs.
"""

from __future__ import annotations

import fcntl
import os
import pty
import signal
import struct
import subprocess
import sys
import termios
import threading
from pathlib import Path

import pytest
import torch
from _train_script import classification_dataset, tiny_bert, weights

import hf_loop as hl

SCRIPT = Path(__file__).with_name("_train_script.py")


def launch(out_dir: Path, terminal: int | None = None, **env: str) -> subprocess.Popen:
    """Run the training script; ``terminal``: a pty's fd to use as its stderr (so it shows a progress bar)."""
    environment = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", **env}
    return subprocess.Popen(
        [sys.executable, str(SCRIPT), str(out_dir)],
        env=environment,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT if terminal is None else terminal,
        text=True,
    )


def finish(process: subprocess.Popen, expected_rc: int) -> str:
    output, _ = process.communicate(timeout=300)
    assert process.returncode == expected_rc, (
        f"exit code {process.returncode}, expected {expected_rc}:\n{output}"
    )
    return output or ""


class Reference:
    """The uninterrupted run, started in the background with a pseudo-terminal as stderr."""

    def __init__(self, out_dir: Path) -> None:
        self.out_dir = out_dir
        self.screen = bytearray()
        primary, secondary = pty.openpty()
        fcntl.ioctl(
            secondary, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 120, 0, 0)
        )  # a fresh pty is 0 wide
        self.process = launch(out_dir, terminal=secondary)
        os.close(secondary)
        self.reader = threading.Thread(target=self._read, args=(primary,), daemon=True)
        self.reader.start()

    def _read(self, fd: int) -> None:
        try:
            while chunk := os.read(fd, 4096):  # keep draining, so the child never blocks on a full pty
                self.screen += chunk
        except OSError:  # EIO: the child closed its end
            pass
        finally:
            os.close(fd)

    def weights(self) -> dict[str, torch.Tensor]:
        finish(self.process, 0)
        self.reader.join(timeout=30)
        return torch.load(self.out_dir / "final_weights.pt", weights_only=True)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    run = Reference(tmp_path_factory.mktemp("reference"))
    yield run
    if run.process.poll() is None:
        run.process.kill()


def checkpoint_steps(out_dir: Path) -> list[int]:
    folder = out_dir / "checkpoints"
    return sorted(int(p.name.split("-")[1]) for p in folder.iterdir() if p.name.startswith("step-"))


def test_kill9_at_several_points_then_rerun_is_bit_identical(reference, tmp_path):
    # 48 rows, batch 8, grad_accum 2 -> 3 steps per epoch, 9 steps; checkpoints every 2 steps, keep_last=2.
    finish(launch(tmp_path, HF_LOOP_TEST_KILL_AT_STEP="3"), -signal.SIGKILL)
    assert checkpoint_steps(tmp_path) == [2]

    # Resumes at 2, writes 4, dies halfway through writing 6: a temp file remains, never a step-6 checkpoint.
    finish(launch(tmp_path, HF_LOOP_TEST_KILL_IN_SAVE="2"), -signal.SIGKILL)
    assert checkpoint_steps(tmp_path) == [2, 4]
    assert list((tmp_path / "checkpoints").glob(".tmp-*"))

    finish(
        launch(tmp_path, HF_LOOP_TEST_KILL_AT_STEP="7"), -signal.SIGKILL
    )  # resumes at 4, writes 6, dies at 7
    assert checkpoint_steps(tmp_path) == [4, 6]

    piped = finish(launch(tmp_path), 0)  # resumes at 6 and finishes
    assert "it/s" not in piped  # stderr is a pipe here: no progress bar
    assert checkpoint_steps(tmp_path) == [8, 9]
    assert not list((tmp_path / "checkpoints").glob(".tmp-*"))
    resumed = torch.load(tmp_path / "final_weights.pt", weights_only=True)
    expected = reference.weights()
    assert resumed.keys() == expected.keys()
    assert all(torch.equal(resumed[k], expected[k]) for k in expected)


def _dropout_run(out_dir: Path, on_log=None) -> hl.TrainResult:
    model = tiny_bert(dropout=0.1)
    loader = hl.make_loader(classification_dataset(24), batch_size=4, sampler="random", seed=2)
    config = hl.TrainConfig(
        epochs=2, grad_accum=2, out_dir=out_dir, progress=False, log_every=1, export=False
    )
    result = hl.train(model, loader, torch.optim.AdamW(model.parameters(), lr=1e-3), config, on_log=on_log)
    result.weights = weights(model)
    return result


def test_sigterm_checkpoints_and_stops_then_resume_is_exact(tmp_path):
    uninterrupted = _dropout_run(tmp_path / "a")

    def preempt(record):
        if record.get("step") == 4:
            os.kill(os.getpid(), signal.SIGTERM)  # what a cluster scheduler sends before preemption

    handler = signal.getsignal(signal.SIGTERM)
    stopped = _dropout_run(tmp_path / "b", on_log=preempt)
    assert stopped.stop_reason == "sigterm" and stopped.steps == 4  # mid-epoch: 3 steps per epoch
    assert stopped.checkpoint.name == "step-00000004"
    assert signal.getsignal(signal.SIGTERM) == handler  # train restored the previous handler
    resumed = _dropout_run(tmp_path / "b")
    assert resumed.resumed_from == stopped.checkpoint and resumed.steps == 6 and resumed.epochs == 2
    assert all(torch.equal(resumed.weights[k], uninterrupted.weights[k]) for k in uninterrupted.weights)

    again = _dropout_run(tmp_path / "b")  # a finished run: nothing left to do, same weights
    assert again.steps == 6 and again.train_loss is None
    assert all(torch.equal(again.weights[k], uninterrupted.weights[k]) for k in uninterrupted.weights)


def _stream_run(out_dir: Path, max_steps: int) -> dict[str, torch.Tensor]:
    from _train_script import token_rows
    from datasets import Dataset

    rows = Dataset.from_dict(token_rows(20)).to_iterable_dataset(num_shards=2)
    loader = hl.make_loader(hl.StreamDataset(rows, shuffle_buffer=4, seed=1), batch_size=4)
    model = tiny_bert(dropout=0.1)
    config = hl.TrainConfig(
        max_steps=max_steps, out_dir=out_dir, checkpoint_every=1, progress=False, export=False
    )
    hl.train(model, loader, torch.optim.AdamW(model.parameters(), lr=1e-3), config)
    return weights(model)


def test_a_stream_resumes_exactly_mid_pass(tmp_path):
    uninterrupted = _stream_run(tmp_path / "a", max_steps=8)  # 5 batches per pass: the run crosses a pass
    _stream_run(tmp_path / "b", max_steps=3)
    resumed = _stream_run(tmp_path / "b", max_steps=8)
    assert all(torch.equal(resumed[k], uninterrupted[k]) for k in uninterrupted)


def test_the_progress_bar_appears_on_a_terminal(reference):
    reference.weights()
    screen = reference.screen.decode(errors="replace")
    assert "train" in screen and "9/9" in screen  # tqdm drew the bar on the reference run's terminal
