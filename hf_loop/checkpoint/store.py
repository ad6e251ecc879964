"""TEMPORARY minimal store (replaced by the store branch): step folders + manifest, same API."""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import shutil
import uuid
from pathlib import Path
from typing import Any

import torch

from hf_loop.dist import DistEnv, all_gather_object, all_reduce, barrier, broadcast_object
from hf_loop.errors import CheckpointError

logger = logging.getLogger("hf_loop")
FORMAT = 2


class CorruptCheckpoint(CheckpointError):
    pass


def step_folder(out_dir, step: int) -> Path:
    return Path(out_dir) / "checkpoints" / f"step-{step:08d}"


class PendingCheckpoint:
    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.files: dict[str, dict[str, Any]] = {}

    def add(self, name: str) -> None:
        data = (self.folder / name).read_bytes()
        self.files[name] = {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}

    def save(self, name: str, obj: Any) -> None:
        buffer = io.BytesIO()
        torch.save(obj, buffer)
        data = buffer.getvalue()
        with open(self.folder / name, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        self.files[name] = {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def write(out_dir, step: int, env: DistEnv, fill, *, identity: dict, extra: dict | None = None) -> Path:
    parent = Path(out_dir) / "checkpoints"
    name = broadcast_object(f".tmp-step-{step:08d}-{os.getpid()}-{uuid.uuid4().hex[:8]}", env)
    temp = parent / name
    if env.is_main:
        temp.mkdir(parents=True)
    barrier(env)
    pending = PendingCheckpoint(temp)
    fill(pending)
    records = all_gather_object(pending.files, env)
    final = step_folder(out_dir, step)
    if env.is_main:
        files = {k: v for r in records for k, v in r.items()}
        manifest = {"format": FORMAT, "step": step, "world_size": env.world_size, "files": files,
                    "identity": identity, "extra": extra or {}}  # fmt: skip
        (temp / "manifest.json").write_text(json.dumps(manifest))
        if final.exists():
            shutil.rmtree(final)
        os.replace(temp, final)
    barrier(env)
    return final


def candidates(out_dir) -> list[Path]:
    parent = Path(out_dir) / "checkpoints"
    if not parent.is_dir():
        return []
    found = [p for p in parent.iterdir() if p.name.startswith("step-") and (p / "manifest.json").exists()]
    return sorted(found, key=lambda p: int(p.name.split("-")[1]), reverse=True)


def manifest_of(folder: Path) -> dict:
    return json.loads((folder / "manifest.json").read_text())


def read(folder: Path, name: str) -> Any:
    manifest = manifest_of(folder)
    data = (folder / name).read_bytes()
    record = manifest["files"].get(name)
    if record is None or len(data) != record["size"] or hashlib.sha256(data).hexdigest() != record["sha256"]:
        raise CorruptCheckpoint(f"{folder}: {name} does not verify")
    return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)


def verify(folder: Path, name: str) -> None:
    manifest = manifest_of(folder)
    data = (folder / name).read_bytes()
    record = manifest["files"].get(name)
    if record is None or len(data) != record["size"] or hashlib.sha256(data).hexdigest() != record["sha256"]:
        raise CorruptCheckpoint(f"{folder}: {name} does not verify")


def load_newest(out_dir, env: DistEnv, read_fn):
    folders = broadcast_object([str(p) for p in candidates(out_dir)] if out_dir is not None else [], env)
    for folder in map(Path, folders):
        try:
            manifest = manifest_of(folder)
            result, ok = read_fn(folder, manifest), 1
        except CheckpointError as error:
            result, ok, reason = None, 0, str(error)
        if int(all_reduce(ok, env, op="min")):
            return folder, manifest, result
        if env.is_main:
            logger.warning("skipping %s: %s", folder, reason if not ok else "another rank could not read it")
    return None


def prune(out_dir, keep_last: int, keep=()) -> None:
    spared = {Path(p).name for p in keep if p is not None}
    for folder in candidates(out_dir)[keep_last:]:
        if folder.name not in spared:
            shutil.rmtree(folder, ignore_errors=True)


class OutDirLock:
    def __init__(self, out_dir) -> None:
        self.out_dir = out_dir

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        return None
