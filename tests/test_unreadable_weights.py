"""A file torch cannot read as weights: the message says what the file is and what to do, not the byte torch's
unpickler stopped at ("cannot be read as a torch checkpoint (101)" before)."""
from __future__ import annotations

import gzip

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from nnunet_smit.errors import CheckpointError
from nnunet_smit.checkpoint import load_encoder_checkpoint


def _write_nifti(path):
    nifti = path.with_name("image.nii")
    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((4, 4, 4), np.int16)), str(nifti))
    nifti.rename(path)


def _write_safetensors(path):
    from safetensors.torch import save_file

    save_file({"patch_embed.proj.weight": torch.zeros(2, 2)}, str(path))


WHAT_AND_WHAT_TO_DO = {
    "hello.pt": (lambda p: p.write_text("hello, this page has moved"),  # torch said "(101)": its memo key 'e'
                 "it is a text file (beginning 'hello, this page has moved'), not weights; pass the encoder checkpoint "
                 "(.pt or .safetensors)."),
    "page.pt": (lambda p: p.write_text("<!DOCTYPE html><html><body>Sign in</body></html>"),
                "it is a web page (an HTML error or login page saved in place of the download); download the weights "
                "again."),
    "lfs.pt": (lambda p: p.write_text("version https://git-lfs.github.com/spec/v1\noid sha256:ab\nsize 1234\n"),
               "it is a Git LFS pointer, not the weights: run `git lfs pull` in the repository it comes from, or "
               "download the file itself."),
    "empty.pt": (lambda p: p.write_bytes(b""),
                 "it is empty (0 bytes): an interrupted download or copy; copy it again."),
    "image.pt": (_write_nifti, "it is a NIfTI image, not weights; pass the encoder checkpoint (.pt or .safetensors)."),
    "image_gz.pt": (lambda p: p.write_bytes(gzip.compress(b"\0" * 400)),
                    "it is gzip-compressed (a .nii.gz image?), not weights; pass the encoder checkpoint (.pt or "
                    ".safetensors)."),
    "weights.pt": (_write_safetensors, "it is a safetensors file with another name: rename it to end in "
                                       ".safetensors."),
    "array.pt": (lambda p: np.save(open(p, "wb"), np.zeros(3)),
                 "it is a NumPy array (.npy), not weights; pass the encoder checkpoint (.pt or .safetensors)."),
}


@pytest.mark.parametrize("name", sorted(WHAT_AND_WHAT_TO_DO))
def test_a_file_that_is_not_weights_is_named_for_what_it_is(tmp_path, name):
    write, says = WHAT_AND_WHAT_TO_DO[name]
    path = tmp_path / name
    write(path)
    with pytest.raises(CheckpointError) as failed:
        load_encoder_checkpoint(path)
    assert str(failed.value) == f"{path} cannot be read as a torch checkpoint: {says}"


def test_a_cut_checkpoint_says_it_is_cut_and_unknown_bytes_say_so(tmp_path):
    torch.save({"weights": torch.zeros(1000)}, tmp_path / "whole.pt")
    data = (tmp_path / "whole.pt").read_bytes()
    (tmp_path / "cut.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError) as failed:
        load_encoder_checkpoint(tmp_path / "cut.pt")
    assert str(failed.value) == (
        f"{tmp_path / 'cut.pt'} cannot be read as a torch checkpoint: it is a torch checkpoint cut short "
        f"({len(data) // 2} bytes): a truncated or damaged copy (an interrupted download or copy); copy it again.")
    (tmp_path / "noise.pt").write_bytes(bytes([0xFF, 0x00, 0x13, 0x37] * 64))
    with pytest.raises(CheckpointError) as failed:
        load_encoder_checkpoint(tmp_path / "noise.pt")
    assert str(failed.value) == (
        f"{tmp_path / 'noise.pt'} cannot be read as a torch checkpoint: it is no torch file (256 bytes, beginning "
        "ff 00 13 37 ff 00 13 37): a truncated or damaged copy, or another kind of file; copy it again from where the "
        "weights were made.")
