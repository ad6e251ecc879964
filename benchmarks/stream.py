"""Stream benchmark: streamed parquet -> padded batches, hf_loop.StreamDataset vs datasets' IterableDataset
(DESIGN.md §4). Everything in one run, on the same parquet files.

(a) throughput, batch 32, num_workers=0 (the CPU cost per sample; workers multiply every side alike):
    anchor 1: ``load_dataset(..., streaming=True)`` in a plain DataLoader (per-example iteration) with a good
              hand-written numpy pad. Target: hf_loop >= 4x it.
    anchor 2: the same stream ``.with_format("torch")`` with ``pad_sequence``.
    hf_loop:  ``hl.make_loader(hl.StreamDataset(stream), batch_size=32, collate_fn=hl.PadCollator())``.
(b) padding waste (padded slots / all slots) without and with stream bucketing, and with a token budget.
(c) resume late in the epoch (90% of the batches consumed): hf_loop's load_state_dict + first batch vs replay
    the consumed batches to get there (what skip-based resume does). Target <= 0.2x.

Run: python benchmarks/stream.py [--rows 20000] [--repeat 3] [--out benchmarks/results/stream.md]
"""

from __future__ import annotations

import datetime
import sys
import tempfile
import time
from pathlib import Path

import pyarrow.parquet as pq
import torch
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import arguments, emit, hand_pad, machine, make_tokenized_dataset, table  # noqa: E402

import hf_loop as hl  # noqa: E402

BATCH = 32
FILES = 8
ROW_GROUP = 1000


def write_parquet(root: Path, rows: int) -> list[str]:
    data = make_tokenized_dataset(rows).data.table
    per_file = -(-rows // FILES)
    files = []
    for k in range(FILES):
        path = root / f"train-{k:05d}-of-{FILES:05d}.parquet"
        pq.write_table(data.slice(k * per_file, per_file), path, row_group_size=ROW_GROUP)
        files.append(str(path))
    return files


def stream_of(files: list[str]):
    from datasets import load_dataset

    return load_dataset("parquet", data_files=files, split="train", streaming=True)


def torch_pad(rows: list[dict]) -> dict[str, torch.Tensor]:
    from torch.nn.utils.rnn import pad_sequence

    ids = pad_sequence([r["input_ids"].long() for r in rows], batch_first=True)
    mask = pad_sequence([r["attention_mask"].long() for r in rows], batch_first=True)
    return {"input_ids": ids, "attention_mask": mask}


def count(loader) -> int:
    return sum(int(b["input_ids"].shape[0]) for b in loader)


def hf_loop_loader(files: list[str], **stream_kw):
    max_tokens = stream_kw.pop("max_tokens", None)
    stream = hl.StreamDataset(stream_of(files), **stream_kw)
    size = {"batch_size": BATCH} if max_tokens is None else {"max_tokens": max_tokens}
    return hl.make_loader(stream, collate_fn=hl.PadCollator(), **size)


def cpu_rates(paths: dict, repeat: int) -> dict[str, float]:
    """Best samples per CPU-second of each path, measured in alternating rounds.

    CPU time of this process (all its threads), not wall time: other jobs share this machine's 2 cores, and
    with num_workers=0 every side does all its work in this process. Rounds alternate so that a busy spell
    hits every path alike."""
    best = dict.fromkeys(paths, 0.0)
    for _ in range(repeat):
        for name, loader in paths.items():
            start = time.process_time()
            n = count(loader)
            best[name] = max(best[name], n / (time.process_time() - start))
    return best


def waste(batches) -> tuple[float, int]:
    real = total = n = 0
    for b in batches:
        mask = b["attention_mask"]
        real += int(mask.count_nonzero())
        total += mask.numel()
        n += 1
    return 1 - real / total, n


def resume_times(files: list[str], repeat: int) -> tuple[float, float, int, int]:
    """Seconds to the first batch after a resume at 90% of the epoch, and to replay up to the same batch."""
    options = {"shuffle_buffer": 50 * BATCH, "seed": 0, "bucket": "input_ids"}
    total = sum(1 for _ in hf_loop_loader(files, **options))
    cut = int(total * 0.9)
    loader = hf_loop_loader(files, **options)
    for k, _ in enumerate(loader, 1):
        if k == cut:
            break
    state = loader.state_dict(consumed=cut)
    best_resume = best_replay = float("inf")
    for _ in range(repeat):
        fresh = hf_loop_loader(files, **options)
        start = time.perf_counter()
        fresh.load_state_dict(state)
        next(iter(fresh))
        best_resume = min(best_resume, time.perf_counter() - start)
        fresh = hf_loop_loader(files, **options)
        start = time.perf_counter()
        for k, _ in enumerate(fresh, 1):  # skip-based resume: read and collate every consumed batch again
            if k == cut + 1:
                break
        best_replay = min(best_replay, time.perf_counter() - start)
    return best_resume, best_replay, cut, total


def main() -> None:
    args = arguments(__doc__, repeat=3, rows=20_000).parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        files = write_parquet(Path(tmp), args.rows)

        plain = DataLoader(stream_of(files), batch_size=BATCH, collate_fn=hand_pad)
        torch_fmt = DataLoader(stream_of(files).with_format("torch"), batch_size=BATCH, collate_fn=torch_pad)
        ours = hf_loop_loader(files)
        ours_shuffled = hf_loop_loader(files, shuffle_buffer=50 * BATCH, bucket="input_ids")
        # same batches on both sides (no shuffle): the comparison is like for like
        first_a, first_b = next(iter(plain)), next(iter(ours))
        assert torch.equal(first_a["input_ids"], first_b["input_ids"].long())

        paths = {
            "HF IterableDataset per example + numpy pad (anchor)": plain,
            'HF IterableDataset .with_format("torch") + pad_sequence': torch_fmt,
            "hl.StreamDataset + hl.PadCollator": ours,
            "hl.StreamDataset, shuffle window 1600 + bucketing": ours_shuffled,
        }
        rates = cpu_rates(paths, args.repeat)
        anchor = rates["HF IterableDataset per example + numpy pad (anchor)"]
        rows = list(rates.items())
        pads = [
            ("shuffle window 1600, no bucketing", *waste(hf_loop_loader(files, shuffle_buffer=1600))),
            (
                "shuffle window 1600, bucket='input_ids'",
                *waste(hf_loop_loader(files, shuffle_buffer=1600, bucket="input_ids")),
            ),
            (
                "shuffle window 1600, max_tokens=4096",
                *waste(hf_loop_loader(files, shuffle_buffer=1600, max_tokens=4096)),
            ),
        ]
        resume, replay, cut, total = resume_times(files, args.repeat)

    report = [
        f"# Stream benchmark ({datetime.date.today().isoformat()})",
        "",
        f"Machine: {machine()}. {args.rows} pre-tokenized rows (lognormal lengths, median 100, sigma 0.8, "
        f"8..512) in {FILES} parquet files (row groups of {ROW_GROUP}), read with "
        f"`load_dataset(..., streaming=True)`; batch "
        f"{BATCH}, num_workers=0. Throughput is samples per CPU-second of the process (best of {args.repeat} "
        "alternating rounds), because other jobs shared the 2 cores; resume times are wall-clock, best of "
        f"{args.repeat}. Command: `python benchmarks/stream.py --out benchmarks/results/stream.md`.",
        "",
        "## Streamed parquet -> padded batches",
        "",
        table(rows, anchor),
        "",
        "## Padding waste (padded token slots / all slots)",
        "",
        "| batching | waste | batches |",
        "|---|---:|---:|",
        *[f"| {name} | {w:.1%} | {n} |" for name, w, n in pads],
        "",
        "## Resume late in the epoch",
        "",
        f"Shuffle window 1600 with bucketing; resume after {cut} of {total} batches (90%).",
        "",
        "| path | seconds to the next batch | vs replay |",
        "|---|---:|---:|",
        f"| replay the consumed batches (skip-based resume) | {replay:.3f} | 1.00x |",
        f"| hl load_state_dict (re-reads at most one window) | {resume:.3f} | {resume / replay:.3f}x |",
    ]
    emit(report, args.out)


if __name__ == "__main__":
    main()
