"""Checkpoint folders: written atomically by every rank, checksummed while written, verified when read.

Every rank writes its files into a temporary folder; rank 0 then writes ``manifest.json`` (step, world size,
every file's size and sha256, the run's identity, library versions), fsyncs, and renames the folder to
``checkpoints/step-00000012``. A crash at any point (even ``kill -9``) leaves the earlier checkpoints and at
most an unfinished temporary folder. Reads check size and sha256 before unpickling with ``weights_only=True``,
and :func:`load_newest` falls back past damaged checkpoints. This layer knows nothing about models or loaders:
what goes into which file is the caller's business. The layout is in ``layout.py``, the lock in ``lock.py``.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import pickle
import shutil
from collections.abc import Callable, Iterable, Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any, NamedTuple

import torch

from hf_loop.checkpoint.layout import (
    ASIDE_PREFIX,
    MANIFEST,
    TEMP_PREFIX,
    Candidate,
    CorruptCheckpoint,
    FileRecord,
    Manifest,
    fsync_dir,
    inspect,
    plain_json,
    remove,
    scan,
    size_reason,
    step_folder,
    step_folders,
    step_of,
    unique_name,
    utc_now,
    versions,
)
from hf_loop.checkpoint.pending import PendingCheckpoint, disk_full_guard, hash_file
from hf_loop.dist import DistEnv, all_gather_object, broadcast_object
from hf_loop.errors import CheckpointError

logger = logging.getLogger("hf_loop")

LARGE = 1 << 20  # files at least this large are hashed while read, then mapped rather than read again


class Loaded(NamedTuple):
    """What :func:`load_newest` found: the folder, its manifest, and what ``read_fn`` returned."""

    folder: Path
    manifest: Manifest
    state: Any


class Begun(NamedTuple):
    """A checkpoint between :func:`begin` and :func:`publish`: its final folder, this rank's pending part,
    (on rank 0) the manifest to complete, and why this rank cannot write into it (None: it can)."""

    final: Path
    pending: PendingCheckpoint
    manifest: Manifest | None
    problem: CheckpointError | None


def write(
    out_dir: str | os.PathLike,
    step: int,
    env: DistEnv,
    fill: Callable[[PendingCheckpoint], Any],
    *,
    identity: Mapping[str, Any],
    extra: Mapping[str, Any] | None = None,
) -> Path:
    """Write one checkpoint folder atomically. Every rank calls it; ``fill(pending)`` writes this rank's files.

    Rank 0 picks the temporary folder; each rank fills it; the ranks agree; rank 0 checks that it sees every
    rank's files, writes the manifest, fsyncs and renames the folder to ``step_folder(out_dir, step)``. A folder
    already there (a rerun reaching the same step) is set aside first and deleted after, so a crash in between
    keeps one of the two. If any rank fails, every rank raises, the temporary folder is removed and nothing is
    renamed. Call :func:`prune` after it, not before. (:func:`begin` and :func:`publish` are its two halves, for
    files written in the background.)

    Args:
        identity: plain JSON values describing the run (what a resume must match); rank 0's is recorded.
        extra: plain JSON values stored in the manifest as they are (e.g. this checkpoint's eval metric).

    Raises:
        CheckpointError: the disk is full (naming out_dir, the bytes needed and free), or another rank failed.
        TypeError: identity or extra is not plain JSON.

    Example:
        >>> import tempfile
        >>> out = tempfile.mkdtemp()
        >>> folder = write(out, 3, DistEnv(), lambda p: p.save("model.pt", {"w": torch.ones(2)}), identity={})
        >>> folder.name, read(folder, "model.pt")
        ('step-00000003', {'w': tensor([1., 1.])})
    """
    begun = begin(out_dir, step, env, identity=identity, extra=extra)
    failure = begun.problem
    if failure is None:
        try:
            fill(begun.pending)
        except (
            BaseException
        ) as exc:  # every rank must reach the agreement in publish, or the others would hang
            failure = exc
    return publish(begun, env, failure)


def begin(
    out_dir: str | os.PathLike,
    step: int,
    env: DistEnv,
    *,
    identity: Mapping[str, Any],
    extra: Mapping[str, Any] | None = None,
) -> Begun:
    """The first half of :func:`write`: rank 0 creates the temporary folder every rank then writes into."""
    final = step_folder(out_dir, step)
    temp, manifest, problem, own = None, None, None, None
    if env.is_main:  # rank 0 picks the temporary name, so every rank writes into the same folder
        try:
            plain = {
                "identity": plain_json(identity, "identity"),
                "extra": plain_json(extra or {}, "extra"),
            }
            manifest = Manifest(step=step, world_size=env.world_size, files={}, **plain)
            temp = final.with_name(unique_name(TEMP_PREFIX, final.name))
            with disk_full_guard(final, "creating the checkpoint folder"):
                temp.mkdir(parents=True)
        except Exception as exc:
            problem, own = f"rank 0: {_describe(exc)}", exc
    temp_name, problem = broadcast_object((temp.name if temp else None, problem), env)
    if problem:
        raise own if own is not None else CheckpointError(f"{final.name} was not written: {problem}")
    pending = PendingCheckpoint(final.with_name(temp_name), step=step, rank=env.rank, out_dir=Path(out_dir))
    unseen = None
    if not pending.folder.is_dir():  # raised in publish, after the ranks agree (raising here would hang them)
        unseen = CheckpointError(
            f"rank {env.rank} cannot see {pending.folder}, created by rank 0: out_dir must be on a filesystem "
            "every rank shares"
        )
    return Begun(final, pending, manifest, unseen)


def publish(begun: Begun, env: DistEnv, failure: BaseException | None = None) -> Path:
    """The second half of :func:`write`, once every rank's files are in ``begun.pending.folder`` (``failure``:
    what went wrong on this rank meanwhile): the ranks agree, rank 0 writes the manifest and renames."""
    final, pending, manifest, _ = begun
    own = failure
    try:
        if own is None:
            pending.sync_folders()
    except BaseException as exc:  # every rank must reach the agreement below, or the others would hang
        own = exc
    gathered = all_gather_object((pending.records, None if own is None else _describe(own)), env)
    problem = _disagreement(gathered)
    if problem is None and env.is_main:
        try:
            files = {name: record for records, _ in gathered for name, record in records.items()}
            _check_visible(pending.folder, files)
            _publish(
                pending.folder, final, replace(manifest, files=files, versions=versions(), created=utc_now())
            )
        except Exception as exc:
            problem, own = f"rank 0: {_describe(exc)}", exc
    if problem and env.is_main:
        remove(pending.folder)
    problem = broadcast_object(problem, env)
    if problem:
        if own is not None:
            raise own
        raise CheckpointError(
            f"{final.name} was not written: {problem}. Nothing was renamed; earlier checkpoints are untouched."
        )
    return final


def candidates(out_dir: str | os.PathLike) -> list[Candidate]:
    """Checkpoints that look complete, newest step first: the manifest parses, every file has its size.

    Cheap (no hashing). A folder that fails is skipped with a warning naming it and the reason. Temporary
    folders and names other than ``step-<8 or more digits>`` are not checkpoints and are ignored.

    Example:
        >>> import tempfile
        >>> candidates(tempfile.mkdtemp())
        []
    """
    good, broken = scan(out_dir)
    for folder, reason in broken:
        logger.warning("skipping %s: %s", _shown(out_dir, folder), reason)
    return good


def read(
    folder: str | os.PathLike, name: str, *, manifest: Manifest | None = None, map_location: Any = "cpu"
) -> Any:
    """Check ``name``'s size and sha256 against the manifest, then unpickle it (weights_only).

    A small file is read once into memory, checked and unpickled from there. A large one is hashed in one read
    that overlaps hashing with reading, then mapped (``torch.load`` with ``weights_only=True, mmap=True``):
    its tensors are views of the file just verified (checkpoint files are never written again), so it is not
    read a second time.

    Raises:
        CorruptCheckpoint: missing manifest or file, wrong size or checksum, or a payload weights_only refuses.
        CheckpointError: the manifest does not list ``name`` (a file that was never written, not damage).
    """
    folder = Path(folder)
    manifest = manifest or Manifest.load(folder)
    record = manifest.files.get(name)
    if record is None:
        listed = sorted(manifest.files)
        raise CheckpointError(f"checkpoint {folder} has no file {name!r}; its manifest lists {listed}")
    large = record.size >= LARGE
    try:
        if large:
            size, digest = hash_file(folder / name)
        else:
            with open(folder / name, "rb") as f:
                data = f.read(record.size + 1)
            size, digest = len(data), hashlib.sha256(data).hexdigest()
    except FileNotFoundError:
        raise CorruptCheckpoint(folder, name, "missing") from None
    except OSError as exc:
        raise CorruptCheckpoint(folder, name, f"cannot be read ({exc.strerror})") from None
    _check(folder, name, record, size, digest)
    try:
        source = folder / name if large else io.BytesIO(data)
        return torch.load(source, map_location=map_location, weights_only=True, mmap=large)
    except pickle.UnpicklingError as exc:
        reason = "holds pickled objects other than tensors and plain values, refused by weights_only"
        raise CorruptCheckpoint(folder, name, f"{reason} ({_describe(exc)})") from None
    except Exception as exc:
        raise CorruptCheckpoint(folder, name, f"cannot be loaded ({_describe(exc)})") from None


def verify(
    folder: str | os.PathLike, names: str | Iterable[str] | None = None, *, manifest: Manifest | None = None
) -> Manifest:
    """Check size and sha256 of files that another library reads itself, e.g. a DCP folder before ``dcp.load``.

    Args:
        names: file names or folders (``"model"`` covers ``"model/__0_0.distcp"``); None checks every file.

    Raises:
        CorruptCheckpoint: the first file that is missing or differs from the manifest.
        CheckpointError: the manifest lists nothing under ``names``.

    Example:
        >>> import tempfile
        >>> folder = write(tempfile.mkdtemp(), 1, DistEnv(), lambda p: p.save("a/b.pt", 0), identity={})
        >>> sorted(verify(folder, "a").files)
        ['a/b.pt']
    """
    folder = Path(folder)
    manifest = manifest or Manifest.load(folder)
    wanted = [names] if isinstance(names, str) else names
    chosen = [
        name
        for name in sorted(manifest.files)
        if wanted is None or any(name == w or name.startswith(f"{w.rstrip('/')}/") for w in wanted)
    ]
    if wanted is not None and not chosen:
        raise CheckpointError(
            f"checkpoint {folder} has no file under {wanted}; it lists {sorted(manifest.files)}"
        )
    for name in chosen:
        try:
            size, digest = hash_file(folder / name)
        except FileNotFoundError:
            raise CorruptCheckpoint(folder, name, "missing") from None
        except OSError as exc:
            raise CorruptCheckpoint(folder, name, f"cannot be read ({exc.strerror})") from None
        _check(folder, name, manifest.files[name], size, digest)
    return manifest


def load_newest(
    out_dir: str | os.PathLike, env: DistEnv, read_fn: Callable[[Path, Manifest], Any]
) -> Loaded | None:
    """The newest checkpoint every rank can read, falling back past damaged ones; None if there is none.

    Rank 0 lists the candidates and broadcasts the list. For each, newest first, every rank calls
    ``read_fn(folder, manifest)``, which reads and verifies what this rank needs (with :func:`read`) and
    returns it without applying it to anything. If any rank raised CorruptCheckpoint, all ranks move to the
    previous candidate and rank 0 warns naming the folder and the reason. Any other error is raised on every
    rank (a bug or a refusal is not damage, and must not silently restart a run from scratch).

    Example:
        >>> import tempfile
        >>> out = tempfile.mkdtemp()
        >>> _ = write(out, 1, DistEnv(), lambda p: p.save("a.pt", torch.zeros(1)), identity={})
        >>> load_newest(out, DistEnv(), lambda folder, m: read(folder, "a.pt", manifest=m)).state
        tensor([0.])
    """
    listing, skipped = scan(out_dir) if env.is_main else ([], [])
    for candidate in broadcast_object(listing, env):
        state, problem, own = None, None, None
        try:
            state = read_fn(candidate.folder, candidate.manifest)
        except CorruptCheckpoint as exc:
            problem = ("corrupt", f"{exc.name}: {exc.reason}")
        except BaseException as exc:  # every rank must reach the agreement below
            problem, own = ("error", _describe(exc)), exc
        problems = all_gather_object(problem, env)
        failed = [f"rank {r}: {p[1]}" for r, p in enumerate(problems) if p and p[0] == "error"]
        if failed:
            _warn_skipped(env, out_dir, skipped, None)
            raise own or CheckpointError(f"reading {candidate.folder} failed on {'; '.join(failed)}")
        reasons = [p[1] + (f" (rank {r})" if r else "") for r, p in enumerate(problems) if p]
        if not reasons:
            _warn_skipped(env, out_dir, skipped, candidate.folder)
            return Loaded(candidate.folder, candidate.manifest, state)
        skipped.append((candidate.folder, "; ".join(dict.fromkeys(reasons))))
    _warn_skipped(env, out_dir, skipped, None)
    return None


def prune(
    out_dir: str | os.PathLike, keep_last: int, keep: Iterable[str | os.PathLike | None] = ()
) -> list[Path]:
    """Delete the step folders older than the newest ``keep_last``, sparing ``keep`` and the newest intact one.

    Call it on one process, after a new checkpoint is complete. "Intact" is the cheap check of
    :func:`candidates`; the folder just written was hashed as it was written. Returns the folders deleted.

    Example:
        >>> import tempfile
        >>> out = tempfile.mkdtemp()
        >>> for step in (1, 2, 3):
        ...     _ = write(out, step, DistEnv(), lambda p: None, identity={})
        >>> [p.name for p in prune(out, keep_last=1, keep=[step_folder(out, 1)])]
        ['step-00000002']
    """
    if isinstance(keep_last, bool) or not isinstance(keep_last, int) or keep_last < 1:
        raise ValueError(f"keep_last must be an int >= 1, got {keep_last!r}")
    spared = {Path(p).name for p in keep if p is not None}
    folders = step_folders(out_dir)
    newest = next((folder for step, folder in folders if _intact(folder, step)), None)
    doomed = [folder for _, folder in folders[keep_last:] if folder.name not in spared and folder != newest]
    for folder in doomed:
        remove(folder)
    return doomed


# --- helpers -------------------------------------------------------------------------------------------------


def _publish(temp: Path, final: Path, manifest: Manifest) -> None:
    """Manifest last, fsync, rename; an existing ``final`` is set aside first so a crash keeps one of the two."""
    text, written = manifest.to_json(), sum(r.size for r in manifest.files.values())
    with (
        disk_full_guard(final, f"writing {MANIFEST}", written + len(text), written),
        open(temp / MANIFEST, "w") as f,
    ):
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    fsync_dir(temp)
    aside = final.with_name(unique_name(ASIDE_PREFIX, final.name)) if final.exists() else None
    if aside:
        os.rename(final, aside)
    try:
        os.rename(temp, final)
    except OSError:
        if aside:
            os.rename(aside, final)
        raise
    fsync_dir(final.parent)
    if aside:
        shutil.rmtree(aside, ignore_errors=True)


def _disagreement(gathered: list[tuple[dict[str, FileRecord], str | None]]) -> str | None:
    """Why the ranks' results cannot form one checkpoint (every rank computes the same answer), or None."""
    problems = [f"rank {rank}: {error}" for rank, (_, error) in enumerate(gathered) if error]
    owners: dict[str, list[int]] = {}
    for rank, (records, _) in enumerate(gathered):
        for name in records:
            owners.setdefault(name, []).append(rank)
    problems += [
        f"{n!r} was written by ranks {r} (one rank per file)" for n, r in owners.items() if len(r) > 1
    ]
    return "; ".join(problems) or None


def _check_visible(folder: Path, files: Mapping[str, FileRecord]) -> None:
    for name, record in files.items():
        path = folder / name
        seen = f"{path.stat().st_size} bytes" if path.is_file() else "no such file"
        if seen != f"{record.size} bytes":
            raise CheckpointError(
                f"rank {record.rank} wrote {name} ({record.size} bytes) but rank 0 sees {seen} in {folder}: "
                "out_dir must be on a filesystem every rank shares"
            )


def _check(folder: Path, name: str, record: FileRecord, size: int, sha256: str) -> None:
    """Raise CorruptCheckpoint if the bytes read differ from the record (a wrong size is the clearer reason)."""
    if size != record.size:
        raise CorruptCheckpoint(folder, name, size_reason(size, record.size))
    if sha256 != record.sha256:
        raise CorruptCheckpoint(folder, name, "sha256 mismatch (the file changed after it was written)")


def _intact(folder: Path, step: int) -> bool:
    try:
        inspect(folder, step)
    except CorruptCheckpoint:
        return False
    return True


def _warn_skipped(env: DistEnv, out_dir: Any, skipped: list[tuple[Path, str]], resumed: Path | None) -> None:
    """Rank 0 warns about every damaged checkpoint newer than the one resumed (all of them if none was)."""
    if not env.is_main:
        return
    after = f"resuming from {resumed.name}" if resumed else "no older intact checkpoint"
    for folder, reason in sorted(skipped, key=lambda item: step_of(item[0]), reverse=True):
        if resumed is None or step_of(folder) > step_of(resumed):
            logger.warning("skipping %s: %s; %s", _shown(out_dir, folder), reason, after)


def _shown(out_dir: Any, folder: Path) -> str:
    return f"checkpoints/{folder.name}" if folder.parent == Path(out_dir) / "checkpoints" else str(folder)


def _describe(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0] if text else '(no message)'}"
