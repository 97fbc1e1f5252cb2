"""The disk fills while pretraining writes its state or its export: one line, the previous file whole, and the rerun
goes on. The disk is a real tmpfs filled up just before the write, so torch.save fails as it does on a full disk (a
RuntimeError that does not say why); skipped where a tmpfs cannot be mounted (the errors themselves are covered without
root in tests/test_files.py)."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from nnunet_smit.errors import SMITError
from nnunet_smit.pretraining.state import CHECKPOINT_NAME
from nnunet_smit.pretraining.trainer import PretrainTrainer
from tests.disk_support import small_disk
from tests.pretraining.training_support import phantom_cache, tiny_config


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return phantom_cache(tmp_path_factory)


def test_a_full_disk_while_saving_the_state_or_the_export_is_one_line_and_the_reruns_go_on(cache, tmp_path,
                                                                                          monkeypatch):
    config = tiny_config(max_steps=4, checkpoint_every_steps=2)
    save = torch.save
    with small_disk(tmp_path / "disk", 256 << 20) as disk:  # a state of the tiny preset is about 85 MB
        out = disk.path / "run"
        ballast = []

        def fill_the_disk_before(name_part: str, skip: int):
            """torch.save that fills the disk just before its ``skip + 1``-th write of a file named ``name_part``."""
            writes = []

            def saving(obj, path, *args, **kwargs):
                if name_part in Path(path).name:
                    writes.append(path)
                    if len(writes) == skip + 1:
                        ballast.append(disk.fill(leave_bytes=64 << 10))
                return save(obj, path, *args, **kwargs)

            return saving

        monkeypatch.setattr(torch, "save", fill_the_disk_before(CHECKPOINT_NAME, skip=1))
        with pytest.raises(SMITError) as failed:
            PretrainTrainer(config, cache, out).fit()
        assert str(failed.value) == (
            f"could not write {out / CHECKPOINT_NAME} at step 4 (No space left on device); the one of step 2 is kept. "
            "Free space and rerun the same command to resume.")
        assert torch.load(out / CHECKPOINT_NAME, map_location="cpu", weights_only=True)["step"] == 2
        assert [p.name for p in out.iterdir() if p.name.endswith(".tmp")] == []

        ballast.pop().unlink()
        monkeypatch.setattr(torch, "save", fill_the_disk_before("smit_encoder", skip=0))
        with pytest.raises(SMITError) as failed:
            PretrainTrainer(config, cache, out).fit()  # resumes at step 2, saves step 4, then exports
        message = str(failed.value)
        assert message.startswith(f"could not write {out / 'smit_encoder_teacher.pt'} (No space left on device); ")
        assert "\n" not in message and "Free space and rerun the same command to export" in message
        assert torch.load(out / CHECKPOINT_NAME, map_location="cpu", weights_only=True)["step"] == 4
        assert not (out / "smit_encoder_teacher.pt").exists()

        ballast.pop().unlink()
        monkeypatch.setattr(torch, "save", save)
        exported = PretrainTrainer(config, cache, out).fit()
        assert exported == out / "smit_encoder_teacher.pt" and exported.is_file()
        assert [p.name for p in out.iterdir() if p.name.endswith(".tmp")] == []
