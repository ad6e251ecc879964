"""Training-loop overhead: hl.train vs a hand-written seed-style loop vs transformers' Trainer (DESIGN.md §4).

Same tiny BERT classifier (fresh copy of the same initial weights for each run), same data (pre-tokenized,
lognormal lengths median 100 / sigma 0.8 clipped to 8..512, truncated to 64 tokens), same batches (one
hl.make_loader + PadCollator feeds all three; Trainer gets the same dataset and collator through its own
DataLoader), AdamW, batch 32, CPU. Each candidate trains ``--steps`` optimizer steps per measurement; runs are
interleaved and the best of ``--repeat`` is kept, so load from other processes falls on all alike.

- hand loop: ``for batch in loader: loss = model(**batch).loss; loss.backward(); opt.step(); opt.zero_grad()``
- hl.train: default TrainConfig (log every 10 steps, progress off)            target: >= 0.95x the hand loop
- Trainer: TrainingArguments(max_steps, no saving, no reporting, logging at the end only)

With CUDA (``--stall``): the input-stall ratio — step time of hl.train reading through the real loader
(num_workers=2, pinned memory, staging) over step time with every batch already on the device; target <= 1.03.

Run: python benchmarks/loop.py [--steps 40] [--repeat 3] [--out benchmarks/results/loop.md]
"""

from __future__ import annotations

import copy
import datetime
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import arguments, emit, lognormal_lengths, machine  # noqa: E402

import hf_loop as hl  # noqa: E402

BATCH, MAX_LEN, VOCAB = 32, 64, 1000


def tiny_model(hidden: int = 32, layers: int = 2, vocab: int = VOCAB, heads: int = 2):
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
        intermediate_size=2 * hidden, max_position_embeddings=512, num_labels=2,
    )  # fmt: skip
    return BertForSequenceClassification(config)


class TinyMLP(torch.nn.Module):
    """Mean-pooled embeddings and a 2-layer MLP: so little compute per step that the loop's own cost shows."""

    def __init__(self, vocab: int = VOCAB, hidden: int = 32) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed = torch.nn.Embedding(vocab, hidden)
        self.mlp = torch.nn.Sequential(
            torch.nn.Linear(hidden, 2 * hidden), torch.nn.ReLU(), torch.nn.Linear(2 * hidden, 2)
        )

    def forward(self, input_ids, attention_mask, labels):
        from transformers.modeling_outputs import SequenceClassifierOutput

        mask = attention_mask.unsqueeze(-1).float()
        logits = self.mlp((self.embed(input_ids) * mask).sum(1) / mask.sum(1))
        return SequenceClassifierOutput(loss=torch.nn.functional.cross_entropy(logits, labels), logits=logits)


def dataset(n: int, vocab: int = VOCAB):
    """Pre-tokenized rows with the standard length distribution and a small vocabulary (a tiny model)."""
    import numpy as np
    from datasets import Dataset

    rng = np.random.default_rng(1)
    ids = [rng.integers(5, vocab, int(k)).tolist() for k in lognormal_lengths(n)]
    return hl.MapDataset(Dataset.from_dict({"input_ids": ids, "label": [i % 2 for i in range(n)]}))


def collator():
    return hl.PadCollator(max_length=MAX_LEN)


class Clock:
    """Wall time and this process's CPU time. With one torch thread and num_workers=0, CPU time is the work the
    loop does; it moves far less than wall time when other processes share the cores."""

    def __enter__(self) -> Clock:
        self.wall, self.cpu = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc) -> None:
        self.wall, self.cpu = time.perf_counter() - self.wall, time.process_time() - self.cpu

    def rates(self, steps: int) -> tuple[float, float]:
        return steps / self.wall, steps / self.cpu


def hand_loop(model, loader, steps: int) -> tuple[float, float]:
    """The seed's loop, written well: no per-step host sync, zero_grad(set_to_none)."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    model.train()
    done = 0
    with Clock() as clock:
        while done < steps:
            for batch in loader:
                inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "labels")}
                loss = model(**inputs).loss
                loss.backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                done += 1
                if done == steps:
                    break
    return clock.rates(steps)


def hl_loop(model, loader, steps: int) -> tuple[float, float]:
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    with Clock() as clock:
        hl.train(model, loader, optimizer, hl.TrainConfig(max_steps=steps, progress=False))
    return clock.rates(steps)


def trainer_loop(model, data, steps: int, tmp: str) -> tuple[float, float]:
    from transformers import Trainer, TrainingArguments

    collate = collator()

    args = TrainingArguments(
        output_dir=tmp, per_device_train_batch_size=BATCH, max_steps=steps, learning_rate=1e-4,
        save_strategy="no", report_to=[], logging_steps=steps, disable_tqdm=True, use_cpu=True,
        dataloader_num_workers=0, remove_unused_columns=False,
    )  # fmt: skip
    trainer = Trainer(model=model, args=args, train_dataset=data, data_collator=collate)
    with Clock() as clock:
        trainer.train()
    return clock.rates(steps)


def overhead(steps: int, repeat: int, model: str) -> tuple[dict[str, tuple[float, float]], str]:
    import tempfile

    data = dataset(BATCH * steps)
    loader = hl.make_loader(data, batch_size=BATCH, sampler="random", collate_fn=collator(), seed=0)
    initial = tiny_model() if model == "bert" else TinyMLP()
    runs = {
        "hand loop": lambda tmp: hand_loop(copy.deepcopy(initial), loader, steps),
        "hl.train": lambda tmp: hl_loop(copy.deepcopy(initial), loader, steps),
    }
    if model == "bert":
        runs["Trainer"] = lambda tmp: trainer_loop(copy.deepcopy(initial), data, steps, tmp)
    best = dict.fromkeys(runs, (0.0, 0.0))
    with tempfile.TemporaryDirectory() as tmp:
        for run in runs.values():  # warm-up: imports, allocator, kernels
            run(tmp)
        for _ in range(repeat):
            for name, run in runs.items():
                wall, cpu = run(tmp)
                best[name] = (max(best[name][0], wall), max(best[name][1], cpu))
    wall0, cpu0 = best["hand loop"]
    lines = [
        "| loop | steps/s (CPU time) | vs hand loop | steps/s (wall) | vs hand loop |",
        "|---|---:|---:|---:|---:|",
    ]
    lines += [
        f"| {name} | {cpu:.2f} | {cpu / cpu0:.3f}x | {wall:.2f} | {wall / wall0:.3f}x |"
        for name, (wall, cpu) in best.items()
    ]
    return best, "\n".join(lines)


def input_stall(steps: int) -> str:
    """CUDA only: hl.train through the real loader vs the same steps on batches already on the device."""
    device = torch.device("cuda", 0)
    env = hl.DistEnv(device=device)
    data = dataset(BATCH * steps, vocab=30_000)
    loader = hl.make_loader(data, batch_size=BATCH, sampler="random", collate_fn=hl.PadCollator(max_length=128),
                            seed=0, env=env,
                            num_workers=2, pin_memory=True, persistent_workers=True)  # fmt: skip
    model = tiny_model(hidden=768, layers=12, vocab=30_000, heads=12).to(device)  # BERT-base size
    resident = [{k: v.to(device) for k, v in b.items()} for b in loader]

    def on_device() -> float:
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
        torch.cuda.synchronize()
        start = time.perf_counter()
        for batch in resident[:steps]:
            loss = model(**{k: batch[k] for k in ("input_ids", "attention_mask", "labels")}).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        return (time.perf_counter() - start) / steps

    def through_loader() -> float:
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
        torch.cuda.synchronize()
        start = time.perf_counter()
        hl.train(model, loader, optimizer, hl.TrainConfig(max_steps=steps, progress=False), env=env)
        torch.cuda.synchronize()
        return (time.perf_counter() - start) / steps

    on_device()  # warm-up: kernels, allocator
    base = min(on_device() for _ in range(3))
    real = min(through_loader() for _ in range(3))
    return (
        "| path | ms/step | ratio |\n|---|---:|---:|\n"
        f"| batches already on {torch.cuda.get_device_name(device)} | {base * 1e3:.1f} | 1.000 |\n"
        f"| hl.train through make_loader (2 workers, pinned, staged) | {real * 1e3:.1f} | {real / base:.3f} |"
    )


def main() -> None:
    parser = arguments(__doc__, repeat=3, steps=200)
    parser.add_argument(
        "--threads", type=int, default=1, help="torch CPU threads (1: steadier on shared CPUs)"
    )
    parser.add_argument("--stall", action="store_true", help="also measure the CUDA input stall")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    tables = {name: overhead(args.steps, args.repeat, name)[1] for name in ("mlp", "bert")}
    report = [
        "# Training-loop overhead (benchmarks/loop.py)", "",
        f"{datetime.date.today()}, `python benchmarks/loop.py --steps {args.steps} --repeat {args.repeat} "
        f"--threads {args.threads}`; tiny BERT (hidden 32, 2 layers, vocab {VOCAB}), batch {BATCH}, lengths "
        f"lognormal (median 100) truncated to {MAX_LEN}, AdamW, CPU, best of {args.repeat} interleaved runs "
        "after one warm-up run each. CPU time is this process's (one torch thread, no workers), the steadier "
        "measure on shared cores.", "",
        "### Tiny MLP (mean-pooled embeddings, 2 linear layers): the loop's fixed cost per step shows", "",
        tables["mlp"], "",
        "### Tiny BERT", "",
        tables["bert"], "",
    ]  # fmt: skip
    if args.stall:
        if torch.cuda.is_available():
            report += ["## GPU input stall", "", input_stall(args.steps), ""]
        else:
            report += ["GPU input stall: not measured (no CUDA device here).", ""]
    report += [f"Machine: {machine()}"]
    emit(report, args.out)


if __name__ == "__main__":
    main()
