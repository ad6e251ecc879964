"""The ``hf-loop`` command: ``finetune`` (train and evaluate a classifier or regressor) and ``inspect`` (a data
report).

``parser.py`` and ``checks.py`` validate the command line with the standard library alone, so ``--help`` and
every mistake answer before torch, datasets or transformers are imported. A mistake (a bad value, a missing path,
empty data, an unusable label column) is one line on stderr that names the flag and the fix, with exit status 2;
only internal errors show a traceback. ``finetune.py`` composes the library; ``output.py`` prints.

Example:
    $ hf-loop finetune                       # the embedded demo, offline, about a minute on 2 CPU cores
    $ hf-loop finetune --dataset stanfordnlp/imdb --model distilbert-base-uncased --sampler length
    $ torchrun --nproc_per_node=2 -m hf_loop.cli finetune --out-dir runs/a
    $ hf-loop inspect demo
    $ hf-loop inspect ./my_data --tokenizer ./my_tokenizer --batch-size 32 --out reports
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence

from hf_loop.cli.checks import UsageError, check_finetune, check_inspect
from hf_loop.cli.output import STOPPED, Console, error_line, progress_bars_on_a_terminal_only
from hf_loop.cli.parser import DEMO, DEMO_ROWS, build_parser
from hf_loop.errors import DataError

__all__ = ["build_parser", "main"]


def _inspect(args: argparse.Namespace) -> int:
    from hf_loop.report import inspect

    dataset, tokenizer = args.dataset, args.tokenizer
    if dataset == DEMO:  # the embedded dataset, measured in the tokens the demo model reads
        from hf_loop import demo

        dataset = demo.make_dataset(DEMO_ROWS, seed=args.seed)
        tokenizer = tokenizer or demo.train_tokenizer()
    report = inspect(
        dataset,
        name=args.config,
        split=args.split,
        column=args.column,
        label_column=args.label_column,
        tokenizer=tokenizer,
        batch_size=args.batch_size,
        max_tokens=args.max_tokens,
        streaming=args.streaming,
        world_size=args.world_size,
        num_workers=args.num_workers,
        out=args.out,
        sample=args.sample,
        seed=args.seed,
    )
    if args.dataset == DEMO:
        report.source = f"embedded demo ({DEMO_ROWS} rows, seed {args.seed})"
    Console(enabled=True)(json.dumps(report.to_dict(), indent=2) if args.json else str(report))
    return 0


def _finetune(args: argparse.Namespace) -> int:
    import hf_loop as hl
    from hf_loop import threads
    from hf_loop.cli import finetune, output

    env = hl.init_distributed()
    log = output.RunLog(Console(enabled=env.is_main))
    try:
        choice = threads.apply(args.threads, env=env, num_workers=args.num_workers)
        args.out_dir = args.out_dir or finetune.default_out_dir(env)
        started = time.perf_counter()
        outcome = finetune.run(args, env, choice, log)
        if outcome.result.stop_reason in STOPPED:  # the first Ctrl-C (or SIGTERM): hl.train checkpointed
            if env.is_main:
                error_line("finetune", output.stop_line(outcome))
            return STOPPED[outcome.result.stop_reason]
        log.say(output.summary(outcome))
        log.say(f"  wall time         {time.perf_counter() - started:.1f} s (data, model and training)")
        return 0
    except KeyboardInterrupt:  # a second Ctrl-C: hl.train stops at once, without a checkpoint
        if log.plan is None:
            raise  # still loading: main() says nothing was written
        if env.is_main:
            where = f"near step {log.step}" if log.step else "before the first log step"
            error_line(
                "finetune",
                f"aborted {where} without writing a checkpoint; run the same command to continue from the last "
                f"checkpoint in {args.out_dir} (one every {log.plan.checkpoint_every} steps)",
            )
        return STOPPED["interrupted"]
    finally:
        hl.shutdown_distributed()


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``hf-loop`` console script. Returns the exit status: 0, 2 for a mistake in a path or
    in the data (one line on stderr), 130 after Ctrl-C, 143 after SIGTERM. A malformed flag value exits from
    argparse with ``SystemExit(2)``, after the same kind of line.

    Example:
        >>> main(["finetune", "--dataset", "./no_such_folder"])   # checked before any data or model loads
        2
        >>> main(["finetune", "--lr", "-1"])
        Traceback (most recent call last):
        SystemExit: 2

    Both print one line on stderr, e.g. ``hf-loop finetune: error: argument --lr: expected a learning rate > 0,
    such as 5e-5, got '-1'``.
    """
    args = build_parser().parse_args(argv)  # a bad value exits here with status 2
    try:
        (check_finetune if args.command == "finetune" else check_inspect)(args)
        with progress_bars_on_a_terminal_only(models=args.command == "finetune"):
            return _finetune(args) if args.command == "finetune" else _inspect(args)
    except (UsageError, DataError) as error:  # the user's to fix: the message says how, a traceback would not
        error_line(args.command, f"error: {error}")
        return 2
    except KeyboardInterrupt:  # while loading data or a model: nothing was written yet
        when = " before training started" if args.command == "finetune" else ""
        error_line(args.command, f"interrupted{when}; nothing was written")
        return STOPPED["interrupted"]


if __name__ == "__main__":
    sys.exit(main())
