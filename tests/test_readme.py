"""README.md runs as written: every ```python block, in order, in one namespace, on local data.

The blocks run in a folder holding local stand-ins for the Hub names they use (tests/_local_hub.py:
``stanfordnlp/imdb``, ``org/corpus``, ``bert-base-uncased``, ``org/model``, ...): datasets and transformers read a
local folder of that name first, so the text is never edited. Blocks written for ``torchrun`` run as one process
(``hl.init_distributed()`` gives world size 1 and ``hl.shard`` leaves the model as it is). Shell blocks do not
run, but every ``hf-loop`` flag they (and the command line section's prose) mention must exist.
"""

from __future__ import annotations

import re
import traceback
from pathlib import Path
from typing import NamedTuple

import pytest
from _local_hub import build

from hf_loop.state import RandomState

README = Path(__file__).resolve().parent.parent / "README.md"
COMMANDS = ("finetune", "inspect")
FLAG = re.compile(r"--[a-z][a-z0-9-]*")


class Block(NamedTuple):
    section: str
    language: str
    line: int  # the README line of the block's first code line
    code: str


def blocks(text: str) -> list[Block]:
    """Every fenced block of ``text`` with its language and the ``## `` section it sits in."""
    out, section, fence = [], "(top)", None
    for number, line in enumerate(text.splitlines(), start=1):
        if fence is None and line.startswith("## "):
            section = line[3:].strip()
        elif fence is None and line.startswith("```"):
            fence, start, body = line[3:].strip(), number + 1, []
        elif fence is not None and line.startswith("```"):
            out.append(Block(section, fence, start, "\n".join(body)))
            fence = None
        elif fence is not None:
            body.append(line)
    assert fence is None, "README.md has an unclosed ``` block"
    return out


def run_block(block: Block, namespace: dict) -> str | None:
    """Execute ``block``; returns None, or the traceback (which names the README line that failed)."""
    code = compile("\n" * (block.line - 1) + block.code, str(README), "exec")
    try:
        exec(code, namespace)
    except Exception:
        return traceback.format_exc()
    return None


def test_every_python_block_runs_in_order(tmp_path, monkeypatch):
    import datasets

    workspace = build(tmp_path / "workspace")
    monkeypatch.chdir(workspace)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "datasets_cache"))
    python = [b for b in blocks(README.read_text()) if b.language == "python"]
    assert len(python) >= 10, f"found only {len(python)} python blocks in README.md"
    namespace: dict = {"__name__": "__readme__"}
    rng = RandomState()
    saved = rng.state_dict()
    try:
        for block in python:
            failure = run_block(block, namespace)
            if failure is not None:
                pytest.fail(f"README.md section {block.section!r}, block at line {block.line}:\n{failure}")
    finally:
        _reset_accelerate()
        rng.load_state_dict(saved)  # the Trainer seeds the global RNGs; the suite's stay as they were
    # what the blocks promise, checked where they leave it
    assert namespace["result"].stop_reason == "completed" and namespace["result"].steps > 0
    assert (workspace / "runs" / "imdb" / "checkpoints").is_dir()
    assert (workspace / "runs" / "big" / "final" / "config.json").is_file()  # the causal LM, exported
    assert namespace["predictions"].shape == (len(namespace["test"]),)


def _reset_accelerate() -> None:
    """The accelerate and Trainer blocks leave accelerate's process-wide state set; later tests start clean."""
    from accelerate.state import AcceleratorState, GradientState, PartialState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    PartialState._reset_state()


def _help(command: str, capsys) -> str:
    from hf_loop.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    return capsys.readouterr().out


def mentioned_flags(text: str) -> dict[str, set[str]]:
    """command -> the ``--flags`` written after ``hf-loop COMMAND`` (or ``-m hf_loop.cli COMMAND``) in the shell
    blocks and inline code, and (for either command) in the prose of the command line section."""
    found: dict[str, set[str]] = {command: set() for command in COMMANDS}
    invocation = re.compile(rf"(?:hf-loop|-m hf_loop\.cli) ({'|'.join(COMMANDS)})\b(.*)")
    lines = [b.code.replace("\\\n", " ") for b in blocks(text) if b.language == "bash"]
    lines += re.findall(r"`(hf-loop [^`]+)`", text)
    for line in "\n".join(lines).splitlines():
        for command, rest in invocation.findall(line):
            found[command] |= set(FLAG.findall(rest))
    section = text.split("\n## The command line", 1)[1].split("\n## ", 1)[0]
    prose = re.sub(r"```.*?```", "", section, flags=re.DOTALL)
    found["either"] = set(FLAG.findall(" ".join(re.findall(r"`([^`]+)`", prose))))
    return found


def test_every_cli_flag_the_readme_mentions_exists(capsys):
    flags = mentioned_flags(README.read_text())
    helps = {command: _help(command, capsys) for command in COMMANDS}
    known = {command: set(FLAG.findall(text)) for command, text in helps.items()}
    missing = [(command, flag) for command in COMMANDS for flag in sorted(flags[command] - known[command])]
    missing += [("any", flag) for flag in sorted(flags["either"] - known["finetune"] - known["inspect"])]
    assert not missing, f"README.md mentions flags the parser does not have: {missing}"
    assert len(flags["finetune"]) >= 10 and len(flags["inspect"]) >= 3  # the extraction found the commands
