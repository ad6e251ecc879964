"""hf_loop: Hugging Face datasets to PyTorch training, fast and exact.

Everything public is importable from the top level::

    import hf_loop as hl
    ds = hl.load("org/name", split="train")
"""

from importlib import import_module

__version__ = "0.1.0"

# name -> module. Resolved on first access (PEP 562) while the package is being built out in parallel.
_EXPORTS = {
    "load": "hub", "DataError": "hub",
    "MapDataset": "data", "Columns": "data", "to_torch": "data", "INDEX_KEY": "data",
    "StreamDataset": "stream",
    "PadCollator": "collate", "PackCollator": "collate",
    "SequentialSampler": "samplers", "RandomSampler": "samplers", "WeightedSampler": "samplers",
    "SubsetSampler": "samplers", "LengthGroupedSampler": "samplers", "TokenBudgetBatchSampler": "samplers",
    "DistributedSampler": "samplers", "class_weights": "samplers",
    "make_loader": "loader", "Loader": "loader",
    "DistEnv": "dist", "init_distributed": "dist", "shutdown_distributed": "dist", "even_steps": "dist",
    "TrainConfig": "loop", "TrainResult": "loop", "train": "loop", "evaluate": "loop", "predict": "loop",
    "count_parameters": "loop", "plot_run": "report",
}

__all__ = sorted(_EXPORTS) + ["__version__"]


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(import_module(f"hf_loop.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module 'hf_loop' has no attribute {name!r}")
