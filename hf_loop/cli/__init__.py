"""The ``hf-loop`` command: ``finetune`` (train and evaluate a classifier) and ``inspect`` (a data report).

This module parses arguments and prints; the work is done by the library (``finetune.py`` composes it, and
``hf_loop.report`` builds the data report).

Example:
    $ hf-loop finetune                       # the embedded demo, offline, under 2 minutes on 2 CPU cores
    $ hf-loop finetune --dataset stanfordnlp/imdb --model distilbert-base-uncased --sampler length
    $ torchrun --nproc_per_node=2 -m hf_loop.cli finetune --out-dir runs/a
    $ hf-loop inspect ./my_data --tokenizer ./my_tokenizer --batch-size 32 --out reports
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Sequence
from typing import Any

from hf_loop.errors import DataError

SAMPLERS = ("random", "weighted", "length", "tokens")


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {text}")
    return value


def _fraction(text: str) -> float:
    value = float(text)
    if not 0 < value < 1:
        raise argparse.ArgumentTypeError(f"must be a fraction between 0 and 1 (exclusive), got {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``hf-loop`` (every flag documented in ``--help``)."""
    parser = argparse.ArgumentParser(
        prog="hf-loop",
        description="Hugging Face datasets to PyTorch training: fine-tune a classifier, or inspect a dataset.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="{finetune,inspect}")

    ft = commands.add_parser(
        "finetune",
        help="fine-tune a text classifier (no arguments: the embedded demo, offline)",
        description="Fine-tune a sequence classifier. With no arguments: a demo dataset built in code, a tokenizer "
        "trained in-process and a tiny BERT - offline, under 2 minutes on 2 CPU cores. Runs unchanged under "
        "`torchrun --nproc_per_node=N`.",
    )
    data = ft.add_argument_group("data")
    data.add_argument(
        "--dataset",
        metavar="NAME_OR_PATH",
        help="Hub id, local folder or data file (default: the embedded demo)",
    )
    data.add_argument("--config", metavar="NAME", help="dataset configuration (subset) name")
    data.add_argument(
        "--split", metavar="NAME", help="training split, or a slice such as 'train[:2000]' (default: train)"
    )
    data.add_argument(
        "--text-column",
        metavar="NAME",
        help="column with the text (default: text, sentence, ... or the first string column)",
    )
    data.add_argument(
        "--label-column", metavar="NAME", help="column with the class label (default: label or labels)"
    )
    data.add_argument(
        "--val-fraction",
        type=_fraction,
        default=0.1,
        metavar="F",
        help="share of train held out for validation when the dataset has no validation split, seeded (default: 0.1)",
    )
    data.add_argument(
        "--streaming",
        action="store_true",
        help="stream the dataset instead of preparing it (needs --max-steps)",
    )
    data.add_argument(
        "--max-length",
        type=_positive_int,
        default=256,
        metavar="N",
        help="truncate texts to N tokens (default: 256)",
    )
    data.add_argument(
        "--num-rows",
        type=_positive_int,
        default=4000,
        metavar="N",
        help="rows of the embedded demo dataset (default: 4000)",
    )
    model = ft.add_argument_group("model and training")
    model.add_argument(
        "--model",
        metavar="NAME_OR_PATH",
        help="pretrained model (Hub id or folder); default: a tiny BERT trained from scratch",
    )
    model.add_argument(
        "--epochs",
        type=_positive_int,
        default=2,
        metavar="N",
        help="passes over the training data (default: 2)",
    )
    model.add_argument(
        "--max-steps",
        type=_positive_int,
        metavar="N",
        help="stop after N optimizer steps (overrides --epochs; required with --streaming)",
    )
    model.add_argument(
        "--batch-size",
        type=_positive_int,
        default=32,
        metavar="N",
        help="examples per batch per process (default: 32)",
    )
    model.add_argument(
        "--lr",
        type=float,
        metavar="LR",
        help="peak learning rate, linear decay (default: 3e-3 from scratch, 5e-5 with --model)",
    )
    model.add_argument(
        "--sampler",
        choices=SAMPLERS,
        default="length",
        help="random (shuffled batches); weighted (class-balanced draws with hl.class_weights); length "
        "(length-grouped batches in random order: little padding, the default); tokens (token-budget batches, "
        "see --max-tokens) (default: length)",
    )
    model.add_argument(
        "--max-tokens",
        type=_positive_int,
        metavar="N",
        help="token budget per batch for --sampler tokens (default: the tokens of an average batch)",
    )
    model.add_argument(
        "--precision",
        choices=("fp32", "bf16", "fp16"),
        default="fp32",
        help="autocast precision (default: fp32)",
    )
    model.add_argument(
        "--grad-accum",
        type=_positive_int,
        default=1,
        metavar="N",
        help="micro-batches per optimizer step (default: 1)",
    )
    model.add_argument(
        "--out-dir",
        metavar="DIR",
        help="checkpoints, metrics.jsonl and the final model; resumes when DIR holds a checkpoint "
        "(default: runs/finetune-<UTC time>)",
    )
    model.add_argument(
        "--num-workers", type=int, default=0, metavar="N", help="DataLoader worker processes (default: 0)"
    )
    model.add_argument(
        "--seed", type=int, default=0, help="seed of the split, sampler and initial weights (default: 0)"
    )
    model.add_argument(
        "--log-every",
        type=_positive_int,
        default=20,
        metavar="N",
        help="print a log line every N steps (default: 20)",
    )

    ins = commands.add_parser(
        "inspect",
        help="report lengths, padding per sampler, label balance and the shard plan of a dataset",
        description="Data report: length distribution (text and a histogram PNG), padding waste per strategy "
        "(random, length-grouped, token-budget) computed with hf_loop's samplers, label balance with the class "
        "weights sampler='weighted' would use, and for streams the shard plan over ranks x workers.",
    )
    ins.add_argument("dataset", metavar="DATASET", help="Hub id, local folder, data file, or builder name")
    ins.add_argument("--config", metavar="NAME", help="dataset configuration (subset) name")
    ins.add_argument("--split", metavar="NAME", help="split to inspect (default: train, else the first)")
    ins.add_argument(
        "--column", metavar="NAME", help="column to measure (default: input_ids, else the first text column)"
    )
    ins.add_argument(
        "--label-column", metavar="NAME", help="label column (default: label or labels when present)"
    )
    ins.add_argument(
        "--tokenizer",
        metavar="NAME_OR_PATH",
        help="count tokens of a text column with this tokenizer (default: words)",
    )
    ins.add_argument(
        "--batch-size",
        type=_positive_int,
        default=32,
        metavar="N",
        help="batch size of the padding estimate (default: 32)",
    )
    ins.add_argument(
        "--max-tokens",
        type=_positive_int,
        metavar="N",
        help="token budget of the token-budget estimate (default: an average batch)",
    )
    ins.add_argument(
        "--streaming",
        action="store_true",
        help="stream: measure the first --sample examples and show the shard plan",
    )
    ins.add_argument(
        "--sample",
        type=_positive_int,
        default=10_000,
        metavar="N",
        help="examples measured when streaming (default: 10000)",
    )
    ins.add_argument(
        "--world-size",
        type=_positive_int,
        default=1,
        metavar="N",
        help="ranks for the shard plan (default: 1)",
    )
    ins.add_argument(
        "--num-workers",
        type=int,
        default=0,
        metavar="N",
        help="DataLoader workers per rank for the shard plan (default: 0)",
    )
    ins.add_argument("--seed", type=int, default=0, help="seed of the samplers (default: 0)")
    ins.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    ins.add_argument(
        "--out", metavar="DIR", default=".", help="folder for lengths.png (default: the current folder)"
    )
    return parser


def _inspect(args: argparse.Namespace) -> int:
    from hf_loop.report import inspect

    report = inspect(
        args.dataset,
        name=args.config,
        split=args.split,
        column=args.column,
        label_column=args.label_column,
        tokenizer=args.tokenizer,
        batch_size=args.batch_size,
        max_tokens=args.max_tokens,
        streaming=args.streaming,
        world_size=args.world_size,
        num_workers=args.num_workers,
        out=args.out,
        sample=args.sample,
        seed=args.seed,
    )
    print(json.dumps(report.to_dict(), indent=2) if args.json else report)
    return 0


def _summary(out: dict[str, Any]) -> str:
    result, info, ev = out["result"], out["info"], out["eval"]
    lines = [
        "",
        f"done in {out['seconds']:.1f} s: {result.steps} optimizer steps, {result.epochs} full epoch(s), "
        f"stop: {result.stop_reason}"
        + (f" (resumed from {result.resumed_from})" if result.resumed_from else ""),
        f"  train loss        {result.train_loss:.4f} (mean of logged windows), last {result.last_loss:.4f}"
        if result.train_loss is not None
        else f"  train loss        (no step to run: {out['out_dir']} holds a finished run; raise --max-steps or "
        "--epochs to continue it, or pass a new --out-dir)",
        f"  eval accuracy     {ev.get('accuracy', float('nan')):.4f} on {int(ev.get('examples', 0))} examples"
        f"  (majority-class baseline {out['baseline']:.4f}: always {out['majority']!r})",
        f"  eval macro-F1     {ev.get('macro_f1', float('nan')):.4f}   eval loss {ev.get('loss', float('nan')):.4f}",
    ]
    if result.train_loss is not None:
        lines.append(
            f"  throughput        {result.samples_per_s:.1f} samples/s, {result.tokens_per_s:.0f} tokens/s"
        )
    if result.padding is not None and result.train_loss is not None:
        line = f"  padding           {result.padding:.1%} of batch tokens were padding"
        expected = info.get("expected_padding")
        if expected:
            line += (
                f" (one-epoch estimate: random {expected['random']:.1%}, length {expected['length']:.1%}, "
                f"tokens {expected['tokens']:.1%})"
            )
        lines.append(line)
    run = out["out_dir"]
    lines += [
        f"  checkpoint        {result.checkpoint}",
        f"  final model       {os.path.join(run, 'final')} (save_pretrained)",
        f'  metrics log       {os.path.join(run, "metrics.jsonl")} (plot: python -c "import hf_loop as hl; '
        f"hl.plot_run('{run}')\")",
    ]
    return "\n".join(lines)


def _finetune(args: argparse.Namespace) -> int:
    import torch

    import hf_loop as hl
    from hf_loop.cli.finetune import default_out_dir, run

    env = hl.init_distributed()
    try:
        if env.device.type == "cpu" and "OMP_NUM_THREADS" not in os.environ and env.world_size > 1:
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // env.world_size))  # ranks share the cores
        args.out_dir = args.out_dir or default_out_dir(env)
        if env.is_main:
            os.makedirs(args.out_dir, exist_ok=True)
        say = print if env.is_main else (lambda _line: None)
        started = time.perf_counter()
        out = run(args, env, lambda line: say(line) or sys.stdout.flush())
        say(_summary(out))
        say(f"  wall time         {time.perf_counter() - started:.1f} s (data, model and training)")
    finally:
        hl.shutdown_distributed()
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``hf-loop`` console script. Returns the exit status.

    Example:
        >>> main(["inspect", "./my_data", "--json"])     # doctest: +SKIP
        0
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "finetune" and args.streaming and args.max_steps is None:
        parser.error("finetune --streaming needs --max-steps N: a stream has no length to count epochs by")
    if args.command == "finetune" and args.streaming and args.dataset is None:
        parser.error(
            "finetune --streaming needs --dataset NAME_OR_PATH; the embedded demo dataset is map-style"
        )
    if args.command == "finetune" and args.streaming and args.sampler == "weighted":
        parser.error("finetune --sampler weighted needs map-style data to weight; drop --streaming")
    try:
        return _finetune(args) if args.command == "finetune" else _inspect(args)
    except DataError as error:  # a data problem the user can fix: the message says how, a traceback would not
        print(f"hf-loop {args.command}: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
