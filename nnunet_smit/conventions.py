"""Conventions shared by pretraining and fine-tuning: how the encoder saw its input.

Pretraining writes a :class:`PretrainPreprocessing` into every encoder checkpoint; fine-tuning reads it back
to map nnU-Net's normalised intensities onto the same HU window and to warn about spacing far from it.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Dict, Tuple

from nnunet_smit.errors import SMITError

# Arrays are read with SimpleITK the way nnU-Net's default reader does: (z, y, x) axis order, spacing
# reversed to match, no reorientation.
AXIS_CONVENTION_NNUNET = "nnunet_sitk_zyx"


@dataclass
class PretrainPreprocessing:
    """How scans were turned into network input during pretraining.

    Attributes:
        target_spacing_mm: voxel spacing after resampling, in the array's axis order (z, y, x), in mm.
        hu_window: HU values clipped to this range (lower, upper).
        scaled_range: the clipped window is mapped linearly onto this range.
        axis_convention: how arrays are laid out (see ``AXIS_CONVENTION_NNUNET``).
        modality: imaging modality of the pretraining data.
        foreground_crop: whether scans were cropped to the body before sampling.
    """

    target_spacing_mm: Tuple[float, float, float] = (2.0, 2.0, 2.0)
    hu_window: Tuple[float, float] = (-175.0, 250.0)
    scaled_range: Tuple[float, float] = (0.0, 1.0)
    axis_convention: str = AXIS_CONVENTION_NNUNET
    modality: str = "CT"
    foreground_crop: bool = True

    def __post_init__(self) -> None:
        self.target_spacing_mm = tuple(float(s) for s in self.target_spacing_mm)
        self.hu_window = tuple(float(v) for v in self.hu_window)
        self.scaled_range = tuple(float(v) for v in self.scaled_range)
        if len(self.target_spacing_mm) != 3 or min(self.target_spacing_mm) <= 0:
            raise SMITError(f"target_spacing_mm must be three positive numbers, got {self.target_spacing_mm}.")
        if len(self.hu_window) != 2 or self.hu_window[0] >= self.hu_window[1]:
            raise SMITError(f"hu_window must be (lower, upper) with lower < upper, got {self.hu_window}.")
        if len(self.scaled_range) != 2 or self.scaled_range[0] >= self.scaled_range[1]:
            raise SMITError(f"scaled_range must be (lower, upper) with lower < upper, got {self.scaled_range}.")

    def to_dict(self) -> Dict[str, Any]:
        d = dataclasses.asdict(self)
        for key in ("target_spacing_mm", "hu_window", "scaled_range"):
            d[key] = list(d[key])
        return d

    @classmethod
    def from_dict(cls, d: Dict[str, Any]) -> "PretrainPreprocessing":
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})

    def scale_hu(self, hu):
        """Clip HU to the window and map it linearly onto ``scaled_range`` (numpy array or torch tensor)."""
        lo, hi = self.hu_window
        out_lo, out_hi = self.scaled_range
        clipped = hu.clip(lo, hi)
        return (clipped - lo) * ((out_hi - out_lo) / (hi - lo)) + out_lo
