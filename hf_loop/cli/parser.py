"""The ``hf-loop`` argument parser. Standard library only, so ``--help`` and every value check answer before
torch, datasets or transformers are imported.

A bad value is two lines on stderr, exit status 2: the flag, what was received and what is expected, then where
to read more (argparse's default repeats the whole usage, which for ``finetune`` is a screenful).
"""

from __future__ import annotations

import argparse
import math
from typing import NoReturn

SAMPLERS = ("random", "weighted", "length", "tokens")
PRECISIONS = ("fp32", "bf16", "fp16")
DEMO = "demo"  # `hf-loop inspect demo`: the embedded demo dataset
DEMO_ROWS = 4000


class Parser(argparse.ArgumentParser):
    """An ``ArgumentParser`` whose errors are two lines: the problem, then where every flag is listed."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message}\n  ({self.prog} --help lists every flag)\n")


def _number(text: str, kind: type, expected: str) -> int | float:
    try:
        return kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}") from None


def positive_int(text: str) -> int:
    value = _number(text, int, "an integer >= 1")
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}")
    return value


def non_negative_int(text: str) -> int:
    value = _number(text, int, "an integer >= 0")
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}")
    return value


def seed(text: str) -> int:
    value = _number(text, int, "an integer seed in 0..2**32-1")
    if not 0 <= value < 2**32:
        raise argparse.ArgumentTypeError(
            f"expected an integer seed in 0..2**32-1 (numpy's range), got {text!r}"
        )
    return value


def fraction(text: str) -> float:
    value = _number(text, float, "a fraction between 0 and 1 (exclusive), such as 0.1")
    if not 0 < value < 1:
        raise argparse.ArgumentTypeError(
            f"expected a fraction between 0 and 1 (exclusive), such as 0.1, got {text!r}"
        )
    return value


def learning_rate(text: str) -> float:
    value = _number(text, float, "a learning rate > 0, such as 5e-5")
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"expected a learning rate > 0, such as 5e-5, got {text!r}")
    return value


def _finetune_parser(commands: argparse._SubParsersAction) -> None:
    ft = commands.add_parser(
        "finetune",
        help="fine-tune a text classifier or regressor (no arguments: the embedded demo, offline)",
        description="Fine-tune a sequence classifier (integer, string or ClassLabel labels) or a regressor "
        "(float labels: MSE, reported as RMSE and R^2). With no arguments: a demo dataset built "
        "in code, a tokenizer trained in-process and a tiny BERT - offline, about 10 s on 2 idle "
        "CPU cores. Runs unchanged under `torchrun --nproc_per_node=N`. Ctrl-C "
        "checkpoints and stops (exit 130): run the same command to continue.",
    )
    data = ft.add_argument_group("data")
    add = data.add_argument
    add(
        "--dataset",
        metavar="NAME_OR_PATH",
        help="Hub id, local folder or data file (default: the embedded demo)",
    )
    add("--config", metavar="NAME", help="dataset configuration (subset) name")
    add("--split", metavar="NAME", help="training split, or a slice such as 'train[:2000]' (default: train)")
    add(
        "--text-column",
        metavar="NAME",
        help="column with the text (default: text, sentence, ... or the first string column)",
    )
    add(
        "--label-column",
        metavar="NAME",
        help="column with the label: class ids, strings (mapped to ids) or floats (regression) (default: "
        "label or labels)",
    )
    add(
        "--val-fraction",
        type=fraction,
        default=0.1,
        metavar="F",
        help="share of train held out for validation when the dataset has no validation split, seeded "
        "(default: 0.1)",
    )
    add(
        "--streaming",
        action="store_true",
        help="stream the dataset instead of preparing it (needs --max-steps)",
    )
    add(
        "--max-length",
        type=positive_int,
        default=256,
        metavar="N",
        help="truncate texts to N tokens (default: 256)",
    )
    add(
        "--num-rows",
        type=positive_int,
        metavar="N",
        help=f"rows of the embedded demo dataset (default: {DEMO_ROWS}; for --dataset use --split "
        "'train[:N]')",
    )

    model = ft.add_argument_group("model and training")
    add = model.add_argument
    add(
        "--model",
        metavar="NAME_OR_PATH",
        help="pretrained model (Hub id or folder); default: a tiny BERT trained from scratch",
    )
    add(
        "--epochs",
        type=positive_int,
        default=2,
        metavar="N",
        help="passes over the training data (default: 2)",
    )
    add(
        "--max-steps",
        type=positive_int,
        metavar="N",
        help="stop after N optimizer steps (overrides --epochs; required with --streaming)",
    )
    add(
        "--batch-size",
        type=positive_int,
        default=32,
        metavar="N",
        help="examples per batch per process (default: 32)",
    )
    add(
        "--lr",
        type=learning_rate,
        metavar="LR",
        help="peak learning rate, linear decay (default: 3e-3 from scratch, 5e-5 with --model)",
    )
    add(
        "--sampler",
        choices=SAMPLERS,
        default="length",
        help="random (shuffled batches); weighted (class-balanced draws with hl.class_weights); length "
        "(length-grouped batches in random order: little padding, the default); tokens (token-budget "
        "batches, see --max-tokens) (default: length)",
    )
    add(
        "--max-tokens",
        type=positive_int,
        metavar="N",
        help="token budget per batch for --sampler tokens (default: the tokens of an average batch)",
    )
    add(
        "--precision",
        choices=PRECISIONS,
        default="fp32",
        help="autocast precision: fp32 on CPU (bf16 there is ~2.6x slower), bf16 on a recent GPU (default: "
        "fp32)",
    )
    add(
        "--fsdp",
        action="store_true",
        help="shard the model, its gradients and optimizer state over the ranks with FSDP2 (hl.shard; under "
        "torchrun), for models that do not fit on one GPU; --precision is its compute dtype",
    )
    add(
        "--activation-checkpointing",
        action="store_true",
        help="with --fsdp: recompute each block's activations in backward (less memory, ~1/3 more compute)",
    )
    add(
        "--grad-accum",
        type=positive_int,
        default=1,
        metavar="N",
        help="micro-batches per optimizer step (default: 1)",
    )
    add(
        "--out-dir",
        metavar="DIR",
        help="checkpoints, metrics.jsonl and the final model; resumes when DIR holds a checkpoint (default: "
        "runs/finetune-<UTC time>)",
    )
    add(
        "--checkpoint-every",
        type=positive_int,
        metavar="N",
        help="write a checkpoint every N optimizer steps, so Ctrl-C or a crash loses little (default: a "
        "tenth of the run, between 10 and 500 steps)",
    )
    add(
        "--num-workers",
        type=non_negative_int,
        default=0,
        metavar="N",
        help="DataLoader worker processes (default: 0)",
    )
    add(
        "--threads",
        type=positive_int,
        metavar="N",
        help="torch intra-op threads per process (default: the physical cores this process may use, shared "
        "among local ranks and workers, capped by the cores other processes leave idle; see "
        "hf_loop.threads)",
    )
    add("--seed", type=seed, default=0, help="seed of the split, sampler and initial weights (default: 0)")
    add(
        "--log-every",
        type=positive_int,
        default=20,
        metavar="N",
        help="print a log line every N steps (default: 20)",
    )


def _inspect_parser(commands: argparse._SubParsersAction) -> None:
    ins = commands.add_parser(
        "inspect",
        help="report lengths, padding per sampler, label balance and the shard plan of a dataset",
        description="Data report: length distribution (text and a histogram PNG), padding waste per "
        "strategy (random, length-grouped, token-budget) computed with hf_loop's samplers, "
        "label balance with the class weights sampler='weighted' would use, and for streams the "
        "shard plan over ranks x workers.",
    )
    add = ins.add_argument
    add(
        "dataset",
        metavar="DATASET",
        help=f"Hub id, local folder, data file, builder name, or '{DEMO}' for the embedded demo dataset "
        f"(measured with its tokenizer; a local folder named {DEMO}: ./{DEMO})",
    )
    add("--config", metavar="NAME", help="dataset configuration (subset) name")
    add("--split", metavar="NAME", help="split to inspect (default: train, else the first)")
    add("--column", metavar="NAME", help="column to measure (default: input_ids, else the first text column)")
    add("--label-column", metavar="NAME", help="label column (default: label or labels when present)")
    add(
        "--tokenizer",
        metavar="NAME_OR_PATH",
        help="count tokens of a text column with this tokenizer (default: words)",
    )
    add(
        "--batch-size",
        type=positive_int,
        default=32,
        metavar="N",
        help="batch size of the padding estimate (default: 32)",
    )
    add(
        "--max-tokens",
        type=positive_int,
        metavar="N",
        help="token budget of the token-budget estimate (default: an average batch)",
    )
    add(
        "--streaming",
        action="store_true",
        help="stream: measure the first --sample examples and show the shard plan",
    )
    add(
        "--sample",
        type=positive_int,
        default=10_000,
        metavar="N",
        help="examples measured when streaming (default: 10000)",
    )
    add(
        "--world-size",
        type=positive_int,
        default=1,
        metavar="N",
        help="ranks for the shard plan (default: 1)",
    )
    add(
        "--num-workers",
        type=non_negative_int,
        default=0,
        metavar="N",
        help="DataLoader workers per rank for the shard plan (default: 0)",
    )
    add("--seed", type=seed, default=0, help="seed of the samplers (default: 0)")
    add("--json", action="store_true", help="print one JSON object instead of text")
    add("--out", metavar="DIR", default=".", help="folder for lengths.png (default: the current folder)")


def build_parser() -> Parser:
    """The argument parser of ``hf-loop`` (every flag documented in ``--help``).

    Example:
        >>> args = build_parser().parse_args(["finetune", "--lr", "1e-4"])
        >>> args.command, args.lr, args.sampler
        ('finetune', 0.0001, 'length')
    """
    parser = Parser(
        prog="hf-loop",
        description="Hugging Face datasets to PyTorch training: fine-tune a classifier, or inspect a "
        "dataset.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="{finetune,inspect}")
    _finetune_parser(commands)
    _inspect_parser(commands)
    return parser
