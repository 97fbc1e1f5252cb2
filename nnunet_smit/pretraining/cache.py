"""Preprocess CT scans once into a resumable on-disk cache for pretraining.

Per scan (see :func:`preprocess_ct`):

1. Read with SimpleITK exactly as nnU-Net's default reader (``SimpleITKIO``) does: ``GetArrayFromImage`` gives
   (z, y, x), the spacing is reversed to match and made positive, nothing is reoriented. Pretrained filters
   therefore meet the same anatomy layout as at fine-tuning.
2. Reject arrays that cannot be CT in HU: non-finite values (corrupt files), no negative value (label maps,
   unscaled scans). Non-finite values are looked for in what the file stores too: SimpleITK's NIfTI reader turns
   NaN and infinity into 0 (:mod:`nnunet_smit.pretraining.nifti_values`). Scans stored as int8, or uint8 without a
   rescale, are reported by discovery (:mod:`nnunet_smit.pretraining.discovery`).
3. Body crop: voxels above -500 HU, largest 26-connected component, its bounding box. nnU-Net's
   ``crop_to_nonzero`` does not apply because CT air is -1000, not 0; the largest component drops the table,
   clothing and cables. The component is found on a view strided to about 4 mm and its box widened by one
   stride, so the full-resolution box never cuts the body.
4. Reject a body box larger than any patient (``MAX_BODY_BOX_MM3``: a wrong spacing in the header, which would
   otherwise be resampled into gigabytes). Resample to ``target_spacing_mm`` with nnU-Net's
   ``resample_data_or_seg_to_shape`` and its defaults for images (cubic in-plane, nearest along an axis more
   than 3x coarser, ``compute_new_shape`` for the shape).
5. Clip to the HU window and scale with ``PretrainPreprocessing.scale_hu``; stored as float16 (0.2 HU steps
   for the default window) in blosc2 ``.b2nd`` files (LZ4HC, chunks/blocks from nnU-Net's
   ``comp_blosc2_params``), read back as float32.

Scans smaller than ``min_shape`` after preprocessing are skipped with a reason, not padded: the sampler pads
between ``min_shape`` and its crop size if it wants to, and a scan smaller than the patch carries too little
context to be worth padding. The check is made when the manifest is assembled, so changing ``min_shape``
recomputes nothing.

Layout of a cache folder::

    manifest.json   settings (preprocessing, pipeline) and the usable cases
    skipped.json    [{"path", "reason"}] for every file or series not used
    cases/<id>.b2nd the preprocessed array (z, y, x), float16
    cases/<id>.json the case record; written last, so it marks the case as done; a usable case's record holds
                    the size and sha256 of its array file (``file_size``, ``file_sha256``)
    .build.lock     held by the build in progress (:class:`nnunet_smit.files.FolderLock`)

Every record of a scan that could be read holds its ``fingerprint`` (:mod:`nnunet_smit.fingerprints`, of the array as
read, before preprocessing); the exported encoder carries those of the usable cases. A finished record written before
fingerprints existed gets its fingerprint at the next build, from a read of the scan alone (nothing is preprocessed
again), so older caches stay valid.

Every file is written with :func:`nnunet_smit.files.atomic_write` (a temporary file beside it, flushed to disk,
renamed into place); a killed build leaves only temporary files, which the next build removes (also the ``.tmp-*``
ones of earlier versions), and it recomputes only cases without a record.
SIGINT or SIGTERM stops a build (:class:`CacheBuildInterrupted`): no new scan is started, and the scans being
preprocessed are finished unless the workers got the signal too (or a second one comes).
A full disk stops a build too (SMITError, one line): the scan that found no room is not written off as unusable (it
gets no record), the scans done so far are kept, and the rerun after freeing space preprocesses the others.

One build per cache folder at a time: a build holds the folder's lock, and a second one (another run sharing
``--cache_dir``) waits for it, then finds those scans cached. Runs that only read use the manifest, which lists
finished cases only and is replaced whole at the end of a build.

A cache heals: every build compares each usable case's file size with its record (a stat per case), and with
``verify=True`` (``--verify_cache``) its sha256 too; a file that fails is preprocessed again from its scan (one warning
line per scan), or reported in ``skipped.json`` when its scan can no longer be read. Records of earlier versions get
their size and checksum at the next build. :meth:`CacheIndex.load` checks the size again and refuses values that are
not finite numbers, so the sampler replaces such a scan instead of feeding it to the model.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import multiprocessing
import os
import signal
import threading
from collections import Counter
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import SimpleITK as sitk

from nnunet_smit.conventions import PretrainPreprocessing
from nnunet_smit.errors import SMITError
from nnunet_smit.files import (FolderLock, atomic_write, describe_holder, is_out_of_space, out_of_space_message,
                               remove_temporary_files)
from nnunet_smit.fingerprints import fingerprint_array, read_image
from nnunet_smit.pretraining.discovery import Discovery, Source, discover_sources
from nnunet_smit.pretraining.nifti_values import count_non_finite_stored, is_nifti

logger = logging.getLogger(__name__)

PathLike = Union[str, Path]

CACHE_FORMAT = "nnunet_smit.pretrain_cache"
CACHE_VERSION = 1
BODY_THRESHOLD_HU = -500.0
# The body mask is analysed on a view strided to about this spacing: fast, and precise enough for a box.
BODY_ANALYSIS_SPACING_MM = 4.0
STORAGE_DTYPE = np.float16
# Largest body box a scan may have (2.0 x 0.8 x 0.8 m, about 4x a whole-body scan's box): a larger one comes from a
# header with a wrong spacing and would be resampled into gigabytes.
MAX_BODY_BOX_MM3 = 2000.0 * 800.0 * 800.0

# Everything besides PretrainPreprocessing that decides the cached values; a cache built with other
# settings is refused rather than silently mixed.
PIPELINE: Dict[str, Any] = {
    "reader": "SimpleITK GetArrayFromImage (z, y, x), spacing reversed, no reorientation (as nnU-Net SimpleITKIO)",
    "crop": {"method": "bbox of largest connected component above threshold", "threshold_hu": BODY_THRESHOLD_HU},
    "resampling": {"function": "nnunetv2 resample_data_or_seg_to_shape", "order": 3, "order_z": 0,
                   "force_separate_z": None},
    "storage": {"format": "blosc2", "dtype": "float16", "codec": "LZ4HC", "clevel": 5, "filter": "SHUFFLE"},
}

_MANIFEST = "manifest.json"
_SKIPPED = "skipped.json"
_CASES = "cases"
_BUILD_LOCK = ".build.lock"
# Temporary files of earlier versions (``.tmp-<pid>-<name>``, running markers ``.tmp-running-<id>``): a cache folder
# that such a version's killed build left may hold them. This version's are :func:`nnunet_smit.files.is_temporary`.
_LEGACY_TMP_PREFIX = ".tmp-"


class CaseSkipped(Exception):
    """A scan that was read but is not usable; the message is the reason."""


NON_FINITE_REASON = "voxels that are not finite numbers (NaN or infinity): a corrupt scan"


# ---------------------------------------------------------------------------------------------- preprocessing

def read_ct(source: Source) -> Tuple[np.ndarray, Tuple[float, float, float]]:
    """Read a scan as nnU-Net does: (array float32 (z, y, x) in HU, spacing (z, y, x) in mm).

    The file or DICOM series is read by :func:`nnunet_smit.fingerprints.read_image`, the rule scan fingerprints
    are defined by.

    Raises:
        CaseSkipped: not a 3D scalar image, or a NIfTI file that stores NaN or infinity (which SimpleITK reads as 0).
    """
    image = read_image(source.paths)
    if image.GetDimension() != 3 or image.GetNumberOfComponentsPerPixel() != 1:
        raise CaseSkipped(f"{image.GetDimension()}D image with {image.GetNumberOfComponentsPerPixel()} "
                          f"components, a 3D scalar CT volume is expected")
    if len(source.paths) == 1 and is_nifti(source.paths[0]) and count_non_finite_stored(source.paths[0]):
        raise CaseSkipped(NON_FINITE_REASON)
    with np.errstate(over="ignore"):  # float64 beyond float32's range turns into infinity, reported as such
        array = sitk.GetArrayFromImage(image).astype(np.float32, copy=False)
    spacing = tuple(abs(float(s)) for s in image.GetSpacing()[::-1])
    return array, spacing


def body_bounding_box(hu: np.ndarray, spacing: Sequence[float], threshold_hu: float = BODY_THRESHOLD_HU,
                      analysis_spacing_mm: float = BODY_ANALYSIS_SPACING_MM) -> Optional[Tuple[slice, ...]]:
    """Bounding box (z, y, x slices) of the largest connected component above ``threshold_hu``, or None.

    Args:
        hu: (z, y, x) array in HU.
        spacing: (z, y, x) voxel spacing in mm.
    """
    from scipy import ndimage

    strides = [max(1, int(analysis_spacing_mm // s)) for s in spacing]
    mask = hu[:: strides[0], :: strides[1], :: strides[2]] > threshold_hu
    labels, num = ndimage.label(mask, structure=np.ones((3, 3, 3), dtype=bool))
    if num == 0:
        return None
    counts = np.bincount(labels.ravel())
    counts[0] = 0
    box = ndimage.find_objects(labels)[int(np.argmax(counts)) - 1]
    # A strided box [a, b) holds the component between full-resolution voxels (a-1)*s+1 and b*s-1.
    return tuple(slice(max(0, (sl.start - 1) * s + 1), min(n, sl.stop * s))
                 for sl, s, n in zip(box, strides, hu.shape))


def preprocess_ct(hu: np.ndarray, spacing: Sequence[float],
                  preprocessing: PretrainPreprocessing) -> Tuple[np.ndarray, Dict[str, Any]]:
    """Crop, resample and scale one scan.

    Args:
        hu: (z, y, x) array in HU.
        spacing: (z, y, x) spacing in mm.
        preprocessing: target spacing, HU window and scaling, whether to crop to the body.

    Returns:
        (array float32 (z, y, x) at ``target_spacing_mm`` with values in ``scaled_range``, info dict with
        ``crop_bbox`` [[start, stop]] x 3 in input voxels and ``cropped_shape``).

    Raises:
        CaseSkipped: the array is not CT in HU or holds no body.
    """
    from nnunetv2.preprocessing.resampling.default_resampling import (compute_new_shape,
                                                                      resample_data_or_seg_to_shape)

    if hu.size and not np.isfinite(hu).all():
        raise CaseSkipped(NON_FINITE_REASON)
    if hu.size == 0 or float(hu.min()) >= 0:
        raise CaseSkipped("no negative value: not a CT in Hounsfield units (a label map or an unscaled scan?)")
    if preprocessing.foreground_crop:
        box = body_bounding_box(hu, spacing)
        if box is None:
            raise CaseSkipped(f"no voxel above {BODY_THRESHOLD_HU:g} HU: no body found")
    else:
        box = tuple(slice(0, n) for n in hu.shape)
    cropped = hu[box]
    extent_mm = [n * sp for n, sp in zip(cropped.shape, spacing)]
    if math.prod(extent_mm) > MAX_BODY_BOX_MM3:
        raise CaseSkipped(
            "body box of {} mm, larger than any patient: the spacing in the header ({}) mm is implausible".format(
                " x ".join(f"{e:.0f}" for e in extent_mm), ", ".join(f"{sp:g}" for sp in spacing)))
    target = preprocessing.target_spacing_mm
    new_shape = np.maximum(compute_new_shape(cropped.shape, spacing, target), 1)
    resampled = resample_data_or_seg_to_shape(cropped[None], new_shape, spacing, target, is_seg=False,
                                              order=PIPELINE["resampling"]["order"],
                                              order_z=PIPELINE["resampling"]["order_z"],
                                              force_separate_z=PIPELINE["resampling"]["force_separate_z"])[0]
    scaled = preprocessing.scale_hu(resampled.astype(np.float32, copy=False))
    info = {"crop_bbox": [[sl.start, sl.stop] for sl in box], "cropped_shape": list(cropped.shape)}
    return scaled, info


# ---------------------------------------------------------------------------------------------- one case

def _write_json(path: Path, obj: Any) -> None:
    text = json.dumps(obj, indent=1)
    atomic_write(path, lambda tmp: Path(tmp).write_text(text))


def _write_array(path: Path, array: np.ndarray, min_shape: Sequence[int], nthreads: int) -> Dict[str, Any]:
    """Write the array atomically; returns the ``file_size`` and ``file_sha256`` of the file as written."""
    import blosc2
    from nnunetv2.training.dataloading.nnunet_dataset import comp_blosc2_params

    patch = [min(int(p), int(s)) for p, s in zip(min_shape, array.shape)]
    blocks, chunks = comp_blosc2_params((1, *array.shape), patch, bytes_per_pixel=array.itemsize)
    cparams = {"codec": blosc2.Codec.LZ4HC, "clevel": PIPELINE["storage"]["clevel"],
               "filters": [blosc2.Filter.SHUFFLE], "nthreads": nthreads}
    written: Dict[str, Any] = {}

    def write(tmp: str) -> None:
        # atomic_write has created ``tmp`` (empty); mode "w" makes blosc2 remove it and write a new file there.
        blosc2.asarray(np.ascontiguousarray(array), urlpath=tmp, chunks=tuple(chunks[1:]), blocks=tuple(blocks[1:]),
                       cparams=cparams, mode="w")
        written.update(file_digest(Path(tmp)))

    atomic_write(path, write)
    return written


def file_digest(path: Path) -> Dict[str, Any]:
    """``file_size`` (bytes) and ``file_sha256`` of a file."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return {"file_size": path.stat().st_size, "file_sha256": digest.hexdigest()}


def file_problem(path: Path, record: Dict[str, Any], verify: bool) -> Optional[str]:
    """What is wrong with a cached array file against its record (None when nothing): its size always, its
    checksum with ``verify``. Records without them (earlier versions) are not checked."""
    try:
        size = path.stat().st_size
    except OSError as error:
        return f"its file cannot be read ({error.strerror})"
    if "file_size" in record and size != record["file_size"]:
        return f"its file has {size} bytes, {record['file_size']} were written"
    if verify and "file_sha256" in record and file_digest(path)["file_sha256"] != record["file_sha256"]:
        return "its file's sha256 differs from the one recorded when it was written"
    return None


def _remove_leftovers(*folders: Path) -> None:
    """Remove the temporary files killed builds left in ``folders`` (only while no build writes there)."""
    remove_temporary_files(*folders, also=lambda name: name.startswith(_LEGACY_TMP_PREFIX))


def _process_source(source: Source, cases_dir: str, preprocessing_dict: Dict[str, Any],
                    min_shape: Tuple[int, int, int], nthreads: int) -> Dict[str, Any]:
    """Preprocess one source into ``cases_dir`` and return its record (runs in worker processes).

    Usable and deterministically unusable scans get a record file; read failures do not, so a later build
    tries them again (they may be transient: memory, a file being copied).
    """
    preprocessing = PretrainPreprocessing.from_dict(preprocessing_dict)
    cases = Path(cases_dir)
    record: Dict[str, Any] = {"id": source.id, "kind": source.kind, "source": source.location,
                              "series_uid": source.series_uid, "num_files": len(source.paths)}
    try:
        hu, spacing = read_ct(source)
    except CaseSkipped as e:
        record.update(status="skipped", reason=str(e))
        _write_json(cases / f"{source.id}.json", record)
        return record
    except Exception as e:  # noqa: BLE001 - any reader failure is a per-file reason, not a crash
        lines = [line.strip() for line in str(e).splitlines() if line.strip()]
        record.update(status="error", reason=f"unreadable ({type(e).__name__}: {lines[-1] if lines else ''})")
        return record
    record.update(original_shape=list(hu.shape), original_spacing_mm=list(spacing), fingerprint=fingerprint_array(hu),
                  hu_min=float(hu.min()) if hu.size else None, hu_max=float(hu.max()) if hu.size else None)
    try:
        array, info = preprocess_ct(hu, spacing, preprocessing)
        del hu
        written = _write_array(cases / f"{source.id}.b2nd", array.astype(STORAGE_DTYPE), min_shape, nthreads)
    except CaseSkipped as e:
        record.update(status="skipped", reason=str(e))
        _write_json(cases / f"{source.id}.json", record)
        return record
    except Exception as e:  # noqa: BLE001 - e.g. out of memory on one huge scan: report it, keep building
        if is_out_of_space(e, cases):  # not the scan's fault: the build stops, and without a record a rerun caches it
            raise
        record.update(status="error", reason=f"preprocessing failed ({type(e).__name__}: {e})"[:300])
        return record
    record.update(status="ok", cached_shape=list(array.shape),
                  cached_spacing_mm=list(preprocessing.target_spacing_mm), file=f"{_CASES}/{source.id}.b2nd",
                  **info, **written)
    _write_json(cases / f"{source.id}.json", record)
    return record


def _add_fingerprint(source: Source, cases_dir: str, *_settings: Any) -> Optional[Dict[str, Any]]:
    """Add the fingerprint to the finished record of a case cached before records carried one; reads the scan, nothing
    is preprocessed again (runs in worker processes, as :func:`_process_source`).

    Returns the record, without a fingerprint when the scan cannot be read any more (moved, deleted).
    """
    cases = Path(cases_dir)
    record = _load_record(cases, source.id)
    if record is None or "fingerprint" in record:
        return record
    try:
        hu, _ = read_ct(source)
    except Exception:  # noqa: BLE001 - the cached array stays usable; the caller reports the missing fingerprint
        return record
    record["fingerprint"] = fingerprint_array(hu)
    _write_json(cases / f"{source.id}.json", record)
    return record


def manifest_fingerprints(manifest: Dict[str, Any]) -> Dict[str, str]:
    """{fingerprint: case id} of a cache manifest's usable cases that have one (:mod:`nnunet_smit.fingerprints`)."""
    fingerprints: Dict[str, str] = {}
    for case in manifest.get("cases", []):
        if case.get("fingerprint"):
            fingerprints.setdefault(case["fingerprint"], case["id"])
    return fingerprints


def _load_record(cases: Path, case_id: str) -> Optional[Dict[str, Any]]:
    """The finished record of a case, or None when it must be (re)computed."""
    try:
        with open(cases / f"{case_id}.json") as f:
            record = json.load(f)
    except (OSError, ValueError):
        return None
    if record.get("status") == "ok" and not (cases / f"{case_id}.b2nd").is_file():
        return None
    return record


# ---------------------------------------------------------------------------------------------- build

def _settings(preprocessing: PretrainPreprocessing) -> Dict[str, Any]:
    return {"format": CACHE_FORMAT, "version": CACHE_VERSION, "preprocessing": preprocessing.to_dict(),
            "pipeline": PIPELINE}


def _normalise_json(obj: Any) -> Any:
    return json.loads(json.dumps(obj))


class CacheBuildInterrupted(Exception):
    """SIGINT or SIGTERM stopped a cache build; the message says how many scans are cached and how to go on."""


def build_cache(sources_dirs: Sequence[PathLike], cache_dir: PathLike, preprocessing: PretrainPreprocessing,
                min_shape: Sequence[int] = (96, 96, 96), num_workers: int = 1,
                progress: bool = False, verify: bool = False) -> "CacheIndex":
    """Find the CT scans under ``sources_dirs`` and preprocess them into ``cache_dir`` (resumably).

    Args:
        sources_dirs: folders searched recursively (see :mod:`nnunet_smit.pretraining.discovery`);
            a single path is accepted too.
        cache_dir: the cache folder; created if needed. Cases already cached are not recomputed.
        preprocessing: spacing (mm, z y x), HU window and scaling, body crop. Must match the settings a
            cache folder was started with.
        min_shape: (z, y, x) voxels; smaller scans after preprocessing are skipped (usually the patch size).
        num_workers: parallel worker processes (fork server or spawn, never a fork of this process);
            1 runs in this process. A scan that kills its worker (out of memory) is reported as skipped and
            tried again by the next build; the others are cached.
        progress: show a progress bar.
        verify: also compare every cached file's sha256 with its record (reads the whole cache); sizes are always
            compared. A file that fails is preprocessed again.

    Returns:
        The :class:`CacheIndex` of the finished cache.

    Raises:
        SMITError: a source folder is missing, the cache folder was built with other settings, or nothing
            usable was found.
    """
    source_roots, cache, min_shape = _checked_arguments(sources_dirs, cache_dir, min_shape)
    with _build_lock(cache):
        return _build(source_roots, cache, preprocessing, min_shape, num_workers, progress, verify)


@contextlib.contextmanager
def _build_lock(cache: Path):
    """Hold the cache folder's build lock; wait (saying for whom) while another build holds it."""
    lock = FolderLock(cache / _BUILD_LOCK, f"the cache {cache}")

    def waiting(holder: Dict[str, Any]) -> None:
        logger.info("cache %s: another build is running (%s); waiting for it to finish", cache, describe_holder(holder))

    lock.acquire(wait=True, on_wait=waiting)
    try:
        yield
    finally:
        lock.release()


def _build(source_roots: List[str], cache: Path, preprocessing: PretrainPreprocessing,
           min_shape: Tuple[int, int, int], num_workers: int, progress: bool, verify: bool) -> "CacheIndex":
    """:func:`build_cache` while holding the folder's build lock."""
    cases = _open_cache_folder(cache, preprocessing)
    discovery = discover_sources(source_roots, exclude=[cache])
    records, todo, unfingerprinted = _reuse_cached(cases, discovery.sources, verify)
    logger.info("cache %s: %d scans found, %d already cached, %d to preprocess", cache, len(discovery.sources),
                len(records), len(todo))
    try:
        with _sigterm_interrupts():
            records.update(_fingerprint_old_records(unfingerprinted, cases, preprocessing, min_shape, num_workers,
                                                    progress))
            records.update(_run(todo, cases, preprocessing, min_shape, num_workers, progress))
        usable, skipped = _usable_and_skipped(discovery, records, preprocessing, min_shape)
        _write_skipped_and_manifest(cache, preprocessing, source_roots, min_shape, usable, skipped,
                                    found_anything=bool(discovery.sources or discovery.skipped))
    except KeyboardInterrupt:
        raise _interrupted(cache, discovery.sources) from None
    except Exception as error:
        if is_out_of_space(error):
            raise _out_of_space(cache, discovery.sources) from None
        raise
    return CacheIndex.open(cache)


def _checked_arguments(sources_dirs: Union[PathLike, Sequence[PathLike]], cache_dir: PathLike,
                       min_shape: Sequence[int]) -> Tuple[List[str], Path, Tuple[int, int, int]]:
    """(absolute source folders, absolute cache folder, ``min_shape`` as a tuple); SMITError for a wrong
    ``min_shape`` or a cache folder that is or holds an input folder (before anything is written)."""
    if isinstance(sources_dirs, (str, Path)):
        sources_dirs = [sources_dirs]
    source_roots = [os.path.abspath(os.fspath(d)) for d in sources_dirs]
    min_shape = tuple(int(s) for s in min_shape)
    if len(min_shape) != 3 or min(min_shape) < 1:
        raise SMITError(f"min_shape must be three positive integers (z, y, x), got {min_shape}.")
    cache = Path(cache_dir).absolute()
    for root in source_roots:  # discovery skips the cache folder: it must not hold an input folder
        if Path(root).resolve().is_relative_to(cache.resolve()):
            raise SMITError(f"the cache folder {cache} is or contains the input folder {root}; choose a cache folder "
                            f"outside the input folders (--cache_dir).")
    return source_roots, cache, min_shape


def _open_cache_folder(cache: Path, preprocessing: PretrainPreprocessing) -> Path:
    """Start the cache folder (an unfinished manifest) or check that it was started with the same settings, and
    remove the temporary files a killed build left; returns the cases folder."""
    cases = cache / _CASES
    cases.mkdir(parents=True, exist_ok=True)
    settings = _normalise_json(_settings(preprocessing))
    manifest_path = cache / _MANIFEST
    if manifest_path.is_file():
        with open(manifest_path) as f:
            existing = json.load(f)
        if {k: existing.get(k) for k in settings} != settings:
            raise SMITError(f"The cache folder {cache} was built with other preprocessing settings; "
                            f"choose a new cache folder or delete this one.")
    else:
        _write_json(manifest_path, {**settings, "complete": False, "cases": []})
    _remove_leftovers(cache, cases)
    return cases


def _reuse_cached(cases: Path, sources: Sequence[Source], verify: bool = False
                  ) -> Tuple[Dict[str, Dict[str, Any]], List[Source], List[Source]]:
    """What the cache already holds: ({case id: finished record}, the sources to preprocess, the cached usable ones
    whose record has no fingerprint yet). A usable case whose file fails :func:`file_problem` is preprocessed
    again; records of earlier versions get their file's size and checksum."""
    records: Dict[str, Dict[str, Any]] = {}
    todo: List[Source] = []
    unfingerprinted: List[Source] = []
    for source in sources:
        record = _load_record(cases, source.id)
        if record is not None and record["status"] == "ok":
            record = _checked_record(cases, source, record, verify)
        if record is None:
            todo.append(source)
        else:
            records[source.id] = record
            if record["status"] == "ok" and "fingerprint" not in record:
                unfingerprinted.append(source)
    return records, todo, unfingerprinted


def _checked_record(cases: Path, source: Source, record: Dict[str, Any], verify: bool) -> Optional[Dict[str, Any]]:
    """The usable record, None (with a warning) when its file fails the check, completed with the file's size and
    checksum when an earlier version wrote it without."""
    path = cases / f"{source.id}.b2nd"
    problem = file_problem(path, record, verify)
    if problem is not None:
        logger.warning("cached scan %s (%s): %s; preprocessing it again from its scan.", source.id, source.location,
                       problem)
        return None
    if "file_size" not in record:
        record.update(file_digest(path))
        _write_json(cases / f"{source.id}.json", record)
    return record


def _fingerprint_old_records(sources: List[Source], cases: Path, preprocessing: PretrainPreprocessing,
                             min_shape: Tuple[int, int, int], num_workers: int,
                             progress: bool) -> Dict[str, Dict[str, Any]]:
    """Add a fingerprint to the records of ``sources`` (cached before records carried one) with
    :func:`_add_fingerprint`; returns {case id: record} of those whose record is still usable."""
    if not sources:
        return {}
    logger.info("cache %s: %d cached scans were cached before scans had fingerprints; reading them to add "
                "one (nothing is preprocessed again)", cases.parent, len(sources))
    fingerprinted = _run(sources, cases, preprocessing, min_shape, num_workers, progress,
                         process=_add_fingerprint, description="fingerprinting cached scans")
    # A scan whose fingerprinting failed (even a dead worker) keeps its usable record.
    return {case_id: record for case_id, record in fingerprinted.items()
            if record is not None and record.get("status") == "ok"}


def _interrupted(cache: Path, sources: Sequence[Source]) -> CacheBuildInterrupted:
    """The error of an interrupted build: how many scans are cached, and how to go on."""
    done = sum(_load_record(cache / _CASES, source.id) is not None for source in sources)
    return CacheBuildInterrupted(
        f"cache build interrupted: {done} of the {len(sources)} scans are preprocessed in {cache}; "
        f"rerun the same command to preprocess the other {len(sources) - done} and go on.")


def _out_of_space(cache: Path, sources: Sequence[Source]) -> SMITError:
    """The error of a build the full disk stopped: the scans done so far are kept, and a rerun goes on."""
    done = sum(_load_record(cache / _CASES, source.id) is not None for source in sources)
    return SMITError("cache build stopped: " + out_of_space_message(
        cache, f"the {done} of the {len(sources)} scans preprocessed so far are kept",
        f"the same command to preprocess the other {len(sources) - done}"))


def _usable_and_skipped(discovery: Discovery, records: Dict[str, Dict[str, Any]],
                        preprocessing: PretrainPreprocessing, min_shape: Tuple[int, int, int]
                        ) -> Tuple[List[Dict[str, Any]], List[Tuple[str, str]]]:
    """(records of the usable cases in discovery order, sorted (path, reason) of every file or series not used)."""
    usable: List[Dict[str, Any]] = []
    skipped: List[Tuple[str, str]] = list(discovery.skipped)
    for source in discovery.sources:
        record = records[source.id]
        if record["status"] != "ok":
            skipped.append((record["source"], record["reason"]))
        elif any(c < m for c, m in zip(record["cached_shape"], min_shape)):
            skipped.append((record["source"], f"too small after preprocessing: {tuple(record['cached_shape'])} "
                                              f"voxels (z, y, x) at {preprocessing.target_spacing_mm} mm, at least "
                                              f"{min_shape} needed"))
        else:
            usable.append(record)
    skipped.sort()
    return usable, skipped


def _write_skipped_and_manifest(cache: Path, preprocessing: PretrainPreprocessing, source_roots: List[str],
                                min_shape: Tuple[int, int, int], usable: List[Dict[str, Any]],
                                skipped: List[Tuple[str, str]], found_anything: bool) -> None:
    """Write ``skipped.json``, then the finished manifest; SMITError (and no finished manifest) if nothing is usable."""
    missing = [case["source"] for case in usable if "fingerprint" not in case]
    if missing:
        logger.warning("cache %s: %d usable scans have no fingerprint, their source files cannot be read any more "
                       "(first: %s); the encoder will not record them, so fine-tuning cannot check held-out cases "
                       "against them", cache, len(missing), missing[0])
    _write_json(cache / _SKIPPED, [{"path": p, "reason": r} for p, r in skipped])
    if not usable:
        if found_anything:
            detail = (f"{len(skipped)} files or series were skipped, the reasons are in {cache / _SKIPPED}")
        else:
            detail = "the folders hold no NIfTI, NRRD, MetaImage or DICOM files"
        raise SMITError(f"No usable CT scan found under {', '.join(source_roots)}; {detail}.")
    manifest = {**_normalise_json(_settings(preprocessing)), "complete": True, "source_dirs": source_roots,
                "min_shape": list(min_shape), "cases": usable}
    _write_json(cache / _MANIFEST, manifest)
    logger.info("cache %s: %d cases usable, %s", cache, len(usable), describe_skipped(skipped, cache / _SKIPPED))


def describe_skipped(skipped: Sequence[Tuple[str, str]], report: Path, most: int = 3) -> str:
    """"N skipped (reasons in REPORT; most often: "reason" (n), ...)" with the ``most`` commonest kinds of reason,
    or "0 skipped"."""
    if not skipped:
        return "0 skipped"
    kinds = Counter(_reason_kind(reason) for _, reason in skipped).most_common(most)
    commonest = ", ".join(f'"{kind}" ({count})' for kind, count in kinds)
    return f"{len(skipped)} skipped (reasons in {report}; most often: {commonest})"


def _reason_kind(reason: str) -> str:
    """A skip reason without what is particular to one file: a DICOM series' name, details after ": " or " (".

    "DICOM series 1.2.3 (20 files): modality MR, not CT" -> "modality MR, not CT";
    "unreadable image file (ITK: ...)" -> "unreadable image file"; "too small after preprocessing: ..." -> "too small
    after preprocessing".
    """
    if reason.startswith("DICOM series ") and "): " in reason:
        reason = reason.split("): ", 1)[1]
    cuts = [i for i in (reason.find(": "), reason.find(" (")) if i > 0]
    return reason[:min(cuts)] if cuts else reason


@contextlib.contextmanager
def _sigterm_interrupts():
    """SIGTERM (a job scheduler's stop, pre-emption) raises KeyboardInterrupt in this process, as SIGINT does, so
    that the build stops the same way for both; only where signal handlers can be set (the main thread)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum, frame):  # noqa: ARG001 - signal handler signature
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@contextlib.contextmanager
def _signals_set(stop: threading.Event):
    """SIGINT and SIGTERM set ``stop`` instead of raising while a pool's futures are waited on (main thread only).

    A KeyboardInterrupt raised inside ``concurrent.futures``' waiting code can leave a future's lock held, and the
    pool's shutdown then waits forever; a flag checked between waits cannot. The handlers in place before are back
    after the block, so a second signal during the shutdown stops at once.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def set_stop(signum, frame):  # noqa: ARG001 - signal handler signature
        stop.set()

    previous = {signum: signal.signal(signum, set_stop) for signum in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def _ignore_sigint() -> None:
    """Cache workers leave Ctrl-C to the main process, which decides what stops (no traceback per worker)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _worker_context() -> multiprocessing.context.BaseContext:
    """Fresh worker processes (never a fork of this one, which may run torch/OpenMP threads).

    Where available a fork server imports the heavy modules (torch, via nnU-Net's resampling) once and forks
    workers from that clean process; elsewhere workers are spawned.
    """
    if "forkserver" in multiprocessing.get_all_start_methods():
        context = multiprocessing.get_context("forkserver")
        context.set_forkserver_preload([__name__, "nnunetv2.preprocessing.resampling.default_resampling"])
        return context
    return multiprocessing.get_context("spawn")


def _run(todo: List[Source], cases: Path, preprocessing: PretrainPreprocessing, min_shape: Tuple[int, int, int],
         num_workers: int, progress: bool, process: Optional[Callable[..., Dict[str, Any]]] = None,
         description: str = "caching CT scans") -> Dict[str, Dict[str, Any]]:
    """Run ``process`` (default :func:`_process_source`: preprocess) over ``todo`` in this process or in
    ``num_workers`` worker processes; returns {case id: record}."""
    from tqdm.auto import tqdm

    results: Dict[str, Dict[str, Any]] = {}
    if not todo:
        return results
    process = process or _process_source  # looked up at call time (tests replace it)
    args = (str(cases), preprocessing.to_dict(), min_shape)
    with tqdm(total=len(todo), desc=description, unit="scan", disable=not progress) as bar:
        if num_workers <= 1:  # in this process (a scan that exhausts the memory takes it down)
            for source in todo:
                results[source.id] = process(source, *args, 4)
                bar.update()
        else:
            _run_workers(todo, cases, process, args, num_workers, results, bar)
    return results


def _run_workers(todo: List[Source], cases: Path, process: Callable[..., Dict[str, Any]], args: tuple,
                 num_workers: int, results: Dict[str, Dict[str, Any]], bar: Any) -> None:
    """:func:`_run` with worker processes.

    A worker process that dies (killed for memory, say) takes its pool down. The scans that were being processed
    at that moment are then retried one at a time, each in a process of its own, and the scans not yet started go
    to a new pool: a scan that kills even a process to itself is reported (status "error", no record file, so a
    later build tries it again) and every other scan is still cached.
    """
    workers = min(num_workers, len(todo))
    nthreads = max(1, min(4, (os.cpu_count() or 1) // workers))
    pending, suspects = list(todo), []
    while pending:
        unfinished = _run_pool(pending, workers, nthreads, process, args, results, bar)
        running = [source for source in unfinished if _running_marker(cases, source).exists()]
        for source in running:
            _running_marker(cases, source).unlink()
        if unfinished:
            logger.warning("a cache worker died (out of memory?) while %d of the %d unfinished scans were being "
                           "preprocessed; those are retried one at a time", len(running), len(unfinished))
        # A pool that broke before any scan started (no marker) makes no progress: its scans are retried alone too.
        pending = [source for source in unfinished if source not in running] if running else []
        suspects += running if running else unfinished
    for source in suspects:
        if _run_pool([source], 1, 4, process, args, results, bar):
            _running_marker(cases, source).unlink(missing_ok=True)
            results[source.id] = {
                "id": source.id, "kind": source.kind, "source": source.location, "series_uid": source.series_uid,
                "num_files": len(source.paths), "status": "error",
                "reason": "the process preprocessing it died, even alone (out of memory?)",
            }
            bar.update()
    if suspects:  # no worker runs now: remove what the dead ones were writing
        _remove_leftovers(cases)


def _running_marker(cases: PathLike, source: Source) -> Path:
    """Present while a worker preprocesses ``source`` (a temporary name: a new build removes leftovers)."""
    return Path(cases) / f".{source.id}.running.tmp"


def _tracked(process: Callable[..., Dict[str, Any]], source: Source, cases_dir: str, *args: Any) -> Dict[str, Any]:
    """``process`` with the source's running marker around it (runs in the worker)."""
    marker = _running_marker(cases_dir, source)
    marker.touch()
    try:
        return process(source, cases_dir, *args)
    finally:
        marker.unlink(missing_ok=True)


def _run_pool(sources: List[Source], workers: int, nthreads: int, process: Callable[..., Dict[str, Any]],
              args: tuple, results: Dict[str, Dict[str, Any]], bar: Any) -> List[Source]:
    """Run ``process`` over ``sources`` in a pool of ``workers`` processes, adding to ``results``; returns the
    sources left unfinished because a worker died."""
    unfinished: List[Source] = []
    pool = ProcessPoolExecutor(max_workers=workers, mp_context=_worker_context(), initializer=_ignore_sigint)
    stop = threading.Event()
    with _signals_set(stop):
        remaining = {pool.submit(_tracked, process, source, *args, nthreads): source for source in sources}
        while remaining and not stop.is_set():
            done, _ = wait(remaining, timeout=0.2, return_when=FIRST_COMPLETED)
            for future in done:
                source = remaining.pop(future)
                try:
                    results[source.id] = future.result()
                except BrokenProcessPool:
                    unfinished.append(source)
                    continue
                except BaseException:  # a full disk: the scans in progress finish, no new one starts
                    pool.shutdown(wait=True, cancel_futures=True)
                    raise
                bar.update()
    if stop.is_set():
        logger.warning("interrupted: no new scan is started; waiting for the scans in progress (interrupt again to "
                       "stop at once)")
        pool.shutdown(wait=True, cancel_futures=True)
        raise KeyboardInterrupt
    pool.shutdown(wait=True)
    return unfinished


# ---------------------------------------------------------------------------------------------- index

class CacheIndex:
    """Read access to a finished cache; cheap to pickle into DataLoader workers (it holds paths and dicts).

    Attributes:
        cache_dir: the cache folder.
        manifest: the parsed ``manifest.json``.
        preprocessing: how the cached arrays were made.
        case_ids: usable cases, in manifest order.
        skipped: (path, reason) for every file or series not used.
    """

    def __init__(self, cache_dir: PathLike, manifest: Dict[str, Any], skipped: List[Tuple[str, str]]) -> None:
        self.cache_dir = Path(cache_dir)
        self.manifest = manifest
        self.preprocessing = PretrainPreprocessing.from_dict(manifest["preprocessing"])
        self.skipped = skipped
        self._cases = {case["id"]: case for case in manifest["cases"]}
        self.case_ids: List[str] = [case["id"] for case in manifest["cases"]]

    @classmethod
    def open(cls, cache_dir: PathLike) -> "CacheIndex":
        """Open a cache written by :func:`build_cache`; SMITError if there is none or it is unfinished."""
        cache = Path(cache_dir)
        try:
            with open(cache / _MANIFEST) as f:
                manifest = json.load(f)
        except (OSError, ValueError):
            raise SMITError(f"No pretraining cache at {cache}; build it first (build_cache or smit_pretrain -d).")
        if manifest.get("format") != CACHE_FORMAT or manifest.get("version") != CACHE_VERSION:
            raise SMITError(f"{cache} is not a version-{CACHE_VERSION} pretraining cache; rebuild it.")
        if not manifest.get("complete"):
            raise SMITError(f"The pretraining cache at {cache} is unfinished; rerun the build to complete it.")
        try:
            with open(cache / _SKIPPED) as f:
                skipped = [(item["path"], item["reason"]) for item in json.load(f)]
        except (OSError, ValueError):
            skipped = []
        return cls(cache, manifest, skipped)

    def __len__(self) -> int:
        return len(self.case_ids)

    def case(self, case_id: str) -> Dict[str, Any]:
        """The manifest record of a case (source, original spacing and shape, crop box, cached shape)."""
        try:
            return self._cases[case_id]
        except KeyError:
            raise SMITError(f"Case {case_id!r} is not in the cache at {self.cache_dir}.") from None

    def shape(self, case_id: str) -> Tuple[int, int, int]:
        """Cached array shape (z, y, x) in voxels at ``preprocessing.target_spacing_mm``."""
        return tuple(self.case(case_id)["cached_shape"])

    def path(self, case_id: str) -> Path:
        return self.cache_dir / self.case(case_id)["file"]

    def load(self, case_id: str, region: Optional[Tuple[slice, ...]] = None) -> np.ndarray:
        """Cached array (z, y, x) as float32 in ``preprocessing.scaled_range``; ``region`` reads only a box.

        Opens the file on every call (memory-mapped, one decompression thread), so it is safe in any process.
        Raises SMITError when the file's size is not the one recorded or it decodes into non-finite values.
        """
        import blosc2
        import torch

        path = self.path(case_id)
        problem = file_problem(path, self.case(case_id), verify=False)
        if problem is not None:
            raise SMITError(f"cached scan {case_id}: {problem}")
        array = blosc2.open(str(path), mode="r", mmap_mode="r", dparams={"nthreads": 1})
        data = np.ascontiguousarray(array[region if region is not None else ...])
        if data.dtype == np.float16:  # the same values as numpy's conversion, about 3.7x faster (vectorised)
            data = torch.from_numpy(data).float().numpy()
        data = data.astype(np.float32, copy=False)
        if not np.isfinite(data).all():  # a damaged file can decode into anything: never hand that to the model
            raise SMITError(f"cached scan {case_id}: its file holds values that are not finite numbers")
        return data

    def scan_fingerprints(self) -> Dict[str, str]:
        """{fingerprint: case id} of the usable cases (those the cache could fingerprint)."""
        return manifest_fingerprints(self.manifest)

    def summary(self) -> Dict[str, Any]:
        """JSON-able description for checkpoint metadata."""
        kinds = Counter(case["kind"] for case in self.manifest["cases"])
        return {
            "num_cases": len(self.case_ids),
            "num_skipped": len(self.skipped),
            "total_voxels": int(sum(math.prod(case["cached_shape"]) for case in self.manifest["cases"])),
            "sources": list(self.manifest.get("source_dirs", [])),
            "kinds": dict(sorted(kinds.items())),
            "min_shape": self.manifest.get("min_shape"),
            "preprocessing": self.preprocessing.to_dict(),
        }
