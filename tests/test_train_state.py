"""The run's position is one TrainState plus the loader's own state: ranks agree on epochs, elastic resume trains
every row exactly `epochs` times, signals stop at a step boundary with a checkpoint, streams evaluate per epoch.

All 2-process work happens in ONE spawn (a module fixture), as in test_ddp.py.
"""

from __future__ import annotations

import collections
import os
import signal
from pathlib import Path

import pytest
import torch
from _train_script import tiny_bert, token_rows, weights
from datasets import Dataset
from distributed import run_distributed

import hf_loop as hl

ROWS = 64


class RowRecorder(torch.nn.Module):
    """Rows carry their id in the first token; the model records which rows each optimizer step trained on."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.linear = torch.nn.Linear(1, 1)
        self.seen: list[int] = []

    def forward(self, input_ids, labels):
        self.seen.extend(input_ids[:, 0].tolist())
        prediction = self.linear(input_ids[:, 1:].float().mean(1, keepdim=True)).squeeze(1)
        return {"loss": ((prediction - labels.float()) ** 2).mean()}


def row_data() -> hl.MapDataset:
    ids = [[row, 5 + row % 7, 6] for row in range(ROWS)]
    return hl.MapDataset(Dataset.from_dict({"input_ids": ids, "label": [row % 2 for row in range(ROWS)]}))


def stop_at(step: int, signum: int = signal.SIGTERM):
    def on_log(record: dict) -> None:
        if record.get("step") == step and "loss" in record:
            os.kill(os.getpid(), signum)

    return on_log


def elastic_run(out_dir: str, env: hl.DistEnv, stop: int | None = None) -> tuple[list[int], hl.TrainResult]:
    model = RowRecorder()
    loader = hl.make_loader(row_data(), batch_size=4, sampler="random", seed=3, env=env)
    config = hl.TrainConfig(epochs=2, out_dir=out_dir, log_every=1, progress=False, export=False)
    result = hl.train(model, loader, torch.optim.SGD(model.parameters(), lr=0.01), config, env=env,
                      on_log=stop_at(stop) if stop else None)  # fmt: skip
    return model.seen, result


def shard_rows(shards: list[list[int]]):
    rows = token_rows(26)
    for shard in shards:  # datasets hands each shard its part of the list
        for i in shard:
            yield {key: values[i] for key, values in rows.items()}


def stream_run(env: hl.DistEnv, out_dir: str, max_steps: int, every: int | None = None) -> dict:
    """3 shards of unknown size (a generator: whole shards are dealt) on 2 ranks, dropout on: one rank runs dry
    first in every epoch while the other still has batches."""
    from datasets import IterableDataset

    shards = [list(range(0, 12)), list(range(12, 16)), list(range(16, 26))]
    rows = IterableDataset.from_generator(shard_rows, gen_kwargs={"shards": shards})
    loader = hl.make_loader(hl.StreamDataset(rows, shuffle_buffer=4, seed=1), batch_size=2, env=env)
    model = tiny_bert(dropout=0.1)
    config = hl.TrainConfig(max_steps=max_steps, out_dir=out_dir, checkpoint_every=every, keep_last=100,
                            progress=False, export=False)  # fmt: skip
    result = hl.train(model, loader, torch.optim.AdamW(model.parameters(), lr=1e-3), config, env=env)
    return {"weights": {k: v.numpy() for k, v in weights(model).items()}, "epochs": result.epochs,
            "unread": result.unread_examples}  # fmt: skip


def _two_ranks(env: hl.DistEnv, dirs: dict[str, str]) -> dict:
    torch.set_num_threads(1)
    out: dict = {"whole": stream_run(env, dirs["whole"], max_steps=14, every=1)}
    # The epoch's last step: where the TrainState's epoch moved while one rank's stream still had batches.
    end = next(
        step for step in range(1, 15)
        if torch.load(Path(dirs["whole"]) / "checkpoints" / f"step-{step:08d}" / "train.pt",
                      weights_only=True)["train_state"]["epoch"] == 1
    )  # fmt: skip
    out["end"] = end
    stream_run(env, dirs["cut"], max_steps=end)  # stopped right after the checkpoint of the epoch's last step
    out["resumed"] = stream_run(env, dirs["cut"], max_steps=14)
    out["seen_12"] = elastic_run(dirs["e12"], env)[0]  # resumes the single process's step 10
    seen, result = elastic_run(dirs["e21"], env, stop=5)
    out["seen_21"], out["stop_21"] = seen, (result.stop_reason, result.steps)
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    dirs = {name: str(tmp_path_factory.mktemp(name)) for name in ("whole", "cut", "e12", "e21")}
    single = hl.DistEnv()
    seen_12_first, stopped = elastic_run(dirs["e12"], single, stop=10)
    assert stopped.stop_reason == "sigterm" and stopped.steps == 10
    ranks = run_distributed(_two_ranks, world_size=2, args=(dirs,), timeout=240)
    with pytest.warns(UserWarning, match=r"resuming with a global batch of 4 examples \(saved with 8\)"):
        seen_21_rest, finished = elastic_run(dirs["e21"], single)
    return {"ranks": ranks, "dirs": dirs, "seen_12_first": seen_12_first, "seen_21_rest": seen_21_rest,
            "finished_21": finished}  # fmt: skip


def test_a_stream_checkpoint_on_an_epochs_last_step_resumes_bit_identical(runs):
    rank0, rank1 = runs["ranks"]
    end = rank0["end"]
    folder = Path(runs["dirs"]["whole"]) / "checkpoints" / f"step-{end:08d}"
    epochs = [torch.load(folder / f"rank-0000{r}.pt", weights_only=True)["loader"]["epoch"] for r in (0, 1)]
    assert sorted(epochs) == [0, 1]  # the scenario: one rank's stream was done, the other still had batches
    for rank in (rank0, rank1):
        whole, resumed = rank["whole"]["weights"], rank["resumed"]["weights"]
        assert all((whole[k] == resumed[k]).all() for k in whole)
        assert rank["whole"]["epochs"] == rank["resumed"]["epochs"] >= 2
    assert rank0["whole"]["unread"] == rank1["whole"]["unread"] > 0  # even_steps' leftovers are reported


def test_elastic_resume_one_to_two_trains_every_row_exactly_twice(runs):
    first = runs["seen_12_first"]
    after = runs["ranks"][0]["seen_12"] + runs["ranks"][1]["seen_12"]
    assert len(first) == 40  # 10 steps of 4 rows on one process, then 2 ranks x 4 rows per step
    assert collections.Counter(first + after) == {row: 2 for row in range(ROWS)}


def test_elastic_resume_two_to_one_trains_every_row_exactly_twice(runs):
    assert runs["ranks"][0]["stop_21"] == ("sigterm", 5) == runs["ranks"][1]["stop_21"]
    before = runs["ranks"][0]["seen_21"] + runs["ranks"][1]["seen_21"]
    assert len(before) == 40
    assert collections.Counter(before + runs["seen_21_rest"]) == {row: 2 for row in range(ROWS)}
    assert runs["finished_21"].steps == 5 + 6 + 16 and runs["finished_21"].epochs == 2


def _dropout_run(out_dir: Path, on_log=None) -> hl.TrainResult:
    model = tiny_bert(dropout=0.1)
    loader = hl.make_loader(hl.MapDataset(Dataset.from_dict(token_rows(24))), batch_size=4, sampler="random",
                            seed=2)  # fmt: skip
    config = hl.TrainConfig(
        epochs=2, grad_accum=2, out_dir=out_dir, progress=False, log_every=1, export=False
    )
    result = hl.train(model, loader, torch.optim.AdamW(model.parameters(), lr=1e-3), config, on_log=on_log)
    result.weights = weights(model)
    return result


def test_ctrl_c_checkpoints_at_the_step_and_resumes_exactly(tmp_path):
    uninterrupted = _dropout_run(tmp_path / "a")
    handler = signal.getsignal(signal.SIGINT)
    stopped = _dropout_run(tmp_path / "b", on_log=stop_at(4, signal.SIGINT))
    assert stopped.stop_reason == "interrupted" and stopped.steps == 4
    assert stopped.checkpoint.name == "step-00000004"
    assert signal.getsignal(signal.SIGINT) == handler  # train restored the previous handler
    resumed = _dropout_run(tmp_path / "b")
    assert (
        resumed.resumed_from == stopped.checkpoint
        and resumed.steps == 6
        and resumed.stop_reason == "completed"
    )
    assert all(torch.equal(resumed.weights[k], uninterrupted.weights[k]) for k in uninterrupted.weights)


def test_a_second_ctrl_c_aborts_at_once(tmp_path):
    def twice(record: dict) -> None:
        if record.get("step") == 2:
            os.kill(os.getpid(), signal.SIGINT)
            os.kill(os.getpid(), signal.SIGINT)

    with pytest.raises(KeyboardInterrupt):
        _dropout_run(tmp_path, on_log=twice)
    assert not (tmp_path / "checkpoints").exists() or not any((tmp_path / "checkpoints").glob("step-*"))


def test_a_stream_with_an_eval_loader_is_evaluated_at_each_epochs_end():
    rows = Dataset.from_dict(token_rows(16))
    stream = hl.make_loader(hl.StreamDataset(rows.to_iterable_dataset(num_shards=2)), batch_size=4)
    evaluations = []
    model = tiny_bert()
    result = hl.train(model, stream, torch.optim.SGD(model.parameters(), lr=0.1),
                      hl.TrainConfig(max_steps=10, progress=False, log_every=100),
                      eval_loader=hl.make_loader(hl.MapDataset(rows), batch_size=8, sampler="sequential"),
                      on_log=lambda r: evaluations.append(r["step"]) if "eval_loss" in r else None)  # fmt: skip
    assert result.epochs == 2 and evaluations == [4, 8, 10]  # 4 batches per pass: two epoch ends, and the end
