"""Scan fingerprints: which scans an encoder was pretrained on, so that held-out cases can be checked against them.

A fingerprint is a hash of a scan's voxel array *as read* (SimpleITK ``GetArrayFromImage``, (z, y, x), a 4D image
holding one volume taken as 3D: :func:`read_image`, the rule the pretraining cache reads by) and of its shape. The
values are canonicalised to little-endian float32 before hashing, so a conversion that keeps the voxels keeps the
fingerprint: NRRD, MetaImage or DICOM -> NIfTI, int16 stored as float32, another compression. A conversion that
changes the voxels or their order does not: resampling, cropping, reorienting (some DICOM converters flip axes and
change the header to match), intensity rescaling that is not exact in float32.

The pretraining cache records the fingerprint of every scan it reads, the exported encoder carries them
(``pretraining_scans``, {fingerprint: scan name}), and fine-tuning and the study check held-out cases with
:func:`find_leaked`.
"""
from __future__ import annotations

import hashlib
import math
import os
from pathlib import Path
from dataclasses import dataclass
from typing import Any, Dict, List, Mapping, Sequence, Union

import numpy as np
import SimpleITK as sitk

from nnunet_smit.errors import SMITError

PathLike = Union[str, os.PathLike]

FINGERPRINT_SCHEME = "nnunet_smit.scan.v1"
# 64 bits: see fingerprint_array for why that is enough.
FINGERPRINT_HEX_DIGITS = 16
# Voxels converted and hashed at a time: a 512 x 512 x 600 scan is hashed in 32 MiB pieces, never copied whole.
SLAB_VOXELS = 8 * 1024 * 1024
_CANONICAL_DTYPE = np.dtype("<f4")


def fingerprint_array(array: np.ndarray) -> str:
    """Fingerprint of a voxel array: 16 hex digits (64 bits) of sha256 over its shape and values.

    The values are hashed as little-endian float32 in C order, slab by slab along the first axis (at most
    ``SLAB_VOXELS`` voxels are converted at a time), so int16 and float32 copies of the same scan share a
    fingerprint, while another shape (a transposed array) or any changed voxel gives another one.

    64 bits are plenty for this use: the chance that two different scans share a fingerprint by accident is about
    ``n * m / 2**64`` for ``n`` pretraining scans checked against ``m`` cases; for 10,000 x 10,000 that is 5e-12.
    The fingerprints only have to tell scans apart, they are no protection against someone forging a collision.

    Args:
        array: the voxel array as read, e.g. (z, y, x) in HU; any numeric dtype and memory layout.

    Returns:
        16 lower-case hex digits.
    """
    array = np.asarray(array)
    digest = hashlib.sha256(f"{FINGERPRINT_SCHEME}|{tuple(int(n) for n in array.shape)}|".encode())
    if array.ndim == 0 or array.size == 0:
        digest.update(np.ascontiguousarray(array, dtype=_CANONICAL_DTYPE).tobytes())
        return digest.hexdigest()[:FINGERPRINT_HEX_DIGITS]
    rows = max(1, SLAB_VOXELS // max(1, math.prod(array.shape[1:])))
    for start in range(0, array.shape[0], rows):
        digest.update(np.ascontiguousarray(array[start:start + rows], dtype=_CANONICAL_DTYPE))
    return digest.hexdigest()[:FINGERPRINT_HEX_DIGITS]


def read_image(paths: Sequence[PathLike]) -> sitk.Image:
    """Read an image as the pretraining cache does: one file, or the slice files of a DICOM series (in order).

    A 4D image that holds a single volume is returned as that 3D volume; nothing is reoriented or resampled.
    Errors are SimpleITK's (the cache reports them per scan).
    """
    paths = [os.fspath(p) for p in paths]
    if len(paths) > 1:
        reader = sitk.ImageSeriesReader()
        reader.SetFileNames(paths)
        image = reader.Execute()
    else:
        image = sitk.ReadImage(paths[0])
    if image.GetDimension() == 4 and image.GetSize()[3] == 1:
        image = image[:, :, :, 0]
    return image


def read_image_array(path: PathLike) -> np.ndarray:
    """The voxel array of an image file as the pretraining cache reads it: (z, y, x), its stored dtype.

    Raises:
        SMITError: the file cannot be read as an image.
    """
    try:
        return sitk.GetArrayFromImage(read_image([path]))
    except RuntimeError as error:  # SimpleITK reports every reading failure as RuntimeError, over several lines
        lines = [line.strip() for line in str(error).splitlines() if line.strip()]
        raise SMITError(f"cannot read {path} as an image ({lines[-1] if lines else 'unknown error'}); "
                        "check that the file is complete.") from None


def fingerprint_image_file(path: PathLike) -> str:
    """:func:`fingerprint_array` of the image file ``path`` as read by :func:`read_image_array`."""
    return fingerprint_array(read_image_array(path))


def find_leaked(case_images: Mapping[str, Sequence[PathLike]],
                pretraining_scans: Mapping[str, str]) -> Dict[str, List[str]]:
    """The cases any of whose image files is a scan the encoder was pretrained on.

    Args:
        case_images: {case id: its image files (every channel)}.
        pretraining_scans: {fingerprint: pretraining scan name}, e.g. ``EncoderCheckpoint.pretraining_scans``.

    Returns:
        {case id: names of the pretraining scans its files match}, only for the cases with a match, in the order of
        ``case_images``. Empty when ``pretraining_scans`` is (no file is read then).

    Raises:
        SMITError: an image file is missing or cannot be read.
    """
    leaked: Dict[str, List[str]] = {}
    if not pretraining_scans:
        return leaked
    for case_id, paths in case_images.items():
        matches = [pretraining_scans[fingerprint] for fingerprint in map(fingerprint_image_file, paths)
                   if fingerprint in pretraining_scans]
        if matches:
            leaked[case_id] = matches
    return leaked


def nnunet_raw_case_images(dataset_folder: PathLike, dataset_json: Mapping[str, Any], case_ids: Sequence[str],
                           images_folder: str = "imagesTr") -> Dict[str, List[Path]]:
    """Image files (one per channel) of nnU-Net raw cases, whether or not they exist.

    Cases listed in the ``dataset`` entry of ``dataset.json`` use its paths (relative to the dataset folder,
    ``$VARIABLES`` expanded, as nnU-Net does); the others ``<images_folder>/{case}_{channel:04d}{file_ending}``,
    the channel count from ``channel_names`` (``modality`` in older files).

    Args:
        dataset_folder: ``nnUNet_raw/DatasetXXX_Name``.
        dataset_json: its parsed ``dataset.json``.
        case_ids: the cases wanted.
        images_folder: ``imagesTr`` (training and validation cases) or ``imagesTs``.

    Raises:
        SMITError: ``dataset.json`` names no channels.
    """
    folder = Path(dataset_folder)
    explicit = dataset_json.get("dataset") or {}
    channels = dataset_json.get("channel_names") or dataset_json.get("modality")
    if not channels and not explicit:
        raise SMITError(f"the dataset.json of {folder} names no channels (channel_names); fix it as nnU-Net requires.")
    file_ending = dataset_json.get("file_ending", ".nii.gz")
    images: Dict[str, List[Path]] = {}
    for case_id in case_ids:
        if case_id in explicit:
            images[case_id] = [folder / os.path.expandvars(p) for p in explicit[case_id]["images"]]
        else:
            images[case_id] = [folder / images_folder / f"{case_id}_{channel:04d}{file_ending}"
                               for channel in range(len(channels or ()))]
    return images


@dataclass
class RawCasesCheck:
    """Outcome of checking nnU-Net raw cases against an encoder's pretraining scans.

    Attributes:
        leaked: {case id: names of the pretraining scans its image files match}, only cases with a match.
        checked: the cases whose image files were all found and fingerprinted.
        missing: the cases with an image file missing (not checked).
    """

    leaked: Dict[str, List[str]]
    checked: List[str]
    missing: List[str]


def check_raw_cases(dataset_folder: PathLike, dataset_json: Mapping[str, Any], case_ids: Sequence[str],
                    pretraining_scans: Mapping[str, str]) -> RawCasesCheck:
    """Which of an nnU-Net raw dataset's cases (``imagesTr``) an encoder was pretrained on.

    Shared by ``nnUNetTrainerSMIT`` (the fold's validation cases) and ``smit_study`` (the held-out test set); each
    words the outcome for its own log.
    """
    images = nnunet_raw_case_images(dataset_folder, dataset_json, case_ids)
    found = {case: paths for case, paths in images.items() if paths and all(p.is_file() for p in paths)}
    return RawCasesCheck(find_leaked(found, pretraining_scans), list(found),
                         [case for case in images if case not in found])
