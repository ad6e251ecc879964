"""What a checkpoint must match to be resumed: the model, the data and the optimizer of this run.

Identity catches real mistakes — another dataset of the same size, another pretrained model of the same
architecture, another optimizer class — and never blocks a real resume: a model re-created from scratch the same
way, or the same data re-created the same way, has the same identity. Everything here is plain JSON values.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from hf_loop.errors import CheckpointError
from hf_loop.fsdp import model_class

PARTS = ("model", "data", "optimizer")


def model_identity(model: torch.nn.Module) -> dict[str, Any]:
    """Class, parameter count, a digest of parameter names and shapes, and where pretrained weights came from.

    Shapes are global, so a model sharded with FSDP2 has the identity of the same model on one process.

    ``source`` is the transformers config's ``name_or_path`` (empty for a model built from a config), so two
    pretrained models of the same architecture differ, while a from-scratch model re-created the same way does not.

    Example:
        >>> identity = model_identity(torch.nn.Linear(2, 3))
        >>> identity["class"], identity["parameters"], identity["source"]
        ('Linear', 9, '')
    """
    digest = hashlib.sha256()
    count = 0
    for name, tensor in model.state_dict().items():
        shape = tuple(getattr(tensor, "shape", ()))
        digest.update(f"{name}:{shape}:{tensor.dtype};".encode())
        count += tensor.numel()
    config = getattr(model, "config", None)
    return {
        "class": model_class(model).__name__,
        "parameters": count,
        "shapes": digest.hexdigest()[:16],
        "source": str(getattr(config, "name_or_path", "") or ""),
    }


def data_identity(loader: Any) -> dict[str, Any]:
    """The loader's ``data_identity()`` (an ``hl.Loader``: the dataset's content fingerprint, rows, columns and
    sampling strategy, or a stream's files and sizes); for any other loader, the dataset's size only."""
    if hasattr(loader, "data_identity"):
        return dict(loader.data_identity())
    dataset = getattr(loader, "dataset", None)
    sized = hasattr(dataset, "__len__") and not isinstance(dataset, torch.utils.data.IterableDataset)
    return {"rows": len(dataset) if sized else None}


def run_identity(model: torch.nn.Module, loader: Any, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """The identity a checkpoint of this run records and a resume compares: model, data and optimizer."""
    return {
        "model": model_identity(model),
        "data": data_identity(loader),
        "optimizer": {"class": type(optimizer).__name__, "groups": len(optimizer.param_groups)},
    }


def _differences(saved: Any, current: Any, prefix: str) -> Iterable[str]:
    if isinstance(saved, Mapping) and isinstance(current, Mapping):
        for key in current:
            yield from _differences(saved.get(key), current[key], f"{prefix}.{key}")
    elif saved != current:
        yield f"{prefix}: checkpoint has {saved!r}, this run has {current!r}"


def check_identity(
    saved: Mapping[str, Any], current: Mapping[str, Any], path: Path, *, allow: Sequence[str] = ()
) -> None:
    """Refuse a checkpoint of another run, naming every difference and the fix.

    Args:
        allow: identity parts ("model", "data", "optimizer") that may differ, from
            ``TrainConfig(resume_allow=...)``.

    Raises:
        CheckpointError: some part outside ``allow`` differs.
    """
    diffs = [
        d for part in PARTS if part not in allow for d in _differences(saved.get(part), current[part], part)
    ]
    if diffs:
        parts = sorted({d.split(".")[0] for d in diffs})
        raise CheckpointError(
            f"checkpoint {path} belongs to another run: " + "; ".join(diffs) + ". Use another out_dir for a "
            "new run (or delete its checkpoints), or, if this change is intended, resume anyway with "
            f"TrainConfig(resume_allow={tuple(parts)!r})."
        )
