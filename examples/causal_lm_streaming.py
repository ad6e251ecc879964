"""Causal LM on a streamed dataset: parquet shards, padding-free packing, a tiny Llama, resume from out_dir.

Offline it writes its own parquet shards (short "stories" from a small grammar), streams them with
``hl.StreamDataset`` (shards dealt to ranks x workers, deterministic windowed shuffle), packs each batch into
one row with ``hl.PackCollator`` (no padding: ``position_ids`` restart per sequence), and trains a tiny
``LlamaForCausalLM``. Checkpoints go to ``--out-dir``; run the script again with a larger ``--max-steps`` and it
resumes exactly where it stopped. Online, name a Hub dataset with a "text" column (streamed, never downloaded
whole):

    python examples/causal_lm_streaming.py --max-steps 100 --out-dir runs/lm
    python examples/causal_lm_streaming.py --max-steps 200 --out-dir runs/lm      # resumes at step 100
    python examples/causal_lm_streaming.py --dataset roneneldan/TinyStories --max-steps 1000 --out-dir runs/ts
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

import hf_loop as hl

SUBJECTS = ["the cat", "a dog", "the bird", "my friend", "the old man", "a small girl"]
VERBS = ["saw", "found", "liked", "chased", "carried", "painted"]
OBJECTS = ["a ball", "the moon", "a red box", "the river", "a tiny boat", "the garden"]
ENDINGS = ["and smiled .", "and went home .", "in the morning .", "under the tree .", "."]


def write_stories(folder: Path, shards: int = 4, per_shard: int = 400, seed: int = 0) -> str:
    """Parquet shards of short stories (1 to 6 sentences): the glob to stream them from."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for shard in range(shards):
        stories = []
        for _ in range(per_shard):
            sentences = [
                f"{rng.choice(SUBJECTS)} {rng.choice(VERBS)} {rng.choice(OBJECTS)} {rng.choice(ENDINGS)}"
                for _ in range(rng.integers(1, 7))
            ]
            stories.append(" ".join(sentences))
        # Small row groups: a reader can take a part of a file when there are more readers than files.
        pq.write_table(pa.table({"text": stories}), folder / f"train-{shard:05d}.parquet", row_group_size=100)
    return str(folder / "train-*.parquet")


def train_tokenizer(texts: list[str]):
    """A word-level tokenizer trained in-process: [BOS] text [EOS], pad id 0."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.train_from_iterator(
        texts, trainers.WordLevelTrainer(vocab_size=5000, special_tokens=["[PAD]", "[UNK]", "[BOS]", "[EOS]"])
    )
    tok.post_processor = processors.TemplateProcessing(
        single="[BOS] $A [EOS]",
        special_tokens=[("[BOS]", tok.token_to_id("[BOS]")), ("[EOS]", tok.token_to_id("[EOS]"))],
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]", bos_token="[BOS]", eos_token="[EOS]"
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--dataset", help="Hub id or local path with a 'text' column (default: stories written here)"
    )
    parser.add_argument("--max-steps", type=int, default=100)
    parser.add_argument("--batch-size", type=int, default=16, help="sequences packed into each batch")
    parser.add_argument("--num-workers", type=int, default=0)
    parser.add_argument("--out-dir", default="runs/causal_lm", help="checkpoints; the run resumes from here")
    args = parser.parse_args(argv)
    out = Path(args.out_dir)

    # 1. A stream: parquet shards written here, or a Hub dataset read lazily.
    if args.dataset is None:
        stream = hl.load("parquet", data_files=write_stories(out / "data"), split="train", streaming=True)
    else:
        stream = hl.load(args.dataset, split="train", streaming=True)
    tokenizer = train_tokenizer([row["text"] for row in stream.take(2000)])

    def tokenize(batch):
        return {"input_ids": tokenizer(batch["text"], truncation=True, max_length=512)["input_ids"]}

    # 2. Exactly-once, resumable streaming; the plan shows which reader reads which shard.
    data = hl.StreamDataset(stream, transform=tokenize, columns=["input_ids"], shuffle_buffer=256, seed=0)
    print(data.plan(num_workers=args.num_workers, world_size=1))
    loader = hl.make_loader(
        data, batch_size=args.batch_size, collate_fn=hl.PackCollator(), num_workers=args.num_workers
    )

    # 3. A tiny Llama; use_cache=False so packed sequences stay apart by their position_ids.
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        use_cache=False,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)

    # 4. Train; with checkpoints in out_dir, a second run with a larger --max-steps resumes exactly.
    train_config = hl.TrainConfig(
        max_steps=args.max_steps,
        scheduler="cosine",
        warmup_steps=min(10, args.max_steps),
        checkpoint_every=max(1, args.max_steps // 2),
        out_dir=out / "run",
        log_every=max(1, args.max_steps // 5),
        progress=False,
    )
    result = hl.train(
        model,
        loader,
        optimizer,
        train_config,
        on_log=lambda r: print(f"step {r['step']}: loss {r['loss']:.3f}, {r['tokens_per_s']:.0f} tokens/s"),
    )
    if result.resumed_from is not None:
        print(f"resumed from {result.resumed_from}")
    print(
        f"{result.steps} steps, last loss {result.last_loss}, padding {result.padding or 0:.1%}; "
        f"checkpoint {result.checkpoint}"
    )

    # 5. Greedy continuation of a prompt.
    model.eval()
    prompt = tokenizer("the cat", add_special_tokens=False, return_tensors="pt")["input_ids"]
    prompt = torch.cat([torch.tensor([[tokenizer.bos_token_id]]), prompt], dim=1)
    with torch.no_grad():
        generated = model.generate(prompt, max_new_tokens=8, do_sample=False, use_cache=False)
    print("sample:", tokenizer.decode(generated[0], skip_special_tokens=True))


if __name__ == "__main__":
    main()
