"""atomic_write: the whole new file or the old one, never a partial file, with the permissions open() gives."""
import os
import stat

import pytest

from nnunet_smit.files import atomic_write, is_temporary


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
