"""hf_loop: Hugging Face datasets to PyTorch training, fast and exact.

Everything public is importable from the top level:

    >>> import hf_loop as hl
    >>> ds = hl.load("org/name", split="train")
    >>> loader = hl.make_loader(hl.MapDataset(ds, transform=tokenize), batch_size=32, sampler="length")
    >>> next(iter(loader))["input_ids"].shape[0]
    32

Names are resolved on first use (PEP 562): ``import hf_loop`` itself imports neither torch nor datasets, so
``hf-loop --help`` and the command line's argument checks answer in a fraction of a second.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

__version__ = "0.1.0"

# public name -> the module that defines it
_EXPORTS = {
    "PackCollator": "collate",
    "PadCollator": "collate",
    "TrainConfig": "config",
    "TrainResult": "config",
    "Columns": "data",
    "MapDataset": "data",
    "to_torch": "adapters",
    "DistEnv": "dist",
    "even_steps": "dist",
    "init_distributed": "dist",
    "shutdown_distributed": "dist",
    "CheckpointError": "errors",
    "DataError": "errors",
    "count_parameters": "evaluation",
    "evaluate": "evaluation",
    "predict": "evaluation",
    "shard": "fsdp",
    "load": "hub",
    "Loader": "loader",
    "make_loader": "loader",
    "train": "loop",
    "plot_run": "report",
    "DistributedSampler": "samplers",
    "LengthGroupedSampler": "samplers",
    "RandomSampler": "samplers",
    "SequentialSampler": "samplers",
    "SubsetSampler": "samplers",
    "TokenBudgetBatchSampler": "samplers",
    "WeightedSampler": "samplers",
    "class_weights": "samplers",
    "StreamDataset": "stream",
}
# modules reached as attributes: hl.threads.choose(...), hl.demo.make_dataset(...)
_SUBMODULES = ("demo", "report", "threads")

__all__ = sorted(_EXPORTS) + ["__version__"]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        value = getattr(import_module(f"hf_loop.{_EXPORTS[name]}"), name)
    elif name in _SUBMODULES:
        value = import_module(f"hf_loop.{name}")
    else:
        raise AttributeError(f"module 'hf_loop' has no attribute {name!r}")
    globals()[name] = value  # later lookups are plain attribute reads
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS) | set(_SUBMODULES))
