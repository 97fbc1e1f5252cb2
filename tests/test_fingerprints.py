"""Scan fingerprints: stable under conversions that keep the voxels, changed by any voxel or shape change."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from nnunet_smit import fingerprints
from nnunet_smit.errors import SMITError
from nnunet_smit.fingerprints import (
    fingerprint_array,
    fingerprint_image_file,
    find_leaked,
    nnunet_raw_case_images,
    read_image_array,
)


def ct_array(shape=(12, 20, 16), seed=0) -> np.ndarray:
    """(z, y, x) int16 HU values, air around noisy tissue."""
    rng = np.random.default_rng(seed)
    array = np.full(shape, -1000, dtype=np.int16)
    array[2:-2, 3:-3, 3:-3] = rng.integers(-100, 1200, size=(shape[0] - 4, shape[1] - 6, shape[2] - 6))
    return array


def write(path: Path, array: np.ndarray, spacing_xyz=(0.8, 0.8, 2.5)) -> Path:
    image = sitk.GetImageFromArray(array)
    image.SetSpacing(spacing_xyz)
    image.SetOrigin((-100.0, 20.0, 7.5))
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(image, str(path), True)
    return path


def test_nrrd_to_nifti_conversion_keeps_the_fingerprint(tmp_path):
    array = ct_array()
    nrrd = write(tmp_path / "scan.nrrd", array)
    # What a lab does: read the NRRD and write it again as NIfTI (header carried over, voxels untouched).
    nifti = tmp_path / "scan.nii.gz"
    sitk.WriteImage(sitk.ReadImage(str(nrrd)), str(nifti), True)
    assert sitk.ReadImage(str(nifti)).GetPixelID() == sitk.sitkInt16
    assert fingerprint_image_file(nrrd) == fingerprint_image_file(nifti) == fingerprint_array(array)


def test_int16_stored_as_float32_keeps_the_fingerprint_and_the_header_is_not_part_of_it(tmp_path):
    array = ct_array()
    as_int = write(tmp_path / "int16.nii.gz", array)
    as_float = write(tmp_path / "float32.nii.gz", array.astype(np.float32), spacing_xyz=(0.7, 0.7, 3.0))
    assert read_image_array(as_float).dtype == np.float32
    assert fingerprint_image_file(as_int) == fingerprint_image_file(as_float)
    assert fingerprint_array(array.astype(">f8")) == fingerprint_array(array)  # big-endian float64 too


def test_one_voxel_or_a_transposed_shape_changes_the_fingerprint():
    array = ct_array()
    reference = fingerprint_array(array)
    changed = array.copy()
    changed[6, 10, 8] += 1
    assert fingerprint_array(changed) != reference
    assert fingerprint_array(array.transpose(0, 2, 1)) != reference
    # The same bytes in another shape are another scan.
    assert fingerprint_array(array.reshape(array.shape[0], -1)) != reference
    assert len(reference) == 16 and int(reference, 16) >= 0


def test_slab_hashing_equals_hashing_the_whole_array_in_any_memory_layout(monkeypatch):
    array = ct_array(shape=(9, 14, 11)).astype(np.float32)
    whole = fingerprint_array(array)
    monkeypatch.setattr(fingerprints, "SLAB_VOXELS", 2 * 14 * 11 + 5)  # slabs of two slices, the last one short
    assert fingerprint_array(array) == whole
    assert fingerprint_array(np.asfortranarray(array)) == whole
    monkeypatch.setattr(fingerprints, "SLAB_VOXELS", 1)  # less than one slice: one slice at a time
    assert fingerprint_array(array) == whole


def test_a_4d_file_with_one_volume_reads_as_its_3d_volume(tmp_path):
    array = ct_array()
    four_d = tmp_path / "one_volume.mha"  # MetaImage keeps the fourth axis (NIfTI's reader drops it itself)
    sitk.WriteImage(sitk.JoinSeries([sitk.GetImageFromArray(array)]), str(four_d))
    assert sitk.ReadImage(str(four_d)).GetDimension() == 4
    assert read_image_array(four_d).shape == array.shape
    assert fingerprint_image_file(four_d) == fingerprint_array(array)


def test_an_unreadable_file_is_one_line(tmp_path):
    junk = tmp_path / "junk.nii.gz"
    junk.write_bytes(b"\x1f\x8b not really gzip")
    with pytest.raises(SMITError) as info:
        fingerprint_image_file(junk)
    assert str(junk) in str(info.value) and "\n" not in str(info.value)


def test_find_leaked_names_the_leaked_case_and_its_pretraining_scan(tmp_path):
    scans = {name: ct_array(seed=seed) for seed, name in enumerate(["a", "b", "c"])}
    pretraining = {fingerprint_array(scans["b"]): "scan_b_0001", fingerprint_array(ct_array(seed=9)): "other_0002"}
    case_images = {
        "case_a": [write(tmp_path / "case_a_0000.nii.gz", scans["a"])],
        # Two channels: the second one is the pretraining scan (converted to float32 on the way).
        "case_b": [write(tmp_path / "case_b_0000.nii.gz", scans["c"]),
                   write(tmp_path / "case_b_0001.nii.gz", scans["b"].astype(np.float32))],
    }
    assert find_leaked(case_images, pretraining) == {"case_b": ["scan_b_0001"]}
    assert find_leaked({"case_a": case_images["case_a"]}, pretraining) == {}
    # Nothing recorded: nothing is read (a missing file is no error then).
    assert find_leaked({"x": [tmp_path / "missing.nii.gz"]}, {}) == {}
    with pytest.raises(SMITError, match="missing.nii.gz"):
        find_leaked({"x": [tmp_path / "missing.nii.gz"]}, pretraining)


def test_nnunet_raw_case_images_follow_the_naming_rule_and_explicit_lists(tmp_path):
    dataset_json = {"channel_names": {"0": "CT", "1": "PET"}, "file_ending": ".nrrd"}
    images = nnunet_raw_case_images(tmp_path, dataset_json, ["liver_7"])
    assert images == {"liver_7": [tmp_path / "imagesTr" / f"liver_7_000{c}.nrrd" for c in (0, 1)]}
    old_style = {"modality": {"0": "CT"}}  # no file_ending: nnU-Net's .nii.gz
    assert nnunet_raw_case_images(tmp_path, old_style, ["c"], "imagesTs") == {
        "c": [tmp_path / "imagesTs" / "c_0000.nii.gz"]}
    explicit = {**dataset_json, "dataset": {"liver_7": {"images": ["elsewhere/ct.nii.gz", "/abs/pet.nii.gz"],
                                                        "label": "elsewhere/seg.nii.gz"}}}
    assert nnunet_raw_case_images(tmp_path, explicit, ["liver_7"]) == {
        "liver_7": [tmp_path / "elsewhere" / "ct.nii.gz", Path("/abs/pet.nii.gz")]}
    with pytest.raises(SMITError, match="names no channels"):
        nnunet_raw_case_images(tmp_path, json.loads('{"file_ending": ".nii.gz"}'), ["c"])
