"""One rank's part of a checkpoint being written: files hashed as they are written, and disk-full errors.

:class:`PendingCheckpoint` is what ``store.write`` hands to the caller's ``fill``. Every file goes through a
writer that updates a sha256 and a byte count on each ``write`` (``torch.save`` writes sequentially to it), so
the manifest's checksums cost no second read. A full disk (ENOSPC, EDQUOT) becomes a CheckpointError naming
``out_dir``, the bytes needed and the bytes free.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import itertools
import os
import shutil
from collections.abc import Iterator, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, BinaryIO

import torch

from hf_loop.checkpoint.layout import FileRecord, check_name, fsync_dir, step_of
from hf_loop.errors import CheckpointError

_DISK_FULL = (errno.ENOSPC, errno.EDQUOT)


_OVERLAP = 1 << 20  # buffers at least this large are hashed on a second thread while the I/O runs


class _Hasher:
    """A sha256 whose large updates run on a second thread, overlapping the caller's I/O on the same buffer.

    hashlib and file reads/writes release the GIL, so on two cores hashing costs about nothing on top of the
    I/O instead of a second pass after it. Updates stay in order: each one finishes before the next starts.
    """

    def __init__(self) -> None:
        self.digest = hashlib.sha256()
        self._pool: ThreadPoolExecutor | None = None

    def during(self, view: memoryview) -> Future | None:
        """Start hashing ``view`` (the caller keeps it alive and unchanged until ``done``); small ones inline."""
        if view.nbytes < _OVERLAP:
            self.digest.update(view)
            return None
        self._pool = self._pool or ThreadPoolExecutor(max_workers=1, thread_name_prefix="hf_loop-sha256")
        return self._pool.submit(self.digest.update, view)

    @staticmethod
    def done(update: Future | None) -> None:
        if update is not None:
            update.result()

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown()


class _HashingWriter:
    """A binary file that hashes (sha256) and counts the bytes as they are written: no second read."""

    def __init__(self, path: Path) -> None:
        self._file = open(path, "wb")  # noqa: SIM115 - closed by finish() or close()
        self._hash = _Hasher()
        self.size = 0
        self.failed_write = 0  # bytes of the write that raised (the disk-full report counts them)
        self.error: OSError | None = None  # what the file raised, even where torch.save wraps it

    def write(self, data: Any) -> int:
        view = memoryview(data).cast("B")
        update = self._hash.during(view)  # the buffer is only valid during this call: wait before returning
        try:
            self._file.write(view)
            if update is not None and not update.done():  # sha256 is slower than a write to the page cache:
                self._file.flush()  # while it catches up, the disk writes what we have (the final fsync
                _datasync(self._file.fileno())  # then finds little left to do)
        except OSError as exc:
            self.error, self.failed_write = exc, view.nbytes
            raise
        finally:
            self._hash.done(update)
        self.size += view.nbytes
        return view.nbytes

    def flush(self) -> None:
        self._file.flush()

    def writable(self) -> bool:
        return True

    def finish(self) -> str:
        """Flush, fsync and close; the sha256 of everything written."""
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        self._hash.close()
        return self._hash.digest.hexdigest()

    def close(self) -> None:
        self._hash.close()
        with contextlib.suppress(OSError):
            self._file.close()


class PendingCheckpoint:
    """This rank's part of a checkpoint being written; ``store.write`` hands it to ``fill``.

    Files go into ``folder`` (the temporary folder, renamed when every rank is done). Names are relative POSIX
    paths and may have subfolders (``"model/shard-0.pt"``); each name belongs to one rank. ``records`` maps
    the names this rank wrote to their :class:`FileRecord`.

    Example:
        >>> import tempfile
        >>> folder = Path(tempfile.mkdtemp())
        >>> pending = PendingCheckpoint(folder, step=1, rank=0, out_dir=folder)
        >>> pending.save("model.pt", {"w": torch.ones(2)})
        >>> with pending.open("notes/run.txt") as f:
        ...     f.write(b"lr=0.1")
        6
        >>> sorted(pending.records), pending.records["notes/run.txt"].size
        (['model.pt', 'notes/run.txt'], 6)
    """

    def __init__(self, folder: Path, *, step: int, rank: int, out_dir: Path) -> None:
        self.folder, self.step, self.rank, self.out_dir = folder, step, rank, out_dir
        self.records: dict[str, FileRecord] = {}
        self._folders = {folder}

    def save(self, name: str, obj: Any) -> None:
        """``torch.save(obj)`` into ``name``, hashed as it is written. Keep ``obj`` to tensors and plain values
        (dicts, lists, numbers, strings): reads use ``weights_only=True`` and refuse anything else."""
        with self._writing(name, expected=_tensor_bytes(obj)) as f, _no_crc32():
            torch.save(obj, f)

    def open(self, name: str) -> contextlib.AbstractContextManager[BinaryIO]:
        """A binary file to write ``name`` through, hashed as written: ``with pending.open("x.json") as f:``."""
        return self._writing(name, expected=0)

    def add(self, name: str) -> None:
        """Register a file, or every not yet registered file under a folder, that another library wrote into
        ``folder`` (e.g. torch Distributed Checkpoint into ``folder / "model"``).

        The one place a file is read back (once, to hash it). Register a folder several ranks wrote into (DCP)
        on one rank, after every writer finished.
        """
        path = self.folder / check_name(name)
        if path.is_file():
            self._claim(name)
            paths = [path]
        elif path.is_dir():
            paths = sorted(p for p in path.rglob("*") if p.is_file())
        else:
            raise ValueError(f"nothing named {name!r} in {self.folder}: write it there first, then add() it")
        for p in paths:
            if (rel := p.relative_to(self.folder).as_posix()) not in self.records:
                size, digest = hash_file(p, sync=True)
                self.records[rel] = FileRecord(size=size, sha256=digest, rank=self.rank)
                self._folders.add(p.parent)

    @contextlib.contextmanager
    def _writing(self, name: str, expected: int) -> Iterator[BinaryIO]:
        writer = None
        try:
            path = self._claim(name)
            writer = _HashingWriter(path)
            yield writer  # type: ignore[misc]
            digest = writer.finish()
        except BaseException as exc:
            if writer is not None:
                writer.close()
            full = _disk_full(exc, writer)
            if full is None:
                raise
            done = sum(r.size for r in self.records.values())
            needed = done + max(writer.size + writer.failed_write if writer else 0, expected)
            on_disk = done + (path.stat().st_size if writer else 0)  # a failed write may have written part
            what = f"{full.strerror} writing {name}"
            raise _disk_full_error(
                self.out_dir, self.step, what, _needs(needed, "on this rank"), on_disk
            ) from exc
        self.records[name] = FileRecord(size=writer.size, sha256=digest, rank=self.rank)
        self._folders.add(path.parent)

    def _claim(self, name: str) -> Path:
        if check_name(name) in self.records:
            raise ValueError(f"{name!r} is already part of this checkpoint: give each file its own name")
        path = self.folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        return path

    def sync_folders(self) -> None:
        """fsync every folder this rank created files in, deepest first."""
        for folder in sorted(self._folders, key=lambda p: len(p.parts), reverse=True):
            fsync_dir(folder)


_datasync = getattr(os, "fdatasync", os.fsync)  # macOS has no fdatasync


def _tensor_bytes(obj: Any) -> int:
    """Bytes of the distinct tensor storages in nested dicts, lists and tuples (about what torch.save writes)."""
    sizes: dict[int, int] = {}
    stack = [obj]
    while stack:
        item = stack.pop()
        if isinstance(item, torch.Tensor):
            storage = item.untyped_storage()
            sizes[storage.data_ptr()] = storage.nbytes()
        elif isinstance(item, Mapping):
            stack.extend(item.values())
        elif isinstance(item, (list, tuple)):
            stack.extend(item)
    return sum(sizes.values())


def _no_crc32() -> contextlib.AbstractContextManager[Any]:
    """torch.save without its per-record CRC32 (the file's sha256 already covers every byte; the CRC pass costs
    about a third of a save). torch.load reads such files as usual. The switch is torch's global serialization
    config, so a torch.save on another thread at the same moment also skips its CRC."""
    try:
        from torch.utils.serialization import config
    except ImportError:  # torch < 2.6 always writes the CRC
        return contextlib.nullcontext()
    return config.patch({"save.compute_crc32": False})


def hash_file(path: Path, *, sync: bool = False) -> tuple[int, str]:
    """(size, sha256 hex) of a file, read once in chunks of up to 8 MB, each hashed while the next one is read;
    ``sync``: fsync it too (a file just written)."""
    hasher, size, update = _Hasher(), 0, None
    try:
        with open(path, "rb", buffering=0) as f:
            chunk = max(1, min(1 << 23, os.fstat(f.fileno()).st_size))
            buffers = [memoryview(bytearray(chunk)), memoryview(bytearray(chunk))]
            for turn in itertools.count():
                buffer = buffers[turn % 2]  # read into one buffer while the other one is hashed
                count = f.readinto(buffer)
                hasher.done(update)
                update = hasher.during(buffer[:count]) if count else None
                if not count:
                    break
                size += count
            if sync:
                os.fsync(f.fileno())
    finally:
        hasher.done(update)
        hasher.close()
    return size, hasher.digest.hexdigest()


def _disk_full(exc: BaseException | None, writer: _HashingWriter | None) -> OSError | None:
    """The ENOSPC/EDQUOT error behind ``exc`` (torch.save may wrap what the file raised), or None."""
    if writer is not None and writer.error is not None and writer.error.errno in _DISK_FULL:
        return writer.error
    while exc is not None:
        if isinstance(exc, OSError) and exc.errno in _DISK_FULL:
            return exc
        exc = exc.__cause__ or exc.__context__
    return None


def _disk_full_error(out_dir: Path, step: int, what: str, needed: str, written: int) -> CheckpointError:
    """``needed``: a sentence on the bytes needed; ``written``: bytes of this checkpoint already on the disk,
    which come back when its unfinished folder is removed."""
    existing = next(p for p in (Path(out_dir), *Path(out_dir).absolute().parents) if p.exists())
    free = shutil.disk_usage(existing).free + written
    return CheckpointError(
        f"checkpoint step-{step:08d} could not be written: the disk holding {out_dir} is full ({what}). "
        f"{needed}{_human(free)} ({free} bytes) are free once its unfinished folder is removed. Earlier "
        "checkpoints are untouched: free some space, keep fewer checkpoints, or use an out_dir on a larger disk."
    )


def _needs(nbytes: int, where: str) -> str:
    return f"It needs at least {_human(nbytes)} ({nbytes} bytes) {where}; " if nbytes else ""


@contextlib.contextmanager
def disk_full_guard(final: Path, what: str, needed: int = 0, written: int = 0) -> Iterator[None]:
    """Turn ENOSPC/EDQUOT inside the block into a CheckpointError. ``needed``: bytes the whole checkpoint needs
    (every rank's files); ``written``: the part of them already in its folder."""
    try:
        yield
    except OSError as exc:
        if exc.errno not in _DISK_FULL:
            raise
        what = f"{exc.strerror} {what}"
        needs = _needs(needed, "for the files of every rank")
        raise _disk_full_error(final.parent.parent, step_of(final), what, needs, written) from exc


def _human(n: float) -> str:
    for unit in ("bytes", "KB", "MB", "GB"):
        if n < 1024:
            return f"{n:.0f} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TB"
