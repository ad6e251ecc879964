"""PNG plots: the length histogram of a report, and the loss / learning-rate curve of a training run."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from hf_loop.errors import DataError

METRICS_FILE = "metrics.jsonl"  # written by hl.train into TrainConfig.out_dir (loop.py)
_PLOT_FIX = "matplotlib is needed for plots: pip install 'hf-loop[plot]' (or pip install matplotlib)"


def _pyplot() -> Any:
    try:
        import matplotlib
    except ImportError as error:
        raise ImportError(_PLOT_FIX) from error
    matplotlib.use("Agg")  # files only: never needs a display
    import matplotlib.pyplot as plt

    return plt


def plot_lengths(lengths: np.ndarray, path: str | Path, *, title: str = "", unit: str = "tokens") -> Path:
    """Write a histogram of ``lengths`` (PNG) with the median and 90th percentile marked.

    Raises:
        ImportError: matplotlib is not installed (the message gives the pip command).

    Example:
        >>> plot_lengths(np.array([3, 5, 8]), "lengths.png")
        PosixPath('lengths.png')
    """
    plt = _pyplot()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.hist(lengths, bins=min(60, max(10, int(np.unique(lengths).size))), color="#4C72B0")
    for q, style in ((50, "-"), (90, "--")):
        value = float(np.percentile(lengths, q))
        ax.axvline(value, color="k", linestyle=style, linewidth=1, label=f"p{q} = {value:g}")
    ax.set_xlabel(f"length ({unit})")
    ax.set_ylabel("examples")
    ax.set_title(title or f"{len(lengths)} examples")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def read_metrics(out_dir: str | Path) -> list[dict[str, Any]]:
    """The records the training loop appended to ``out_dir/metrics.jsonl`` (one JSON object per line)."""
    file = Path(out_dir) / METRICS_FILE
    if not file.is_file():
        raise DataError(
            f"no metrics log at {file}: hl.train writes it when TrainConfig(out_dir=...) is set. Fix: pass the "
            "out_dir of a run (hf-loop finetune --out-dir DIR)"
        )
    with file.open() as handle:
        return [json.loads(line) for line in handle if line.strip()]


def plot_run(out_dir: str | Path, path: str | Path | None = None) -> Path:
    """Plot a run's training loss (and eval loss, and the learning rate on a second axis) from its metrics log.

    Args:
        out_dir: the ``TrainConfig.out_dir`` of a run.
        path: the PNG to write; default ``out_dir/run.png``.

    Raises:
        ImportError: matplotlib is not installed (the message gives the pip command).
        DataError: ``out_dir`` has no metrics log, or the log has no loss records.

    Example:
        >>> config = hl.TrainConfig(epochs=2, out_dir="runs/demo", log_every=2)
        >>> _ = hl.train(model, loader, optimizer, config)      # writes runs/demo/metrics.jsonl
        >>> hl.plot_run("runs/demo")
        PosixPath('runs/demo/run.png')
    """
    records = read_metrics(out_dir)
    train = [r for r in records if "loss" in r and "step" in r]
    evals = [r for r in records if "eval_loss" in r and "step" in r]
    if not train and not evals:
        raise DataError(f"{Path(out_dir) / METRICS_FILE} has no records with 'step' and 'loss' to plot")
    plt = _pyplot()
    path = Path(path) if path is not None else Path(out_dir) / "run.png"
    fig, ax = plt.subplots(figsize=(7, 4))
    if train:
        ax.plot([r["step"] for r in train], [r["loss"] for r in train], label="train loss", color="#4C72B0")
    if evals:
        ax.plot(
            [r["step"] for r in evals],
            [r["eval_loss"] for r in evals],
            "o-",
            label="eval loss",
            color="#DD8452",
        )
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss")
    handles = list(ax.get_lines())
    lrs = [r for r in train if "lr" in r]
    if lrs:
        twin = ax.twinx()
        handles += twin.plot(
            [r["step"] for r in lrs], [r["lr"] for r in lrs], ":", color="gray", label="lr (right)"
        )
        twin.set_ylabel("learning rate")
    ax.legend(handles=handles, loc="upper right")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
