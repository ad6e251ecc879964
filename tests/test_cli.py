"""`hf-loop inspect` and `hf-loop finetune`, run in-process through main() on data built in the test."""

from __future__ import annotations

import json
import re

import pytest

from hf_loop.cli import build_parser, main

FINETUNE_FLAGS = [
    "--dataset",
    "--split",
    "--text-column",
    "--label-column",
    "--model",
    "--epochs",
    "--max-steps",
    "--batch-size",
    "--lr",
    "--val-fraction",
    "--sampler",
    "--max-tokens",
    "--precision",
    "--grad-accum",
    "--out-dir",
    "--streaming",
    "--num-workers",
    "--seed",
]
INSPECT_FLAGS = [
    "--split",
    "--column",
    "--tokenizer",
    "--batch-size",
    "--streaming",
    "--world-size",
    "--num-workers",
    "--json",
    "--out",
]


def help_text(command: str, capsys) -> str:
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    return capsys.readouterr().out


def test_help_documents_every_flag(capsys):
    finetune = help_text("finetune", capsys)
    for flag in FINETUNE_FLAGS:
        # each flag is listed with a sentence of help after it
        assert re.search(rf"{flag}( [A-Z_,{{}}|a-z0-9]+)?\s+\S", finetune), flag
    assert "random" in finetune and "weighted" in finetune and "tokens" in finetune
    inspect = help_text("inspect", capsys)
    for flag in INSPECT_FLAGS:
        assert flag in inspect, flag
    for action in build_parser()._subparsers._group_actions[0].choices["finetune"]._actions:
        assert action.help, action.option_strings  # no undocumented flag


@pytest.fixture
def tokenizer_dir(tokenizer, tmp_path):
    path = tmp_path / "tokenizer"
    tokenizer.save_pretrained(str(path))
    return path


def test_inspect_prints_report_writes_png_and_json(hub_folder, tokenizer_dir, tmp_path, capsys):
    out = tmp_path / "report"
    args = [
        "inspect",
        str(hub_folder),
        "--tokenizer",
        str(tokenizer_dir),
        "--batch-size",
        "8",
        "--out",
        str(out),
    ]
    assert main(args) == 0
    text = capsys.readouterr().out
    assert "lengths of 'text' (tokens), 60 examples" in text
    assert re.search(r"length-grouped\s+waste\s+\d+\.\d%", text)
    assert "drawn  50.0% under sampler='weighted'" in text
    assert (out / "lengths.png").stat().st_size > 1000
    assert main([*args, "--json", "--split", "test"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["lengths"]["count"] == 20 and set(report["padding"]) == {"random", "length", "tokens"}
    assert report["labels"][0]["count"] + report["labels"][1]["count"] == 20


def test_inspect_streaming_shows_the_shard_plan(hub_folder, tmp_path, capsys):
    args = ["inspect", str(hub_folder), "--split", "train", "--streaming", "--world-size", "2", "--json"]
    assert main([*args, "--num-workers", "1", "--out", str(tmp_path)]) == 0
    report = json.loads(capsys.readouterr().out)
    plan = report["plan"]
    assert plan["world_size"] == 2 and [(r["rank"], r["shards"]) for r in plan["readers"]] == [
        (0, [0]),
        (1, [1]),
    ]
    assert report["lengths"]["count"] == 60 and "streamed" in report["notes"][-1]
    # 60 rows cannot feed 2 ranks x 40 workers: the report says why and how to fix it, and keeps its numbers
    assert main([*args, "--num-workers", "40", "--out", str(tmp_path)]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["plan"] is None and report["lengths"]["count"] == 60
    assert (
        "no shard plan for world size 2 x 40 worker(s)" in report["notes"][0] and "Fix:" in report["notes"][0]
    )


def test_inspect_data_error_exits_2_with_the_fix(hub_folder, capsys):
    assert main(["inspect", str(hub_folder), "--split", "dev"]) == 2
    err = capsys.readouterr().err
    assert "hf-loop inspect: error:" in err and "available splits: ['train', 'test']" in err


def test_finetune_streaming_needs_max_steps(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["finetune", "--dataset", "x", "--streaming"])
    assert exit_info.value.code == 2
    assert "--streaming needs --max-steps" in capsys.readouterr().err


def run_finetune(tmp_path, capsys, *extra: str) -> str:
    out = tmp_path / "run"
    argv = ["finetune", "--num-rows", "240", "--batch-size", "16", "--max-steps", "4", "--log-every", "2"]
    assert main([*argv, "--out-dir", str(out), *extra]) == 0
    text = capsys.readouterr().out
    assert (out / "metrics.jsonl").is_file() and (out / "final").is_dir()
    return text


def test_finetune_weighted_sampler_end_to_end(tmp_path, capsys):
    text = run_finetune(tmp_path, capsys, "--sampler", "weighted")
    assert "sampler weighted" in text and "24 validation rows" in text
    assert re.search(r"step\s+4/4\s+loss \d+\.\d+", text)
    assert re.search(r"eval accuracy\s+\d\.\d+ on 24 examples\s+\(majority-class baseline \d\.\d+", text)
    assert "samples/s" in text and "padding" in text and "metrics log" in text
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == [2, 4]


def test_finetune_token_budget_and_resume(tmp_path, capsys):
    text = run_finetune(tmp_path, capsys, "--sampler", "tokens", "--max-tokens", "400")
    assert "sampler tokens (max_tokens 400)" in text
    again = run_finetune(tmp_path, capsys, "--sampler", "tokens", "--max-tokens", "400", "--max-steps", "6")
    assert "resumed from" in again and "6 optimizer steps" in again
    done = run_finetune(tmp_path, capsys, "--sampler", "tokens", "--max-tokens", "400", "--max-steps", "6")
    assert "holds a finished run; raise --max-steps" in done and re.search(
        r"eval accuracy\s+\d\.\d+ on 24", done
    )


def test_finetune_on_a_hub_folder_carves_validation(hub_folder, tmp_path, capsys):
    text = run_finetune(tmp_path, capsys, "--dataset", str(hub_folder), "--val-fraction", "0.25")
    assert "60 rows" not in text and "45 train rows, 15 validation rows" in text
    assert "(2 classes: 0, 1)" in text


@pytest.mark.parametrize("sampler", ["length", "tokens"])
def test_finetune_streaming(sampler, hub_folder, tmp_path, capsys):
    text = run_finetune(tmp_path, capsys, "--dataset", str(hub_folder), "--streaming", "--sampler", sampler)
    assert "data: " in text and " - stream, " in text and "held out by a hash of 'text'" in text
    assert "shard plan, epoch 0: 1 rank(s)" in text and f"sampler {sampler}" in text
    if sampler == "tokens":
        assert re.search(r"sampler tokens \(max_tokens \d+\)", text)
    assert re.search(r"step\s+4/4\s+loss", text)
    with pytest.raises(SystemExit):
        main(
            [
                "finetune",
                "--dataset",
                str(hub_folder),
                "--streaming",
                "--max-steps",
                "2",
                "--sampler",
                "weighted",
            ]
        )
    assert "--sampler weighted needs map-style data" in capsys.readouterr().err


def test_finetune_string_labels_from_a_data_file(tmp_path, capsys):
    from datasets import Dataset

    file = tmp_path / "reviews.parquet"
    names = ["neg", "pos", "neutral"]
    Dataset.from_dict(
        {
            "review": [f"w{i % 7} w{i % 11} w{i % 3}" for i in range(80)],
            "sentiment": [names[i % 5 % 3] for i in range(80)],
        }
    ).to_parquet(file)
    args = [
        "--dataset",
        str(file),
        "--text-column",
        "review",
        "--label-column",
        "sentiment",
        "--sampler",
        "weighted",
    ]
    text = run_finetune(tmp_path, capsys, *args)
    assert "text 'review', label 'sentiment' (3 classes: neg, neutral, pos)" in text
    assert "majority-class baseline" in text and "always 'neg'" in text


def test_finetune_pretrained_model_from_a_folder(tmp_path, capsys):
    from hf_loop import demo

    tokenizer = demo.train_tokenizer()
    demo.make_model(tokenizer, num_labels=2).save_pretrained(tmp_path / "pretrained")  # another head size
    tokenizer.save_pretrained(tmp_path / "pretrained")
    text = run_finetune(tmp_path, capsys, "--model", str(tmp_path / "pretrained"))
    assert f"model: {tmp_path / 'pretrained'} - 125,123 parameters" in text and "lr 5e-05" in text


def _finetune_on_rank(env, out_dir: str) -> str:
    import contextlib
    import io

    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        code = main(["finetune", "--num-rows", "200", "--batch-size", "8", "--max-steps", "3", "--log-every", "3",
                     "--sampler", "weighted", "--out-dir", out_dir])  # fmt: skip
    assert code == 0
    return printed.getvalue()


def test_finetune_runs_unchanged_on_two_processes(tmp_path):
    from distributed import run_distributed

    rank0, rank1 = run_distributed(_finetune_on_rank, 2, (str(tmp_path / "ddp"),), timeout=240)
    assert "batch 8 x 2 rank(s)" in rank0 and re.search(r"eval accuracy\s+\d\.\d+ on 20 examples", rank0)
    assert rank1 == ""  # only rank 0 prints
    assert (tmp_path / "ddp" / "metrics.jsonl").is_file() and (tmp_path / "ddp" / "final").is_dir()
