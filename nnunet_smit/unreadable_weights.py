"""Why a file given as weights cannot be read by ``torch.load``, in plain words.

torch's own messages name the byte its unpickler stopped at ("Unsupported operand 110", "101", "failed finding central
directory"), which says nothing to a user who passed an HTML error page, a Git LFS pointer, a NIfTI image or a
safetensors file named ``.pt``. :func:`describe_unreadable_weights` looks at the file's first bytes and says what the
file is and what to do.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Optional, Union

PathLike = Union[str, os.PathLike]

_HEAD_BYTES = 512
_NIFTI_MAGICS = (b"n+1\0", b"ni1\0")
_ZIP_MAGIC = b"PK\x03\x04"
_NOT_WEIGHTS = "not weights; pass the encoder checkpoint (.pt or .safetensors)."


def describe_unreadable_weights(path: PathLike, torch_message: str = "") -> str:
    """What the file ``path`` is and what to do, for a file ``torch.load`` failed on; the end of a sentence that
    begins with the path ("PATH cannot be read as a torch checkpoint: " + this).

    ``torch_message`` is torch's error, which tells a truncated zip archive (torch's format) from another zip.
    """
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as handle:
        head = handle.read(_HEAD_BYTES)
    kind = _file_kind(head, size)
    if kind is not None:
        return kind
    if head.startswith(_ZIP_MAGIC):
        if "central directory" in torch_message:
            return (f"it is a torch checkpoint cut short ({size} bytes): a truncated or damaged copy (an interrupted "
                    "download or copy); copy it again.")
        return "it is a zip archive that holds no torch checkpoint; point to the .pt or .safetensors file itself."
    return (f"it is no torch file ({size} bytes, beginning {head[:8].hex(' ')}): a truncated or damaged copy, or "
            "another kind of file; copy it again from where the weights were made.")


def _file_kind(head: bytes, size: int) -> Optional[str]:
    """What a file beginning with ``head`` is when it is a kind of file often passed as weights by mistake."""
    if size == 0:
        return "it is empty (0 bytes): an interrupted download or copy; copy it again."
    if head.startswith(b"version https://git-lfs"):
        return ("it is a Git LFS pointer, not the weights: run `git lfs pull` in the repository it comes from, or "
                "download the file itself.")
    if len(head) >= 348 and head[344:348] in _NIFTI_MAGICS:
        return f"it is a NIfTI image, {_NOT_WEIGHTS}"
    if head.startswith(b"\x1f\x8b"):
        return f"it is gzip-compressed (a .nii.gz image?), {_NOT_WEIGHTS}"
    if head.startswith(b"\x93NUMPY"):
        return f"it is a NumPy array (.npy), {_NOT_WEIGHTS}"
    if head.startswith(b"\x89HDF"):
        return "it is an HDF5 file (Keras or TensorFlow weights?), which this package does not read; pass a .pt file."
    if len(head) > 9 and int.from_bytes(head[:8], "little") < size and head[8:10] == b'{"':
        return "it is a safetensors file with another name: rename it to end in .safetensors."
    text = _as_text(head)
    if text is not None:
        if text.lstrip().startswith("<"):
            return ("it is a web page (an HTML error or login page saved in place of the download); download the "
                    "weights again.")
        first = " ".join(text.split())[:40]
        return f"it is a text file (beginning {first!r}), {_NOT_WEIGHTS}"
    return None


def _as_text(head: bytes) -> Optional[str]:
    """``head`` as text when it is printable UTF-8 (a cut at the end of ``head`` allowed), else None."""
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError as error:
        if error.start < len(head) - 3:
            return None
        text = head[:error.start].decode("utf-8")
    return text if text and all(c.isprintable() or c.isspace() for c in text) else None
