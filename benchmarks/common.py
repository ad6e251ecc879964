"""Shared benchmark helpers: the DESIGN.md §4 length distribution, a pre-tokenized dataset, a tiny fast
tokenizer trained in-process, the hand-written pad every loader benchmark compares against, a best-of
timer, the command line every script takes (sizes, ``--repeat``, ``--out``), the report's machine line,
and printing/writing the report.

Lengths: lognormal with median 100 and sigma 0.8, clipped to 8..512 (seeded), as every hf_loop benchmark uses.
"""

from __future__ import annotations

import argparse
import os
import platform
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch

MEDIAN, SIGMA, MIN_LEN, MAX_LEN = 100, 0.8, 8, 512
VOCAB = 30_000


def lognormal_lengths(n: int, seed: int = 0) -> np.ndarray:
    """``n`` token counts: lognormal (median 100, sigma 0.8), clipped to 8..512, as int64."""
    rng = np.random.default_rng(seed)
    return np.clip(rng.lognormal(np.log(MEDIAN), SIGMA, n), MIN_LEN, MAX_LEN).astype(np.int64)


def make_tokenized_dataset(n: int, seed: int = 0, rows_per_chunk: int = 1000):
    """A pre-tokenized ``datasets.Dataset``: ``input_ids`` (random ids, int32) and ``attention_mask`` (ones,
    int8) — the types ``datasets.map`` gives a tokenizer's output — stored in record batches of
    ``rows_per_chunk`` rows, as ``map``'s writer leaves them."""
    from datasets import Dataset
    from datasets.table import InMemoryTable

    lengths = lognormal_lengths(n, seed)
    rng = np.random.default_rng(seed + 1)
    batches = []
    for start in range(0, n, rows_per_chunk):
        part = lengths[start : start + rows_per_chunk]
        offsets = pa.array(np.concatenate([[0], np.cumsum(part)]).astype(np.int32))
        ids = pa.array(rng.integers(5, VOCAB, int(part.sum()), dtype=np.int32))
        mask = pa.array(np.ones(int(part.sum()), dtype=np.int8))
        batches.append(
            pa.RecordBatch.from_arrays(
                [pa.ListArray.from_arrays(offsets, ids), pa.ListArray.from_arrays(offsets, mask)],
                ["input_ids", "attention_mask"],
            )
        )
    return Dataset(InMemoryTable(pa.Table.from_batches(batches)))


def rows_of_lists(n: int, seed: int = 0) -> list[dict[str, list[int]]]:
    """``n`` row dicts of Python lists (input_ids + attention_mask), what a tokenizer returns per example."""
    rng = np.random.default_rng(seed + 1)
    return [
        {"input_ids": rng.integers(5, VOCAB, length).tolist(), "attention_mask": [1] * int(length)}
        for length in lognormal_lengths(n, seed)
    ]


def fast_tokenizer():
    """A real transformers fast tokenizer (WordLevel, trained in-process on a toy corpus; pad id 0)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    words = [f"w{i}" for i in range(200)]
    tok = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator([" ".join(words)], trainers.WordLevelTrainer(special_tokens=["[PAD]", "[UNK]"]))
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]")


def hand_pad(rows: list[dict]) -> dict[str, torch.Tensor]:
    """A good hand-written numpy pad: one row assignment per example, the mask from lengths (the rows' own
    ``attention_mask`` is ignored and nothing is checked) — the reference loader benchmarks compare against."""
    lengths = [len(r["input_ids"]) for r in rows]
    ids = np.zeros((len(rows), max(lengths)), dtype=np.int64)
    mask = np.zeros_like(ids)
    for i, (row, n) in enumerate(zip(rows, lengths)):
        ids[i, :n] = row["input_ids"]
        mask[i, :n] = 1
    return {"input_ids": torch.from_numpy(ids), "attention_mask": torch.from_numpy(mask)}


def timeit(fn: Callable[[], int], repeat: int = 5) -> float:
    """Best-of-``repeat`` throughput in samples/s; ``fn`` runs one pass and returns how many samples it did."""
    best = 0.0
    for _ in range(repeat):
        start = time.perf_counter()
        count = fn()
        best = max(best, count / (time.perf_counter() - start))
    return best


def compare(fns: dict[str, Callable[[], int]], repeat: int = 5) -> dict[str, float]:
    """Best-of-``repeat`` samples/s for each candidate, measured interleaved (a, b, c, a, b, c, ...) so that
    load from other processes on a shared machine falls on every candidate alike."""
    best = dict.fromkeys(fns, 0.0)
    for _ in range(repeat):
        for name, fn in fns.items():
            best[name] = max(best[name], timeit(fn, 1))
    return best


def machine() -> str:
    """One line describing where the numbers came from."""
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    return (
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs (load average {load} at the end: "
        f"the CPUs are shared), Python {platform.python_version()}, torch {torch.__version__}, "
        f"numpy {np.__version__}, pyarrow {pa.__version__}"
    )


def table(rows: list[tuple[str, float]], anchor: float) -> str:
    """A markdown table of samples/s with the ratio to ``anchor``."""
    lines = ["| path | samples/s | vs anchor |", "|---|---:|---:|"]
    lines += [f"| {name} | {rate:,.0f} | {rate / anchor:.1f}x |" for name, rate in rows]
    return "\n".join(lines)


def arguments(doc: str, repeat: int | None = None, **sizes: int) -> argparse.ArgumentParser:
    """The command line every benchmark takes: ``--<size> N`` for each size (``rows=16_000`` gives
    ``--rows``), ``--repeat N`` when ``repeat`` has a default, and ``--out PATH`` (also write the report
    there). Scripts add their own options to the parser it returns."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    for name, default in sizes.items():
        parser.add_argument(f"--{name}", type=int, default=default)
    if repeat is not None:
        parser.add_argument("--repeat", type=int, default=repeat)
    parser.add_argument("--out", type=Path, default=None, help="write the markdown report here as well")
    return parser


def emit(report: list[str], out: Path | None) -> None:
    """Print the report's lines and, with ``--out``, write them to that file (one trailing newline)."""
    text = "\n".join(report) + "\n"
    print(text, end="")
    if out:
        Path(out).write_text(text)
