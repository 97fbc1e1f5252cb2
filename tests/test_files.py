"""atomic_write: the whole new file or the old one, never a partial file, with the permissions open() gives; FolderLock:
one holder at a time, and a dead holder never blocks the next one."""
import os
import signal
import socket
import stat
import subprocess
import sys
import threading
import time

import pytest

from nnunet_smit.files import FolderBusy, FolderLock, atomic_write, is_temporary


def test_the_file_is_replaced_whole_and_no_temporary_file_stays(tmp_path):
    target = tmp_path / "out" / "state.json"
    atomic_write(target, lambda tmp: open(tmp, "w").write("new"))
    assert target.read_text() == "new" and os.listdir(target.parent) == ["state.json"]


def test_a_failed_write_keeps_the_old_file_and_removes_the_temporary_one(tmp_path):
    target = tmp_path / "state.json"
    target.write_text("old")

    def fails_half_way(tmp):
        open(tmp, "w").write("par")
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError):
        atomic_write(target, fails_half_way)
    assert target.read_text() == "old" and os.listdir(tmp_path) == ["state.json"]


def test_the_file_has_the_permissions_of_a_plain_open(tmp_path):
    atomic_write(tmp_path / "a", lambda tmp: open(tmp, "w").write("x"))
    open(tmp_path / "b", "w").write("x")
    mode = stat.S_IMODE((tmp_path / "a").stat().st_mode)
    assert mode == stat.S_IMODE((tmp_path / "b").stat().st_mode) and mode & stat.S_IRUSR


def test_temporary_names_are_recognised():
    assert is_temporary(".checkpoint_latest.pt.k2j3h4.tmp") and not is_temporary("checkpoint_latest.pt")


HOLD = """
import sys, time
from nnunet_smit.files import FolderLock
lock = FolderLock(sys.argv[1], "the folder")
lock.acquire()
print("held", flush=True)
time.sleep(600)
"""


def _holder(path):
    """A process that holds the lock on ``path`` (started and holding when this returns)."""
    process = subprocess.Popen([sys.executable, "-c", HOLD, str(path)], stdout=subprocess.PIPE, text=True)
    assert process.stdout.readline().strip() == "held"
    return process


def test_a_live_holder_refuses_naming_its_host_and_pid(tmp_path):
    holder = _holder(tmp_path / ".lock")
    try:
        with pytest.raises(FolderBusy) as busy:
            FolderLock(tmp_path / ".lock", "the folder").acquire()
        assert str(busy.value).startswith(f"the folder is in use by pid {holder.pid} on host {socket.gethostname()}, "
                                          "since 20")
        assert busy.value.holder["pid"] == holder.pid
    finally:
        holder.kill()
        holder.wait()


def test_a_holder_killed_with_sigkill_is_taken_over_at_once(tmp_path):
    holder = _holder(tmp_path / ".lock")
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    lock = FolderLock(tmp_path / ".lock", "the folder")
    assert lock.acquire() and lock.held
    assert lock.previous["pid"] == holder.pid  # what the dead holder left, for the warning
    lock.release()
    assert (tmp_path / ".lock").read_text() == ""  # released: nothing left to take over
    again = FolderLock(tmp_path / ".lock", "the folder")
    assert again.acquire() and again.previous is None
    again.release()


def test_two_locks_in_one_process_exclude_each_other_and_a_waiter_gets_it_after_release(tmp_path):
    first = FolderLock(tmp_path / ".lock", "the folder")
    first.acquire()
    with pytest.raises(FolderBusy):
        FolderLock(tmp_path / ".lock", "the folder").acquire()
    waited = []
    second = FolderLock(tmp_path / ".lock", "the folder")
    thread = threading.Thread(target=lambda: second.acquire(wait=True, on_wait=waited.append))
    thread.start()
    time.sleep(0.3)
    assert thread.is_alive() and waited and waited[0]["pid"] == os.getpid()
    first.release()
    thread.join(10)
    assert second.held
    second.release()
