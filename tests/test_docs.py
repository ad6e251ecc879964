"""Every docstring example in hf_loop runs under doctest, for real, on tiny data built in-process.

Each module under ``hf_loop/`` is imported and its examples run with shared globals, so an example can be
written as a user would write it: ``hl``, ``torch``, ``np``, a tiny HF dataset (``ds``, ``hf_dataset``: text,
label and input_ids), a trained-in-process tokenizer (``tok``, ``tokenizer``) and its ``tokenize`` transform,
``data`` (an ``hl.MapDataset``), a tiny BERT classifier (``model``) with its ``optimizer``, loaders
(``loader``, ``eval_loader``, ``test_loader``), one padded ``batch``, a single-process ``env``, a ``stream`` over
``data/*.parquet``, and an ``out_dir``. Stateful objects are rebuilt (and the RNGs seeded) for every docstring.
Examples run in a workspace folder holding local stand-ins for the Hub names they use (tests/_local_hub.py);
whatever a docstring writes there is removed after it.

An example is skipped only when it needs what CI cannot have, and says so before its directive
(``# needs torchrun  # doctest: +SKIP``).
"""

from __future__ import annotations

import doctest
import importlib
import os
import pkgutil
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from _local_hub import build, token_dataset, tokenizer
from _train_script import tiny_bert

import hf_loop as hl
from hf_loop.state import RandomState

SKIP_REASONS = ("needs torchrun", "needs a GPU", "needs the Hub")
MIN_EXAMPLES = 260  # the count when this test was written; fewer means examples were lost or skipped


def _modules() -> list[str]:
    names = ["hf_loop"] + [m.name for m in pkgutil.walk_packages(hl.__path__, "hf_loop.")]
    return [name for name in names if not name.endswith("__main__")]  # that one runs the command line


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    import datasets

    root = build(tmp_path_factory.mktemp("workspace"))
    with pytest.MonkeyPatch.context() as patch:  # prepared Arrow files go to a temporary cache, not ~/.cache
        patch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path_factory.mktemp("datasets_cache")))
        yield root


@pytest.fixture(scope="module")
def constants(workspace):
    """The globals that no example can change: modules, the tokenizer, immutable datasets."""
    tok = tokenizer()

    def tokenize(batch):
        return {**tok(batch["text"], truncation=True), "label": batch["label"]}

    ds = token_dataset(32)
    return {"hl": hl, "torch": torch, "np": np, "tok": tok, "tokenizer": tok, "tokenize": tokenize,
            "ds": ds, "hf_dataset": ds}  # fmt: skip


def fresh_globals(constants: dict) -> dict:
    """The stateful globals, rebuilt for each docstring so no example sees another's training or position."""
    torch.manual_seed(0)
    np.random.seed(0)
    model = tiny_bert()
    data = hl.MapDataset(constants["ds"], columns=["input_ids", "label"])
    eval_loader = hl.make_loader(data, batch_size=8, sampler="sequential")
    parquet = hl.load("parquet", data_files="data/*.parquet", split="train", streaming=True)
    return {
        **constants,
        "data": data,
        "model": model,
        "optimizer": torch.optim.AdamW(model.parameters(), lr=1e-3),
        "loader": hl.make_loader(data, batch_size=8, seed=0),
        "eval_loader": eval_loader,
        "test_loader": hl.make_loader(data, batch_size=8, sampler="sequential"),
        "batch": next(iter(eval_loader)),
        "env": hl.DistEnv(),
        "stream": hl.StreamDataset(parquet),
        "out_dir": "runs/example",
    }


def _skip_reason(example: doctest.Example) -> str | None:
    """The reason written before a skipped example's directive, or None when it is not skipped."""
    if not example.options.get(doctest.SKIP):
        return None
    last = example.source.rstrip("\n").splitlines()[-1]
    found = re.search(r"#\s*([^#]*?)\s*#\s*doctest:", last)
    return found.group(1) if found else ""


def _docstrings(name: str) -> list[doctest.DocTest]:
    tests = doctest.DocTestFinder().find(importlib.import_module(name), name)
    return [test for test in tests if test.examples]


def _run(test: doctest.DocTest, globs: dict, workspace: Path, out: list[str]) -> doctest.TestResults:
    before = set(os.listdir(workspace))
    test.globs = {**test.globs, **globs}
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    try:
        return runner.run(test, out=out.append)
    finally:
        for entry in set(os.listdir(workspace)) - before:  # what the examples wrote
            path = workspace / entry
            shutil.rmtree(path) if path.is_dir() else path.unlink()


def test_every_docstring_example_runs(constants, workspace, monkeypatch):
    monkeypatch.chdir(workspace)
    rng = RandomState()
    saved = rng.state_dict()
    out: list[str] = []
    try:
        tests = [test for name in _modules() for test in _docstrings(name)]
        results = [_run(test, fresh_globals(constants), workspace, out) for test in tests]
    finally:
        rng.load_state_dict(saved)  # seeding the examples leaves the suite's RNGs as they were
    failed, attempted = sum(r.failed for r in results), sum(r.attempted for r in results)
    print(f"\n{attempted} docstring examples ran in {len(tests)} docstrings of {len(_modules())} modules")
    assert failed == 0, f"{failed} of {attempted} docstring examples failed:\n" + "".join(out)
    assert attempted >= MIN_EXAMPLES, f"only {attempted} examples ran (expected >= {MIN_EXAMPLES})"


def test_a_skipped_example_says_why():
    """``+SKIP`` only for what CI cannot have, named before the directive; everything else runs."""
    skipped = []
    for name in _modules():
        for test in _docstrings(name):
            for example in test.examples:
                reason = _skip_reason(example)
                if reason is not None:
                    skipped.append((test.name, reason))
    unexplained = [(where, reason) for where, reason in skipped if not reason.startswith(SKIP_REASONS)]
    assert not unexplained, f"skipped without a reason starting with one of {SKIP_REASONS}: {unexplained}"
    print(f"{len(skipped)} skipped: {skipped}")


def test_every_public_name_has_an_example():
    parser = doctest.DocTestParser()
    missing = [
        name
        for name in hl.__all__
        if name != "__version__" and not parser.get_examples(getattr(hl, name).__doc__ or "")
    ]
    assert not missing, f"public names without a docstring example: {missing}"
