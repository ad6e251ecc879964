"""One live run per ``out_dir``: a lock file held with ``flock``, recording who holds it.

The holder also tidies ``checkpoints/``: only it may remove what dead writers left there, so a second run can
never delete the temporary folder of a live one.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import re
import socket
from pathlib import Path
from typing import Any

from hf_loop.checkpoint.layout import ASIDE_PREFIX, TEMP_PREFIX, remove, utc_now
from hf_loop.errors import CheckpointError

try:
    import fcntl
except ImportError:  # Windows: the record in the lock file decides alone
    fcntl = None

logger = logging.getLogger("hf_loop")

LOCK = "hf_loop.lock"
_ASIDE = re.compile(re.escape(ASIDE_PREFIX) + r"(step-\d{8,})-.*")


class OutDirLock:
    """Hold ``out_dir`` for this process; a context manager. Rank 0 takes it (the caller decides).

    The lock file (``out_dir/hf_loop.lock``) records pid, host and start time. A second live process is
    refused; a lock left by a dead process on this host is taken over with a warning; one left by a process on
    another host cannot be checked and is refused with the way to remove it. On entering, temporary folders of
    dead writers are removed and a checkpoint set aside by an unfinished replacement is restored.

    Raises (on enter):
        CheckpointError: naming the pid and host holding ``out_dir`` and the fix.

    Example:
        >>> import tempfile
        >>> with OutDirLock(tempfile.mkdtemp()) as lock:
        ...     lock.path.name
        'hf_loop.lock'
    """

    def __init__(self, out_dir: str | os.PathLike) -> None:
        self.out_dir = Path(out_dir)
        self.path = self.out_dir / LOCK
        self._fd: int | None = None

    def __enter__(self) -> OutDirLock:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            locked = _flock(fd)
            holder = _read_holder(fd)
            if locked is None:
                raise CheckpointError(f"{self.out_dir} is in use by {_who(holder)}: {_FIX}")
            if holder:
                self._take_over(holder, kernel_lock=locked)
            me = {"pid": os.getpid(), "host": socket.gethostname(), "started": utc_now()}
            os.ftruncate(fd, 0)
            os.pwrite(fd, json.dumps(me).encode(), 0)
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd
        try:
            clean_stale(self.out_dir / "checkpoints")
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc_info: Any) -> None:
        if self._fd is not None:
            os.ftruncate(self._fd, 0)  # an empty record: nobody holds it (closing releases the flock)
            os.close(self._fd)
            self._fd = None

    def _take_over(self, holder: dict, *, kernel_lock: bool) -> None:
        host = socket.gethostname()
        if holder.get("host") != host:
            raise CheckpointError(
                f"{self.out_dir} was locked by {_who(holder)}; this host ({host}) cannot check whether that "
                f"process still runs. If no run uses this out_dir any more, delete {self.path} and start again; "
                "otherwise wait for that run, or use another out_dir."
            )
        if not kernel_lock and _alive(holder.get("pid")):
            raise CheckpointError(f"{self.out_dir} is in use by {_who(holder)}: {_FIX}")
        logger.warning("%s: taking over the lock left by %s, which has ended", self.out_dir, _who(holder))


_FIX = "wait for that run to end, or give this one another out_dir"


def clean_stale(root: Path) -> None:
    """Remove unfinished temporary folders in ``checkpoints/`` and restore a set-aside checkpoint whose
    replacement never arrived. Only the lock holder calls this: no other live writer can be using them."""
    if not root.is_dir():
        return
    for entry in sorted(root.iterdir()):
        if (m := _ASIDE.fullmatch(entry.name)) and not (root / m.group(1)).exists():
            os.rename(entry, root / m.group(1))
            logger.warning("restored %s, set aside by a run that stopped while replacing it", m.group(1))
        elif entry.name.startswith((TEMP_PREFIX, ASIDE_PREFIX)):
            logger.info("removing %s, left unfinished by a run that stopped", entry)
            remove(entry)


def _flock(fd: int) -> bool | None:
    """True: locked; None: another process holds it; False: no kernel lock here (the record decides)."""
    if fcntl is None:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return None
    except OSError as exc:
        if exc.errno in (errno.ENOLCK, errno.EOPNOTSUPP, errno.EINVAL):
            return False
        raise
    return True


def _read_holder(fd: int) -> dict:
    """The JSON record in the lock file; {} when empty (released cleanly)."""
    try:
        holder = json.loads(os.pread(fd, 4096, 0) or b"{}")
    except ValueError:  # a holder killed while writing its record, on this host
        return {"pid": None, "host": socket.gethostname(), "started": "unknown (unreadable record)"}
    return holder if isinstance(holder, dict) else {}


def _who(holder: dict) -> str:
    if not holder:
        return "another process (which has not written its record yet)"
    if holder.get("pid") == os.getpid() and holder.get("host") == socket.gethostname():
        return f"this process (pid {os.getpid()}), which holds it already"
    return f"pid {holder.get('pid')} on host {holder.get('host')} (since {holder.get('started')})"


def _alive(pid: Any) -> bool:
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, owned by another user
        return True
    return True
