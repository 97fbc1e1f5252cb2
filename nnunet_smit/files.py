"""Files that survive a crash: writes a reader never sees half-done, and locks a dead process cannot keep.

Every writer of the project (checkpoints, the preprocessed cache, logs' summaries, study reports) goes through
:func:`atomic_write`; one process at a time per run folder or cache build through :class:`FolderLock`.
"""
from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import socket
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Union

from nnunet_smit.errors import SMITError

logger = logging.getLogger(__name__)

PathLike = Union[str, os.PathLike]

def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# Read once, at import (setting and restoring it later could race with other threads creating files).
_UMASK = _current_umask()

# Temporary files are named ``.<name>.<random>.tmp`` beside their target.
TEMPORARY_SUFFIX = ".tmp"


def is_temporary(name: str) -> bool:
    """Whether a file name is one of :func:`atomic_write`'s temporary files (left behind only by a killed run)."""
    return name.startswith(".") and name.endswith(TEMPORARY_SUFFIX)


def remove_temporary_files(*folders: PathLike, also: Optional[Callable[[str], bool]] = None) -> List[Path]:
    """Delete the temporary files a killed :func:`atomic_write` left in ``folders`` (not below them), and files whose
    name ``also`` accepts (an earlier version's temporary names); returns them.

    Only for a process that holds the folder (its :class:`FolderLock`): another writer's file in progress would go.
    """
    removed: List[Path] = []
    for folder in map(Path, folders):
        if folder.is_dir():
            for path in folder.iterdir():
                if (is_temporary(path.name) or (also is not None and also(path.name))) and path.is_file():
                    path.unlink(missing_ok=True)
                    removed.append(path)
    return removed


def atomic_write(path: PathLike, write: Callable[[str], None]) -> None:
    """Call ``write(tmp)`` on a temporary file beside ``path``, flush it to disk, then rename it onto ``path``.

    The file's data is flushed (fsync) before the rename and the folder's entry after it, so that after a crash or
    a power loss ``path`` holds either the old file or the complete new one, never a partial file.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=TEMPORARY_SUFFIX, dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~_UMASK)  # mkstemp makes 0600: give the file the permissions open() would
    finally:
        os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
        _fsync_folder(path.parent)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _fsync_folder(folder: Path) -> None:
    """Flush a folder's entries (the rename) to disk; file systems that cannot (some network mounts) are skipped."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


class FolderBusy(SMITError):
    """Another live process holds the lock; ``holder`` says which (host, pid, since, what)."""

    def __init__(self, message: str, holder: Dict[str, Any]) -> None:
        super().__init__(message)
        self.holder = holder


def describe_holder(holder: Dict[str, Any]) -> str:
    """"pid 123 on host node7, since 2026-11-30 07:31:02 UTC" from a lock file's record."""
    since = holder.get("since")
    when = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(since)) if isinstance(since, (int, float)) else "?"
    return f"pid {holder.get('pid', '?')} on host {holder.get('host', '?')}, since {when}"


class FolderLock:
    """An exclusive lock held by one process at a time, kept as an OS file lock (``flock``) on ``path``.

    The rule for a holder that died: the kernel drops an ``flock`` when its process ends for any reason (``kill -9``
    included), so the next process takes the lock at once; the record a dead holder left in the file (host, pid,
    start) is reported as taken over. On NFS (v4, or v3 with lockd) Linux turns ``flock`` into a lock the server
    keeps, shared by every node: a node that is lost without releasing it holds it until the server's lease for that
    node expires (NFSv4: 90 s by default). A file system that cannot lock at all (``ENOLCK``, ``EOPNOTSUPP``) gets a
    warning and no lock: the caller's one-run rule is then not enforced there.

    The file is never deleted (deleting a lock file lets two processes hold locks on two different files); releasing
    empties it.
    """

    def __init__(self, path: PathLike, what: str) -> None:
        self.path = Path(path)
        self.what = what
        self._fd: Optional[int] = None
        self.previous: Optional[Dict[str, Any]] = None  # what a holder that died without releasing left

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self, wait: bool = False, on_wait: Optional[Callable[[Dict[str, Any]], None]] = None) -> bool:
        """Take the lock; returns False where the file system cannot lock (warned once).

        Raises:
            FolderBusy: ``wait`` is False and a live process holds it.
        """
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _read_holder(fd)
                if not wait:
                    raise FolderBusy(f"{self.what} is in use by {describe_holder(holder)}", holder) from None
                if on_wait is not None:
                    on_wait(holder)
                fcntl.flock(fd, fcntl.LOCK_EX)
        except OSError as error:
            os.close(fd)
            if error.errno in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                logger.warning("the file system of %s cannot lock files (%s): nothing stops a second process from "
                               "using %s at the same time.", self.path, error.strerror, self.what)
                return False
            raise
        except BaseException:
            os.close(fd)
            raise
        left = _read_holder(fd)
        self.previous = left or None
        record = {"host": socket.gethostname(), "pid": os.getpid(), "since": round(time.time(), 3)}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(record).encode(), 0)
        os.fsync(fd)
        self._fd = fd
        return True

    def release(self) -> None:
        """Empty the file and drop the lock (a no-op when not held)."""
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        try:
            os.ftruncate(fd, 0)
        finally:
            os.close(fd)  # closing drops the flock

    def __enter__(self) -> "FolderLock":
        self.acquire()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.release()


def _read_holder(fd: int) -> Dict[str, Any]:
    try:
        data = os.pread(fd, 4096, 0)
        holder = json.loads(data.decode()) if data.strip() else {}
    except (OSError, ValueError):
        return {}
    return holder if isinstance(holder, dict) else {}
