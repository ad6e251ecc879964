"""``hf-loop finetune``: sequence classification or regression from a dataset (or the embedded demo) to a
trained model.

The recipe is the library's own path, step by step: ``hl.load`` -> a validation split (``data.py``) -> an
on-the-fly tokenizing transform -> ``hl.MapDataset`` / ``hl.StreamDataset`` -> ``hl.make_loader`` with the
chosen sampler -> ``hl.train`` -> ``hl.evaluate``. Printing stays in ``output.py``.
"""

from __future__ import annotations

import time
from argparse import Namespace
from datetime import datetime, timezone
from typing import Any

import numpy as np
import torch

import hf_loop as hl
from hf_loop import demo
from hf_loop.cli import output
from hf_loop.cli.checks import UsageError
from hf_loop.cli.data import Data, Tokenize, load_data
from hf_loop.cli.output import Outcome, Plan, regression_scores
from hf_loop.dist import DistEnv, broadcast_object
from hf_loop.report import default_max_tokens, padding_waste
from hf_loop.threads import ThreadChoice


def accuracy(predictions: torch.Tensor, labels: torch.Tensor) -> float:
    return (predictions == labels).float().mean().item()


def macro_f1(predictions: torch.Tensor, labels: torch.Tensor) -> float:
    scores = []
    for c in torch.unique(torch.cat([predictions, labels])).tolist():
        tp = ((predictions == c) & (labels == c)).sum().item()
        denominator = (predictions == c).sum().item() + (labels == c).sum().item()
        scores.append(2 * tp / denominator if denominator else 0.0)
    return float(np.mean(scores))


CLASS_METRICS = {"accuracy": accuracy, "macro_f1": macro_f1}


def default_checkpoint_every(steps: int) -> int:
    """A tenth of the run, kept between 10 and 500 steps: Ctrl-C or a crash loses little, and a long run does
    not spend its time writing checkpoints.

    Example:
        >>> default_checkpoint_every(226), default_checkpoint_every(40), default_checkpoint_every(100_000)
        (22, 10, 500)
    """
    return min(500, max(10, steps // 10))


def default_out_dir(env: DistEnv) -> str:
    stamp = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
    return broadcast_object(f"runs/finetune-{stamp}", env)  # every rank writes to rank 0's folder


def build_model(args: Namespace, data: Data) -> tuple[Any, Any]:
    """The tokenizer and the model: pretrained from ``--model``, else a tiny BERT with an in-process tokenizer.
    Float labels get a one-output regression head (MSE loss)."""
    num_labels = 1 if data.labels.regression else len(data.labels.names)
    problem_type = "regression" if data.labels.regression else "single_label_classification"
    if args.model is None:
        if args.dataset is None:
            tokenizer = demo.train_tokenizer(max_length=args.max_length)
        else:
            sample = data.val if data.streaming else data.train.select(range(min(20_000, len(data.train))))
            texts = sample.with_format("arrow", columns=[data.text_column])[:].column(0).to_pylist()
            tokenizer = demo.train_tokenizer([str(t) for t in texts], max_length=args.max_length)
        model = demo.make_model(tokenizer, num_labels, seed=args.seed, problem_type=problem_type)
        return tokenizer, model
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    names = data.labels.names if not data.labels.regression else ("score",)
    try:
        tokenizer = AutoTokenizer.from_pretrained(args.model)
        model = AutoModelForSequenceClassification.from_pretrained(
            args.model,
            num_labels=num_labels,
            problem_type=problem_type,
            id2label=dict(enumerate(names)),
            label2id={n: i for i, n in enumerate(names)},
            ignore_mismatched_sizes=True,  # a new head when the checkpoint has another one
        )
    except (OSError, ValueError) as error:  # not found, not a model, no network: the first line says which
        raise UsageError(f"--model {args.model}: {str(error).splitlines()[0]}") from None
    if tokenizer.pad_token is None:  # decoder-only models: padding is masked by position, so eos is safe
        tokenizer.pad_token = tokenizer.eos_token
    model.config.pad_token_id = tokenizer.pad_token_id
    positions = getattr(model.config, "max_position_embeddings", None)
    if positions is not None and args.max_length > positions:
        raise UsageError(
            f"--max-length {args.max_length} is longer than --model {args.model} can read ({positions} "
            f"positions). Fix: --max-length {positions}"
        )
    return tokenizer, model


def _token_budget(args: Namespace, lengths: np.ndarray) -> int:
    if args.max_tokens is None:
        return default_max_tokens(lengths, args.batch_size)
    if args.max_tokens < lengths.max():
        longest = int(lengths.max())
        raise UsageError(
            f"--max-tokens {args.max_tokens} is smaller than the longest example ({longest} tokens after "
            f"truncation at --max-length {args.max_length}). Fix: --max-tokens {longest} or more, or "
            f"--max-length {args.max_tokens}"
        )
    return args.max_tokens


def build_loaders(args: Namespace, data: Data, tokenizer: Any, env: DistEnv, plan: Plan) -> tuple[Any, Any]:
    """Train and eval loaders for the chosen sampler; fills in what the header reports about them."""
    transform = Tokenize(tokenizer, data.text_column, data.label_column, data.labels, args.max_length)
    columns = ["input_ids", "labels"]
    common = {
        "collate_fn": hl.PadCollator.for_tokenizer(tokenizer),
        "env": env,
        "num_workers": args.num_workers,
        "seed": args.seed,
    }
    if data.streaming:
        bucket = "input_ids" if args.sampler in ("length", "tokens") else None
        stream = hl.StreamDataset(
            data.train,
            transform=transform,
            columns=columns,
            shuffle_buffer=1000,
            seed=args.seed,
            bucket=bucket,
        )
        plan.shard_plan = str(stream.plan(num_workers=args.num_workers, world_size=env.world_size))
        if args.sampler == "tokens":
            # A stream's lengths are unknown up front: size the budget from the held-out sample; truncation at
            # --max-length bounds every example, so the budget never has to grow past it.
            lengths = np.array([len(ids) for ids in transform(data.val[:])["input_ids"]])
            plan.max_tokens = args.max_tokens or max(
                default_max_tokens(lengths, args.batch_size), args.max_length
            )
            train = hl.make_loader(stream, max_tokens=plan.max_tokens, **common)
        else:
            train = hl.make_loader(stream, batch_size=args.batch_size, **common)
    else:
        dataset = hl.MapDataset(data.train, transform=transform, columns=columns)
        options: dict[str, Any] = {}
        measure = args.sampler in ("length", "tokens") or len(dataset) <= 200_000
        lengths = dataset.lengths("input_ids") if measure else None
        if args.sampler == "weighted":
            options["weights"] = hl.class_weights(data.label_ids(data.train))
        if args.sampler in ("length", "tokens"):
            options["lengths"] = lengths
        if args.sampler == "tokens":
            options["max_tokens"] = plan.max_tokens = _token_budget(args, lengths)
        if lengths is not None:
            waste = padding_waste(lengths, args.batch_size, max_tokens=plan.max_tokens)
            plan.expected_padding = {k: v["waste"] for k, v in waste.items()}
        batch_size = None if args.sampler == "tokens" else args.batch_size
        train = hl.make_loader(dataset, batch_size=batch_size, sampler=args.sampler, **options, **common)
    val = hl.MapDataset(data.val, transform=transform, columns=columns)
    evaluation = hl.make_loader(val, batch_size=2 * args.batch_size, sampler="sequential", **common)
    return train, evaluation


def baseline(data: Data) -> dict[str, Any]:
    """What a model that ignores the text scores: the majority class, or the train mean for regression."""
    if data.labels.regression:
        val = data.targets(data.val)
        mean = float(np.mean(data.targets(data.val if data.streaming else data.train)))
        mse = float(np.mean((val - mean) ** 2))
        return {"mean": mean, "variance": float(np.var(val)), **regression_scores(mse, float(np.var(val)))}
    val = data.label_ids(data.val)
    seen = val if data.streaming else data.label_ids(data.train)
    majority = int(np.bincount(seen).argmax())
    return {"majority": data.labels.names[majority], "accuracy": float(np.mean(val == majority))}


def run(
    args: Namespace,
    env: DistEnv,
    cpu: ThreadChoice,
    log: output.RunLog,
) -> Outcome:
    """Train and evaluate; ``log`` prints the header and every log record (rank 0). ``cpu``: the thread count
    applied (the header prints it; ``hl.train`` keeps an automatic one fitted to the idle CPUs)."""
    data = load_data(args)
    if data.labels.regression and args.sampler == "weighted":
        raise UsageError(
            f"--sampler weighted balances classes, but {data.label_column!r} holds floats (regression "
            "targets). Fix: --sampler length or random, or integer class labels"
        )
    tokenizer, model = build_model(args, data)
    if args.fsdp:  # before the optimizer: it must see the sharded parameters
        model = hl.shard(model, env, precision=args.precision,
                         activation_checkpointing=args.activation_checkpointing)  # fmt: skip
    lr = args.lr if args.lr is not None else (3e-3 if args.model is None else 5e-5)
    plan = Plan(steps=0, lr=lr, checkpoint_every=0, cpu=str(cpu), baseline=baseline(data))
    train_loader, eval_loader = build_loaders(args, data, tokenizer, env, plan)
    plan.steps = args.max_steps or args.epochs * -(-len(train_loader) // args.grad_accum)
    plan.checkpoint_every = args.checkpoint_every or default_checkpoint_every(plan.steps)
    config = hl.TrainConfig(
        epochs=args.epochs,
        max_steps=args.max_steps,
        grad_accum=args.grad_accum,
        precision=args.precision,
        max_grad_norm=1.0,
        scheduler="linear",
        warmup_steps=max(1, plan.steps // 20),
        checkpoint_every=plan.checkpoint_every,
        out_dir=args.out_dir,
        seed=args.seed,
        log_every=args.log_every,
        progress=False,  # the CLI prints its own log lines
        threads=cpu,
    )
    log.start(output.header(args, data, model, env, plan), plan)
    metrics = None if data.labels.regression else CLASS_METRICS  # regression: RMSE and R^2 from the eval MSE
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    started = time.perf_counter()
    result = hl.train(model, train_loader, optimizer, config, eval_loader=eval_loader, env=env, metrics=metrics,
                      on_log=log)  # fmt: skip
    seconds = time.perf_counter() - started
    scores = result.eval
    if not scores and result.stop_reason not in output.STOPPED:  # a finished run: report the restored model
        scores = hl.evaluate(model, eval_loader, env=env, metrics=metrics)
    return Outcome(data, plan, result, scores, seconds, args.out_dir)
