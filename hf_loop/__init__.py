"""hf_loop: Hugging Face datasets to PyTorch training, fast and exact.

Everything public is importable from the top level::

    import hf_loop as hl

    ds = hl.load("org/name", split="train")
    loader = hl.make_loader(hl.MapDataset(ds, transform=tokenize), batch_size=32, sampler="length")
"""

from hf_loop.adapters import to_torch
from hf_loop.collate import PackCollator, PadCollator
from hf_loop.config import TrainConfig, TrainResult
from hf_loop.data import Columns, MapDataset
from hf_loop.dist import DistEnv, even_steps, init_distributed, shutdown_distributed
from hf_loop.errors import CheckpointError, DataError
from hf_loop.evaluation import count_parameters, evaluate, predict
from hf_loop.fsdp import shard
from hf_loop.hub import load
from hf_loop.loader import Loader, make_loader
from hf_loop.loop import train
from hf_loop.report import plot_run
from hf_loop.samplers import (
    DistributedSampler,
    LengthGroupedSampler,
    RandomSampler,
    SequentialSampler,
    SubsetSampler,
    TokenBudgetBatchSampler,
    WeightedSampler,
    class_weights,
)
from hf_loop.stream import StreamDataset

__version__ = "0.1.0"

__all__ = [
    "CheckpointError",
    "Columns",
    "DataError",
    "DistEnv",
    "DistributedSampler",
    "LengthGroupedSampler",
    "Loader",
    "MapDataset",
    "PackCollator",
    "PadCollator",
    "RandomSampler",
    "SequentialSampler",
    "StreamDataset",
    "SubsetSampler",
    "TokenBudgetBatchSampler",
    "TrainConfig",
    "TrainResult",
    "WeightedSampler",
    "__version__",
    "class_weights",
    "count_parameters",
    "even_steps",
    "evaluate",
    "init_distributed",
    "load",
    "make_loader",
    "plot_run",
    "predict",
    "shard",
    "shutdown_distributed",
    "to_torch",
    "train",
]
