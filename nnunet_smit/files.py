"""Writing files so that a reader, or a run killed half-way, never sees a partial one.

Every writer of the project (checkpoints, the preprocessed cache, logs' summaries, study reports) goes through
:func:`atomic_write`.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Callable, Union

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
