"""Discovery on a folder mixing every supported format with unusable files of each kind.

The scan writers and the mixed folder are shared with ``test_cache.py`` (the cache builds on discovery).
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from nnunet_smit.pretraining.discovery import discover_sources

# Marker phantom: body box and a bright cube at known (z, y, x) voxels, anisotropic spacing (z, y, x) mm.
MARKER_SHAPE = (30, 40, 50)
MARKER_SPACING = (3.0, 1.5, 1.0)
MARKER_BODY = (slice(2, 28), slice(5, 37), slice(4, 46))
MARKER_CUBE = (slice(20, 23), slice(10, 13), slice(35, 38))


def body_volume(shape, body=None, value=40.0, dtype=np.int16) -> np.ndarray:
    """(z, y, x) array: -1000 HU air with a box of ``value`` HU (default: all but a 2-voxel border)."""
    array = np.full(shape, -1000, dtype=np.float32)
    array[body if body is not None else tuple(slice(2, n - 2) for n in shape)] = value
    return array.astype(dtype)


def write_image(path: Path, array: np.ndarray, spacing_zyx) -> Path:
    image = sitk.GetImageFromArray(array)
    image.SetSpacing(tuple(float(s) for s in spacing_zyx[::-1]))
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(image, str(path), True)
    return path


def write_dicom_series(folder: Path, array: np.ndarray, spacing_zyx, modality: str = "CT",
                       image_type: str = "ORIGINAL\\PRIMARY\\AXIAL", drop_slices=(), uid_suffix: str = "1",
                       dtype=np.int16) -> Path:
    """One file per slice with the tags a scanner writes (positions from the image geometry), stored as ``dtype``."""
    folder.mkdir(parents=True, exist_ok=True)
    image = sitk.GetImageFromArray(array.astype(dtype))
    image.SetSpacing(tuple(float(s) for s in spacing_zyx[::-1]))
    series_uid = f"1.2.826.0.1.3680043.2.1125.7.{uid_suffix}"
    tags = [("0008|0060", modality), ("0008|0008", image_type), ("0020|000e", series_uid),
            ("0020|000d", "1.2.826.0.1.3680043.2.1125.7.100"), ("0020|0037", "1\\0\\0\\0\\1\\0"),
            ("0008|0021", "20240101"), ("0008|0031", "120000"), ("0010|0010", "Phantom^Test"),
            ("0010|0020", "PHANTOM"), ("0018|0050", str(spacing_zyx[0]))]
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    writer.SetImageIO("GDCMImageIO")  # scanner-style file names without an extension
    for i in range(array.shape[0]):
        if i in drop_slices:
            continue
        slice_image = image[:, :, i]
        for tag, value in tags:
            slice_image.SetMetaData(tag, value)
        position = image.TransformIndexToPhysicalPoint((0, 0, i))
        slice_image.SetMetaData("0020|0032", "\\".join(f"{p:.4f}" for p in position))
        slice_image.SetMetaData("0020|0013", str(i + 1))
        slice_image.SetMetaData("0008|0018", f"{series_uid}.{i + 1}")
        writer.SetFileName(str(folder / f"IM{i:04d}"))
        writer.Execute(slice_image)
    return folder


def write_mixed_folder(root: Path) -> dict:
    """A folder with usable scans in every format and one unusable file of each kind; expectations alongside."""
    ct = body_volume((24, 40, 40))
    write_image(root / "nifti" / "marker.nii.gz", body_volume(MARKER_SHAPE, MARKER_BODY), MARKER_SPACING)
    arr = sitk.GetArrayFromImage(sitk.ReadImage(str(root / "nifti" / "marker.nii.gz")))
    arr[MARKER_CUBE] = 1000
    write_image(root / "nifti" / "marker.nii.gz", arr, MARKER_SPACING)
    write_image(root / "nifti" / "plain.nii", ct, (2.0, 1.0, 1.0))
    write_image(root / "other" / "scan.nrrd", ct, (2.5, 1.2, 1.2))
    write_image(root / "other" / "scan.mha", ct, (2.0, 1.0, 1.0))
    write_image(root / "other" / "detached.mhd", ct, (2.0, 1.0, 1.0))  # writes detached.raw too
    write_dicom_series(root / "dicom" / "ct", body_volume((20, 48, 48), value=60), (2.5, 1.0, 1.0), uid_suffix="1")
    write_dicom_series(root / "dicom" / "mr", body_volume((12, 32, 32), value=300), (3.0, 1.0, 1.0), modality="MR",
                       uid_suffix="2")
    write_dicom_series(root / "dicom" / "scout", body_volume((3, 32, 32)), (5.0, 1.0, 1.0),
                       image_type="ORIGINAL\\PRIMARY\\LOCALIZER", uid_suffix="3")
    write_dicom_series(root / "dicom" / "gap", body_volume((14, 32, 32)), (2.0, 1.0, 1.0), drop_slices=(6,),
                       uid_suffix="4")
    write_dicom_series(root / "dicom" / "short", body_volume((5, 32, 32)), (2.0, 1.0, 1.0), uid_suffix="5")
    dataset = root / "Dataset001_Test"
    write_image(dataset / "imagesTr" / "case_000_0000.nii.gz", ct, (2.0, 1.0, 1.0))
    write_image(dataset / "imagesTr" / "case_000_0001.nii.gz", ct, (2.0, 1.0, 1.0))
    write_image(dataset / "labelsTr" / "case_000.nii.gz", np.zeros((24, 40, 40), np.uint8), (2.0, 1.0, 1.0))
    (dataset / "dataset.json").write_text(json.dumps({"channel_names": {"0": "CT", "1": "PET"},
                                                      "labels": {"background": 0, "x": 1}, "file_ending": ".nii.gz"}))
    junk = root / "junk"
    junk.mkdir()
    (junk / "corrupt.nii.gz").write_bytes(np.random.default_rng(0).bytes(4096))
    (junk / "notes.txt").write_text("not an image")
    write_image(junk / "small.nii.gz", body_volume((10, 10, 10), body=(slice(1, 9),) * 3), (1.0, 1.0, 1.0))
    write_image(junk / "mask.nii.gz", (ct > 0).astype(np.uint8), (2.0, 1.0, 1.0))
    write_image(junk / "mask16.nii.gz", (ct > 0).astype(np.int16), (2.0, 1.0, 1.0))
    write_image(junk / "slice2d.nrrd", ct[0], (1.0, 1.0))

    used = {
        str(root / "nifti" / "marker.nii.gz"): "nifti",
        str(root / "nifti" / "plain.nii"): "nifti",
        str(root / "other" / "scan.nrrd"): "nrrd",
        str(root / "other" / "scan.mha"): "metaimage",
        str(root / "other" / "detached.mhd"): "metaimage",
        str(root / "dicom" / "ct"): "dicom",
        str(dataset / "imagesTr" / "case_000_0000.nii.gz"): "nnunet_raw",
    }
    discovery_skips = {
        str(root / "dicom" / "mr"): "modality MR, not CT",
        str(root / "dicom" / "scout"): "localiser",
        str(root / "dicom" / "gap"): "inconsistent slice spacing",
        str(root / "dicom" / "short"): "only 5 slices",
        str(dataset / "imagesTr" / "case_000_0001.nii.gz"): "not the CT channel",
        str(dataset / "labelsTr" / "case_000.nii.gz"): "label map",
        str(junk / "corrupt.nii.gz"): "unreadable image file",
        str(junk / "notes.txt"): "not a recognised image format",
        str(junk / "slice2d.nrrd"): "2D image",
        str(junk / "mask.nii.gz"): "voxels stored as uint8 (0 to 255) without a rescale slope and intercept",
    }
    cache_skips = {
        str(junk / "small.nii.gz"): "too small after preprocessing",
        str(junk / "mask16.nii.gz"): "no negative value",
    }
    return {"root": root, "used": used, "discovery_skips": discovery_skips, "cache_skips": cache_skips}



@pytest.fixture(scope="module")
def mixed(tmp_path_factory):
    """The mixed folder (:func:`write_mixed_folder`)."""
    return write_mixed_folder(tmp_path_factory.mktemp("raw"))


def assert_reasons(skipped, expected):
    by_path = {}
    for path, reason in skipped:
        assert path not in by_path, f"{path} reported twice"
        by_path[path] = reason
    assert set(by_path) == set(expected)
    for path, fragment in expected.items():
        assert fragment in by_path[path], (path, by_path[path])


def test_discovery_uses_the_right_files_and_reports_the_rest(mixed):
    sources, skipped = discover_sources([mixed["root"]])
    # Headers of the too-small scan and of the label map look fine: the cache rejects them, not discovery.
    assert {s.location: s.kind for s in sources} == mixed["used"] | {p: "nifti" for p in mixed["cache_skips"]}
    assert_reasons(skipped, mixed["discovery_skips"])
    dicom = next(s for s in sources if s.kind == "dicom")
    assert len(dicom.paths) == 20 and dicom.series_uid.endswith(".1")
    assert len({s.id for s in sources}) == len(sources)
    # Ids are stable across runs (the cache relies on it).
    assert [s.id for s in discover_sources([mixed["root"]]).sources] == [s.id for s in sources]
    assert not any(path.endswith(".raw") for path, _ in skipped)


def test_dicom_slices_are_sorted_along_the_normal(tmp_path):
    folder = write_dicom_series(tmp_path / "ct", body_volume((10, 16, 16)), (2.0, 1.0, 1.0))
    # File names in reverse anatomical order: discovery must still order by position.
    for path in sorted(folder.iterdir()):
        path.rename(folder / f"x{99 - int(path.name[2:]):03d}")
    (source,), _ = discover_sources([tmp_path], min_dicom_slices=8)
    positions = [float(sitk.ReadImage(p).GetOrigin()[2]) for p in source.paths]
    assert positions == sorted(positions)



def test_a_dicom_series_stored_as_uint8_without_a_rescale_is_reported(tmp_path):
    write_dicom_series(tmp_path / "ct8", body_volume((10, 16, 16), value=200) + 1000, (2.0, 1.0, 1.0),
                       dtype=np.uint8)  # a converter that cast HU + 1000 to uint8, without a RescaleIntercept
    sources, skipped = discover_sources([tmp_path])
    assert sources == [] and len(skipped) == 1
    assert skipped[0][1].endswith("): voxels stored as uint8 (0 to 255) without a rescale slope and intercept, which "
                                  "cannot hold CT values in HU (a mask or a screenshot?)")
