"""kill -9 during an FSDP2 run on 2 processes (torchrun), once mid-checkpoint: the rerun's final weights are
bit-identical to an uninterrupted run's. The uninterrupted run starts first and overlaps with the others."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).with_name("_fsdp_script.py")


def launch(out_dir: Path, **env: str) -> subprocess.Popen:
    environment = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "OMP_NUM_THREADS": "1",
        **env,
    }
    return subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(SCRIPT),
         str(out_dir)],
        env=environment, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip


def finish(process: subprocess.Popen, ok: bool) -> str:
    output, _ = process.communicate(timeout=300)
    assert (process.returncode == 0) == ok, f"exit code {process.returncode}:\n{output[-3000:]}"
    return output


def steps_on_disk(out_dir: Path) -> list[int]:
    folder = out_dir / "checkpoints"
    return sorted(int(p.name.split("-")[1]) for p in folder.iterdir() if p.name.startswith("step-"))


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("reference")
    process = launch(out_dir)
    yield out_dir, process
    if process.poll() is None:
        process.kill()


def test_kill9_during_an_fsdp_run_then_rerun_is_bit_identical(reference, tmp_path):
    # 48 rows on 2 ranks, batch 4, grad_accum 2: 3 steps per epoch, 6 steps; checkpoints at 2, 4, 6.
    finish(launch(tmp_path, HF_LOOP_TEST_KILL_AT_STEP="3"), ok=False)
    assert steps_on_disk(tmp_path) == [2]
    finish(launch(tmp_path, HF_LOOP_TEST_KILL_IN_SAVE="2"), ok=False)  # resumes at 2, writes 4, dies in 6
    assert steps_on_disk(tmp_path) == [2, 4]
    finish(launch(tmp_path), ok=True)  # resumes at 4 and finishes
    assert steps_on_disk(tmp_path) == [4, 6]
    resumed = torch.load(tmp_path / "final_weights.pt", weights_only=True)
    out_dir, process = reference
    finish(process, ok=True)
    expected = torch.load(out_dir / "final_weights.pt", weights_only=True)
    assert resumed.keys() == expected.keys()
    assert all(torch.equal(resumed[k], expected[k]) for k in expected)
