"""Each example runs end to end for a few steps, offline, on the data it builds itself (in a subprocess)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def run_example(name: str, *args: str, cwd: Path) -> str:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run(
        [sys.executable, str(EXAMPLES / name), *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, f"{name} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout


def test_text_classification(tmp_path):
    out = run_example("text_classification.py", "--max-steps", "3", "--num-rows", "600", cwd=tmp_path)
    assert "train label counts: [" in out and "step 3: loss" in out
    assert "trained 3 steps; eval loss" in out and "accuracy" in out and "first predictions: [" in out


def test_image_classification(tmp_path):
    out = run_example("image_classification.py", "--max-steps", "3", "--batch-size", "16", cwd=tmp_path)
    assert "(all)" in out and "step 3: loss" in out and "eval accuracy" in out and "on 180 images" in out


def test_causal_lm_streaming_resumes(tmp_path):
    first = run_example("causal_lm_streaming.py", "--max-steps", "2", "--out-dir", "lm", cwd=tmp_path)
    assert "shard plan" in first and "4 shard(s)" in first and "2 steps" in first and "sample:" in first
    assert (tmp_path / "lm" / "run" / "checkpoints").is_dir()
    second = run_example("causal_lm_streaming.py", "--max-steps", "4", "--out-dir", "lm", cwd=tmp_path)
    assert "resumed from" in second and "4 steps" in second
    assert "step 3:" in second and "step 1:" not in second


@pytest.mark.parametrize("name", ["plain_loop.py"])
def test_plain_loop(name, tmp_path):
    out = run_example(name, "--max-steps", "3", "--num-rows", "400", cwd=tmp_path)
    assert "(all)" in out and "step 3: loss" in out and "test accuracy" in out and "after 3 steps" in out
