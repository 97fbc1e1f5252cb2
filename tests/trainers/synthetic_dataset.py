"""A small CT-like nnU-Net raw dataset for the trainer tests (generated, no downloads)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import List, Sequence, Tuple

import numpy as np
import SimpleITK as sitk

# Array shape (z, y, x): deliberately not multiples of 32, so the trainer has to fit the planned patch.
CASE_SHAPE = (40, 64, 56)
SPACING_XYZ = (1.5, 1.5, 2.5)
ORIGIN_XYZ = (-60.0, 12.5, 100.0)
# A rotated direction (about z), so that lost geometry would show in the checks.
_C, _S = np.cos(0.3), np.sin(0.3)
DIRECTION = (_C, -_S, 0.0, _S, _C, 0.0, 0.0, 0.0, 1.0)
LABELS = {"background": 0, "liver": 1, "bone": 2}


def _case(rng: np.random.Generator, shape: Sequence[int]) -> Tuple[np.ndarray, np.ndarray]:
    """HU volume (air outside a soft-tissue body, a liver-like blob, a bone-like bar) and its labels."""
    zz, yy, xx = np.meshgrid(*(np.linspace(-1, 1, s) for s in shape), indexing="ij")
    image = np.full(shape, -1000.0, dtype=np.float32)
    body = (yy / 0.9) ** 2 + (xx / 0.85) ** 2 < 1.0
    image[body] = 20.0
    centre = rng.uniform(-0.25, 0.25, size=3)
    radius = rng.uniform(0.3, 0.45)
    liver = ((zz - centre[0]) ** 2 + (yy - centre[1]) ** 2 + (xx - centre[2]) ** 2 < radius**2) & body
    image[liver] = 90.0
    bone = (np.abs(yy - 0.55) < 0.1) & (np.abs(xx + rng.uniform(-0.2, 0.2)) < 0.15) & body
    image[bone] = 700.0
    image += rng.normal(0.0, 15.0, size=shape).astype(np.float32)
    labels = np.zeros(shape, dtype=np.uint8)
    labels[liver] = LABELS["liver"]
    labels[bone] = LABELS["bone"]
    return image, labels


def _write(array: np.ndarray, path: Path) -> None:
    img = sitk.GetImageFromArray(array)
    img.SetSpacing(SPACING_XYZ)
    img.SetOrigin(ORIGIN_XYZ)
    img.SetDirection(DIRECTION)
    sitk.WriteImage(img, str(path))


def write_dataset(raw_root: Path, dataset_id: int = 901, num_cases: int = 5, num_test_cases: int = 1,
                  seed: int = 0, label_bone: bool = True) -> Tuple[str, List[Path]]:
    """Write DatasetXXX_SMITToy (imagesTr, labelsTr, imagesTs, dataset.json); returns its name and test images.

    ``label_bone=False`` labels the liver-like blob only: the foreground (what nnU-Net's CT clip range comes from) is
    soft tissue, while the images still hold 700 HU bone.
    """
    name = f"Dataset{dataset_id:03d}_SMITToy"
    folder = raw_root / name
    for sub in ("imagesTr", "labelsTr", "imagesTs"):
        (folder / sub).mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(num_cases):
        image, labels = _case(rng, CASE_SHAPE)
        if not label_bone:
            labels[labels == LABELS["bone"]] = 0
        _write(image, folder / "imagesTr" / f"toy_{i:03d}_0000.nii.gz")
        _write(labels, folder / "labelsTr" / f"toy_{i:03d}.nii.gz")
    test_images = []
    for i in range(num_test_cases):
        image, _ = _case(rng, CASE_SHAPE)
        path = folder / "imagesTs" / f"test_{i:03d}_0000.nii.gz"
        _write(image, path)
        test_images.append(path)
    dataset_json = {
        "channel_names": {"0": "CT"},
        "labels": LABELS if label_bone else {k: v for k, v in LABELS.items() if k != "bone"},
        "numTraining": num_cases,
        "file_ending": ".nii.gz",
    }
    (folder / "dataset.json").write_text(json.dumps(dataset_json, indent=2))
    return name, test_images
