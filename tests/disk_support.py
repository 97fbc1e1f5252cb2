"""A real full disk for tests: a small tmpfs mounted on a test's folder (root only; the test is skipped elsewhere)."""
from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
from pathlib import Path
from typing import Iterator

import pytest


class SmallDisk:
    """A tmpfs of a few MiB mounted on ``path``, which can be grown, shrunk and filled."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def resize(self, size_bytes: int) -> None:
        """Give the file system ``size_bytes`` (rounded up to pages); shrinking below what it holds fails."""
        _mount(["-o", f"remount,size={size_bytes}", self.path])

    def free_bytes(self) -> int:
        stat = os.statvfs(self.path)
        return stat.f_bavail * stat.f_frsize

    def fill(self, leave_bytes: int = 0) -> Path:
        """Write a ballast file that leaves about ``leave_bytes`` free; returns it (delete it to free the space)."""
        ballast = self.path / "ballast"
        with open(ballast, "ab") as handle:
            handle.write(bytes(max(0, self.free_bytes() - leave_bytes)))
        return ballast


def _mount(args: list) -> None:
    subprocess.run(["mount", *map(str, args)], check=True, capture_output=True, timeout=30)


@contextlib.contextmanager
def small_disk(path: Path, size_bytes: int) -> Iterator[SmallDisk]:
    """Mount a tmpfs of ``size_bytes`` on ``path`` (created) for the block; skips the test where mounting is not
    permitted (not root, a container without CAP_SYS_ADMIN, no ``mount``)."""
    path.mkdir(parents=True, exist_ok=True)
    if shutil.which("mount") is None or os.geteuid() != 0:
        pytest.skip("a full disk is simulated with a tmpfs, which needs root and the mount command")
    try:
        _mount(["-t", "tmpfs", "-o", f"size={size_bytes}", "tmpfs", path])
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as error:
        pytest.skip(f"cannot mount a tmpfs here ({error})")
    try:
        yield SmallDisk(path)
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True, timeout=30)
