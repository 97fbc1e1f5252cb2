"""Discovery and cache on a folder mixing every supported format with unusable files of each kind."""
from __future__ import annotations

import json
import os
import pickle
import signal
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from nnunet_smit.conventions import PretrainPreprocessing
from nnunet_smit.errors import SMITError
from nnunet_smit.fingerprints import fingerprint_array, fingerprint_image_file
from nnunet_smit.pretraining import cache as cache_module
from nnunet_smit.pretraining.cache import CacheBuildInterrupted, CacheIndex, build_cache, read_ct
from nnunet_smit.pretraining.discovery import Source, discover_sources

PREPROCESSING = PretrainPreprocessing(target_spacing_mm=(2.0, 2.0, 2.0), hu_window=(-175.0, 250.0))
MIN_SHAPE = (16, 16, 16)

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
                       image_type: str = "ORIGINAL\\PRIMARY\\AXIAL", drop_slices=(), uid_suffix: str = "1") -> Path:
    """One file per slice with the tags a scanner writes (positions from the image geometry)."""
    folder.mkdir(parents=True, exist_ok=True)
    image = sitk.GetImageFromArray(array.astype(np.int16))
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


@pytest.fixture(scope="module")
def mixed(tmp_path_factory):
    """A folder with usable scans in every format and one unusable file of each kind; expectations alongside."""
    root = tmp_path_factory.mktemp("raw")
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
    }
    cache_skips = {
        str(junk / "small.nii.gz"): "too small after preprocessing",
        str(junk / "mask.nii.gz"): "no negative value",
    }
    return {"root": root, "used": used, "discovery_skips": discovery_skips, "cache_skips": cache_skips}


@pytest.fixture(scope="module")
def built(mixed, tmp_path_factory):
    """The mixed folder cached in this process."""
    cache_dir = tmp_path_factory.mktemp("cache")
    return build_cache([mixed["root"]], cache_dir, PREPROCESSING, min_shape=MIN_SHAPE, num_workers=1)


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


def test_cache_uses_exactly_the_usable_scans(built, mixed):
    sources = {built.case(case_id)["source"]: built.case(case_id)["kind"] for case_id in built.case_ids}
    assert sources == mixed["used"]
    assert_reasons(built.skipped, mixed["discovery_skips"] | mixed["cache_skips"])
    on_disk = json.loads((built.cache_dir / "skipped.json").read_text())
    assert sorted((item["path"], item["reason"]) for item in on_disk) == sorted(built.skipped)
    summary = built.summary()
    assert summary["num_cases"] == 7 and summary["num_skipped"] == len(built.skipped)
    assert summary["total_voxels"] == sum(int(np.prod(built.shape(c))) for c in built.case_ids)
    json.dumps(summary)


def test_cached_values_lie_in_the_scaled_range(built):
    lo, hi = PREPROCESSING.scaled_range
    soft_tissue = float(PREPROCESSING.scale_hu(np.float32(40.0)))
    for case_id in built.case_ids:
        array = built.load(case_id)
        assert array.dtype == np.float32 and array.shape == built.shape(case_id)
        assert lo <= array.min() and array.max() <= hi
        # float16 storage: 40 HU comes back within 0.5 HU (window 425 HU wide).
        if built.case(case_id)["kind"] == "nifti" and "plain" in case_id:
            centre = array[tuple(slice(n // 2 - 2, n // 2 + 2) for n in array.shape)]
            assert np.allclose(centre, soft_tissue, atol=0.5 / 425)


def test_reader_matches_nnunet_simpleitk_reader(mixed):
    from nnunetv2.imageio.simpleitk_reader_writer import SimpleITKIO

    path = str(mixed["root"] / "nifti" / "marker.nii.gz")
    ours, spacing = read_ct(Source("nifti", (path,), "marker"))
    theirs, properties = SimpleITKIO().read_images([path])
    np.testing.assert_array_equal(ours, theirs[0])
    assert list(spacing) == list(properties["spacing"]) == list(MARKER_SPACING)


def test_marker_stays_on_its_axes_after_crop_and_resampling(built, mixed):
    case_id = next(c for c in built.case_ids if "marker" in c)
    record = built.case(case_id)
    assert record["original_shape"] == list(MARKER_SHAPE)
    assert record["original_spacing_mm"] == list(MARKER_SPACING)
    array = built.load(case_id)
    # The crop holds the whole body box and stays within one analysis stride (4 mm) of it.
    for (start, stop), body, spacing in zip(record["crop_bbox"], MARKER_BODY, MARKER_SPACING):
        assert start <= body.start and stop >= body.stop
        assert (body.start - start) * spacing <= 4.0 and (stop - body.stop) * spacing <= 4.0
    extent_mm = [(stop - start) * s for (start, stop), s in zip(record["crop_bbox"], MARKER_SPACING)]
    assert array.shape == tuple(round(e / 2.0) for e in extent_mm)
    # Marker centre: voxel-centre mapping of the resampling, within one output voxel (interpolation and
    # shape rounding move it by less than that). The cubic resampling rings at the sharp air/body step on
    # the crop border, so the marker is looked for 3 voxels inside it.
    interior = np.zeros(array.shape, dtype=bool)
    interior[3:-3, 3:-3, 3:-3] = True
    found = np.argwhere((array > 0.95) & interior).mean(axis=0)
    for axis, (cube, (start, _), spacing) in enumerate(zip(MARKER_CUBE, record["crop_bbox"], MARKER_SPACING)):
        centre_mm = ((cube.start + cube.stop) / 2 - start) * spacing
        expected = centre_mm / 2.0 - 0.5
        assert abs(found[axis] - expected) < 1.0, (axis, found, expected)


def test_every_cached_scan_carries_the_fingerprint_of_its_array_as_read(built, mixed):
    root = mixed["root"]
    by_source = {built.case(c)["source"]: built.case(c)["fingerprint"] for c in built.case_ids}
    # One array written in five formats and layouts, with other spacings: one scan.
    copies = [root / "nifti" / "plain.nii", root / "other" / "scan.nrrd", root / "other" / "scan.mha",
              root / "other" / "detached.mhd", root / "Dataset001_Test" / "imagesTr" / "case_000_0000.nii.gz"]
    assert {by_source[str(p)] for p in copies} == {fingerprint_array(body_volume((24, 40, 40)))}
    assert by_source[str(root / "dicom" / "ct")] == fingerprint_array(body_volume((20, 48, 48), value=60))
    marker = root / "nifti" / "marker.nii.gz"
    assert by_source[str(marker)] == fingerprint_image_file(marker)
    fingerprints = built.scan_fingerprints()
    assert set(fingerprints) == set(by_source.values()) and len(fingerprints) == 3
    assert set(fingerprints.values()) <= set(built.case_ids)


def count_preprocessed(monkeypatch) -> list:
    """The ids of the scans the cache preprocesses from now on (a list filled as it happens)."""
    calls = []
    process = cache_module._process_source

    def counting(source, *args):
        calls.append(source.id)
        return process(source, *args)

    monkeypatch.setattr(cache_module, "_process_source", counting)
    return calls


def test_records_cached_before_fingerprints_get_one_without_preprocessing_again(tmp_path, monkeypatch):
    raw = tmp_path / "raw"
    for i in range(3):
        write_image(raw / f"ct_{i}.nii.gz", body_volume((20 + 2 * i, 40, 40)), (2.0, 1.0, 1.0))
    cache_dir, cases = tmp_path / "cache", tmp_path / "cache" / "cases"
    first = build_cache([raw], cache_dir, PREPROCESSING, min_shape=MIN_SHAPE)
    expected = {case_id: first.case(case_id)["fingerprint"] for case_id in first.case_ids}
    assert len(set(expected.values())) == 3
    # What a build made before fingerprints existed: records and manifest without them (two records here).
    old, current = first.case_ids[:2], first.case_ids[2]
    for case_id in old:
        record = json.loads((cases / f"{case_id}.json").read_text())
        del record["fingerprint"]
        (cases / f"{case_id}.json").write_text(json.dumps(record))
    manifest = json.loads((cache_dir / "manifest.json").read_text())
    for case in manifest["cases"]:
        del case["fingerprint"]
    (cache_dir / "manifest.json").write_text(json.dumps(manifest))
    assert CacheIndex.open(cache_dir).scan_fingerprints() == {}  # an old cache opens as before, with none
    mtimes = {p.name: p.stat().st_mtime_ns for p in cases.iterdir()}

    calls = count_preprocessed(monkeypatch)
    healed = build_cache([raw], cache_dir, PREPROCESSING, min_shape=MIN_SHAPE, num_workers=2)
    assert calls == []
    assert {case_id: healed.case(case_id)["fingerprint"] for case_id in healed.case_ids} == expected
    for case_id in old:
        assert json.loads((cases / f"{case_id}.json").read_text())["fingerprint"] == expected[case_id]
    # Only the two old records were rewritten; no array was.
    changed = {name for name, mtime in mtimes.items() if (cases / name).stat().st_mtime_ns != mtime}
    assert changed == {f"{case_id}.json" for case_id in old} and f"{current}.json" not in changed
    assert healed.scan_fingerprints() == {fingerprint: case_id for case_id, fingerprint in expected.items()}


def test_load_region_reads_a_box(built):
    case_id = built.case_ids[0]
    region = (slice(1, 5), slice(2, 9), slice(3, 7))
    np.testing.assert_array_equal(built.load(case_id, region), built.load(case_id)[region])
    # DataLoader workers receive the index pickled.
    clone = pickle.loads(pickle.dumps(built))
    np.testing.assert_array_equal(clone.load(case_id), built.load(case_id))


def test_second_build_recomputes_nothing_and_a_killed_build_continues(tmp_path, monkeypatch):
    raw = tmp_path / "raw"
    for i in range(3):
        write_image(raw / f"ct_{i}.nii.gz", body_volume((20 + 2 * i, 40, 40)), (2.0, 1.0, 1.0))
    cache_dir = tmp_path / "cache"
    calls = count_preprocessed(monkeypatch)
    first = build_cache([raw], cache_dir, PREPROCESSING, min_shape=MIN_SHAPE)
    assert len(calls) == 3 and len(first.case_ids) == 3
    mtimes = {p.name: p.stat().st_mtime_ns for p in (cache_dir / "cases").iterdir()}

    calls.clear()
    second = build_cache([raw], cache_dir, PREPROCESSING, min_shape=MIN_SHAPE)
    assert calls == [] and second.case_ids == first.case_ids
    assert {p.name: p.stat().st_mtime_ns for p in (cache_dir / "cases").iterdir()} == mtimes

    # A killed build: one case died between its array and its record, one never started, and
    # temporary files are left behind.
    cases = cache_dir / "cases"
    killed_after_array, never_started, kept = first.case_ids
    (cases / f"{killed_after_array}.json").unlink()
    (cases / f"{never_started}.json").unlink()
    (cases / f"{never_started}.b2nd").unlink()
    (cases / f".tmp-4242-{never_started}.b2nd").write_bytes(b"half written")
    (cache_dir / ".tmp-4242-manifest.json").write_text("{")
    calls.clear()
    third = build_cache([raw], cache_dir, PREPROCESSING, min_shape=MIN_SHAPE)
    assert sorted(calls) == sorted([killed_after_array, never_started])
    assert third.case_ids == first.case_ids
    assert not list(cache_dir.rglob(".tmp-*"))
    assert (cases / f"{kept}.b2nd").stat().st_mtime_ns == mtimes[f"{kept}.b2nd"]
    for case_id in third.case_ids:
        assert third.load(case_id).shape == first.shape(case_id)
    assert CacheIndex.open(cache_dir).case_ids == first.case_ids


def test_parallel_workers_write_the_same_cache(tmp_path):
    raw = tmp_path / "raw"
    write_image(raw / "a.nii.gz", body_volume((20, 40, 40)), (2.0, 1.0, 1.0))
    write_image(raw / "b.nrrd", body_volume((30, 36, 44)), (1.5, 1.2, 0.9))
    inline = build_cache([raw], tmp_path / "inline", PREPROCESSING, min_shape=MIN_SHAPE, num_workers=1)
    parallel = build_cache([raw], tmp_path / "parallel", PREPROCESSING, min_shape=MIN_SHAPE, num_workers=2)
    assert parallel.case_ids == inline.case_ids
    for case_id in inline.case_ids:
        np.testing.assert_array_equal(parallel.load(case_id), inline.load(case_id))


def test_cache_built_with_other_settings_is_refused(tmp_path):
    raw = tmp_path / "raw"
    write_image(raw / "ct.nii.gz", body_volume((20, 40, 40)), (2.0, 1.0, 1.0))
    build_cache([raw], tmp_path / "cache", PREPROCESSING, min_shape=MIN_SHAPE)
    other = PretrainPreprocessing(target_spacing_mm=(1.5, 1.5, 1.5))
    with pytest.raises(SMITError, match="other preprocessing settings"):
        build_cache([raw], tmp_path / "cache", other, min_shape=MIN_SHAPE)
    # A larger min_shape only changes which cases are listed; nothing is recomputed.
    with pytest.raises(SMITError, match="too small|No usable CT scan"):
        build_cache([raw], tmp_path / "cache", PREPROCESSING, min_shape=(64, 64, 64))


def test_nothing_usable_is_one_clear_error(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(SMITError) as info:
        build_cache([empty], tmp_path / "cache_a", PREPROCESSING)
    message = str(info.value)
    assert message.startswith(f"No usable CT scan found under {empty}") and "\n" not in message
    assert "no NIfTI, NRRD, MetaImage or DICOM files" in message

    junk = tmp_path / "junk"
    junk.mkdir()
    (junk / "readme.txt").write_text("hello")
    write_image(junk / "tiny.nii.gz", body_volume((6, 6, 6), body=(slice(1, 5),) * 3), (1.0, 1.0, 1.0))
    with pytest.raises(SMITError, match="2 files or series were skipped") as info:
        build_cache([junk], tmp_path / "cache_b", PREPROCESSING)
    skipped = json.loads((tmp_path / "cache_b" / "skipped.json").read_text())
    assert {Path(item["path"]).name for item in skipped} == {"readme.txt", "tiny.nii.gz"}

    with pytest.raises(SMITError, match="does not exist"):
        build_cache([tmp_path / "missing"], tmp_path / "cache_c", PREPROCESSING)
    with pytest.raises(SMITError, match="No pretraining cache"):
        CacheIndex.open(tmp_path / "nowhere")
    with pytest.raises(SMITError, match="unfinished"):
        CacheIndex.open(tmp_path / "cache_b")


def test_cache_folder_inside_a_source_folder_is_not_rescanned(tmp_path):
    raw = tmp_path / "raw"
    write_image(raw / "ct.nii.gz", body_volume((20, 40, 40)), (2.0, 1.0, 1.0))
    build_cache([raw], raw / "cache", PREPROCESSING, min_shape=MIN_SHAPE)
    index = build_cache([raw], raw / "cache", PREPROCESSING, min_shape=MIN_SHAPE)
    assert len(index.case_ids) == 1 and index.skipped == []


def test_corrupt_values_and_implausible_spacing_are_skipped_with_their_reason(tmp_path):
    raw = tmp_path / "raw"
    write_image(raw / "ct.nii.gz", body_volume((20, 40, 40)), (2.0, 1.0, 1.0))
    with_nan = body_volume((20, 40, 40), dtype=np.float32)
    with_nan[10, 20, 20] = np.nan  # one voxel would make every loss of a batch holding it NaN
    write_image(raw / "nan.mha", with_nan, (2.0, 1.0, 1.0))  # (SimpleITK's NIfTI reader turns NaN into 0)
    # 40 mm voxels: a 2 m body box on every axis, which 2 mm resampling would turn into 10^9 voxels
    write_image(raw / "coarse.nii.gz", body_volume((54, 54, 54)), (40.0, 40.0, 40.0))
    index = build_cache([raw], tmp_path / "cache", PREPROCESSING, min_shape=MIN_SHAPE)
    assert [index.case(c)["source"] for c in index.case_ids] == [str(raw / "ct.nii.gz")]
    reasons = {Path(path).name: reason for path, reason in index.skipped}
    assert reasons["nan.mha"] == "voxels that are not finite numbers (NaN or infinity): a corrupt scan"
    assert reasons["coarse.nii.gz"] == ("body box of 2000 x 2000 x 2000 mm, larger than any patient: the spacing in "
                                        "the header (40, 40, 40) mm is implausible")
    assert not list((tmp_path / "cache" / "cases").glob("coarse*.b2nd"))


def test_a_scan_that_kills_its_worker_is_reported_and_the_others_are_cached(tmp_path, monkeypatch):
    from tests.pretraining.cache_crash_support import die_on_scans_named_killer

    raw = tmp_path / "raw"
    for i in range(5):
        write_image(raw / f"ct_{i}.nii.gz", body_volume((20 + 2 * i, 40, 40)), (2.0, 1.0, 1.0))
    write_image(raw / "killer.nii.gz", body_volume((20, 40, 40)), (2.0, 1.0, 1.0))
    monkeypatch.setattr(cache_module, "_process_source", die_on_scans_named_killer)
    index = build_cache([raw], tmp_path / "cache", PREPROCESSING, min_shape=MIN_SHAPE, num_workers=2)
    assert sorted(Path(index.case(c)["source"]).name for c in index.case_ids) == [f"ct_{i}.nii.gz" for i in range(5)]
    assert index.skipped == [(str(raw / "killer.nii.gz"),
                              "the process preprocessing it died, even alone (out of memory?)")]
    assert not list((tmp_path / "cache").rglob(".tmp-*"))
    # No record for it: the next build tries it again (and here reports it again), recomputing nothing else.
    monkeypatch.setattr(cache_module, "_process_source", die_on_scans_named_killer)
    again = build_cache([raw], tmp_path / "cache", PREPROCESSING, min_shape=MIN_SHAPE, num_workers=2)
    assert again.case_ids == index.case_ids and again.skipped == index.skipped


def test_sigterm_stops_the_build_after_the_scans_in_progress_and_a_rerun_goes_on(tmp_path, monkeypatch):
    from tests.pretraining.cache_crash_support import slow_with_a_stop_flag

    raw = tmp_path / "raw"
    write_image(raw / "a_stopper.nii.gz", body_volume((20, 40, 40)), (2.0, 1.0, 1.0))
    for i in range(5):
        write_image(raw / f"ct_{i}.nii.gz", body_volume((20 + 2 * i, 40, 40)), (2.0, 1.0, 1.0))
    flag = tmp_path / "cache" / "stop-flag"

    def terminate_when_flagged():  # a scheduler's SIGTERM to this process (not to the workers) mid-build
        deadline = time.monotonic() + 120
        while not flag.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        os.kill(os.getpid(), signal.SIGTERM)

    handler_before = signal.getsignal(signal.SIGTERM)
    monkeypatch.setattr(cache_module, "_process_source", slow_with_a_stop_flag)
    killer = threading.Thread(target=terminate_when_flagged, daemon=True)
    killer.start()
    with pytest.raises(CacheBuildInterrupted, match=r"^cache build interrupted: \d of the 6 scans are preprocessed "
                                                    r"in .*; rerun the same command to preprocess the other \d"):
        build_cache([raw], tmp_path / "cache", PREPROCESSING, min_shape=MIN_SHAPE, num_workers=2)
    killer.join()
    assert signal.getsignal(signal.SIGTERM) is handler_before
    cases = tmp_path / "cache" / "cases"
    done = sorted(p.stem for p in cases.glob("*.json"))
    # The scan in progress at the signal was finished and kept; the scans not yet started were not begun.
    assert any(name.startswith("a_stopper") for name in done) and 1 <= len(done) < 6
    assert not list(cases.glob(".tmp-*"))
    manifest = json.loads((tmp_path / "cache" / "manifest.json").read_text())
    assert manifest["complete"] is False
    kept = {p.name: p.stat().st_mtime_ns for p in cases.glob("*.b2nd")}
    index = build_cache([raw], tmp_path / "cache", PREPROCESSING, min_shape=MIN_SHAPE, num_workers=2)
    assert len(index.case_ids) == 6
    assert all((cases / name).stat().st_mtime_ns == mtime for name, mtime in kept.items())  # not recomputed


def test_a_cache_folder_that_is_or_holds_an_input_folder_is_refused_before_writing(tmp_path):
    raw = tmp_path / "raw"
    write_image(raw / "ct.nii.gz", body_volume((20, 40, 40)), (2.0, 1.0, 1.0))
    for cache_dir in (raw, tmp_path):
        with pytest.raises(SMITError, match=r"is or contains the input folder .*; choose a cache folder outside"):
            build_cache([raw], cache_dir, PREPROCESSING, min_shape=MIN_SHAPE)
    assert sorted(p.name for p in raw.iterdir()) == ["ct.nii.gz"] and not (tmp_path / "manifest.json").exists()
    # A cache inside an input folder is fine: discovery skips it.
    index = build_cache([raw], raw / "cache", PREPROCESSING, min_shape=MIN_SHAPE)
    assert len(index.case_ids) == 1
