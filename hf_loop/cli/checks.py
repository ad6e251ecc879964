"""Checks of a parsed command line that need more than one flag, or the filesystem, but nothing heavy.

They run before torch, datasets or transformers are imported, so a mistake costs a fraction of a second. Each
failure is a :class:`UsageError` whose message names the flag, what it received and the fix; the command prints
it as one line and exits with status 2.
"""

from __future__ import annotations

import os
from argparse import Namespace
from pathlib import Path

from hf_loop.cli.parser import DEMO

DATA_SUFFIXES = (".parquet", ".csv", ".tsv", ".json", ".jsonl", ".txt", ".arrow")
PATH_PREFIXES = ("./", "../", "/", "~", ".\\", "..\\")


class UsageError(ValueError):
    """A mistake on the command line (a flag's value, a combination of flags, a path): message = the fix."""


def looks_like_path(value: str) -> bool:
    """True when ``value`` can only be meant as a local path (a Hub id such as "org/name" also has a slash)."""
    return value.startswith(PATH_PREFIXES) or value.lower().endswith(DATA_SUFFIXES) or value in (".", "..")


COMPRESSED = (".gz", ".bz2", ".xz", ".zst", ".zip")


def _is_data_file(path: Path) -> bool:
    name = path.name.lower()
    for suffix in COMPRESSED:
        name = name.removesuffix(suffix)
    return name.endswith(DATA_SUFFIXES)


def _data_files(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    return sorted(p for p in path.rglob("*") if p.is_file() and _is_data_file(p))


def _empty(file: Path) -> bool:
    """True when a data file holds no rows: a parquet file with 0 rows, a text file that is blank or only a
    CSV/TSV header. (datasets fails on these with Arrow errors that never name the file.)"""
    if file.suffix.lower() == ".parquet":
        import pyarrow.parquet as pq

        try:
            return pq.read_metadata(file).num_rows == 0
        except Exception:  # not parquet at all: datasets will say so, naming the file
            return False
    if file.suffix.lower() in (".arrow", *COMPRESSED):
        return file.stat().st_size == 0
    with open(file, "rb") as f:
        lines = [line for line in (f.readline() for _ in range(2)) if line.strip()]
    header_only = file.suffix.lower() in (".csv", ".tsv") and len(lines) == 1
    return not lines or header_only


def check_dataset(value: str | None, flag: str = "--dataset") -> None:
    """A local dataset must exist and hold rows; a Hub id is left to ``hl.load`` (its errors list the cache)."""
    if value is None or (value == DEMO and flag == "DATASET"):
        return
    path = Path(value).expanduser()
    if not path.exists():
        if looks_like_path(value):
            raise UsageError(
                f"{flag} {value}: no such file or folder ({path.absolute()}). Fix: check the path, or pass a Hub "
                "id such as org/name"
            )
        return
    files = _data_files(path)
    if not files:
        raise UsageError(
            f"{flag} {value}: the folder holds no data files ({', '.join(DATA_SUFFIXES)}). Fix: the folder "
            "with the data, or a Hub id"
        )
    for file in files:
        if _empty(file):
            raise UsageError(f"{flag} {value}: {file} holds no rows. Fix: write data into it, or remove it")


def check_pretrained(value: str | None, flag: str, needs: str) -> None:
    """A local model (or tokenizer) folder must exist and hold ``needs``; a Hub id must be cached when offline.

    Args:
        value: the flag's value (None: nothing to check).
        flag: the flag, for the message.
        needs: the file the folder must contain (``config.json`` for a model, ``tokenizer_config.json``).
    """
    if value is None:
        return
    path = Path(value).expanduser()
    if path.is_dir():
        if not (path / needs).is_file():
            raise UsageError(
                f"{flag} {value}: the folder has no {needs}. Fix: pass a folder written by save_pretrained(), "
                "or a Hub id"
            )
        return
    if path.exists() or looks_like_path(value):
        what = "is a file, not a folder" if path.exists() else "does not exist"
        raise UsageError(
            f"{flag} {value}: the path {what} ({path.absolute()}). Fix: pass a folder written by "
            "save_pretrained(), or a Hub id such as bert-base-uncased"
        )
    from huggingface_hub import is_offline_mode, try_to_load_from_cache

    try:
        cached = isinstance(try_to_load_from_cache(value, needs), str)
    except ValueError as error:  # huggingface_hub's HFValidationError: not a possible repo id
        raise UsageError(f"{flag} {value}: neither a local folder nor a Hub id ({error})") from None
    if is_offline_mode() and not cached:
        raise UsageError(
            f"{flag} {value}: not in the local Hugging Face cache, and HF_HUB_OFFLINE is set. Fix: download it "
            "once while online (unset HF_HUB_OFFLINE), or pass a local folder"
        )


def check_out_dir(value: str | None, flag: str) -> None:
    """The output folder must be a folder (or creatable) and writable."""
    if value is None:
        return
    path = Path(value).expanduser()
    if path.exists() and not path.is_dir():
        raise UsageError(f"{flag} {value}: this is a file, not a folder. Fix: pass a folder path")
    existing = next((p for p in (path, *path.absolute().parents) if p.exists()), None)
    if existing is not None and not os.access(existing, os.W_OK):
        raise UsageError(
            f"{flag} {value}: {existing} is not writable. Fix: pass a folder you may write, e.g. under your home"
        )


def check_finetune(args: Namespace) -> None:
    """Everything about a ``finetune`` command line that can be checked without loading data or a model."""
    if args.streaming and args.dataset is None:
        raise UsageError(
            "--streaming needs --dataset NAME_OR_PATH: the embedded demo dataset is map-style. Fix: add "
            "--dataset, or drop --streaming"
        )
    if args.streaming and args.max_steps is None:
        raise UsageError(
            "--streaming needs --max-steps N: a stream has no length to count epochs by. Fix: add --max-steps"
        )
    if args.streaming and args.sampler == "weighted":
        raise UsageError("--sampler weighted needs map-style data to weight. Fix: drop --streaming")
    if args.max_tokens is not None and args.sampler != "tokens":
        raise UsageError(
            f"--max-tokens {args.max_tokens} sets the budget of --sampler tokens, but the sampler is "
            f"{args.sampler!r}. Fix: add --sampler tokens, or drop --max-tokens"
        )
    if args.streaming and args.max_tokens is not None and args.max_tokens < args.max_length:
        raise UsageError(
            f"--max-tokens {args.max_tokens} is below --max-length {args.max_length}: a streamed example of "
            f"--max-length tokens would fit no batch. Fix: --max-tokens {args.max_length} or more, or "
            f"--max-length {args.max_tokens}"
        )
    if args.activation_checkpointing and not args.fsdp:
        raise UsageError(
            "--activation-checkpointing recomputes the blocks that --fsdp shards. Fix: add --fsdp, or drop "
            "--activation-checkpointing"
        )
    if args.num_rows is not None and args.dataset is not None:
        raise UsageError(
            f"--num-rows sizes the embedded demo dataset, not --dataset {args.dataset}. Fix: take rows with "
            f"--split 'train[:{args.num_rows}]'"
        )
    if args.config is not None and args.dataset is not None and Path(args.dataset).is_file():
        raise UsageError(
            f"--config {args.config}: the data file {args.dataset} has no configurations. Fix: drop --config"
        )
    check_dataset(args.dataset)
    check_pretrained(args.model, "--model", "config.json")
    check_out_dir(args.out_dir, "--out-dir")


def check_inspect(args: Namespace) -> None:
    """Everything about an ``inspect`` command line that can be checked without loading data."""
    if args.dataset == DEMO and args.streaming:
        raise UsageError(f"--streaming: the embedded demo dataset is map-style. Fix: drop --streaming, or pass ./{DEMO} "
                         "for a local folder of that name")  # fmt: skip
    check_dataset(args.dataset, "DATASET")
    check_pretrained(args.tokenizer, "--tokenizer", "tokenizer_config.json")
    check_out_dir(args.out, "--out")
