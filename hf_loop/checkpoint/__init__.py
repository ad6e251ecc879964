"""Training state on disk: atomic writes, safe loads, identity checks, and which files to keep.

A checkpoint is one ``torch.save`` file holding only tensors and plain Python values (numbers, strings, lists,
dicts), so it loads with ``torch.load(weights_only=True)``: a file that needs anything else is refused rather than
unpickled. Files are written to a temporary name, fsynced and renamed, so a crash mid-write (even ``kill -9``)
leaves the previous checkpoint intact and never a truncated one under a real name.
"""

from __future__ import annotations

import hashlib
import logging
import os
import pickle
import random
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

# Re-exports of the checkpoint-folder protocol (store.py with layout.py, pending.py, lock.py). Its own prune and
# FORMAT stay at hf_loop.checkpoint.store.prune / layout.FORMAT while this file defines single-file versions.
from hf_loop.checkpoint.layout import Candidate as Candidate
from hf_loop.checkpoint.layout import CorruptCheckpoint as CorruptCheckpoint
from hf_loop.checkpoint.layout import FileRecord as FileRecord
from hf_loop.checkpoint.layout import Manifest as Manifest
from hf_loop.checkpoint.layout import step_folder as step_folder
from hf_loop.checkpoint.lock import OutDirLock as OutDirLock
from hf_loop.checkpoint.pending import PendingCheckpoint as PendingCheckpoint
from hf_loop.checkpoint.store import Loaded as Loaded
from hf_loop.checkpoint.store import candidates as candidates
from hf_loop.checkpoint.store import load_newest as load_newest
from hf_loop.checkpoint.store import read as read
from hf_loop.checkpoint.store import verify as verify
from hf_loop.checkpoint.store import write as write
from hf_loop.dist import DistEnv, all_gather_object, barrier

logger = logging.getLogger("hf_loop")

FORMAT = 1
_NAME = re.compile(r"^step-(\d+)\.pt$")


def rng_state() -> dict[str, Any]:
    """Every global RNG this process draws from, as tensors and plain values (loadable with weights_only).

    Example:
        >>> state = rng_state(); _ = torch.rand(1); set_rng_state(state)   # the same draw happens again
    """
    _, keys, pos, has_gauss, cached = np.random.get_state()
    version, py_state, gauss_next = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        # numpy's legacy tuple holds a str and an ndarray; stored as a tensor and ints it survives weights_only.
        "numpy": {
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached),
        },
        "python": {"version": version, "state": list(py_state), "gauss_next": gauss_next},
    }


def set_rng_state(state: Mapping[str, Any]) -> None:
    """Restore what :func:`rng_state` captured."""
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])
    np_state = state["numpy"]
    np.random.set_state(
        (
            "MT19937",
            np_state["keys"].numpy().astype(np.uint32),
            np_state["pos"],
            np_state["has_gauss"],
            np_state["cached_gaussian"],
        )
    )
    py = state["python"]
    random.setstate((py["version"], tuple(py["state"]), py["gauss_next"]))


def model_identity(model: torch.nn.Module) -> dict[str, Any]:
    """Class, parameter count and a digest of parameter names and shapes: what must match to resume."""
    digest = hashlib.sha256()
    count = 0
    for name, tensor in model.state_dict().items():
        digest.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype};".encode())
        count += tensor.numel()
    return {"class": type(model).__name__, "numel": count, "digest": digest.hexdigest()[:16]}


def check_identity(saved: Mapping[str, Any], current: Mapping[str, Any], path: Path) -> None:
    """Refuse a checkpoint whose model or data identity differs, saying what differs and how to proceed.

    Raises:
        ValueError: listing every differing field with its saved and current value.
    """
    diffs = [
        f"{key}: checkpoint has {saved.get(key)!r}, this run has {current.get(key)!r}"
        for key in current
        if saved.get(key) != current.get(key)
    ]
    if diffs:
        raise ValueError(
            f"checkpoint {path} does not belong to this run: "
            + "; ".join(diffs)
            + ". Use a fresh out_dir for a different model or dataset, or delete the old checkpoints."
        )


def path_for(out_dir: Path, step: int) -> Path:
    return Path(out_dir) / "checkpoints" / f"step-{step:08d}.pt"


def save(state: Mapping[str, Any], path: Path) -> Path:
    """Write ``state`` to ``path`` atomically: temp file in the same folder, fsync, ``os.replace``, fsync folder.

    Example:
        >>> save({"step": 3, "model": model.state_dict()}, path_for(out_dir, 3))   # doctest: +SKIP
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".tmp-{path.name}-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            torch.save(dict(state), f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)  # atomic on POSIX: readers see the old file or the complete new one
    finally:
        if tmp.exists():
            tmp.unlink()
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)  # the rename itself must survive a power cut, not only the data
    finally:
        os.close(dir_fd)
    return path


def load(path: Path) -> dict[str, Any]:
    """Load a checkpoint with ``weights_only=True``.

    Raises:
        ValueError: the file holds a pickled object that is not a tensor or plain value (it is not unpickled),
            or is not an hf_loop
    """
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ValueError(
            f"refusing to load checkpoint {path}: it holds pickled objects other than tensors and plain values "
            f"({first}). hf_loop checkpoints load with weights_only=True; delete the file or point out_dir "
            "elsewhere if it did not come from hf_loop."
        ) from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise ValueError(
            f"{path} is not an hf_loop checkpoint (format {FORMAT}); found {type(state).__name__}"
        )
    return state


def list_checkpoints(out_dir: Path) -> list[Path]:
    """Complete checkpoints in ``out_dir``, oldest step first (temporary files are never listed)."""
    folder = Path(out_dir) / "checkpoints"
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := _NAME.match(p.name))]
    return [p for _, p in sorted(found)]


def latest(out_dir: Path | None) -> Path | None:
    """The newest complete checkpoint, or None."""
    if out_dir is None:
        return None
    found = list_checkpoints(out_dir)
    return found[-1] if found else None


def remove_stale_temporaries(out_dir: Path) -> None:
    """Delete temp files a killed writer left behind (they were never renamed, so never valid)."""
    folder = Path(out_dir) / "checkpoints"
    if folder.is_dir():
        for p in folder.glob(".tmp-*"):
            p.unlink(missing_ok=True)


def prune(out_dir: Path, keep_last: int, keep: Iterable[Path | None] = ()) -> None:
    """Delete all but the newest ``keep_last`` checkpoints, sparing ``keep`` (e.g. the best one)."""
    spared = {Path(p).name for p in keep if p is not None}
    for path in list_checkpoints(out_dir)[:-keep_last]:
        if path.name not in spared:
            path.unlink(missing_ok=True)


def strategy(state: Any) -> str:
    """The sampling strategy and its seed from a loader state, e.g. "map/RandomSampler(seed=0)".

    The DistributedSampler layer is left out on purpose: a run saved on 2 ranks may resume on 1 (elastic).
    """
    kinds: list[str] = []
    while isinstance(state, Mapping):
        if state.get("kind") not in (None, "DistributedSampler"):
            kinds.append(f"{state['kind']}" + (f"(seed={state['seed']})" if "seed" in state else ""))
        state = state.get("sampler", state.get("inner"))
    return "/".join(kinds)


def run_identity(model: torch.nn.Module, loader: Iterable) -> dict[str, Any]:
    """What a checkpoint must match to be resumed by this run: model, dataset size, sampling strategy."""
    model_id = model_identity(model)
    dataset = getattr(loader, "dataset", None)
    sized = hasattr(dataset, "__len__") and not isinstance(dataset, torch.utils.data.IterableDataset)
    size = len(dataset) if sized else None
    state = loader.state_dict() if hasattr(loader, "state_dict") else None
    return {
        "model": f"{model_id['class']} ({model_id['numel']} values, {model_id['digest']})",
        "dataset_size": size,
        "strategy": strategy(state),
    }


def restore(
    state: dict, *, raw, optimizer, scheduler, scaler, loader, config, env: DistEnv, path: Path
) -> None:
    """Load a checkpoint into this run's objects; map-style data may resume on a different world size.

    Each rank takes its own loader and RNG state when the world size is unchanged. Otherwise every rank takes
    rank 0's: map-style positions are global, so the same global order continues (the Loader warns when the
    global batch size changes); a stream's per-rank shard positions cannot be redistributed and are refused.
    """
    raw.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    if scheduler is not None and state["scheduler"] is not None:
        scheduler.load_state_dict(state["scheduler"])
    if scaler is not None and state["scaler"] is not None:
        scaler.load_state_dict(state["scaler"])
    same_world = state["world_size"] == env.world_size
    loader_state = state["loader"][env.rank if same_world else 0]
    if not same_world and loader_state.get("kind") == "stream":
        raise ValueError(
            f"checkpoint {path} was written by {state['world_size']} processes and this run has "
            f"{env.world_size}; a stream's shard positions cannot be redistributed. Resume with "
            f"--nproc_per_node={state['world_size']} (or the same world size)."
        )
    loader.load_state_dict(loader_state)
    set_rng_state(state["rng"][env.rank if same_world else 0])
    changed = {
        k: (v, config.fingerprint().get(k))
        for k, v in state["config"].items()
        if config.fingerprint().get(k) != v
    }
    if changed and env.is_main:
        logger.warning("resuming %s with changed settings (saved -> now): %s", path, changed)


def save_training(
    path: Path,
    *,
    raw,
    optimizer,
    scheduler,
    scaler,
    loader,
    config,
    env: DistEnv,
    progress: dict,
    consumed: int,
    identity: dict,
) -> Path:
    """Collect every rank's loader and RNG state; rank 0 writes the file; all ranks wait for it.

    ``consumed`` is the number of batches the loop took from the loader's current iteration up to this
    optimizer step, so batches staged or prefetched ahead of it are not counted as seen.
    """
    loader_states = all_gather_object(loader.state_dict(consumed=consumed), env)
    rng_states = all_gather_object(rng_state(), env)
    if env.is_main:
        save(
            {
                "format": FORMAT,
                **progress,
                "model": raw.state_dict(),
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict() if scheduler else None,
                "scaler": scaler.state_dict() if scaler else None,
                "loader": loader_states,
                "rng": rng_states,
                "identity": identity,
                "config": config.fingerprint(),
                "world_size": env.world_size,
            },
            path,
        )
        prune(config.out_dir, config.keep_last, keep=[progress["best_path"]])
    barrier(env)
    return path
