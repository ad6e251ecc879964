"""Real 2-process gloo runs: DDP equals one process, elastic resume across world sizes, distributed evaluation.

All 2-process work happens in ONE spawn (a module fixture) to keep process start-up out of the test budget.
"""

from __future__ import annotations

import pytest
import torch
from _train_script import classification_dataset, tiny_bert, token_rows, weights
from distributed import run_distributed

import hf_loop as hl

N_ELASTIC = 24


class IndexRecorder(torch.nn.Module):
    """Takes the data's row id as an input (via model_inputs) so a test can see which examples each step used."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(1, 1)
        self.seen: list[list[int]] = []

    def forward(self, input_ids, labels, row):
        self.seen.append(row.tolist())
        prediction = self.linear(input_ids.float().mean(1, keepdim=True)).squeeze(1)
        return {"loss": ((prediction - labels.float()) ** 2).mean()}


def _elastic_run(out_dir, *, batch_size: int, max_steps: int, env: hl.DistEnv) -> list[list[int]]:
    model = IndexRecorder()
    from datasets import Dataset

    rows = Dataset.from_dict({**token_rows(N_ELASTIC), "row": list(range(N_ELASTIC))})
    loader = hl.make_loader(hl.MapDataset(rows), batch_size=batch_size, sampler="random", seed=5, env=env)
    config = hl.TrainConfig(
        max_steps=max_steps, out_dir=out_dir, progress=False, model_inputs=["input_ids", "labels", "row"]
    )
    hl.train(model, loader, torch.optim.SGD(model.parameters(), lr=0.01), config, env=env)
    return model.seen


def summed_loss(outputs, batch):
    """A loss_fn reporting (sum, count): the loop divides by the global count once all ranks have reported."""
    return torch.nn.functional.cross_entropy(outputs.logits, batch["labels"], reduction="sum"), len(
        outputs.logits
    )


def _train_bert(env: hl.DistEnv, batch_size: int, grad_accum: int, loss_fn=None) -> dict[str, torch.Tensor]:
    model = tiny_bert()
    loader = hl.make_loader(classification_dataset(32), batch_size=batch_size, sampler="sequential", env=env)
    config = hl.TrainConfig(max_steps=3, grad_accum=grad_accum, progress=False)
    hl.train(model, loader, torch.optim.SGD(model.parameters(), lr=0.5), config, env=env, loss_fn=loss_fn)
    return weights(model)


def _eval_and_predict(env: hl.DistEnv) -> tuple[dict, torch.Tensor]:
    model = tiny_bert()
    loader = hl.make_loader(classification_dataset(10), batch_size=4, sampler="random", seed=1, env=env)
    accuracy = {"accuracy": lambda p, y: (p == y).float().mean().item()}
    return hl.evaluate(model, loader, metrics=accuracy, env=env), hl.predict(model, loader, env=env)


def _train_stream(env: hl.DistEnv, out_dir: str | None = None) -> tuple[int, int]:
    """A stream of 3 uneven shards (13 rows) on 2 ranks: the ranks must agree on every step and stop together."""
    from datasets import Dataset

    rows = Dataset.from_dict(token_rows(13)).to_iterable_dataset(num_shards=3)
    loader = hl.make_loader(hl.StreamDataset(rows), batch_size=2, env=env)
    model = tiny_bert()
    config = hl.TrainConfig(max_steps=7, progress=False, out_dir=out_dir, export=False)
    result = hl.train(model, loader, torch.optim.SGD(model.parameters(), lr=0.1), config, env=env)
    return result.steps, result.epochs


def _predict_without_index(env: hl.DistEnv) -> str:
    """A hand-made DataLoader: its split over the ranks (if any) is unknown, so distributed predict refuses it."""
    rows = [{"input_ids": torch.tensor([5, 6, 7]), "labels": torch.tensor(1)} for _ in range(6)]
    try:
        hl.predict(tiny_bert(), torch.utils.data.DataLoader(rows, batch_size=2), env=env)
    except ValueError as error:
        return str(error)
    return "no error"


def _two_ranks(env: hl.DistEnv, dir_21: str, dir_12: str, dir_stream: str) -> dict:
    torch.set_num_threads(1)
    evaluation, predictions = _eval_and_predict(env)
    # Results cross the process boundary as numpy: torch tensors would travel as shared memory that vanishes
    # when the worker exits.
    return {
        # per-rank batch 2 x grad_accum 2 x 2 ranks = the single process's batch of 8 (no_sync on micro-step 1)
        "ddp": {k: v.numpy() for k, v in _train_bert(env, batch_size=2, grad_accum=2).items()},
        "ddp_loss_fn": {k: v.numpy() for k, v in _train_bert(env, 2, 2, loss_fn=summed_loss).items()},
        "seen_21": _elastic_run(dir_21, batch_size=4, max_steps=2, env=env),  # 2 steps of 8, then 1 process
        "seen_12": _elastic_run(dir_12, batch_size=4, max_steps=3, env=env),  # resumes 1 process' step 1
        "eval": (evaluation, predictions.numpy()),
        "stream": _train_stream(env, dir_stream),
        "no_index": _predict_without_index(env),
    }


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    dir_21, dir_12 = tmp_path_factory.mktemp("w2_to_w1"), tmp_path_factory.mktemp("w1_to_w2")
    dir_stream = tmp_path_factory.mktemp("stream")
    single = hl.DistEnv()
    seen_12_first = _elastic_run(dir_12, batch_size=8, max_steps=1, env=single)
    ranks = run_distributed(_two_ranks, world_size=2, args=(str(dir_21), str(dir_12), str(dir_stream)))
    seen_21_rest = _elastic_run(dir_21, batch_size=8, max_steps=3, env=single)
    return {
        "ranks": ranks,
        "seen_12_first": seen_12_first,
        "seen_21_rest": seen_21_rest,
        "dir_stream": dir_stream,
    }


def test_ddp_two_processes_equal_one_process_with_the_same_global_batch(runs):
    one = _train_bert(hl.DistEnv(), batch_size=8, grad_accum=1)
    rank0, rank1 = runs["ranks"][0]["ddp"], runs["ranks"][1]["ddp"]
    assert all((rank0[k] == rank1[k]).all() for k in rank0)
    assert max(abs(rank0[k] - one[k].numpy()).max() for k in one) <= 1e-5
    assert max((one[k] - weights(tiny_bert())[k]).abs().max().item() for k in one) > 1e-3  # it trained
    with_loss_fn = runs["ranks"][0]["ddp_loss_fn"]
    assert max(abs(with_loss_fn[k] - one[k].numpy()).max() for k in one) <= 1e-5


def test_elastic_resume_from_two_processes_on_one(runs):
    order = hl.RandomSampler(N_ELASTIC, seed=5).order(0).tolist()
    first_two_steps = sorted(i for rank in runs["ranks"] for batch in rank["seen_21"] for i in batch)
    assert first_two_steps == sorted(order[:16])
    assert runs["seen_21_rest"] == [order[16:24]]  # one process continues with the rest of the global order


def test_elastic_resume_from_one_process_on_two(runs):
    order = hl.RandomSampler(N_ELASTIC, seed=5).order(0).tolist()
    assert runs["seen_12_first"] == [order[:8]]
    per_step = [sorted(a + b) for a, b in zip(runs["ranks"][0]["seen_12"], runs["ranks"][1]["seen_12"])]
    assert per_step == [sorted(order[8:16]), sorted(order[16:24])]


def test_distributed_evaluate_and_predict_drop_padding_duplicates(runs):
    single_eval, single_pred = _eval_and_predict(hl.DistEnv())
    for rank in runs["ranks"]:
        evaluation, predictions = rank["eval"]
        assert evaluation["examples"] == 10  # 10 rows on 2 ranks in batches of 4: 5 each, no padding
        assert evaluation["loss"] == pytest.approx(single_eval["loss"], rel=1e-5)
        assert evaluation["accuracy"] == single_eval["accuracy"]
        assert predictions.shape == (10, 2)
        torch.testing.assert_close(torch.from_numpy(predictions), single_pred)


def test_a_stream_on_two_ranks_runs_equal_steps_and_stops_together(runs):
    rank0, rank1 = runs["ranks"][0]["stream"], runs["ranks"][1]["stream"]
    assert rank0 == rank1 and rank0[0] == 7 and rank0[1] >= 1  # several passes, no hang, same epoch count


def test_a_stream_checkpoint_is_not_resumed_on_another_world_size(runs):
    with pytest.raises(
        ValueError, match=r"written by 2 processes and this run has 1; a stream's shard positions"
    ):
        _train_stream(hl.DistEnv(), str(runs["dir_stream"]))


def test_distributed_predict_over_a_plain_dataloader_is_an_error(runs):
    for rank in runs["ranks"]:
        assert "distributed predict needs an hl.Loader built with env=" in rank["no_index"]
