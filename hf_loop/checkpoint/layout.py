"""The on-disk layout of checkpoints: folder names, the manifest, and the cheap completeness check.

``out_dir/checkpoints/step-00000012/`` holds any number of files and ``manifest.json`` (written last). Names
starting with ``.tmp-`` are unfinished writes or deletions; ``.old-step-...`` is a complete checkpoint set aside
while a rerun replaces it. Neither is ever read as a checkpoint.
"""

from __future__ import annotations

import json
import os
import platform
import re
import secrets
import shutil
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path, PurePosixPath
from typing import Any, NamedTuple

import torch

from hf_loop.errors import CheckpointError

FORMAT = 1
MANIFEST = "manifest.json"
TEMP_PREFIX, ASIDE_PREFIX = ".tmp-", ".old-"
_STEP = re.compile(r"step-(\d{8,})")


def step_folder(out_dir: str | os.PathLike, step: int) -> Path:
    """The final folder of the checkpoint taken at ``step``.

    Example:
        >>> step_folder("run", 12).as_posix()
        'run/checkpoints/step-00000012'
    """
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise ValueError(f"step must be an int >= 0, got {step!r}")
    return Path(out_dir) / "checkpoints" / f"step-{step:08d}"


def step_of(folder: Path) -> int:
    """The step in a folder name made by :func:`step_folder`."""
    return int(_STEP.fullmatch(folder.name).group(1))


def unique_name(prefix: str, name: str) -> str:
    """A name no other writer picks: ``<prefix><name>-<pid>-<random hex>``."""
    return f"{prefix}{name}-{os.getpid()}-{secrets.token_hex(4)}"


class CorruptCheckpoint(CheckpointError):  # noqa: N818 - the name says what the checkpoint is
    """A checkpoint folder that cannot be trusted; the message names the folder, the file and the reason."""

    def __init__(self, folder: str | os.PathLike, name: str, reason: str) -> None:
        self.folder, self.name, self.reason = Path(folder), name, reason
        super().__init__(f"checkpoint {self.folder}: {name}: {reason}")

    def __reduce__(self):
        return type(self), (self.folder, self.name, self.reason)


@dataclass(frozen=True, kw_only=True)
class FileRecord:
    """One file of a checkpoint: its size in bytes, sha256 (hex) and the rank that wrote it."""

    size: int
    sha256: str
    rank: int


@dataclass(frozen=True, kw_only=True)
class Manifest:
    """What ``manifest.json`` records. It is written last, so its presence means the folder is complete.

    Example:
        >>> m = Manifest(step=3, world_size=1, files={}, identity={"run": "a"})
        >>> Manifest.parse(m.to_json()) == m
        True
    """

    format: int = FORMAT
    step: int
    world_size: int
    files: Mapping[str, FileRecord]
    identity: Mapping[str, Any]
    extra: Mapping[str, Any] = field(default_factory=dict)
    versions: Mapping[str, str] = field(
        default_factory=dict
    )  # hf_loop, torch, transformers, datasets, python
    created: str = ""  # ISO 8601, UTC

    def to_json(self) -> str:
        data = {k: getattr(self, k) for k in ("format", "step", "world_size", "created", "versions")}
        data |= {"identity": self.identity, "extra": self.extra}
        data["files"] = {name: vars(record) for name, record in sorted(self.files.items())}
        return json.dumps(data, indent=1) + "\n"

    @classmethod
    def parse(cls, text: str) -> Manifest:
        """Read a manifest from JSON text. Raises ValueError saying what is wrong with it."""
        data = json.loads(text)
        if not isinstance(data, dict):
            raise ValueError(f"holds a JSON {type(data).__name__}, not an object")
        if data.get("format") != FORMAT:
            raise ValueError(f"format {data.get('format')!r}; this hf_loop reads format {FORMAT}")
        try:
            return cls(
                step=int(data["step"]),
                world_size=int(data["world_size"]),
                files={check_name(n): FileRecord(**r) for n, r in data["files"].items()},
                identity=dict(data["identity"]),
                extra=dict(data["extra"]),
                versions=dict(data["versions"]),
                created=str(data["created"]),
            )
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise ValueError(f"malformed ({type(exc).__name__}: {exc})") from None

    @classmethod
    def load(cls, folder: str | os.PathLike) -> Manifest:
        """Read ``folder/manifest.json``. Raises CorruptCheckpoint when it is missing or malformed."""
        try:
            return cls.parse((Path(folder) / MANIFEST).read_text())
        except FileNotFoundError:
            reason = "missing (the folder was not completed by hf_loop)"
            raise CorruptCheckpoint(folder, MANIFEST, reason) from None
        except (OSError, UnicodeDecodeError, ValueError) as exc:
            raise CorruptCheckpoint(folder, MANIFEST, str(exc)) from None


class Candidate(NamedTuple):
    """A checkpoint folder that passed the cheap check, with its manifest."""

    folder: Path
    manifest: Manifest


def check_name(name: str) -> str:
    """``name`` if it is a usable file name inside a checkpoint (relative POSIX path), else ValueError."""
    parts = name.split("/") if isinstance(name, str) else []
    if not name or PurePosixPath(name).is_absolute() or "\\" in name or {"", ".", ".."} & set(parts):
        raise ValueError(
            f"a checkpoint file name must be a relative path like 'model.pt' or 'model/0.pt', got {name!r}"
        )
    if name == MANIFEST:
        raise ValueError(f"{MANIFEST!r} is written by hf_loop itself: choose another name")
    return name


def step_folders(out_dir: str | os.PathLike) -> list[tuple[int, Path]]:
    """Folders named exactly as :func:`step_folder` names them, newest step first."""
    root = Path(out_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _STEP.fullmatch(p.name)) and p.is_dir()]
    return sorted(((s, p) for s, p in found if step_folder(out_dir, s).name == p.name), reverse=True)


def inspect(folder: Path, step: int) -> Manifest:
    """The manifest, if it parses and every file it lists has its recorded size (no hashing).

    Raises:
        CorruptCheckpoint: naming the first problem found.
    """
    manifest = Manifest.load(folder)
    if manifest.step != step:
        reason = f"records step {manifest.step}, the folder name says {step}"
        raise CorruptCheckpoint(folder, MANIFEST, reason)
    for name, record in manifest.files.items():
        try:
            size = (folder / name).stat().st_size
        except OSError:
            raise CorruptCheckpoint(folder, name, "missing") from None
        if size != record.size:
            raise CorruptCheckpoint(folder, name, size_reason(size, record.size))
    return manifest


def scan(out_dir: str | os.PathLike) -> tuple[list[Candidate], list[tuple[Path, str]]]:
    """(checkpoints that pass :func:`inspect`, (folder, reason) for those that do not), newest step first."""
    good, broken = [], []
    for step, folder in step_folders(out_dir):
        try:
            good.append(Candidate(folder, inspect(folder, step)))
        except CorruptCheckpoint as exc:
            broken.append((folder, f"{exc.name}: {exc.reason}"))
    return good, broken


def size_reason(size: int, expected: int) -> str:
    if size == 0:
        return f"empty (the manifest says {expected} bytes)"
    if size < expected:
        return f"truncated: {size} bytes, the manifest says {expected}"
    return f"{size} bytes, the manifest says {expected} (the file changed after it was written)"


def remove(path: Path) -> None:
    """Delete a file or folder; a final-named folder is first renamed to a ``.tmp-`` name, so a crash halfway
    leaves something the next run cleans up, never a half-deleted checkpoint under its final name."""
    if path.is_dir() and not path.name.startswith((TEMP_PREFIX, ASIDE_PREFIX)):
        hidden = path.with_name(unique_name(f"{TEMP_PREFIX}deleting-", path.name))
        os.rename(path, hidden)
        path = hidden
    if path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def utc_now() -> str:
    """The time now, ISO 8601 in UTC to the second (the manifest's ``created``, the lock's ``started``)."""
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def fsync_dir(path: Path) -> None:
    """Make the entries of a folder (new files, renames) durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def plain_json(value: Any, what: str) -> dict[str, Any]:
    """``value`` when it is a dict of plain JSON values that reads back unchanged (what a manifest can hold)."""
    if not isinstance(value, Mapping):
        raise TypeError(f"{what} must be a dict of plain JSON values, got {type(value).__name__}")
    try:
        back = json.loads(json.dumps(value, allow_nan=False))
    except (TypeError, ValueError) as exc:
        raise TypeError(
            f"{what} must hold plain JSON values (str, int, float, bool, None, lists, dicts with str keys): {exc}"
        ) from None
    if back != value:
        raise TypeError(
            f"{what} must read back from JSON unchanged, but {dict(value)!r} reads back as {back!r}: use lists "
            "instead of tuples, and str keys"
        )
    return back


def versions() -> dict[str, str]:
    """The versions a manifest records: hf_loop, transformers, datasets, torch, python."""

    def version(dist: str) -> str:
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            return "not installed"

    found = {
        name: version(dist)
        for name, dist in [("hf_loop", "hf-loop"), ("transformers",) * 2, ("datasets",) * 2]
    }
    return {**found, "torch": torch.__version__, "python": platform.python_version()}
