"""hl.train / evaluate / predict on tiny models: loss weighting, what reaches the model, precision, logging."""

from __future__ import annotations

import json
import math
import os

import pytest
import torch
from _train_script import classification_dataset, lm_dataset, tiny_bert, tiny_llama, token_rows, weights
from datasets import Dataset

import hf_loop as hl


def loader(ds, batch_size=8, sampler="sequential", **kw):
    return hl.make_loader(ds, batch_size=batch_size, sampler=sampler, **kw)


def cfg(**kw):
    return hl.TrainConfig(progress=False, **kw)


def max_diff(a: dict, b: dict) -> float:
    return max((a[k].double() - b[k].double()).abs().max().item() for k in a)


# -- training --------------------------------------------------------------------------------------------------


def test_loss_goes_down_and_logs_to_jsonl_and_on_log(tmp_path):
    model = tiny_bert()
    records = []
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    result = hl.train(
        model,
        loader(classification_dataset(), batch_size=16, sampler="random"),
        opt,
        cfg(epochs=5, log_every=5, out_dir=tmp_path),
        on_log=records.append,
    )
    losses = [r["loss"] for r in records if "loss" in r]
    assert losses[-1] < losses[0] - 0.05
    assert result.steps == 20 and result.epochs == 5 and result.stop_reason == "completed"
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["loss"] for r in lines if "loss" in r] == losses
    first = lines[0]
    assert {"step", "loss", "lr", "grad_norm", "samples_per_s", "tokens_per_s", "padding"} <= set(first)
    assert 0 < first["padding"] < 1 and first["samples_per_s"] > 0 and math.isfinite(first["grad_norm"])
    assert result.samples_per_s > 0 and result.tokens_per_s > 0 and 0 < result.padding < 1
    assert (tmp_path / "final" / "config.json").exists()  # save_pretrained of the final model


def _accumulation_run(model_fn, ds, batch_size, grad_accum):
    model = model_fn()
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    hl.train(model, loader(ds, batch_size=batch_size), opt, cfg(max_steps=2, grad_accum=grad_accum))
    return weights(model)


@pytest.mark.parametrize("kind", ["causal_lm", "sequence_classifier"])
def test_grad_accumulation_equals_a_bigger_batch(kind):
    # Unequal lengths: each micro-batch of 4 is padded to its own length and holds a different number of targets.
    model_fn, ds = (
        (tiny_llama, lm_dataset()) if kind == "causal_lm" else (tiny_bert, classification_dataset())
    )
    one = _accumulation_run(model_fn, ds, batch_size=8, grad_accum=1)
    two = _accumulation_run(model_fn, ds, batch_size=4, grad_accum=2)
    start = weights(model_fn())
    assert max_diff(one, start) > 1e-3  # the runs trained
    assert max_diff(one, two) <= 1e-6


@pytest.mark.parametrize(
    ("kind", "labels", "expected", "on_host"),
    [
        ("causal", [[5, 6, 8], [7, 9, -100]], 3, False),  # position 0 is never a target after the shift
        ("token", [[5, 6, 8], [7, 9, -100]], 5, False),
        ("auto", [[5, 6, 8], [7, 9, -100]], 5, False),  # integer labels with a sequence axis: tokens
        ("auto", [1, 0], 2, True),  # sequence classification: examples, known without device work
        ("auto", [[0.5, 1.0], [0.0, 1.0]], 2, True),  # float labels (regression, multi-label): examples
    ],
)
def test_count_targets_per_head(kind, labels, expected, on_host):
    from hf_loop.steps import count_targets

    count = count_targets(torch.tensor(labels), kind, batch_size=2, device=torch.device("cpu"))
    if on_host:
        assert isinstance(count, int) and count == expected
    else:
        assert count.dim() == 0 and count.item() == expected


class Recorder(torch.nn.Module):
    """A model naming only some keys; records what it receives."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(1, 1)
        self.seen: list[dict] = []

    def forward(self, input_ids, labels=None, num_items_in_batch=None):
        self.seen.append({"keys": {"input_ids", "labels"}, "num_items": num_items_in_batch})
        logits = self.linear(input_ids.float().mean(1, keepdim=True))
        loss_sum = ((logits.squeeze(1) - labels.float()) ** 2).sum()
        return {"loss": loss_sum / num_items_in_batch, "logits": logits}


def test_only_forward_parameters_reach_the_model_and_num_items_is_global():
    model = Recorder()
    ds = classification_dataset(12)  # the batches also carry "_index", "id" (strings) and "attention_mask"
    hl.train(
        model,
        loader(ds, batch_size=4),
        torch.optim.SGD(model.parameters(), lr=0.1),
        cfg(max_steps=1, grad_accum=3),
    )
    assert len(model.seen) == 3
    assert [int(s["num_items"]) for s in model.seen] == [12, 12, 12]  # examples over all three micro-batches


def test_model_inputs_list_and_use_cache_off():
    seen = {}
    model = tiny_llama()
    model.register_forward_pre_hook(lambda m, args, kwargs: seen.update(kwargs), with_kwargs=True)
    hl.train(
        model,
        loader(lm_dataset(8), batch_size=4),
        torch.optim.SGD(model.parameters(), lr=0.1),
        cfg(max_steps=1, model_inputs=["input_ids", "labels"]),
    )
    assert seen["use_cache"] is False  # no KV cache while training
    assert set(seen) == {
        "input_ids",
        "labels",
        "use_cache",
        "num_items_in_batch",
    }  # no attention_mask, _index


def test_missing_loss_names_labels():
    ds = hl.MapDataset(__import__("datasets").Dataset.from_dict({"input_ids": token_rows(8)["input_ids"]}))
    model = tiny_bert()
    with pytest.raises(ValueError, match=r"returned none: the batch has no 'labels'.*loss_fn="):
        hl.train(model, loader(ds), torch.optim.SGD(model.parameters(), lr=0.1), cfg(max_steps=1))


def test_loss_fn_returning_sum_and_count_matches_the_model_loss():
    def loss_fn(outputs, batch):
        logits = outputs.logits
        return torch.nn.functional.cross_entropy(logits, batch["labels"], reduction="sum"), len(logits)

    runs = []
    for fn in (None, loss_fn):
        model = tiny_bert()
        hl.train(
            model,
            loader(classification_dataset(24), batch_size=4),
            torch.optim.SGD(model.parameters(), lr=0.5),
            cfg(max_steps=2, grad_accum=3),
            loss_fn=fn,
        )
        runs.append(weights(model))
    assert max_diff(*runs) <= 1e-6


def test_clipping_reports_the_norm_and_schedulers_step():
    model = tiny_bert()
    records = []
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    hl.train(
        model,
        loader(classification_dataset(32)),
        opt,
        cfg(max_steps=4, log_every=1, max_grad_norm=1e-3, scheduler="linear", warmup_steps=2),
        on_log=records.append,
    )
    assert all(r["grad_norm"] > 1e-3 for r in records)  # the norm before clipping is reported
    assert [r["lr"] for r in records] == pytest.approx([0.5, 1.0, 0.5, 0.0])
    model = tiny_bert()
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    hl.train(model, loader(classification_dataset(16)), opt, cfg(max_steps=2, scheduler=sched))
    assert opt.param_groups[0]["lr"] == 0.25


class Exploding(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.ones(1))

    def forward(self, input_ids, labels):
        return {"loss": self.w.sum() * float("inf")}


def test_nonfinite_steps_are_skipped_then_stop_with_a_clear_error():
    model = Exploding()
    with pytest.raises(FloatingPointError, match="3 optimizer steps in a row had a non-finite gradient norm"):
        hl.train(
            model,
            loader(classification_dataset(32), batch_size=4),
            torch.optim.SGD(model.parameters(), lr=0.1),
            cfg(max_steps=5, max_bad_steps=3),
        )
    assert model.w.item() == 1.0  # no step was applied
    with pytest.raises(FloatingPointError, match="training diverged by step 1.*max_bad_steps"):
        hl.train(
            model,
            loader(classification_dataset(8)),
            torch.optim.SGD(model.parameters(), lr=0.1),
            cfg(max_steps=1),
        )


class FirstStepExplodes(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.ones(1))
        self.calls = 0

    def forward(self, input_ids, labels):
        self.calls += 1
        scale = float("inf") if self.calls == 1 else 1.0
        return {"loss": (self.w * input_ids.float().mean() * scale - labels.float().mean()) ** 2}


def test_a_skipped_step_is_reported_and_kept_out_of_the_logs(caplog):
    model = FirstStepExplodes()
    records = []
    result = hl.train(model, loader(classification_dataset(32), batch_size=4),
                      torch.optim.SGD(model.parameters(), lr=1e-4), cfg(max_steps=3, max_bad_steps=2, log_every=1),
                      on_log=records.append)  # fmt: skip
    assert "step 1: non-finite gradient norm, step skipped (1 in a row)" in caplog.text
    assert result.steps == 3 and model.calls == 4  # the skipped step's batch was used, but no step counted
    assert [r["step"] for r in records] == [1, 2, 3] and all(math.isfinite(r["loss"]) for r in records)


def test_a_loss_that_is_not_one_number_is_an_error():
    model = tiny_bert()
    with pytest.raises(ValueError, match=r"the loss must be a single number, got a tensor of shape \(4,\)"):
        hl.train(model, loader(classification_dataset(8), batch_size=4), torch.optim.SGD(model.parameters(), lr=0.1),
                 cfg(max_steps=1), loss_fn=lambda out, batch: out.logits[:, 0])  # fmt: skip


def test_loss_fn_must_return_a_tensor_or_a_pair():
    model = tiny_bert()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(
        TypeError, match=r"loss_fn must return a scalar tensor or \(loss_sum, count\), got float"
    ):
        hl.train(model, loader(classification_dataset(8)), opt, cfg(max_steps=1), loss_fn=lambda out, b: 0.5)
    with pytest.raises(
        ValueError, match=r"loss_fn must return a scalar loss or \(loss_sum, count\), got a 3-tuple"
    ):
        hl.train(
            model, loader(classification_dataset(8)), opt, cfg(max_steps=1), loss_fn=lambda out, b: (1, 2, 3)
        )


def test_stream_without_max_steps_is_refused():
    from datasets import Dataset

    stream = hl.StreamDataset(Dataset.from_dict(token_rows(16)).to_iterable_dataset(num_shards=2))
    model = tiny_bert()
    with pytest.raises(ValueError, match=r"has no length \(a stream\).*max_steps"):
        hl.train(
            model, hl.make_loader(stream, batch_size=4), torch.optim.SGD(model.parameters(), lr=0.1), cfg()
        )
    result = hl.train(
        model,
        hl.make_loader(stream, batch_size=4),
        torch.optim.SGD(model.parameters(), lr=0.1),
        cfg(max_steps=6),
    )
    assert result.steps == 6 and result.epochs == 1  # 4 batches per pass: the stream is read again


class NoBatches(torch.utils.data.IterableDataset):
    def __iter__(self):
        return iter(())


def test_an_empty_loader_is_an_error_not_an_endless_loop():
    model = tiny_bert()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    empty = torch.utils.data.DataLoader([], batch_size=2)
    with pytest.raises(ValueError, match=r"yields no batch \(dataset of 0 rows, batch_size=2\)"):
        hl.train(model, empty, opt, cfg(max_steps=3))
    stream = torch.utils.data.DataLoader(NoBatches(), batch_size=None)  # no length: found out while training
    with pytest.raises(ValueError, match="yielded no batches in epoch 0 on rank 0"):
        hl.train(model, stream, opt, cfg(max_steps=3))


def test_a_loader_without_one_full_batch_is_refused():
    model = tiny_bert()
    tiny = hl.make_loader(classification_dataset(6), batch_size=8, drop_last=True)
    with pytest.raises(
        ValueError, match=r"yields no batch \(dataset of 6 rows, batch_size=8\).*drop_last=False"
    ):
        hl.train(model, tiny, torch.optim.SGD(model.parameters(), lr=0.1), cfg(epochs=1))


def test_bf16_autocast_on_cpu():
    model = tiny_bert()
    dtypes = []
    model.classifier.register_forward_hook(lambda m, i, o: dtypes.append(o.dtype))
    result = hl.train(
        model,
        loader(classification_dataset(16)),
        torch.optim.AdamW(model.parameters()),
        cfg(max_steps=2, precision="bf16"),
    )
    assert dtypes == [torch.bfloat16, torch.bfloat16] and math.isfinite(result.last_loss)
    assert model.classifier.weight.dtype == torch.float32  # master weights stay fp32


def test_fp16_uses_a_grad_scaler_that_is_checkpointed_and_restored(tmp_path):
    model = tiny_bert()
    opt = torch.optim.AdamW(model.parameters())
    first = hl.train(model, loader(classification_dataset(16)), opt,
                     cfg(max_steps=1, precision="fp16", out_dir=tmp_path, export=False))  # fmt: skip
    scaler = torch.load(first.checkpoint / "train.pt", weights_only=True)["scaler"]
    assert scaler["scale"] > 1 and "_growth_tracker" in scaler  # only fp16 gets a GradScaler
    second = hl.train(model, loader(classification_dataset(16)), opt,
                      cfg(max_steps=2, precision="fp16", out_dir=tmp_path, export=False))  # fmt: skip
    assert second.resumed_from == first.checkpoint and math.isfinite(second.last_loss)
    bf16 = hl.train(model, loader(classification_dataset(16)), opt,
                    cfg(max_steps=1, precision="bf16", out_dir=tmp_path / "bf16"))  # fmt: skip
    assert torch.load(bf16.checkpoint / "train.pt", weights_only=True)["scaler"] is None


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_cuda_precision_and_staging(precision):
    model = tiny_bert()
    env = hl.DistEnv(device=torch.device("cuda", 0))
    ds = classification_dataset(32)
    result = hl.train(
        model,
        loader(ds, pin_memory=True, env=env),
        torch.optim.AdamW(model.parameters()),
        cfg(max_steps=4, precision=precision, max_grad_norm=1.0),
        env=env,
    )
    assert next(model.parameters()).is_cuda and math.isfinite(result.last_loss)
    predictions = hl.predict(model, loader(ds, env=env), env=env, reduce="argmax")
    assert predictions.shape == (32,)


class BagOfEmbeddings(torch.nn.Module):
    """Plain torch, no data-dependent Python branches: any host sync in a step comes from the loop."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(64, 8)
        self.head = torch.nn.Linear(8, 2)

    def forward(self, input_ids, attention_mask, labels):
        mask = attention_mask.unsqueeze(-1).float()
        pooled = (self.embed(input_ids) * mask).sum(1) / mask.sum(1)
        return {"loss": torch.nn.functional.cross_entropy(self.head(pooled), labels)}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_default_step_makes_no_host_sync():
    from hf_loop.feed import staged
    from hf_loop.logs import Window
    from hf_loop.steps import ModelInputs, TrainStep

    device = torch.device("cuda", 0)
    env = hl.DistEnv(device=device)
    model = BagOfEmbeddings().to(device)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    window = Window(device)
    step = TrainStep(model, opt, scheduler=None, scaler=None, inputs=ModelInputs(model), loss_fn=None,
                     config=cfg(), env=env, window=window)  # fmt: skip
    batches = staged(list(loader(classification_dataset(16), batch_size=4, pin_memory=True, env=env)), device)

    def one_step() -> None:
        step([next(batches)], want_norm=False)

    one_step()  # warm-up: CUDA context, kernels, allocator
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")  # any synchronizing call raises
    try:
        one_step()
        one_step()
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert window.flush(env)["samples"] == 12


def test_early_stopping_keeps_the_best_checkpoint(tmp_path):
    model = tiny_bert()
    opt = torch.optim.SGD(model.parameters(), lr=0.0)  # nothing improves after the first evaluation
    result = hl.train(
        model,
        loader(classification_dataset(16)),
        opt,
        cfg(epochs=10, eval_every=1, patience=2, out_dir=tmp_path, keep_last=1),
        eval_loader=loader(classification_dataset(16)),
    )
    assert result.stopped_early and result.steps == 3
    assert result.best_checkpoint.name == "step-00000001" and result.best_checkpoint.exists()
    names = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert names == ["step-00000001", "step-00000003"]  # the newest plus the best


# -- evaluate / predict --------------------------------------------------------------------------------------


def test_evaluate_loss_matches_the_model_and_metrics_are_in_dataset_order():
    model = tiny_bert()
    ds = classification_dataset(20)
    batches = list(loader(ds, batch_size=6))
    with torch.no_grad():
        model.eval()
        losses = [
            (
                model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], labels=b["labels"]).loss,
                len(b["labels"]),
            )
            for b in batches
        ]
        expected = sum(loss * n for loss, n in losses) / 20
    labels = torch.tensor(token_rows(20)["label"])
    result = hl.evaluate(
        model,
        loader(ds, batch_size=6, sampler="random"),
        metrics={"labels_in_order": lambda p, y: float(torch.equal(y, labels))},
    )
    assert result["loss"] == pytest.approx(expected.item(), rel=1e-5)
    assert result["labels_in_order"] == 1.0 and result["examples"] == 20


def test_metrics_without_labels_are_an_error():
    ds = hl.MapDataset(__import__("datasets").Dataset.from_dict({"input_ids": token_rows(8)["input_ids"]}))
    with pytest.raises(
        ValueError, match=r"metrics compare predictions with 'labels', but an eval batch has none"
    ):
        hl.evaluate(tiny_bert(), loader(ds), metrics={"accuracy": lambda p, y: 0.0})
    assert hl.evaluate(tiny_bert(), loader(ds)) == {"examples": 8.0}  # no labels, no loss: nothing to average


def test_predict_is_in_dataset_order_with_reduce_and_trimmed_sequences():
    model = tiny_llama()
    ds = lm_dataset(10)
    ordered = hl.predict(model, loader(ds, batch_size=10), reduce="argmax")
    shuffled = hl.predict(model, loader(ds, batch_size=3, sampler="random"), reduce="argmax")
    lengths = [len(r) for r in token_rows(10)["input_ids"]]
    assert [len(r) for r in ordered] == lengths  # N x L (ragged), never N x L x V; padding cut away
    assert all(torch.equal(a, b) for a, b in zip(ordered, shuffled))
    last = hl.predict(model, loader(ds, batch_size=4), reduce=lambda out, batch: out.logits[:, -1, :3])
    assert last.shape == (10, 3)
    both = hl.predict(model, loader(ds, batch_size=4), reduce=lambda out, b: {"top": out.logits.argmax(-1),
                                                                               "first": out.logits[:, 0, :2]})  # fmt: skip
    assert all(torch.equal(a, b) for a, b in zip(both["top"], ordered)) and both["first"].shape == (10, 2)
    with pytest.raises(ValueError, match="reduce must be None, 'argmax' or a callable"):
        hl.predict(model, loader(ds), reduce="max")


def test_evaluate_with_a_summing_loss_fn_matches_the_model_loss():
    model = tiny_bert()
    ds = classification_dataset(20)

    def summed(outputs, batch):
        return torch.nn.functional.cross_entropy(outputs.logits, batch["labels"], reduction="sum"), len(
            batch["labels"]
        )

    plain = hl.evaluate(model, loader(ds, batch_size=6))
    custom = hl.evaluate(model, loader(ds, batch_size=6), loss_fn=summed)
    assert custom["loss"] == pytest.approx(plain["loss"], rel=1e-5)


def test_count_parameters_with_frozen_parts_and_gradient_checkpointing():
    model = tiny_bert()
    for p in model.bert.embeddings.parameters():
        p.requires_grad = False
    table = hl.count_parameters(model)
    total = sum(p.numel() for p in model.parameters())
    frozen = sum(p.numel() for p in model.bert.embeddings.parameters())
    assert (table.total, table.trainable) == (total, total - frozen)
    assert dict((r[0], r[1]) for r in table.rows)["bert.embeddings"] == 0
    getattr(model, "activation_checkpointing_enable", model.gradient_checkpointing_enable)()
    assert hl.count_parameters(model) == table
    assert "bert.encoder" in str(table) and "trainable" in str(table)


def test_count_parameters_of_a_peft_model():
    peft = pytest.importorskip("peft")
    model = peft.get_peft_model(tiny_llama(), peft.LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    table = hl.count_parameters(model)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert table.trainable == trainable and 0 < trainable < table.total
    before = weights(model)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    result = hl.train(model, loader(lm_dataset(8), batch_size=4), opt, cfg(max_steps=2))
    changed = {k for k, v in weights(model).items() if not torch.equal(v, before[k])}
    assert math.isfinite(result.last_loss) and changed and all("lora_" in k for k in changed)


# -- TrainConfig errors ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"epochs": 0}, ValueError, r"TrainConfig.epochs must be >= 1, got 0"),
        ({"grad_accum": 1.5}, TypeError, r"TrainConfig.grad_accum must be an int, got float 1.5"),
        ({"max_steps": 0}, ValueError, r"TrainConfig.max_steps must be >= 1, got 0"),
        ({"max_steps": "100"}, TypeError, r"TrainConfig.max_steps must be an int, got str '100'"),
        ({"log_every": True}, TypeError, r"TrainConfig.log_every must be an int, got bool True"),
        ({"keep_last": 0}, ValueError, r"TrainConfig.keep_last"),
        ({"eval_every": -1}, ValueError, r"TrainConfig.eval_every"),
        ({"patience": 0}, ValueError, r"TrainConfig.patience"),
        ({"max_bad_steps": 0}, ValueError, r"TrainConfig.max_bad_steps"),
        ({"warmup_steps": -1}, ValueError, r"TrainConfig.warmup_steps must be >= 0, got -1"),
        ({"max_grad_norm": 0}, ValueError, r"TrainConfig.max_grad_norm must be a number > 0 or None, got 0"),
        (
            {"precision": "fp8"},
            ValueError,
            r"TrainConfig.precision must be one of \['bf16', 'fp16', 'fp32'\]",
        ),
        ({"scheduler": "warm"}, ValueError, r"TrainConfig.scheduler must be one of \[.*'linear'.*got 'warm'"),
        (
            {"scheduler": 3},
            TypeError,
            r"TrainConfig.scheduler must be a scheduler name or a torch LR scheduler",
        ),
        ({"seed": "0"}, TypeError, r"TrainConfig.seed must be an int, got str '0'"),
        ({"compile": "yes"}, TypeError, r"TrainConfig.compile must be True or False, got str 'yes'"),
        (
            {"ddp_static_graph": 1},
            TypeError,
            r"TrainConfig.ddp_static_graph must be True or False, got int 1",
        ),
        (
            {"async_checkpoint": "False"},
            TypeError,
            r"TrainConfig.async_checkpoint must be True or False, got str",
        ),
        (
            {"resume_allow": "model"},
            ValueError,
            r"TrainConfig.resume_allow must be a tuple of identity parts",
        ),
        ({"checkpoint_every": 5}, ValueError, r"TrainConfig.checkpoint_every needs out_dir"),
        ({"best_metric": ""}, ValueError, r"TrainConfig.best_metric must be a metric name"),
        (
            {"model_inputs": "input_ids"},
            TypeError,
            r"model_inputs must be a list of key names.*\['input_ids'\]",
        ),
    ],
)
def test_train_config_errors_name_the_field(kwargs, error, match):
    with pytest.raises(error, match=match):
        hl.TrainConfig(**kwargs)


def test_train_argument_errors(tmp_path):
    model = tiny_bert()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    plain = torch.utils.data.DataLoader([1, 2])
    with pytest.raises(TypeError, match=r"out_dir need a resumable loader.*got DataLoader.*hl.make_loader"):
        hl.train(model, plain, opt, cfg(out_dir=tmp_path))
    with pytest.raises(ValueError, match=r"patience \(early stopping\) needs eval_loader="):
        hl.train(model, loader(classification_dataset(8)), opt, cfg(patience=1))
    with pytest.raises(ValueError, match=r"eval_every \(periodic evaluation\) needs eval_loader="):
        hl.train(model, loader(classification_dataset(8)), opt, cfg(eval_every=2))
    with pytest.warns(UserWarning, match=r"warmup_steps=50 is longer than the run \(1 steps\)"):
        hl.train(model, loader(classification_dataset(8)), opt, cfg(scheduler="linear", warmup_steps=50))
    strings = hl.MapDataset(Dataset.from_dict({"input_ids": [[5, 6]] * 4, "label": ["pos", "neg"] * 2}))
    with pytest.raises(TypeError, match=r"'labels' are strings \(first: 'pos'\).*class_encode_column"):
        hl.train(model, loader(strings), opt, cfg(max_steps=1))
    with pytest.raises(ValueError, match=r"best_metric='accuracy' is not among the eval results"):
        hl.train(
            model,
            loader(classification_dataset(8)),
            opt,
            cfg(best_metric="accuracy"),
            eval_loader=loader(classification_dataset(8)),
        )
    frozen = hl.TrainConfig()
    with pytest.raises(AttributeError):
        frozen.epochs = 2


class TinyRegressor(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.linear = torch.nn.Linear(1, 1)

    def forward(self, input_ids, labels):
        prediction = self.linear(input_ids.float().mean(1, keepdim=True)).squeeze(1)
        return {"loss": ((prediction - labels.float()) ** 2).mean()}


@pytest.mark.skipif(
    not os.environ.get("HF_LOOP_SLOW_TESTS"),
    reason="torch.compile takes ~30 s on 2 CPU cores; set HF_LOOP_SLOW_TESTS=1",
)
def test_compile_trains_and_checkpoints_the_plain_module(tmp_path):
    model = TinyRegressor()
    result = hl.train(model, loader(classification_dataset(16), batch_size=8), torch.optim.SGD(model.parameters(),
                      lr=1e-3), cfg(max_steps=2, compile=True, out_dir=tmp_path))  # fmt: skip
    state = torch.load(result.checkpoint, weights_only=True)
    assert set(state["model"]) == {"linear.weight", "linear.bias"}  # no "_orig_mod." prefix
    assert not any(torch.equal(state["model"][k], TinyRegressor().state_dict()[k]) for k in state["model"])
