"""Find the CT scans under one or more folders: NIfTI, NRRD, MetaImage, DICOM series, nnU-Net raw datasets.

Discovery reads headers only (no voxel data), so it is cheap; every file it cannot use is reported with one
reason. Voxel-level checks (body found, size after resampling) happen when the cache is built.

Rules:
- ``.nii``, ``.nii.gz``, ``.nrrd``, ``.nhdr``, ``.mha``, ``.mhd`` files are single 3D images; a header that cannot
  be read, a 2D image, a 4D image or a multi-component (vector/RGB) image is reported.
- A scan (file or DICOM series) whose voxels are stored in a type that cannot hold CT values in HU is reported:
  int8 (-128 to 127: the values were wrapped or clipped when it was written), and uint8 without a rescale slope and
  intercept (0 to 255: a mask or a screenshot). The type is the one SimpleITK reads into, which is float or int16
  where the header carries a rescale (NIfTI ``scl_slope``/``scl_inter``, DICOM RescaleSlope/RescaleIntercept).
  ``.raw``/``.zraw`` files are the voxel data of a MetaImage/NRRD header and are neither used nor reported.
- Any other file is a DICOM candidate. Each directory is grouped by SeriesInstanceUID with GDCM (one series
  never spans directories); a series is used when its Modality (0008|0060) is CT, its ImageType (0008|0008)
  is not a localiser, it has at least ``min_dicom_slices`` slices, all slices share one orientation and the
  slice positions (ImagePositionPatient 0020|0032 projected on the slice normal) are evenly spaced. Candidates
  that belong to no series are reported as unrecognised.
- A folder holding ``imagesTr``/``imagesTs`` is an nnU-Net raw dataset: in its ``images*`` folders only the
  CT channel files are used (the channels named "CT" in ``dataset.json``, channel ``0000`` when it names
  none or is absent); other channels and everything in ``labels*`` folders are reported.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterable, List, NamedTuple, Optional, Sequence, Set, Tuple, Union

import numpy as np
import SimpleITK as sitk

from nnunet_smit.errors import SMITError

logger = logging.getLogger(__name__)

PathLike = Union[str, Path]

# Longest suffix first so ".nii.gz" wins over ".gz".
IMAGE_SUFFIXES: Tuple[Tuple[str, str], ...] = (
    (".nii.gz", "nifti"),
    (".nii", "nifti"),
    (".nrrd", "nrrd"),
    (".nhdr", "nrrd"),
    (".mha", "metaimage"),
    (".mhd", "metaimage"),
)
# Voxel data of detached MetaImage / NRRD headers: read through their header, never on their own.
COMPANION_SUFFIXES: Tuple[str, ...] = (".raw", ".zraw", ".raw.gz")

SOURCE_KINDS = ("nifti", "nrrd", "metaimage", "dicom", "nnunet_raw")

_NNUNET_CHANNEL = re.compile(r"^(?P<case>.+)_(?P<channel>\d{4})$")
_TAG_MODALITY = "0008|0060"
_TAG_IMAGE_TYPE = "0008|0008"
_TAG_POSITION = "0020|0032"
_TAG_ORIENTATION = "0020|0037"
_LOCALISER_WORDS = ("LOCALIZER", "LOCALISER", "SCOUT", "TOPOGRAM")
# Pixel types that cannot hold CT values in HU (-1024 to about 3000), as SimpleITK reads them: a rescale in the
# header (NIfTI scl_slope/scl_inter, DICOM RescaleSlope/RescaleIntercept) makes SimpleITK read float or int16 instead.
_TYPES_WITHOUT_HU = {
    sitk.sitkInt8: "voxels stored as int8 (-128 to 127), which cannot hold CT values in HU: they were wrapped or "
                   "clipped when the file was written",
    sitk.sitkUInt8: "voxels stored as uint8 (0 to 255) without a rescale slope and intercept, which cannot hold CT "
                    "values in HU (a mask or a screenshot?)",
}


@dataclass(frozen=True)
class Source:
    """One scan found by discovery.

    Attributes:
        kind: one of ``SOURCE_KINDS``.
        paths: the files to read: one file for image formats, the slice files sorted by position along the
            slice normal for a DICOM series.
        id: a case identifier, unique and stable for the same path: sanitised name + 8 hex digits of a hash.
        series_uid: SeriesInstanceUID for DICOM series, else None.
    """

    kind: str
    paths: Tuple[str, ...]
    id: str
    series_uid: Optional[str] = None

    @property
    def location(self) -> str:
        """The path a person would look at: the file, or a DICOM series' directory."""
        return os.path.dirname(self.paths[0]) if self.kind == "dicom" else self.paths[0]


class Discovery(NamedTuple):
    """Result of :func:`discover_sources`: usable scans and (path, reason) for everything else."""

    sources: List[Source]
    skipped: List[Tuple[str, str]]


def split_image_suffix(name: str) -> Tuple[str, Optional[str]]:
    """Split a file name into (stem, kind) for the supported image formats; kind is None for other files."""
    lower = name.lower()
    for suffix, kind in IMAGE_SUFFIXES:
        if lower.endswith(suffix):
            return name[: -len(suffix)], kind
    return name, None


def discover_sources(
    source_dirs: Sequence[PathLike],
    min_dicom_slices: int = 8,
    slice_spacing_rtol: float = 1e-2,
    slice_spacing_atol_mm: float = 0.05,
    exclude: Iterable[PathLike] = (),
) -> Discovery:
    """Recursively find usable CT scans under ``source_dirs``.

    Args:
        source_dirs: folders to search (recursively; hidden folders and files are ignored).
        min_dicom_slices: DICOM series with fewer slices are skipped (localisers, single images).
        slice_spacing_rtol, slice_spacing_atol_mm: a DICOM series is evenly spaced when every gap between
            consecutive slice positions differs from the median gap by at most
            ``max(slice_spacing_atol_mm, slice_spacing_rtol * median)`` (mm).
        exclude: folders not to descend into (e.g. a cache folder placed inside a source folder).

    Returns:
        Discovery(sources sorted by location, skipped (path, reason) sorted by path).

    Raises:
        SMITError: a source folder does not exist.
    """
    excluded = {os.path.realpath(p) for p in exclude}
    found: List[Tuple[str, Tuple[str, ...], str, Optional[str]]] = []  # (kind, paths, name, series_uid)
    skipped: List[Tuple[str, str]] = []
    seen_dirs: Set[str] = set()
    for root in source_dirs:
        root = os.path.abspath(os.fspath(root))
        if not os.path.isdir(root):
            raise SMITError(f"Source folder {root} does not exist or is not a folder; pass a folder of CT scans.")
        for directory, subdirs, files in os.walk(root):
            real = os.path.realpath(directory)
            if real in seen_dirs or real in excluded:
                subdirs[:] = []
                continue
            seen_dirs.add(real)
            subdirs[:] = sorted(d for d in subdirs if not d.startswith("."))
            files = sorted(f for f in files if not f.startswith("."))
            _scan_directory(directory, files, found, skipped, min_dicom_slices, slice_spacing_rtol,
                            slice_spacing_atol_mm)

    sources = _assign_ids(found)
    sources.sort(key=lambda s: (s.location, s.paths[0]))
    skipped.sort()
    logger.info("discovery: %d usable scans, %d files skipped", len(sources), len(skipped))
    return Discovery(sources, skipped)


def _nnunet_role(directory: str) -> Tuple[Optional[str], Optional[Set[str]], Optional[Dict[str, str]]]:
    """('images'|'labels'|None, CT channel ids, channel names) for a folder inside an nnU-Net raw dataset."""
    parent, name = os.path.split(directory)
    if not (os.path.isdir(os.path.join(parent, "imagesTr")) or os.path.isdir(os.path.join(parent, "imagesTs"))):
        return None, None, None
    if name.startswith("labels"):
        return "labels", None, None
    if not name.startswith("images"):
        return None, None, None
    channel_names: Dict[str, str] = {}
    try:
        with open(os.path.join(parent, "dataset.json")) as f:
            names = json.load(f).get("channel_names") or {}
        channel_names = {f"{int(k):04d}": str(v) for k, v in names.items()}
    except (OSError, ValueError, AttributeError):
        channel_names = {}
    ct_channels = {k for k, v in channel_names.items() if v.strip().upper() == "CT"}
    if not channel_names:
        ct_channels = {"0000"}
    return "images", ct_channels, channel_names


def _scan_directory(
    directory: str,
    files: List[str],
    found: list,
    skipped: List[Tuple[str, str]],
    min_dicom_slices: int,
    rtol: float,
    atol_mm: float,
) -> None:
    role, ct_channels, channel_names = _nnunet_role(directory)
    is_nnunet_root = os.path.isdir(os.path.join(directory, "imagesTr")) or os.path.isdir(
        os.path.join(directory, "imagesTs"))
    dicom_candidates: List[str] = []
    for name in files:
        path = os.path.join(directory, name)
        stem, kind = split_image_suffix(name)
        if kind is None:
            if name.lower().endswith(COMPANION_SUFFIXES) or (is_nnunet_root and name == "dataset.json"):
                continue
            dicom_candidates.append(path)
            continue
        if role == "labels":
            skipped.append((path, "nnU-Net label map, not a CT image"))
            continue
        if role == "images":
            match = _NNUNET_CHANNEL.match(stem)
            if match is not None:
                channel = match.group("channel")
                if channel not in ct_channels:
                    label = channel_names.get(channel, "unnamed")
                    skipped.append((path, f"nnU-Net channel {channel} ({label}) is not the CT channel "
                                          f"(used: {', '.join(sorted(ct_channels)) or 'none'})"))
                    continue
                reason = _check_image_header(path)
                if reason is None:
                    found.append(("nnunet_raw", (path,), match.group("case"), None))
                else:
                    skipped.append((path, reason))
                continue
        reason = _check_image_header(path)
        if reason is None:
            found.append((kind, (path,), stem, None))
        else:
            skipped.append((path, reason))
    if dicom_candidates:
        _scan_dicom(directory, dicom_candidates, found, skipped, min_dicom_slices, rtol, atol_mm)


def _check_image_header(path: str) -> Optional[str]:
    """None when the file's header describes a 3D single-component image, else the reason."""
    reader = sitk.ImageFileReader()
    reader.SetFileName(path)
    try:
        reader.ReadImageInformation()
    except RuntimeError as e:
        return f"unreadable image file ({_first_line(e)})"
    dimension = reader.GetDimension()
    if dimension == 4 and reader.GetSize()[3] == 1:
        dimension = 3
    if dimension != 3:
        return f"{dimension}D image, a 3D CT volume is expected"
    if reader.GetNumberOfComponents() != 1:
        return f"{reader.GetNumberOfComponents()}-component (vector/RGB) image, a scalar CT volume is expected"
    return _TYPES_WITHOUT_HU.get(reader.GetPixelID())


def _scan_dicom(
    directory: str,
    candidates: List[str],
    found: list,
    skipped: List[Tuple[str, str]],
    min_slices: int,
    rtol: float,
    atol_mm: float,
) -> None:
    consumed: Set[str] = set()
    try:
        series_ids = sitk.ImageSeriesReader.GetGDCMSeriesIDs(directory)
    except RuntimeError:
        series_ids = ()
    for uid in series_ids:
        files = [os.path.abspath(f) for f in sitk.ImageSeriesReader.GetGDCMSeriesFileNames(directory, uid)]
        consumed.update(files)
        sorted_files, reason = _check_dicom_series(files, min_slices, rtol, atol_mm)
        if reason is None:
            found.append(("dicom", tuple(sorted_files), os.path.basename(directory) or "series", uid))
        else:
            skipped.append((directory, f"DICOM series {uid} ({len(files)} files): {reason}"))
    for path in candidates:
        if os.path.abspath(path) not in consumed:
            skipped.append((path, "not a recognised image format (NIfTI, NRRD, MetaImage or DICOM expected)"))


def _check_dicom_series(files: List[str], min_slices: int, rtol: float,
                        atol_mm: float) -> Tuple[List[str], Optional[str]]:
    """(files sorted along the slice normal, None) for a usable CT series, else (files, reason)."""
    reader = sitk.ImageFileReader()
    reader.LoadPrivateTagsOn()
    headers = []
    for path in files:
        reader.SetFileName(path)
        try:
            reader.ReadImageInformation()
        except RuntimeError as e:
            return files, f"unreadable slice {os.path.basename(path)} ({_first_line(e)})"
        tags = {key: reader.GetMetaData(key).strip() for key in (_TAG_MODALITY, _TAG_IMAGE_TYPE, _TAG_POSITION,
                                                                  _TAG_ORIENTATION) if reader.HasMetaDataKey(key)}
        headers.append((tags, reader.GetSize()))
        if len(headers) == 1:
            modality = tags.get(_TAG_MODALITY, "").upper()
            if modality != "CT":
                return files, f"modality {modality or 'missing'}, not CT"
            image_type = tags.get(_TAG_IMAGE_TYPE, "").upper()
            if any(word in image_type for word in _LOCALISER_WORDS):
                return files, f"localiser (ImageType {image_type})"
            if reader.GetPixelID() in _TYPES_WITHOUT_HU:
                return files, _TYPES_WITHOUT_HU[reader.GetPixelID()]
    if len(files) == 1:
        # One multi-frame file: GDCM/ITK assemble and space its frames.
        size = headers[0][1]
        num_slices = size[2] if len(size) > 2 else 1
        if num_slices < min_slices:
            return files, f"only {num_slices} slices (at least {min_slices} needed)"
        return files, None
    if len(files) < min_slices:
        return files, f"only {len(files)} slices (at least {min_slices} needed)"
    try:
        orientations = np.array([[float(v) for v in h[0][_TAG_ORIENTATION].split("\\")] for h in headers])
        positions = np.array([[float(v) for v in h[0][_TAG_POSITION].split("\\")] for h in headers])
    except (KeyError, ValueError):
        return files, "slices lack a readable ImagePositionPatient/ImageOrientationPatient"
    if orientations.shape[1] != 6 or positions.shape[1] != 3:
        return files, "malformed ImagePositionPatient/ImageOrientationPatient"
    if np.abs(orientations - orientations[0]).max() > 1e-3:
        return files, "slices with different orientations"
    normal = np.cross(orientations[0, :3], orientations[0, 3:])
    along = positions @ normal
    order = np.argsort(along, kind="stable")
    gaps = np.diff(along[order])
    median = float(np.median(gaps))
    if gaps.min() <= atol_mm:
        return files, "duplicate slice positions (several acquisitions in one series?)"
    tolerance = max(atol_mm, rtol * median)
    if np.abs(gaps - median).max() > tolerance:
        return files, (f"inconsistent slice spacing ({gaps.min():.3g} to {gaps.max():.3g} mm): missing slices "
                       f"or a mixed series")
    return [files[i] for i in order], None


def _assign_ids(found: list) -> List[Source]:
    sources = []
    for kind, paths, name, uid in found:
        key = f"{paths[0]}|{uid}" if uid else paths[0]
        digest = hashlib.sha1(key.encode("utf-8")).hexdigest()[:8]
        base = re.sub(r"[^A-Za-z0-9.-]+", "_", name).strip("._")[:48] or "scan"
        sources.append(Source(kind=kind, paths=tuple(paths), id=f"{base}_{digest}", series_uid=uid))
    return sources


def _first_line(error: BaseException) -> str:
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    # ITK messages start with a file/line banner; the last line says what went wrong.
    return (lines[-1] if lines else type(error).__name__)[:200]
