"""atomic_write: the whole new file or the old one, never a partial file, with the permissions open() gives, and a full
disk reported as one (also where torch or blosc2 do not say so); FolderLock: one holder at a time, and a dead holder
never blocks the next one; read_json: one line for every way a JSON file can be broken."""
import errno
import json
import os
import signal
import socket
import stat
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
import torch

from nnunet_smit import files
from nnunet_smit.errors import SMITError
from nnunet_smit.files import (FolderBusy, FolderLock, atomic_write, is_out_of_space, is_temporary,
                               out_of_space_message, read_json)
from tests.disk_support import small_disk


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


# ------------------------------------------------------------------------------------------------ a full disk

TORCH_FULL_DISK = "[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534"  # as torch 2.x says it
BLOSC2_FULL_DISK = "Error while creating the NDArray"


def test_a_full_disk_is_known_by_errno_by_message_and_through_causes(tmp_path):
    assert is_out_of_space(OSError(errno.ENOSPC, "No space left on device"))
    assert is_out_of_space(OSError(errno.EDQUOT, "Disk quota exceeded"))
    assert is_out_of_space(RuntimeError("PytorchStreamWriter failed: No space left on device"))
    try:
        try:
            raise OSError(errno.ENOSPC, "No space left on device")
        except OSError as cause:
            raise RuntimeError("file write failed") from cause
    except RuntimeError as chained:
        assert is_out_of_space(chained)
    assert not is_out_of_space(OSError(errno.EACCES, "Permission denied"), tmp_path)
    # torch's and blosc2's own errors name no cause: with room left in the folder they are something else
    assert not is_out_of_space(RuntimeError(TORCH_FULL_DISK))
    assert not is_out_of_space(RuntimeError(TORCH_FULL_DISK), tmp_path)
    assert os.listdir(tmp_path) == []  # the probe leaves nothing
    assert out_of_space_message("/cache", "the 2 scans cached so far are kept", "the same command") == (
        "no space left on the device of /cache; the 2 scans cached so far are kept. Free space there and rerun the "
        "same command.")


@pytest.mark.parametrize("message", [TORCH_FULL_DISK, BLOSC2_FULL_DISK])
def test_a_library_error_on_a_full_disk_becomes_enospc_and_the_old_file_stays(tmp_path, monkeypatch, message):
    """Without root (no tmpfs): the library's error as it raises it, and a disk on which 1 MiB no longer fits."""
    target = tmp_path / "checkpoint_latest.pt"
    target.write_text("old")

    def fails_like_the_library(tmp):
        open(tmp, "wb").write(b"partial")
        raise RuntimeError(message)

    monkeypatch.setattr(files, "_has_room", lambda folder: False)
    with pytest.raises(OSError) as failed:
        atomic_write(target, fails_like_the_library)
    assert failed.value.errno == errno.ENOSPC and failed.value.filename == str(target)
    assert str(failed.value.__cause__) == message
    assert target.read_text() == "old" and os.listdir(tmp_path) == ["checkpoint_latest.pt"]
    monkeypatch.setattr(files, "_has_room", lambda folder: True)
    with pytest.raises(RuntimeError, match="unexpected pos|NDArray"):  # room left: the library's error as it was
        atomic_write(target, fails_like_the_library)


def test_torch_and_blosc2_filling_a_real_disk_raise_enospc_and_keep_the_old_file(tmp_path):
    import blosc2

    with small_disk(tmp_path / "disk", 2 << 20) as disk:
        target = disk.path / "state.pt"
        atomic_write(target, lambda tmp: torch.save({"step": 1}, tmp))
        noise = np.random.default_rng(0).standard_normal(1 << 20).astype(np.float32)  # 4 MiB, incompressible
        writers = {"torch": lambda tmp: torch.save({"step": 2, "weights": torch.from_numpy(noise)}, tmp),
                   "blosc2": lambda tmp: blosc2.asarray(noise, urlpath=tmp, mode="w")}
        for name, write in writers.items():
            with pytest.raises(OSError) as failed:
                atomic_write(target, write)
            assert failed.value.errno == errno.ENOSPC, name
            assert torch.load(target, weights_only=True) == {"step": 1}
            assert sorted(os.listdir(disk.path)) == ["state.pt"]


# ------------------------------------------------------------------------------------------------ read_json

@pytest.mark.parametrize("content, expected, says", [
    (None, dict, "does not exist"),
    (b"", dict, "is empty (an interrupted write?)"),
    (b'{"configurations": {"3d_fullres": ', dict, "is not valid JSON (Expecting value at line 1, column 35: a "
                                                   "truncated or hand-edited file?)"),
    (b"\x89PNG\r\n\x1a\n\x00\x00", dict, "is not text (byte 0 is not UTF-8: a binary or damaged file)"),
    (b"[1, 2, 3]", dict, "holds an array where an object is expected"),
    (b'{"a": 1}', list, "holds an object where an array is expected"),
    (b"true", dict, "holds true or false where an object is expected"),
])
def test_a_broken_json_file_is_one_line_naming_it_and_what_to_do(tmp_path, content, expected, says):
    path = tmp_path / "plans.json"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(SMITError) as failed:
        read_json(path, "the nnU-Net plans", expected, remedy="run nnUNetv2_plan_and_preprocess -d 3")
    assert str(failed.value) == f"the nnU-Net plans {path} {says}; run nnUNetv2_plan_and_preprocess -d 3."


def test_a_good_json_file_is_read_as_it_is(tmp_path):
    (tmp_path / "a.json").write_text(json.dumps({"plans_name": "nnUNetPlans", "é": [1]}), encoding="utf-8")
    assert read_json(tmp_path / "a.json", "the plans") == {"plans_name": "nnUNetPlans", "é": [1]}
    (tmp_path / "b.json").write_text("[]")
    assert read_json(tmp_path / "b.json", "the splits", list) == []
