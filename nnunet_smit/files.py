"""Files that survive a crash: writes a reader never sees half-done, and locks a dead process cannot keep.

Every writer of the project (checkpoints, the preprocessed cache, logs' summaries, study reports) goes through
:func:`atomic_write`; one process at a time per run folder or cache build through :class:`FolderLock`. A write that
fails because the disk is full is told apart from a broken file (:func:`is_out_of_space`), and a JSON file a user
may have edited or truncated is read by :func:`read_json`, which says in one line what is wrong with it.
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

    Raises:
        OSError: with ``errno.ENOSPC`` when the disk is full, also where the library writing (torch, blosc2) raised
            its own RuntimeError, which does not say why (:func:`is_out_of_space` tells while the partial file is
            still there); any other error of ``write`` as it was raised.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=TEMPORARY_SUFFIX, dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~_UMASK)  # mkstemp makes 0600: give the file the permissions open() would
    finally:
        os.close(fd)
    try:
        try:
            write(tmp)
        except Exception as error:
            if not isinstance(error, OSError) and is_out_of_space(error, path.parent):
                raise out_of_space_error(path) from error
            raise
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


# ---------------------------------------------------------------------------------------------- a full disk

_OUT_OF_SPACE_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
# torch.save and blosc2 report a failed write as a RuntimeError that does not say why: "[enforce fail at
# inline_container.cc:672] . unexpected pos 576 vs 534", "PytorchStreamWriter failed writing file data/0: file write
# failed", "Error while creating the NDArray". A write of this size into the folder tells whether the disk is full.
_PROBE_BYTES = 1 << 20


def is_out_of_space(error: BaseException, folder: Optional[PathLike] = None) -> bool:
    """Whether ``error`` means that the disk (or the user's quota) is full.

    True for an ``OSError`` with ``ENOSPC`` or ``EDQUOT`` anywhere in the chain of causes, and for an error whose
    message carries those errors' text ("No space left on device", "Disk quota exceeded"). A library's own error
    that names no cause (torch's and blosc2's, see above) counts when ``folder`` is given and a probe write of 1 MiB
    into it fails with ENOSPC or EDQUOT: call this before removing the partial file the failed write left, since
    removing it frees the space again.
    """
    seen = error
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno in _OUT_OF_SPACE_ERRNOS:
            return True
        if any(os.strerror(code) in str(seen) for code in _OUT_OF_SPACE_ERRNOS):
            return True
        seen = seen.__cause__ or seen.__context__
    if folder is None or isinstance(error, OSError):
        return False
    return not _has_room(Path(folder))


def _has_room(folder: Path) -> bool:
    """Whether 1 MiB more fits in ``folder`` (written, flushed and removed); True when the probe fails otherwise."""
    try:
        fd, probe = tempfile.mkstemp(prefix=".space-probe.", suffix=TEMPORARY_SUFFIX, dir=folder)
    except OSError as error:
        return error.errno not in _OUT_OF_SPACE_ERRNOS
    try:
        os.write(fd, bytes(_PROBE_BYTES))
        os.fsync(fd)
    except OSError as error:
        return error.errno not in _OUT_OF_SPACE_ERRNOS
    finally:
        os.close(fd)
        os.remove(probe)
    return True


def out_of_space_error(path: PathLike) -> OSError:
    """The ``OSError`` (ENOSPC, "No space left on device") of a write to ``path`` that found the disk full."""
    return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), os.fspath(path))


def out_of_space_message(folder: PathLike, kept: str, rerun: str) -> str:
    """One line for work stopped by a full disk: where, what is kept, what to do.

    Example: ``out_of_space_message(cache, "the 12 scans cached so far are kept", "the same command to cache the
    other 3")`` gives "no space left on the device of CACHE; the 12 scans cached so far are kept. Free space there
    and rerun the same command to cache the other 3."
    """
    return f"no space left on the device of {folder}; {kept}. Free space there and rerun {rerun}."


# ---------------------------------------------------------------------------------------------- JSON a user may edit

_JSON_TYPE_NAMES = {dict: "an object", list: "an array", str: "a string", int: "a number", float: "a number",
                    bool: "true or false", type(None): "null"}


def json_type_name(value: Any) -> str:
    """What a parsed JSON value is, in JSON's words: "an object", "an array", "a number", ..."""
    return _JSON_TYPE_NAMES.get(type(value), type(value).__name__)


def read_json(path: PathLike, what: str, expected: type = dict, remedy: str = "fix or delete it") -> Any:
    """The JSON value in ``path``, which must be of type ``expected`` (``dict``: an object, ``list``: an array).

    Args:
        what: what the file is, for the message ("the nnU-Net plans", "the splits file").
        remedy: what to do about a bad file, the end of the message ("rerun nnUNetv2_plan_and_preprocess -d 3").

    Raises:
        SMITError: one line naming ``what`` and ``path`` for a missing or unreadable file, a file that is not UTF-8
            text (binary, damaged), that is empty, truncated or otherwise not JSON (with the line and column), or whose
            top-level value is of another type.
    """
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise SMITError(f"{what} {path} does not exist; {remedy}.") from None
    except OSError as error:
        raise SMITError(f"{what} {path} cannot be read ({error.strerror or error}); {remedy}.") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as error:
        raise SMITError(f"{what} {path} is not text (byte {error.start} is not UTF-8: a binary or damaged file); "
                        f"{remedy}.") from None
    if not text.strip():
        raise SMITError(f"{what} {path} is empty (an interrupted write?); {remedy}.")
    try:
        value = json.loads(text)
    except json.JSONDecodeError as error:
        raise SMITError(f"{what} {path} is not valid JSON ({error.msg} at line {error.lineno}, column {error.colno}: "
                        f"a truncated or hand-edited file?); {remedy}.") from None
    if not isinstance(value, expected) or (expected is not bool and isinstance(value, bool)):
        wanted = _JSON_TYPE_NAMES.get(expected, expected.__name__)
        raise SMITError(f"{what} {path} holds {json_type_name(value)} where {wanted} is expected; {remedy}.")
    return value


# ---------------------------------------------------------------------------------------------- locks

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
