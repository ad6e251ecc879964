"""hf_loop next to the tools users already run, on 2 real gloo processes: accelerate with an hl.Loader (passed
through untouched, exact, resumable), transformers' Trainer with PadCollator and an hf_loop sampler (each row
once per epoch, resume exact), and the refusals where a rank-aware loader or sampler would be sharded twice.

One spawn (a module fixture) runs every case: process start-up dominates the cost.
"""

from __future__ import annotations

import pytest
import torch
from _train_script import token_rows
from distributed import run_distributed

import hf_loop as hl

ROWS = 32


def _rows() -> hl.MapDataset:
    from datasets import Dataset

    rows = Dataset.from_dict({**token_rows(ROWS), "row": list(range(ROWS))})
    return hl.MapDataset(rows, columns=["input_ids", "label", "row"])  # the model's inputs (no string ids)


class RowModel(torch.nn.Module):
    """A tiny regressor that records which rows each forward saw (the Trainer passes it the batch keys)."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(1, 1)
        self.seen: list[list[int]] = []

    def forward(self, input_ids, attention_mask, labels, row):
        self.seen.append(row.tolist())
        mean = (input_ids * attention_mask).sum(1, keepdim=True) / attention_mask.sum(1, keepdim=True)
        prediction = self.linear(mean.float()).squeeze(1)
        return {"loss": ((prediction - labels.float()) ** 2).mean()}


def _accelerate(env: hl.DistEnv) -> dict:
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    accelerator = Accelerator(cpu=True)
    model = RowModel()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    loader = hl.make_loader(_rows(), batch_size=4, sampler="random", seed=3, env=env)
    model, optimizer, prepared = accelerator.prepare(model, optimizer, loader)
    out: dict = {"same_object": prepared is loader, "epochs": []}
    for _ in range(2):
        rows = []
        for batch in prepared:
            optimizer.zero_grad()
            accelerator.backward(model(**batch)["loss"])
            optimizer.step()
            rows += batch["row"].tolist()
        out["epochs"].append(rows)
    # resume: 2 batches of epoch 2 consumed, then a fresh loader continues from the saved state
    taken = [batch["row"].tolist() for _, batch in zip(range(3), prepared)]
    state = prepared.state_dict(consumed=2)
    fresh = accelerator.prepare(hl.make_loader(_rows(), batch_size=4, sampler="random", seed=3, env=env))
    fresh.load_state_dict(state)
    reference = hl.make_loader(_rows(), batch_size=4, sampler="random", seed=3, env=env)
    reference.set_epoch(2)
    out["resume"] = (taken[:2], [b["row"].tolist() for b in fresh], [b["row"].tolist() for b in reference])
    # refusals: a loader built for one process, and an hl.DistributedSampler in a plain DataLoader
    try:
        accelerator.prepare(hl.make_loader(_rows(), batch_size=4))
        out["single"] = "no error"
    except ValueError as error:
        out["single"] = str(error)
    sampler = hl.DistributedSampler(hl.RandomSampler(ROWS), num_replicas=env.world_size, rank=env.rank)
    plain = accelerator.prepare(torch.utils.data.DataLoader(_rows(), batch_size=4, sampler=sampler))
    try:
        next(iter(plain))
        out["twice"] = "no error"
    except RuntimeError as error:
        out["twice"] = str(error)
    AcceleratorState._reset_state(True)  # the Trainer builds its own Accelerator next
    return out


def _trainer(
    env: hl.DistEnv, out_dir: str, sampler_fn, resume: str | None = None, **arguments
) -> list[list[int]]:
    from transformers import Trainer, TrainingArguments

    class HlTrainer(Trainer):
        def _get_train_sampler(self, train_dataset=None):
            return sampler_fn(env)

    model = RowModel()
    args = TrainingArguments(
        output_dir=out_dir,
        per_device_train_batch_size=4,
        use_cpu=True,
        remove_unused_columns=False,  # PadCollator reads hl.Columns whole (row dicts are 3.7x slower)
        report_to=[],
        disable_tqdm=True,
        logging_steps=100,
        save_strategy="steps",
        save_steps=3,
        dataloader_num_workers=0,
        **arguments,
    )
    trainer = HlTrainer(model=model, args=args, train_dataset=_rows(), data_collator=hl.PadCollator())
    trainer.train(resume_from_checkpoint=resume)
    return model.seen


def _global_sampler(env: hl.DistEnv) -> hl.RandomSampler:
    return hl.RandomSampler(ROWS, seed=3)  # the Trainer's accelerator splits its batches over the ranks


def _rank_aware_sampler(env: hl.DistEnv) -> hl.DistributedSampler:
    return hl.DistributedSampler(hl.RandomSampler(ROWS, seed=3), num_replicas=env.world_size, rank=env.rank)


def _two_ranks(env: hl.DistEnv, full_dir: str, cut_dir: str) -> dict:
    torch.set_num_threads(1)
    out = {"accelerate": _accelerate(env)}
    out["trainer_full"] = _trainer(env, full_dir, _global_sampler, num_train_epochs=2)
    out["trainer_cut"] = _trainer(env, cut_dir, _global_sampler, max_steps=3)
    resumed = _trainer(env, cut_dir, _global_sampler, num_train_epochs=2, resume=f"{cut_dir}/checkpoint-3")
    out["trainer_resumed"] = resumed
    try:
        _trainer(env, full_dir + "-twice", _rank_aware_sampler, max_steps=1)
        out["trainer_twice"] = "no error"
    except RuntimeError as error:
        out["trainer_twice"] = str(error)
    return out


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    full, cut = tmp_path_factory.mktemp("full"), tmp_path_factory.mktemp("cut")
    return run_distributed(_two_ranks, world_size=2, args=(str(full), str(cut)), timeout=300)


def test_accelerate_passes_an_hl_loader_through_exact(ranks):
    for rank in ranks:
        assert rank["accelerate"]["same_object"]
    for epoch in range(2):
        rows = ranks[0]["accelerate"]["epochs"][epoch] + ranks[1]["accelerate"]["epochs"][epoch]
        assert sorted(rows) == list(range(ROWS))  # every row once per epoch: 16 per rank, not 8
    assert ranks[0]["accelerate"]["epochs"][0] != ranks[0]["accelerate"]["epochs"][1]


def test_accelerate_resume_continues_exactly(ranks):
    for rank in ranks:
        taken, rest, reference = rank["accelerate"]["resume"]
        assert taken + rest == reference and len(rest) == len(reference) - 2


def test_accelerate_refuses_a_single_process_loader_and_double_sharding(ranks):
    for rank in ranks:
        assert "built for world_size=1 but runs in a process group of 2" in rank["accelerate"]["single"]
        assert "env=hl.init_distributed()" in rank["accelerate"]["single"]
        assert "is iterated by BatchSamplerShard, which shards it again" in rank["accelerate"]["twice"]


def _epochs(seen: list[list[int]], steps_per_epoch: int) -> list[list[int]]:
    rows = [r for batch in seen for r in batch]
    size = steps_per_epoch * 4
    return [rows[k : k + size] for k in range(0, len(rows), size)]


def test_trainer_with_padcollator_and_a_global_hf_loop_sampler_reads_each_row_once(ranks):
    per_rank = [_epochs(rank["trainer_full"], steps_per_epoch=4) for rank in ranks]
    assert [len(epochs) for epochs in per_rank] == [2, 2]
    for epoch in range(2):
        assert sorted(per_rank[0][epoch] + per_rank[1][epoch]) == list(range(ROWS))
    assert per_rank[0][0] != per_rank[0][1]  # the Trainer's set_epoch reaches the sampler


def test_trainer_resume_is_exact(ranks):
    for rank in ranks:
        assert rank["trainer_cut"] == rank["trainer_full"][:3]
        assert rank["trainer_resumed"] == rank["trainer_full"][3:]


def test_trainer_refuses_a_rank_aware_sampler_it_would_shard_again(ranks):
    for rank in ranks:
        assert "shards it again over 2 processes" in rank["trainer_twice"]
        assert "Give that loader the GLOBAL sampler" in rank["trainer_twice"]
