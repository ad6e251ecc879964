"""`hf-loop inspect` and `hf-loop finetune`, run in-process through main() on data built in the test; a few
end-to-end checks (import cost, signals, a closed stdout) run the command in a subprocess."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from hf_loop.cli import build_parser, main

ROOT = Path(__file__).resolve().parent.parent
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
    "--checkpoint-every",
    "--streaming",
    "--num-workers",
    "--threads",
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


@pytest.fixture(autouse=True, scope="module")
def transformers_logs_to_the_root_logger():
    """transformers' own log handler keeps the stderr of the test that first logged (closed by pytest after it),
    and logging to it prints a traceback into a later test's stderr. Through the root logger, pytest captures."""
    from transformers.utils import logging

    logging.disable_default_handler()
    yield
    logging.enable_default_handler()


@pytest.fixture(autouse=True)
def keep_torch_threads():
    """main() sets torch's intra-op threads for the process; later tests get the count they started with."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


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


def exit_code(argv: list[str]) -> int:
    try:
        return main(argv)
    except SystemExit as exit_info:  # argparse's own errors exit from inside parse_args
        return exit_info.code


def user_error(capsys, *argv: str) -> str:
    """Run a mistaken command line: exit status 2, one or two lines on stderr, no traceback, nothing on stdout
    but the header. Returns stderr."""
    code = exit_code(list(argv))
    captured = capsys.readouterr()
    assert code == 2, (code, captured.err)
    assert "Traceback" not in captured.err and 1 <= len(captured.err.strip().splitlines()) <= 2, captured.err
    return captured.err


@pytest.mark.parametrize(
    "argv, expected",
    [
        (["--lr", "-1"], "argument --lr: expected a learning rate > 0, such as 5e-5, got '-1'"),
        (["--lr", "fast"], "argument --lr: expected a learning rate > 0, such as 5e-5, got 'fast'"),
        (["--num-workers", "-1"], "argument --num-workers: expected an integer >= 0, got '-1'"),
        (["--batch-size", "0"], "argument --batch-size: expected an integer >= 1, got '0'"),
        (["--seed", "-1"], "argument --seed: expected an integer seed in 0..2**32-1"),
        (["--val-fraction", "1.5"], "argument --val-fraction: expected a fraction between 0 and 1"),
        (["--threads", "0"], "argument --threads: expected an integer >= 1, got '0'"),
        (["--checkpoint-every", "x"], "argument --checkpoint-every: expected an integer >= 1, got 'x'"),
        (["--precision", "fp8"], "argument --precision: invalid choice: 'fp8'"),
        (["--model", "./no_model"], "--model ./no_model: the path does not exist"),
        (["--model", "no-such-org/no-such-model"], "not in the local Hugging Face cache, and HF_HUB_OFFLINE"),
        (["--dataset", "./missing.csv"], "--dataset ./missing.csv: no such file or folder"),
        (["--max-tokens", "100"], "--max-tokens 100 sets the budget of --sampler tokens, but the sampler is"),
        (["--streaming"], "--streaming needs --dataset NAME_OR_PATH"),
        (["--dataset", "org/name", "--streaming"], "--streaming needs --max-steps N"),
        (["--dataset", "org/name", "--num-rows", "10"], "--num-rows sizes the embedded demo dataset"),
        (
            ["--dataset", "org/name", "--streaming", "--max-steps", "2", "--sampler", "weighted"],
            "--sampler weighted needs map-style data",
        ),
        (
            [
                "--dataset",
                "org/n",
                "--streaming",
                "--max-steps",
                "2",
                "--sampler",
                "tokens",
                "--max-tokens",
                "9",
            ],
            "--max-tokens 9 is below --max-length 256",
        ),
    ],
)
def test_finetune_mistakes_before_loading_anything(argv, expected, capsys):
    err = user_error(capsys, "finetune", *argv)
    assert err.startswith("hf-loop finetune: error: ") and expected in err


def test_finetune_path_mistakes(tmp_path, capsys):
    (tmp_path / "model").mkdir()
    err = user_error(capsys, "finetune", "--model", str(tmp_path / "model"))
    assert "the folder has no config.json. Fix: pass a folder written by save_pretrained()" in err
    (tmp_path / "file").write_text("x")
    err = user_error(capsys, "finetune", "--out-dir", str(tmp_path / "file"))
    assert f"--out-dir {tmp_path / 'file'}: this is a file, not a folder" in err
    err = user_error(capsys, "finetune", "--dataset", str(tmp_path / "file"), "--config", "x")
    assert "--config x: the data file" in err


def write_table(path: Path, **columns) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    if path.suffix == ".csv":
        import pyarrow.csv as pacsv

        pacsv.write_csv(pa.table(columns), path)
    else:
        pq.write_table(pa.table(columns), path)
    return path


def test_empty_data_files(tmp_path, capsys):
    import pyarrow as pa

    empty = write_table(
        tmp_path / "empty.parquet", text=pa.array([], pa.string()), label=pa.array([], pa.int64())
    )
    assert f"{empty} holds no rows" in user_error(capsys, "finetune", "--dataset", str(empty))
    (tmp_path / "blank.csv").write_text("")
    (tmp_path / "header.csv").write_text("text,label\n")
    for name in ("blank.csv", "header.csv"):
        err = user_error(capsys, "finetune", "--dataset", str(tmp_path / name))
        assert f"--dataset {tmp_path / name}: {tmp_path / name} holds no rows" in err
    folder = tmp_path / "folder"
    folder.mkdir()
    assert "the folder holds no data files (.parquet, .csv" in user_error(
        capsys, "finetune", "--dataset", str(folder)
    )
    (folder / "header.csv").write_text("text,label\n")
    assert "holds no rows" in user_error(capsys, "inspect", str(folder))


def texts(n: int) -> list[str]:
    return [f"w{i % 7} w{i % 5} w{i % 3}" for i in range(n)]


def test_label_mistakes_after_loading(tmp_path, capsys):
    labels = [float(i % 2) for i in range(40)]
    labels[3] = labels[17] = float("nan")
    nan = write_table(tmp_path / "nan.parquet", text=texts(40), label=labels)
    err = user_error(capsys, "finetune", "--dataset", str(nan))
    assert "label column 'label' of " in err and "2 of 40 rows have no label (NaN or null): rows 3, 17" in err
    csv = write_table(
        tmp_path / "gaps.csv", text=texts(30), label=[None if i % 10 == 4 else i % 2 for i in range(30)]
    )
    assert "3 of 30 rows have no label (NaN or null): rows 4, 14, 24" in user_error(
        capsys, "finetune", "--dataset", str(csv)
    )
    floats = write_table(tmp_path / "f.parquet", text=texts(40), label=[i / 7 for i in range(40)])
    err = user_error(capsys, "finetune", "--dataset", str(floats), "--sampler", "weighted")
    assert "--sampler weighted balances classes, but 'label' holds floats (regression targets)" in err
    err = user_error(capsys, "finetune", "--dataset", str(floats), "--label-column", "score")
    assert "--label-column score: no such column; columns: ['text', 'label']" in err
    err = user_error(capsys, "finetune", "--dataset", str(floats), "--split", "train[:abc]")
    assert "--split train[:abc]: not datasets' split syntax. Fix: e.g. --split 'train[:2000]'" in err
    small = write_table(tmp_path / "small.parquet", text=texts(3), label=[0, 1, 0])
    err = user_error(capsys, "finetune", "--dataset", str(small), "--val-fraction", "0.9")
    assert "--val-fraction 0.9 of 3 rows leaves no training rows" in err


def test_column_mistakes(hub_folder, tmp_path, capsys):
    hub = ["--dataset", str(hub_folder)]
    err = user_error(capsys, "finetune", *hub, "--text-column", "label")
    assert "--text-column label: the column holds Value('int64'), not text" in err
    assert "--label-column text is also the text column" in user_error(
        capsys, "finetune", *hub, "--label-column", "text"
    )
    lists = write_table(tmp_path / "tags.parquet", text=texts(20), tags=[[i, i + 1] for i in range(20)])
    err = user_error(capsys, "finetune", "--dataset", str(lists), "--label-column", "tags")
    assert "label column 'tags' holds list<item: int64>, not one class or score per row" in err
    err = user_error(capsys, "inspect", str(hub_folder), "--column", "label")
    assert "column 'label' holds Value('int64'), which has no length per row. Fix: --column" in err
    err = user_error(capsys, "inspect", str(hub_folder), "--max-tokens", "2")
    assert re.search(
        r"max_tokens 2 is below the longest example \((\d+) words\).* Fix: --max-tokens \1 or more", err
    )
    assert "--streaming: the embedded demo dataset is map-style" in user_error(
        capsys, "inspect", "demo", "--streaming"
    )


def test_token_budget_below_the_longest_example_names_max_length(capsys):
    err = user_error(capsys, "finetune", "--num-rows", "200", "--sampler", "tokens", "--max-tokens", "10")
    assert re.search(r"--max-tokens 10 is smaller than the longest example \((\d+) tokens after truncation at "
                     r"--max-length 256\)\. Fix: --max-tokens \1 or more, or --max-length 10", err)  # fmt: skip


@pytest.fixture
def pretrained(tmp_path):
    from hf_loop import demo

    tokenizer = demo.train_tokenizer()
    demo.make_model(tokenizer, num_labels=2).save_pretrained(tmp_path / "pretrained")  # another head size
    tokenizer.save_pretrained(tmp_path / "pretrained")
    return tmp_path / "pretrained"


def test_max_length_beyond_the_models_positions(pretrained, tmp_path, capsys):
    argv = ["finetune", "--model", str(pretrained), "--num-rows", "60", "--max-length", "4096"]
    err = user_error(capsys, *argv, "--out-dir", str(tmp_path / "run"))
    assert (
        f"--max-length 4096 is longer than --model {pretrained} can read (512 positions). Fix: --max-length 512"
        in err
    )


@pytest.mark.parametrize(
    "argv, expected",
    [
        (["./nope"], "DATASET ./nope: no such file or folder"),
        (["demo", "--tokenizer", "./nope"], "--tokenizer ./nope: the path does not exist"),
        (["demo", "--num-workers", "-1"], "argument --num-workers: expected an integer >= 0, got '-1'"),
        (["demo", "--world-size", "0"], "argument --world-size: expected an integer >= 1, got '0'"),
    ],
)
def test_inspect_mistakes(argv, expected, capsys):
    err = user_error(capsys, "inspect", *argv)
    assert err.startswith("hf-loop inspect: error: ") and expected in err


def test_mistakes_answer_without_importing_torch_datasets_or_transformers():
    code = (
        "import sys; from hf_loop.cli import main; codes = [main(a) for a in "
        "(['finetune', '--model', './no_model'], ['finetune', '--max-tokens', '9'], ['inspect', './nope'])]; "
        "print(codes, sorted(m for m in ('torch', 'datasets', 'transformers') if m in sys.modules))"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=subprocess_env())
    assert proc.stdout.strip() == "[2, 2, 2] []", proc.stderr
    for help_argv in (["--help"], ["finetune", "--help"], ["inspect", "--help"]):
        code = (
            f"import sys; from hf_loop.cli import main\ntry: main({help_argv!r})\nexcept SystemExit as e: "
            "print(e.code, sorted(m for m in ('torch', 'datasets', 'transformers') if m in sys.modules))"
        )
        proc = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, env=subprocess_env()
        )
        assert proc.stdout.strip().endswith("0 []"), (help_argv, proc.stdout[-200:], proc.stderr)


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


def test_inspect_demo_measures_the_tokens_the_demo_model_reads(tmp_path, capsys):
    from hf_loop import demo

    assert main(["inspect", "demo", "--json", "--out", str(tmp_path)]) == 0
    report = json.loads(capsys.readouterr().out)
    ds, tokenizer = demo.make_dataset(4000), demo.train_tokenizer()
    lengths = [len(ids) for ids in tokenizer(ds["text"][:])["input_ids"]]
    assert report["source"] == "embedded demo (4000 rows, seed 0)" and report["unit"] == "tokens"
    assert report["lengths"]["count"] == 4000 and report["lengths"]["total"] == sum(lengths)
    assert [row["name"] for row in report["labels"]] == ["other", "sports", "finance"]


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
    err = user_error(capsys, "inspect", str(hub_folder), "--split", "dev")
    assert "hf-loop inspect: error:" in err and "available splits: ['train', 'test']" in err


def run_finetune(tmp_path, capsys, *extra: str) -> str:
    out = tmp_path / "run"
    argv = ["finetune", "--batch-size", "16", "--max-steps", "4", "--log-every", "2", "--threads", "1"]
    if "--dataset" not in extra:
        argv += ["--num-rows", "240"]
    assert main([*argv, "--out-dir", str(out), *extra]) == 0
    text = capsys.readouterr().out
    assert (out / "metrics.jsonl").is_file() and (out / "final").is_dir()
    return text


def test_finetune_weighted_sampler_end_to_end(tmp_path, capsys):
    text = run_finetune(tmp_path, capsys, "--sampler", "weighted")
    assert "sampler weighted" in text and "24 validation rows" in text
    assert "cpu: 1 intra-op thread (requested)" in text and torch.get_num_threads() == 1
    assert "checkpoints: every 10 steps in " in text  # the default: a tenth of the run, at least 10 steps
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


def test_finetune_float_labels_train_a_regression_head(tmp_path, capsys):
    import numpy as np

    rng = np.random.default_rng(0)
    words = rng.integers(0, 8, size=(200, 4))
    targets = (words == 0).sum(1).astype(float)  # the score counts one word: learnable from the text
    file = write_table(
        tmp_path / "scores.parquet", text=[" ".join(f"w{w}" for w in row) for row in words], score=targets
    )
    args = ["--dataset", str(file), "--label-column", "score", "--max-steps", "30"]
    text = run_finetune(tmp_path, capsys, *args)
    assert "label 'score' (float: regression, MSE loss, reported as RMSE and R^2)" in text
    rmse = float(re.search(r"eval RMSE\s+(\d\.\d+) on 20 examples", text).group(1))
    baseline = float(re.search(r"predicting the train mean [\d.]+: (\d\.\d+)\)", text).group(1))
    r2 = float(re.search(r"eval R\^2\s+(-?\d\.\d+)\s+eval loss \(MSE\) (\d\.\d+)", text).group(1))
    mse = float(re.search(r"eval loss \(MSE\) (\d\.\d+)", text).group(1))
    assert rmse == pytest.approx(mse**0.5, abs=2e-4)
    assert rmse < baseline and r2 > 0.5  # it learned what the mean does not know (R^2 0.86 when written)
    final = tmp_path / "run" / "final" / "config.json"
    config = json.loads(final.read_text())
    assert config["problem_type"] == "regression" and len(config["id2label"]) == 1  # one output


@pytest.mark.parametrize("sampler", ["length", "tokens"])
def test_finetune_streaming(sampler, hub_folder, tmp_path, capsys):
    text = run_finetune(tmp_path, capsys, "--dataset", str(hub_folder), "--streaming", "--sampler", sampler)
    assert "data: " in text and " - stream, " in text and "held out by a hash of 'text'" in text
    assert "shard plan, epoch 0: 1 rank(s)" in text and f"sampler {sampler}" in text
    if sampler == "tokens":
        assert re.search(r"sampler tokens \(max_tokens \d+\)", text)
    assert re.search(r"step\s+4/4\s+loss", text)


def test_finetune_string_labels_from_a_data_file(tmp_path, capsys):
    names = ["neg", "pos", "neutral"]
    file = write_table(
        tmp_path / "reviews.parquet",
        review=[f"w{i % 7} w{i % 11} w{i % 3}" for i in range(80)],
        sentiment=[names[i % 5 % 3] for i in range(80)],
    )
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


def test_finetune_pretrained_model_from_a_folder(pretrained, tmp_path, capsys):
    text = run_finetune(tmp_path, capsys, "--model", str(pretrained))
    assert f"model: {pretrained} - 125,123 parameters" in text and "lr 5e-05" in text


def test_stop_lines_name_the_checkpoint_and_exit_status():
    from hf_loop import TrainResult
    from hf_loop.cli import output
    from hf_loop.cli.finetune import Outcome

    result = TrainResult(steps=57, epochs=0, train_loss=None, last_loss=None, stop_reason="interrupted",
                         checkpoint=Path("runs/a/checkpoints/step-57"))  # fmt: skip
    outcome = Outcome(data=None, plan=None, result=result, eval={}, seconds=1.0, out_dir="runs/a")
    assert output.stop_line(outcome) == (
        "interrupted (Ctrl-C) at step 57: checkpoint written to runs/a/checkpoints/step-57; run the same "
        "command to continue"
    )
    assert output.STOPPED == {"interrupted": 130, "sigterm": 143}


def _finetune_on_rank(env, out_dir: str, *extra: str) -> str:
    import contextlib
    import io

    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        code = main(["finetune", "--num-rows", "200", "--batch-size", "8", "--max-steps", "3", "--log-every", "3",
                     "--sampler", "weighted", "--out-dir", out_dir, *extra])  # fmt: skip
    assert code == 0
    return printed.getvalue()


def test_finetune_runs_unchanged_on_two_processes(tmp_path):
    from distributed import run_distributed

    rank0, rank1 = run_distributed(_finetune_on_rank, 2, (str(tmp_path / "ddp"),), timeout=240)
    assert "batch 8 x 2 rank(s)" in rank0 and re.search(r"eval accuracy\s+\d\.\d+ on 20 examples", rank0)
    assert re.search(
        r"cpu: \d+ intra-op threads? \((OMP_NUM_THREADS|\d+ cores?, shared by 2 local ranks)", rank0
    )
    assert rank1 == ""  # only rank 0 prints
    assert (tmp_path / "ddp" / "metrics.jsonl").is_file() and (tmp_path / "ddp" / "final").is_dir()


def test_finetune_fsdp_on_two_processes(tmp_path):
    from distributed import run_distributed

    flags = ("--fsdp", "--activation-checkpointing")
    rank0, rank1 = run_distributed(_finetune_on_rank, 2, (str(tmp_path / "fsdp"), *flags), timeout=240)
    assert "BertForSequenceClassification, sharded over 2 rank(s) with FSDP2" in rank0 and rank1 == ""
    assert re.search(r"eval accuracy\s+\d\.\d+ on 20 examples", rank0)
    assert (tmp_path / "fsdp" / "final" / "config.json").is_file()  # gathered from both ranks


def test_activation_checkpointing_needs_fsdp(capsys):
    assert main(["finetune", "--activation-checkpointing"]) == 2
    err = capsys.readouterr().err
    assert (
        "--activation-checkpointing recomputes the blocks that --fsdp shards" in err
        and "Traceback" not in err
    )


# -- end to end, in a subprocess: signals and a closed stdout


def subprocess_env() -> dict[str, str]:
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
    return {**os.environ, "PYTHONPATH": path, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}


def start_demo(out_dir: Path) -> subprocess.Popen:
    argv = ["finetune", "--num-rows", "600", "--log-every", "1", "--threads", "1", "--out-dir", str(out_dir)]
    return subprocess.Popen([sys.executable, "-m", "hf_loop.cli", *argv], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=subprocess_env())  # fmt: skip


def signal_at_first_step(proc: subprocess.Popen, sig: int) -> tuple[str, str]:
    for line in proc.stdout:
        if line.startswith("step"):
            proc.send_signal(sig)
            break
    out, err = proc.communicate(timeout=120)
    return out, err


def test_sigterm_checkpoints_exits_143_and_the_same_command_continues(tmp_path):
    out, err = signal_at_first_step(start_demo(tmp_path / "run"), signal.SIGTERM)
    assert "Traceback" not in err and "done in" not in out
    stop = re.fullmatch(r"hf-loop finetune: stopped by SIGTERM at step (\d+): checkpoint written to (\S+); "
                        r"run the same command to continue\n", err)  # fmt: skip
    assert stop and Path(stop.group(2)).exists()
    proc = start_demo(tmp_path / "run")
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0 and f"(resumed from {stop.group(2)})" in out and "stop: completed" in out


def test_ctrl_c_checkpoints_exits_130_with_one_line_and_the_same_command_continues(tmp_path):
    proc = start_demo(tmp_path / "run")
    out, err = signal_at_first_step(proc, signal.SIGINT)
    assert proc.returncode == 130 and "Traceback" not in err and "done in" not in out
    stop = re.fullmatch(r"hf-loop finetune: interrupted \(Ctrl-C\) at step (\d+): checkpoint written to (\S+); "
                        r"run the same command to continue\n", err.split("\n", 1)[-1] if "press Ctrl-C" in err else err)  # fmt: skip
    assert (
        stop and Path(stop.group(2)).name == f"step-{int(stop.group(1)):08d}" and Path(stop.group(2)).exists()
    )
    proc = start_demo(tmp_path / "run")
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0 and f"(resumed from {stop.group(2)})" in out and "stop: completed" in out


def test_closed_stdout_never_stops_training(tmp_path):
    proc = start_demo(tmp_path / "run")
    assert proc.stdout.readline().startswith("data: ")
    proc.stdout.close()  # `hf-loop finetune | head -1`: the reader is gone
    err = proc.stderr.read()
    assert proc.wait(timeout=300) == 0 and "Traceback" not in err and "BrokenPipe" not in err
    assert (tmp_path / "run" / "final").is_dir() and (tmp_path / "run" / "metrics.jsonl").is_file()
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert max(r["step"] for r in records) == 34  # 540 train rows / 32 = 17 steps x 2 epochs: all of them
