"""The values a NIfTI file stores, read past ITK's NIfTI reader.

ITK reads NIfTI with nifticlib, whose ``nifti_read_buffer`` replaces every NaN and infinity of floating-point data by
0 while it reads: through SimpleITK (and so through nnU-Net's ``SimpleITKIO``) a corrupt NIfTI scan looks clean,
while the same array in NRRD or MetaImage keeps its NaN. :func:`count_non_finite_stored` counts them in what the file
holds, streaming its data in slabs, so the pretraining cache skips such a scan whatever its format.

Integer data holds no NaN or infinity and nifticlib leaves it as it is; a rescale (``scl_slope``, ``scl_inter``) that
overflows float32 gives infinity in the array SimpleITK returns, where the cache finds it.
"""
from __future__ import annotations

import os
from typing import Union

import numpy as np

PathLike = Union[str, os.PathLike]

NIFTI_SUFFIXES = (".nii", ".nii.gz")
# Bytes read and checked at a time: a 512 x 512 x 600 float32 scan in 20 slabs, never held whole.
SLAB_BYTES = 32 << 20


def is_nifti(path: PathLike) -> bool:
    return os.fspath(path).lower().endswith(NIFTI_SUFFIXES)


def count_non_finite_stored(path: PathLike) -> int:
    """The number of NaN and infinite voxel values stored in the NIfTI file ``path`` (0 for integer data).

    Raises:
        OSError, ValueError: the file or its header cannot be read (nibabel's errors).
    """
    import nibabel
    from nibabel.openers import ImageOpener

    header = nibabel.load(os.fspath(path)).header  # the header only; the data is read below, a slab at a time
    dtype = header.get_data_dtype()
    if dtype.kind not in "fc":
        return 0
    remaining = int(np.prod(header.get_data_shape(), dtype=np.int64)) * dtype.itemsize
    slab = max(1, SLAB_BYTES // dtype.itemsize) * dtype.itemsize
    non_finite = 0
    with ImageOpener(os.fspath(path)) as handle:
        handle.seek(int(header.get_data_offset()))
        while remaining > 0:
            data = handle.read(min(slab, remaining))
            if not data:  # a truncated file: SimpleITK's read of it fails and says so
                break
            values = np.frombuffer(data, dtype=dtype, count=len(data) // dtype.itemsize)
            non_finite += values.size - int(np.count_nonzero(np.isfinite(values)))
            remaining -= len(data)
    return non_finite
