"""FSDP2 in hl.train on 2 real gloo processes (CPU): equal to DDP, elastic sharded checkpoints, export, guards.

All 2-process work happens in ONE spawn (a module fixture); kill -9 runs go through torchrun in
test_fsdp_resume.py.
"""

from __future__ import annotations

import pytest
import torch
from _train_script import lm_dataset, tiny_llama
from distributed import run_distributed

import hf_loop as hl
from hf_loop.checkpoint import step_folder
from hf_loop.fsdp import gathered

ROWS = 32


def numpy(weights: dict[str, torch.Tensor]) -> dict:
    return {k: v.numpy() for k, v in weights.items()}  # tensors would cross processes as shared memory


def lm_run(env: hl.DistEnv, *, shard: bool, batch_size: int, max_steps: int, grad_accum: int = 1,
           recompute: bool = False, **options) -> tuple[dict, list[float]]:  # fmt: skip
    """Causal LM steps on a sequential order: the global batch is world size x batch_size x grad_accum."""
    model = tiny_llama()
    if shard:
        model = hl.shard(model, env, precision="fp32", activation_checkpointing=recompute)
    loader = hl.make_loader(lm_dataset(ROWS), batch_size=batch_size, sampler="sequential", env=env)
    norms: list[float] = []
    config = hl.TrainConfig(max_steps=max_steps, grad_accum=grad_accum, max_grad_norm=0.5, log_every=1,
                            progress=False, **{"export": False, **options})  # fmt: skip
    hl.train(model, loader, torch.optim.AdamW(model.parameters(), lr=1e-3), config, env=env,
             on_log=lambda record: norms.append(record["grad_norm"]))  # fmt: skip
    return numpy(gathered(model)), norms


def autocast_seen(env: hl.DistEnv, precision: str) -> tuple[list[bool], list[torch.dtype]]:
    """Whether autocast was on inside the first decoder layer's MLP, and the dtype of its output."""
    model = hl.shard(tiny_llama(), env, precision=precision)
    seen: list[bool] = []
    dtypes: list[torch.dtype] = []
    layer = model.model.layers[0].mlp
    layer.register_forward_pre_hook(lambda m, a: seen.append(torch.is_autocast_enabled("cpu")))
    layer.register_forward_hook(
        lambda m, a, out: dtypes.append((out[0] if isinstance(out, tuple) else out).dtype)
    )
    loader = hl.make_loader(lm_dataset(8), batch_size=2, sampler="sequential", env=env)
    hl.train(model, loader, torch.optim.SGD(model.parameters(), lr=0.1),
             hl.TrainConfig(max_steps=1, precision="bf16", progress=False), env=env)  # fmt: skip
    return seen, dtypes


def uneven_evaluation(env: hl.DistEnv) -> tuple[dict, torch.Tensor]:
    """5 rows on 2 ranks in batches of 2: rank 0 has 2 batches, rank 1 one (each row evaluated once)."""
    model = hl.shard(tiny_llama(), env, precision="fp32")
    loader = hl.make_loader(lm_dataset(5), batch_size=2, sampler="sequential", env=env)
    return hl.evaluate(model, loader, env=env), hl.predict(model, loader, env=env, reduce="argmax")


def optimizer_before_shard(env: hl.DistEnv) -> str:
    model = tiny_llama()
    optimizer = torch.optim.AdamW(model.parameters())  # built too early: shard replaces the parameters
    model = hl.shard(model, env, precision="fp32")
    loader = hl.make_loader(lm_dataset(8), batch_size=2, env=env)
    try:
        hl.train(model, loader, optimizer, hl.TrainConfig(max_steps=1, progress=False), env=env)
    except ValueError as error:
        return str(error)
    return "no error"


def _two_ranks(env: hl.DistEnv, dirs: dict[str, str]) -> dict:
    torch.set_num_threads(1)
    out = {}
    for accum in (1, 2):
        out[f"ddp{accum}"] = lm_run(env, shard=False, batch_size=2 // accum, grad_accum=accum, max_steps=3)
        out[f"fsdp{accum}"] = lm_run(env, shard=True, batch_size=2 // accum, grad_accum=accum, max_steps=3)
    out["recompute"] = lm_run(env, shard=True, batch_size=2, max_steps=3, recompute=True)
    out["async"] = lm_run(env, shard=True, batch_size=2, max_steps=3, out_dir=dirs["async"], checkpoint_every=1,
                          async_checkpoint=True)  # fmt: skip
    lm_run(env, shard=True, batch_size=2, max_steps=2, out_dir=dirs["w21"])  # then one process goes on
    out["w12"] = lm_run(env, shard=True, batch_size=2, max_steps=4, out_dir=dirs["w12"])  # resumes 1 process
    out["export"] = lm_run(env, shard=True, batch_size=2, max_steps=2, out_dir=dirs["export"], export=True)[0]
    out["autocast"] = {p: autocast_seen(env, p) for p in ("bf16", "fp32")}
    out["early_optimizer"] = optimizer_before_shard(env)
    evaluation, predictions = uneven_evaluation(env)
    out["evaluation"] = (evaluation, [p.numpy() for p in predictions])
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    dirs = {name: str(tmp_path_factory.mktemp(name)) for name in ("w21", "w12", "export", "async")}
    single = hl.DistEnv()
    reference = lm_run(single, shard=False, batch_size=4, max_steps=3)
    lm_run(single, shard=True, batch_size=4, max_steps=2, out_dir=dirs["w12"])  # hl.shard: a no-op here
    ranks = run_distributed(_two_ranks, world_size=2, args=(dirs,), timeout=300)
    return {
        "ranks": ranks,
        "dirs": dirs,
        "reference": reference,
        "reference4": lm_run(single, shard=False, batch_size=4, max_steps=4),
        "w21": lm_run(single, shard=True, batch_size=4, max_steps=4, out_dir=dirs["w21"]),
    }


def max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float(abs(a[k] - b[k]).max()) for k in a)


@pytest.mark.parametrize("accum", [1, 2])
def test_fsdp_training_equals_ddp_with_clipping_and_accumulation(runs, accum):
    ddp_weights, ddp_norms = runs["ranks"][0][f"ddp{accum}"]
    fsdp_weights, fsdp_norms = runs["ranks"][0][f"fsdp{accum}"]
    assert max_diff(fsdp_weights, ddp_weights) <= 1e-5
    assert fsdp_norms == pytest.approx(ddp_norms, rel=1e-5) and len(fsdp_norms) == 3
    assert fsdp_norms[0] > 0.5  # clipping was active, and the norm is the global one (not one shard's)
    one_process = runs["reference"]
    assert max_diff(fsdp_weights, one_process[0]) <= 1e-5  # and equal to one process with the global batch
    assert runs["ranks"][1][f"fsdp{accum}"][0] == {}  # the full weights are gathered on rank 0 only


def test_activation_checkpointing_trains_the_same(runs):
    recomputed, norms = runs["ranks"][0]["recompute"]
    plain, plain_norms = runs["ranks"][0]["fsdp1"]
    assert max_diff(recomputed, plain) <= 1e-6 and norms == pytest.approx(plain_norms, rel=1e-6)


def test_async_checkpoints_are_complete_and_hold_the_weights_of_their_step(runs):
    from transformers import LlamaForCausalLM

    from hf_loop.checkpoint import verify
    from hf_loop.fsdp import load_sharded

    weights, norms = runs["ranks"][0]["async"]
    assert max_diff(weights, runs["ranks"][0]["fsdp1"][0]) == 0.0  # writing in the background changed nothing
    folders = [step_folder(runs["dirs"]["async"], step) for step in (2, 3)]  # keep_last=2
    assert all(verify(folder).step == step for folder, step in zip(folders, (2, 3)))
    plain = LlamaForCausalLM(tiny_llama().config)
    state = {"model": plain.state_dict()}
    load_sharded(state, folders[-1] / "dcp")
    assert max_diff(numpy(state["model"]), weights) == 0.0  # the last one, completed at exit, holds step 3


def test_a_sharded_checkpoint_resumes_on_one_process(runs):
    folder = step_folder(runs["dirs"]["w21"], 2)
    assert {p.name for p in (folder / "dcp").iterdir()} == {".metadata", "__0_0.distcp", "__1_0.distcp"}
    assert max_diff(runs["w21"][0], runs["reference4"][0]) <= 1e-5


def test_a_one_process_checkpoint_resumes_sharded_on_two(runs):
    assert max_diff(runs["ranks"][0]["w12"][0], runs["reference4"][0]) <= 1e-5
    assert runs["ranks"][0]["w12"][1] == pytest.approx(runs["reference4"][1][2:], rel=1e-5)  # steps 3 and 4


def test_the_export_reloads_into_a_plain_model(runs):
    from transformers import LlamaForCausalLM

    exported = LlamaForCausalLM.from_pretrained(runs["dirs"]["export"] + "/final")
    weights = {k: v.numpy() for k, v in exported.state_dict().items()}
    assert max_diff(weights, runs["ranks"][0]["export"]) == 0.0


def test_a_precision_policy_replaces_autocast(runs):
    seen, dtypes = runs["ranks"][0]["autocast"]["bf16"]
    assert seen == [False] and dtypes == [torch.bfloat16]  # FSDP computes in bf16 itself: no autocast
    seen, dtypes = runs["ranks"][0]["autocast"]["fp32"]
    assert seen == [True] and dtypes == [torch.bfloat16]  # no policy: TrainConfig(precision="bf16") autocasts


def test_evaluation_of_a_sharded_model_with_uneven_shares_runs_in_step(runs):
    single_eval, single_pred = uneven_evaluation(hl.DistEnv())
    for rank in runs["ranks"]:
        evaluation, predictions = rank["evaluation"]
        assert evaluation["examples"] == 5 and evaluation["loss"] == pytest.approx(
            single_eval["loss"], rel=1e-5
        )
        assert all((p == q.numpy()).all() for p, q in zip(predictions, single_pred, strict=True))


def test_an_optimizer_built_before_sharding_is_refused(runs):
    message = runs["ranks"][0]["early_optimizer"]
    assert "optimizer was built before hl.shard" in message and "model = hl.shard(model, env)" in message


def test_shard_finds_no_block_in_a_plain_module():
    with pytest.raises(ValueError, match=r"found no transformer block to shard in Linear.*blocks=\["):
        hl.shard(torch.nn.Linear(2, 2), hl.DistEnv())
    with pytest.raises(ValueError, match=r"precision must be one of"):
        hl.shard(tiny_llama(), hl.DistEnv(), precision="int8")
