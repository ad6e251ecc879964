"""Checkpoint save and verified load: hf_loop's step folders vs one plain torch.save / torch.load file.

The state is what a resume needs most of: a model state dict and its AdamW state (exp_avg, exp_avg_sq, step),
built by one real AdamW step on a stack of Linear layers of ``--mb`` MB (the optimizer doubles it, so the
default writes about 300 MB). Side by side in one process, interleaved, best of ``--repeat``:

- save, plain: ``torch.save(state, path)`` (no fsync: the data may still be only in the page cache)
- save, plain + fsync: ``torch.save`` to an open file, then ``fsync`` (the minimum a durable save costs)
- save, hf_loop: ``store.write`` of model.pt and optimizer.pt: sha256 while writing, fsync of every file and
  folder, manifest, rename (the guarantee: atomic, durable, verifiable)
- load, plain: ``torch.load(path, weights_only=True)``
- load, hf_loop: ``store.load_newest`` reading both files: manifest, sizes, sha256 of every byte, then
  ``torch.load(weights_only=True)`` from memory

Each load runs twice: warm (the files were just written and sit in the page cache) and cold (their pages are
evicted first with ``posix_fadvise(DONTNEED)``, which touches only these files, so the bytes come from the disk
as after a restart). Every save goes to a new file or folder; the previous one is deleted outside the timing.

Run: python benchmarks/checkpoint.py [--mb 100] [--repeat 5] [--out benchmarks/results/checkpoint.md]
"""

from __future__ import annotations

import datetime
import hashlib
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import arguments, emit, machine  # noqa: E402

import hf_loop as hl  # noqa: E402
from hf_loop.checkpoint import layout, store  # noqa: E402

WIDTH = 1024  # a Linear(1024, 1024) layer holds 4 MB of fp32 weights
SAVE_PLAIN, SAVE_FSYNC = "save, plain torch.save", "save, plain torch.save + fsync"
SAVE_OURS = "save, hf_loop store.write (sha256, fsync, manifest, rename)"
LOAD_PLAIN, LOAD_PLAIN_COLD = "load, plain torch.load(weights_only=True)", "load, plain, cold"
LOAD_OURS = "load, hf_loop store.load_newest (sizes + sha256 verified)"
LOAD_OURS_COLD = "load, hf_loop, cold"


def training_state(model_mb: int) -> dict:
    """Model and AdamW state after one real step (exp_avg and exp_avg_sq have the parameters' shapes)."""
    torch.manual_seed(0)
    layers = max(1, round(model_mb * 2**20 / (4 * (WIDTH * WIDTH + WIDTH))))
    model = torch.nn.Sequential(*[torch.nn.Linear(WIDTH, WIDTH) for _ in range(layers)])
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    model(torch.randn(4, WIDTH)).square().mean().backward()
    optimizer.step()
    return {"model": model.state_dict(), "optimizer": optimizer.state_dict()}


def nbytes(state: dict) -> int:
    """Bytes of every tensor in the state (what both sides write, give or take the pickled structure)."""
    model = sum(t.nbytes for t in state["model"].values())
    return model + sum(t.nbytes for s in state["optimizer"]["state"].values() for t in s.values())


class Runs:
    """The five candidates over one temporary folder; each call returns its seconds."""

    def __init__(self, root: Path, state: dict) -> None:
        self.root, self.state, self.env = root, state, hl.DistEnv()
        self.count = 0
        self.plain_path: Path | None = None

    def _next_plain(self) -> Path:
        if self.plain_path is not None:
            self.plain_path.unlink()
        self.count += 1
        self.plain_path = self.root / f"plain-{self.count}.pt"
        return self.plain_path

    def save_plain(self) -> float:
        path = self._next_plain()
        start = time.perf_counter()
        torch.save(self.state, path)
        return time.perf_counter() - start

    def save_plain_fsync(self) -> float:
        path = self._next_plain()
        start = time.perf_counter()
        with open(path, "wb") as f:
            torch.save(self.state, f)
            f.flush()
            os.fsync(f.fileno())
        return time.perf_counter() - start

    def save_hf_loop(self) -> float:
        self.count += 1
        for _, old in layout.step_folders(self.root):
            shutil.rmtree(old)

        def fill(p: hl.checkpoint.PendingCheckpoint) -> None:
            p.save("model.pt", self.state["model"])
            p.save("optimizer.pt", self.state["optimizer"])

        start = time.perf_counter()
        store.write(self.root, self.count, self.env, fill, identity={"benchmark": "checkpoint"})
        return time.perf_counter() - start

    def load_plain(self, cold: bool = False) -> float:
        if cold:
            evict([self.plain_path])
        start = time.perf_counter()
        torch.load(self.plain_path, weights_only=True)
        return time.perf_counter() - start

    def load_hf_loop(self, cold: bool = False) -> float:
        def read_both(folder: Path, manifest: layout.Manifest) -> dict:
            return {
                name: store.read(folder, f"{name}.pt", manifest=manifest) for name in ("model", "optimizer")
            }

        if cold:
            evict([p for p in self.root.rglob("*") if p.is_file()])
        start = time.perf_counter()
        found = store.load_newest(self.root, self.env, read_both)
        elapsed = time.perf_counter() - start
        assert found is not None and found.state["model"].keys() == self.state["model"].keys()
        return elapsed


def evict(paths: list[Path]) -> None:
    """Drop these files' pages from the page cache (they are fsynced, so clean): the next read hits the disk."""
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def interleaved(fns: dict[str, Callable[[], float]], repeat: int) -> dict[str, list[float]]:
    """Seconds of each candidate, measured a, b, c, a, b, c, ... after one warm-up round."""
    for fn in fns.values():
        fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeat):
        for name, fn in fns.items():
            times[name].append(fn())
    return times


def hash_rate(size: int) -> float:
    """sha256 bytes/s on this machine (one core), over a buffer of ``size`` bytes."""
    data = os.urandom(min(size, 256 * 2**20))
    start = time.perf_counter()
    hashlib.sha256(data).digest()
    return len(data) / (time.perf_counter() - start)


def main() -> None:
    parser = arguments(__doc__, repeat=5, mb=100)
    parser.add_argument("--dir", type=Path, default=None, help="where to write (default: a temporary folder)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    state = training_state(args.mb)
    size = nbytes(state)
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        runs = Runs(Path(tmp), state)
        # save and load alternate, so each load reads the file its own side has just written
        times = interleaved(
            {
                SAVE_PLAIN: runs.save_plain,
                LOAD_PLAIN: runs.load_plain,
                SAVE_FSYNC: runs.save_plain_fsync,
                LOAD_PLAIN_COLD: lambda: runs.load_plain(cold=True),
                SAVE_OURS: runs.save_hf_loop,
                LOAD_OURS: runs.load_hf_loop,
                LOAD_OURS_COLD: lambda: runs.load_hf_loop(cold=True),
            },
            args.repeat,
        )
    best = {name: min(t) for name, t in times.items()}
    anchor = {SAVE_PLAIN: SAVE_FSYNC, SAVE_FSYNC: SAVE_FSYNC, SAVE_OURS: SAVE_FSYNC, LOAD_PLAIN: LOAD_PLAIN,
              LOAD_OURS: LOAD_PLAIN, LOAD_PLAIN_COLD: LOAD_PLAIN_COLD, LOAD_OURS_COLD: LOAD_PLAIN_COLD}  # fmt: skip
    rows = [
        f"| {name} | {best[name]:.3f} | {statistics.median(t):.3f} | {size / best[name] / 2**30:.2f} | "
        f"{best[name] / best[anchor[name]]:.2f}x |"
        for name, t in times.items()
    ]
    ratio = {name: best[name] / best[anchor[name]] for name in (SAVE_OURS, LOAD_OURS, LOAD_OURS_COLD)}
    hashing = size / hash_rate(size)
    uptime = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    report = [
        "# Checkpoint save and verified load (benchmarks/checkpoint.py)", "",
        f"{datetime.date.today()}, `python benchmarks/checkpoint.py --mb {args.mb} --repeat "
        f"{args.repeat}`: a state of {size / 2**20:.0f} MB (model {args.mb} MB of Linear({WIDTH}, {WIDTH}) "
        "layers + AdamW exp_avg/exp_avg_sq after one step), written to and read from a temporary folder on the "
        f"local disk; best and median of {args.repeat} interleaved runs after a warm-up; one torch thread.", "",
        "| path | best s | median s | GB/s (best) | vs plain (saves: vs plain + fsync) |",
        "|---|---:|---:|---:|---:|",
        *rows, "",
        f"hf_loop vs plain (target <= 1.2x): save {ratio[SAVE_OURS]:.2f}x plain torch.save + fsync "
        f"({best[SAVE_OURS] / best[SAVE_PLAIN]:.2f}x without fsync); verified load {ratio[LOAD_OURS]:.2f}x warm, "
        f"{ratio[LOAD_OURS_COLD]:.2f}x cold. One sha256 pass over the state takes {hashing:.3f} s here "
        f"({size / hashing / 2**30:.2f} GB/s on one core).",
        "", f"uptime: `{uptime}`", "", f"Machine: {machine()}",
    ]  # fmt: skip
    emit(report, args.out)


if __name__ == "__main__":
    main()
