"""Cache building on a folder mixing every supported format with unusable files of each kind: what is cached,
resuming, interrupts, dead workers, corrupt files and temporary files."""
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
from nnunet_smit.pretraining.discovery import Source
from tests.pretraining.test_discovery import (MARKER_BODY, MARKER_CUBE, MARKER_SHAPE, MARKER_SPACING, assert_reasons,
                                              body_volume, write_image, write_mixed_folder)

PREPROCESSING = PretrainPreprocessing(target_spacing_mm=(2.0, 2.0, 2.0), hu_window=(-175.0, 250.0))
MIN_SHAPE = (16, 16, 16)


@pytest.fixture(scope="module")
def mixed(tmp_path_factory):
    """The mixed folder (:func:`write_mixed_folder`), written for this module."""
    return write_mixed_folder(tmp_path_factory.mktemp("raw"))


@pytest.fixture(scope="module")
def built(mixed, tmp_path_factory):
    """The mixed folder cached in this process."""
    cache_dir = tmp_path_factory.mktemp("cache")
    return build_cache([mixed["root"]], cache_dir, PREPROCESSING, min_shape=MIN_SHAPE, num_workers=1)


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
    write_image(raw / "nan.mha", with_nan, (2.0, 1.0, 1.0))
    # 40 mm voxels: a 2 m body box on every axis, which 2 mm resampling would turn into 10^9 voxels
    write_image(raw / "coarse.nii.gz", body_volume((54, 54, 54)), (40.0, 40.0, 40.0))
    index = build_cache([raw], tmp_path / "cache", PREPROCESSING, min_shape=MIN_SHAPE)
    assert [index.case(c)["source"] for c in index.case_ids] == [str(raw / "ct.nii.gz")]
    reasons = {Path(path).name: reason for path, reason in index.skipped}
    assert reasons["nan.mha"] == "voxels that are not finite numbers (NaN or infinity): a corrupt scan"
    assert reasons["coarse.nii.gz"] == ("body box of 2000 x 2000 x 2000 mm, larger than any patient: the spacing in "
                                        "the header (40, 40, 40) mm is implausible")
    assert not list((tmp_path / "cache" / "cases").glob("coarse*.b2nd"))


def write_nifti(path: Path, array: np.ndarray, slope: float = 1.0, inter: float = 0.0) -> Path:
    """A NIfTI file of ``array`` (z, y, x) written as stored, with ``scl_slope``/``scl_inter`` as given (nibabel
    refuses an infinite slope; a huge one overflows float32 too)."""
    import nibabel

    image = nibabel.Nifti1Image(np.ascontiguousarray(array.transpose(2, 1, 0)), np.diag([1.0, 1.0, 2.0, 1.0]))
    image.header.set_slope_inter(slope, inter)
    path.parent.mkdir(parents=True, exist_ok=True)
    nibabel.save(image, str(path))
    return path


def unusable_values_folder(raw: Path) -> dict:
    """One good scan, one usable uint8 scan with a rescale, and a scan of every kind of values that are not CT in HU
    (non-finite in every format, through a cast or a rescale, types that cannot hold HU); {file name: reason}."""
    write_image(raw / "ct.nii.gz", body_volume((20, 40, 40)), (2.0, 1.0, 1.0))
    hu = body_volume((20, 40, 40), dtype=np.float32)
    write_nifti(raw / "rescaled_uint8.nii.gz", ((hu + 1024) / 8).astype(np.uint8), slope=8.0, inter=-1024.0)
    non_finite = cache_module.NON_FINITE_REASON
    reasons = {}
    for name, value in (("nan.nii.gz", np.nan), ("inf.nii", np.inf), ("nan.nrrd", np.nan), ("inf.mha", -np.inf)):
        bad = hu.copy()
        bad[10, 20, 20] = value
        write_image(raw / name, bad, (2.0, 1.0, 1.0))
        reasons[name] = non_finite
    beyond_float32 = hu.astype(np.float64)
    beyond_float32[10, 20, 20] = 1e300  # finite in the file, infinity once read as float32
    write_image(raw / "float64.nii.gz", beyond_float32, (2.0, 1.0, 1.0))
    write_nifti(raw / "overflowing_slope.nii", body_volume((20, 40, 40)), slope=1e38)
    reasons.update({"float64.nii.gz": non_finite, "overflowing_slope.nii": non_finite})
    wrapped = body_volume((20, 40, 40), dtype=np.int16).astype(np.int8)  # -1000 HU wrapped into 24
    write_image(raw / "int8.nii.gz", wrapped, (2.0, 1.0, 1.0))
    write_image(raw / "uint8.nrrd", (hu > 0).astype(np.uint8), (2.0, 1.0, 1.0))
    reasons["int8.nii.gz"] = ("voxels stored as int8 (-128 to 127), which cannot hold CT values in HU: they were "
                              "wrapped or clipped when the file was written")
    reasons["uint8.nrrd"] = ("voxels stored as uint8 (0 to 255) without a rescale slope and intercept, which cannot "
                             "hold CT values in HU (a mask or a screenshot?)")
    return reasons


def test_non_finite_voxels_are_found_whatever_the_format_and_types_that_cannot_hold_hu_are_skipped(tmp_path):
    raw = tmp_path / "raw"
    expected = unusable_values_folder(raw)
    # What SimpleITK returns hides the NIfTI ones: its NIfTI reader turns NaN and infinity into 0.
    assert np.isfinite(sitk.GetArrayFromImage(sitk.ReadImage(str(raw / "nan.nii.gz")))).all()
    index = build_cache([raw], tmp_path / "cache", PREPROCESSING, min_shape=MIN_SHAPE)
    assert sorted(Path(index.case(c)["source"]).name for c in index.case_ids) == ["ct.nii.gz", "rescaled_uint8.nii.gz"]
    assert {Path(path).name: reason for path, reason in index.skipped} == expected
    on_disk = json.loads((tmp_path / "cache" / "skipped.json").read_text())
    assert {Path(item["path"]).name: item["reason"] for item in on_disk} == expected
    np.testing.assert_allclose(*(index.load(c) for c in index.case_ids), atol=2e-3)  # 8 HU steps: the same scan


def test_the_build_log_names_the_skipped_report_and_the_three_commonest_reasons(tmp_path, caplog):
    raw = tmp_path / "raw"
    unusable_values_folder(raw)
    for i in range(2):
        (raw / f"notes_{i}.txt").write_text("not an image")
    with caplog.at_level("INFO", logger="nnunet_smit.pretraining.cache"):
        build_cache([raw], tmp_path / "cache", PREPROCESSING, min_shape=MIN_SHAPE)
    line = [r.getMessage() for r in caplog.records if "usable" in r.getMessage()][-1]
    assert line == (
        f"cache {tmp_path / 'cache'}: 2 cases usable, 10 skipped (reasons in {tmp_path / 'cache' / 'skipped.json'}; "
        'most often: "voxels that are not finite numbers" (6), "not a recognised image format" (2), '
        '"voxels stored as int8" (1))')


def _scans_and_a_killer(raw, n):
    """``n`` small CT scans ct_<i>.nii.gz and one named killer.nii.gz in ``raw``."""
    for i in range(n):
        write_image(raw / f"ct_{i}.nii.gz", body_volume((20 + 2 * i, 40, 40)), (2.0, 1.0, 1.0))
    write_image(raw / "killer.nii.gz", body_volume((20, 40, 40)), (2.0, 1.0, 1.0))
    return raw


def test_a_scan_that_kills_its_worker_is_reported_and_the_others_are_cached(tmp_path, monkeypatch):
    from tests.pretraining.cache_crash_support import die_on_scans_named_killer

    raw = _scans_and_a_killer(tmp_path / "raw", 5)
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


def cache_files(cache_dir: Path) -> list:
    """Every file under a cache folder, as sorted paths relative to it."""
    return sorted(p.relative_to(cache_dir).as_posix() for p in cache_dir.rglob("*") if p.is_file())


def finished_cache_files(index: CacheIndex) -> list:
    """The files of a finished cache where every scan found is usable: the manifest, the skipped report, the build
    lock (empty once released), and an array and a record per case."""
    return sorted([".build.lock", "manifest.json", "skipped.json"]
                  + [f"cases/{case_id}.{ext}" for case_id in index.case_ids for ext in ("b2nd", "json")])


def test_a_build_leaves_no_temporary_file_and_removes_those_a_killed_build_left(tmp_path):
    raw = tmp_path / "raw"
    for i in range(3):
        write_image(raw / f"ct_{i}.nii.gz", body_volume((20 + 2 * i, 40, 40)), (2.0, 1.0, 1.0))
    cache_dir, cases = tmp_path / "cache", tmp_path / "cache" / "cases"
    first = build_cache([raw], cache_dir, PREPROCESSING, min_shape=MIN_SHAPE, num_workers=2)
    assert cache_files(cache_dir) == finished_cache_files(first)

    # What killed builds leave: temporary files of this version (".<name>.<random>.tmp") and of earlier ones
    # (".tmp-<pid>-<name>", running markers ".tmp-running-<id>"), some of them complete copies of a case's files.
    redone, kept, _ = first.case_ids
    expected = first.load(redone)
    mtimes = {p.name: p.stat().st_mtime_ns for p in cases.iterdir()}
    (cases / f".{redone}.b2nd.k3x9q2za.tmp").write_bytes((cases / f"{redone}.b2nd").read_bytes())
    (cases / f".tmp-4242-{redone}.json").write_text((cases / f"{redone}.json").read_text())
    (cases / f"{redone}.b2nd").unlink()
    (cases / f"{redone}.json").unlink()
    (cases / f".{kept}.json.0ab1cd2e.tmp").write_text("{")
    (cases / f".tmp-running-{kept}").touch()
    (cache_dir / ".manifest.json.zz81hq0w.tmp").write_text("{")
    (cache_dir / ".tmp-4242-skipped.json").write_text("[")
    second = build_cache([raw], cache_dir, PREPROCESSING, min_shape=MIN_SHAPE)
    assert second.case_ids == first.case_ids and second.skipped == []
    assert cache_files(cache_dir) == finished_cache_files(second)
    np.testing.assert_array_equal(second.load(redone), expected)
    for name in (f"{kept}.b2nd", f"{kept}.json"):  # not recomputed: its temporary files were only removed
        assert (cases / name).stat().st_mtime_ns == mtimes[name]


def test_a_worker_killed_while_writing_leaves_no_temporary_file(tmp_path, monkeypatch):
    from tests.pretraining.cache_crash_support import die_while_writing_scans_named_killer

    raw = _scans_and_a_killer(tmp_path / "raw", 2)
    # No public input kills a worker half-way through a write: the preprocessing is replaced by one that does.
    monkeypatch.setattr(cache_module, "_process_source", die_while_writing_scans_named_killer)
    index = build_cache([raw], tmp_path / "cache", PREPROCESSING, min_shape=MIN_SHAPE, num_workers=2)
    assert index.skipped == [(str(raw / "killer.nii.gz"),
                              "the process preprocessing it died, even alone (out of memory?)")]
    assert cache_files(tmp_path / "cache") == finished_cache_files(index)


def _three_scans(raw):
    for i in range(3):
        write_image(raw / f"ct_{i}.nii.gz", body_volume((20 + 2 * i, 40, 40)), (2.0, 1.0, 1.0))
    return raw


def test_every_cached_file_has_its_size_and_checksum_in_its_record(tmp_path):
    index = build_cache([_three_scans(tmp_path / "raw")], tmp_path / "cache", PREPROCESSING, min_shape=MIN_SHAPE)
    for case_id in index.case_ids:
        record = json.loads((tmp_path / "cache" / "cases" / f"{case_id}.json").read_text())
        assert record["file_size"] == index.path(case_id).stat().st_size
        assert record["file_sha256"] == cache_module.file_digest(index.path(case_id))["file_sha256"]
        assert index.case(case_id)["file_size"] == record["file_size"]  # the manifest's copy


def test_a_truncated_cache_file_is_rebuilt_at_the_next_build_with_one_warning(tmp_path, caplog):
    raw = _three_scans(tmp_path / "raw")
    index = build_cache([raw], tmp_path / "cache", PREPROCESSING, min_shape=MIN_SHAPE)
    damaged = index.case_ids[1]
    original = index.load(damaged)
    data = index.path(damaged).read_bytes()
    index.path(damaged).write_bytes(data[: len(data) // 2])
    with pytest.raises(SMITError, match=f"cached scan {damaged}: its file has {len(data) // 2} bytes, {len(data)} were"):
        index.load(damaged)  # the sampler replaces such a scan by the next one, with a warning
    with caplog.at_level("WARNING", logger="nnunet_smit.pretraining.cache"):
        healed = build_cache([raw], tmp_path / "cache", PREPROCESSING, min_shape=MIN_SHAPE)
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1 and warnings[0].startswith(f"cached scan {damaged} (") and "preprocessing it again" in \
        warnings[0]
    assert np.array_equal(healed.load(damaged), original)


def test_a_changed_byte_is_found_by_verify_and_rebuilt(tmp_path, caplog):
    raw = _three_scans(tmp_path / "raw")
    index = build_cache([raw], tmp_path / "cache", PREPROCESSING, min_shape=MIN_SHAPE)
    damaged = index.case_ids[0]
    original = index.load(damaged)
    data = bytearray(index.path(damaged).read_bytes())
    data[-100] ^= 0xFF  # same size: only the checksum tells
    index.path(damaged).write_bytes(bytes(data))
    with caplog.at_level("WARNING", logger="nnunet_smit.pretraining.cache"):
        build_cache([raw], tmp_path / "cache", PREPROCESSING, min_shape=MIN_SHAPE)
        assert not [r for r in caplog.records if r.levelname == "WARNING"]  # sizes only by default
        healed = build_cache([raw], tmp_path / "cache", PREPROCESSING, min_shape=MIN_SHAPE, verify=True)
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1 and "sha256 differs from the one recorded" in warnings[0]
    assert np.array_equal(healed.load(damaged), original)


def test_a_damaged_file_whose_scan_is_unreadable_now_is_reported_as_skipped(tmp_path):
    raw = _three_scans(tmp_path / "raw")
    index = build_cache([raw], tmp_path / "cache", PREPROCESSING, min_shape=MIN_SHAPE)
    damaged = index.case_ids[2]
    source = Path(index.case(damaged)["source"])
    index.path(damaged).write_bytes(b"damaged")
    source.write_bytes(b"no longer a scan")
    healed = build_cache([raw], tmp_path / "cache", PREPROCESSING, min_shape=MIN_SHAPE)
    assert damaged not in healed.case_ids and len(healed.case_ids) == 2
    assert [path for path, _ in healed.skipped] == [str(source)]


def test_a_cache_file_of_non_finite_values_is_never_handed_out(tmp_path):
    index = build_cache([_three_scans(tmp_path / "raw")], tmp_path / "cache", PREPROCESSING, min_shape=MIN_SHAPE)
    case_id = index.case_ids[0]
    bad = np.full(index.shape(case_id), np.nan, dtype=np.float16)
    cache_module._write_array(index.path(case_id), bad, MIN_SHAPE, 1)  # same shape, other content
    record = dict(index.case(case_id), file_size=index.path(case_id).stat().st_size)
    index._cases[case_id] = record  # the size matches: only the values tell
    with pytest.raises(SMITError, match="holds values that are not finite numbers"):
        index.load(case_id)


def test_records_of_earlier_versions_get_their_size_and_checksum(tmp_path):
    raw = _three_scans(tmp_path / "raw")
    index = build_cache([raw], tmp_path / "cache", PREPROCESSING, min_shape=MIN_SHAPE)
    record_path = tmp_path / "cache" / "cases" / f"{index.case_ids[0]}.json"
    record = json.loads(record_path.read_text())
    expected = {k: record.pop(k) for k in ("file_size", "file_sha256")}
    record_path.write_text(json.dumps(record))
    build_cache([raw], tmp_path / "cache", PREPROCESSING, min_shape=MIN_SHAPE)
    assert {k: json.loads(record_path.read_text())[k] for k in expected} == expected


def test_a_second_build_of_the_same_cache_waits_for_the_first(tmp_path, caplog):
    from nnunet_smit.files import FolderLock

    raw = _three_scans(tmp_path / "raw")
    first = FolderLock(tmp_path / "cache" / ".build.lock", "the cache")
    first.acquire()  # a build in progress, as far as the folder can tell
    done = []
    with caplog.at_level("INFO", logger="nnunet_smit.pretraining.cache"):
        second = threading.Thread(target=lambda: done.append(
            build_cache([raw], tmp_path / "cache", PREPROCESSING, min_shape=MIN_SHAPE)))
        second.start()
        time.sleep(1.0)
        assert second.is_alive() and not done and not (tmp_path / "cache" / "manifest.json").exists()
        first.release()
        second.join(120)
    assert len(done[0].case_ids) == 3
    assert "another build is running (pid" in caplog.text and "waiting for it to finish" in caplog.text


def test_a_full_disk_stops_the_build_keeping_what_is_cached_and_the_rerun_caches_the_rest(tmp_path):
    from tests.disk_support import small_disk

    raw = tmp_path / "raw"
    noise = np.random.default_rng(0)
    for i in range(5):  # about 100 KB each once cached: noise does not compress
        scan = body_volume((40, 80, 80), dtype=np.float32)
        scan[2:-2, 2:-2, 2:-2] += noise.normal(0, 200, (36, 76, 76))
        write_image(raw / f"ct_{i}.nii.gz", scan.astype(np.int16), (2.0, 1.0, 1.0))
    with small_disk(tmp_path / "disk", 8 << 20) as disk:
        cache_dir = disk.path / "cache"
        ballast = disk.fill(leave_bytes=260 << 10)
        with pytest.raises(SMITError) as stopped:
            build_cache([raw], cache_dir, PREPROCESSING, min_shape=MIN_SHAPE, num_workers=2)
        message = str(stopped.value)
        kept = sorted((cache_dir / "cases").glob("*.json"))
        assert message == (f"cache build stopped: no space left on the device of {cache_dir}; the {len(kept)} of the 5 "
                           f"scans preprocessed so far are kept. Free space there and rerun the same command to "
                           f"preprocess the other {5 - len(kept)}.")
        assert 1 <= len(kept) < 5
        # No scan is written off: every record is a cached scan, and nothing says a scan failed.
        assert {json.loads(p.read_text())["status"] for p in kept} == {"ok"}
        assert not (cache_dir / "skipped.json").exists()
        mtimes = {p.name: p.stat().st_mtime_ns for p in (cache_dir / "cases").glob("*.b2nd")}

        ballast.unlink()
        index = build_cache([raw], cache_dir, PREPROCESSING, min_shape=MIN_SHAPE, num_workers=2)
        assert len(index.case_ids) == 5 and index.skipped == []
        assert all((cache_dir / "cases" / name).stat().st_mtime_ns == mtime for name, mtime in mtimes.items())
        assert cache_files(cache_dir) == finished_cache_files(index)
