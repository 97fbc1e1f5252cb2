"""Fit nnU-Net's planned 3D patch to the Swin size rule (every axis a multiple of 32).

A pure function of the plan, so the trainer, its tests and the README agree on what it chooses.
"""
from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from typing import Optional, Sequence, Tuple

from nnunet_smit.errors import SMITError

SIZE_DIVISOR = 32  # patch embedding (2) x four patch mergings (2**4)
MIN_AXIS = 64  # 32 leaves a 1^3 bottleneck, where instance norm fails in training mode


@dataclass(frozen=True)
class PatchFit:
    """The fitted patch (voxels, array axis order) and batch size, next to nnU-Net's plan."""

    patch_size: Tuple[int, ...]
    batch_size: int
    planned_patch_size: Tuple[int, ...]
    planned_batch_size: int

    @property
    def voxel_ratio(self) -> float:
        """Voxels per batch, fitted over planned."""
        return (math.prod(self.patch_size) * self.batch_size) / (
            math.prod(self.planned_patch_size) * self.planned_batch_size
        )

    def describe(self) -> str:
        return (
            f"SMIT patch fitting: planned patch {list(self.planned_patch_size)} x batch {self.planned_batch_size} -> "
            f"patch {list(self.patch_size)} x batch {self.batch_size} "
            f"(axes multiples of {SIZE_DIVISOR}, voxels per batch x{self.voxel_ratio:.2f})"
        )


def _check_3d(patch: Sequence[int]) -> Tuple[int, ...]:
    patch = tuple(int(p) for p in patch)
    if len(patch) != 3 or min(patch) <= 0:
        raise SMITError(
            f"SMIT needs a 3D patch of three positive sizes, got {list(patch)}; use a 3d configuration "
            "(3d_fullres, 3d_lowres or 3d_cascade_fullres)."
        )
    return patch


def _matched_batch(planned_patch: Tuple[int, ...], planned_batch: int, patch: Tuple[int, ...]) -> int:
    """Batch size that keeps voxels per batch close to the plan, at least min(2, planned)."""
    floor = min(2, planned_batch)
    return max(floor, int(round(planned_batch * math.prod(planned_patch) / math.prod(patch))))


def _keeps_order(planned: Tuple[int, ...], fitted: Tuple[int, ...]) -> bool:
    """Equal planned axes stay equal and a shorter planned axis never becomes the longer one."""
    for i, j in itertools.permutations(range(len(planned)), 2):
        if planned[i] == planned[j] and fitted[i] != fitted[j]:
            return False
        if planned[i] < planned[j] and fitted[i] > fitted[j]:
            return False
    return True


def fit_patch_size(
    planned_patch_size: Sequence[int],
    planned_batch_size: int,
    divisor: int = SIZE_DIVISOR,
    min_axis: int = MIN_AXIS,
    fixed_patch_size: Optional[Sequence[int]] = None,
) -> PatchFit:
    """Fit a planned 3D patch (array axis order, voxels) and batch size to the Swin size rule.

    Every axis becomes a multiple of ``divisor`` and at least ``min_axis``: each axis is rounded down or up to
    the nearest allowed size, and of the combinations that keep the planned axis order, the one with the
    smallest sum of |log(voxel ratio)| and the largest per-axis deviation from the common scale (in log units)
    wins, i.e. the planned aspect and the voxel budget stay close. The batch size is then scaled so that
    voxels per batch stay close to the plan (never below min(2, planned)).
    ``fixed_patch_size`` skips the search (the fixed-size trainer variants); the batch is still matched.
    """
    planned = _check_3d(planned_patch_size)
    planned_batch_size = int(planned_batch_size)
    if planned_batch_size < 1:
        raise SMITError(f"The planned batch size must be at least 1, got {planned_batch_size}.")
    if fixed_patch_size is not None:
        patch = _check_3d(fixed_patch_size)
        if any(p % divisor or p < min_axis for p in patch):
            raise SMITError(
                f"A fixed SMIT patch needs every axis a multiple of {divisor} and at least {min_axis}, "
                f"got {list(patch)}."
            )
        return PatchFit(patch, _matched_batch(planned, planned_batch_size, patch), planned, planned_batch_size)

    def allowed(size: int) -> Tuple[int, ...]:
        down = max(min_axis, (size // divisor) * divisor)
        up = max(min_axis, -(-size // divisor) * divisor)
        return tuple(sorted({down, up}))

    planned_log_volume = sum(math.log(p) for p in planned)
    best_score, best = None, None
    for candidate in itertools.product(*(allowed(p) for p in planned)):
        if not _keeps_order(planned, candidate):
            continue
        log_ratios = [math.log(c / p) for c, p in zip(candidate, planned)]
        mean_log_ratio = sum(log_ratios) / len(log_ratios)
        aspect_change = max(abs(r - mean_log_ratio) for r in log_ratios)
        volume_change = abs(sum(math.log(c) for c in candidate) - planned_log_volume)
        # ties: the smaller patch (cheaper)
        score = (round(volume_change + aspect_change, 12), math.prod(candidate))
        if best_score is None or score < best_score:
            best_score, best = score, candidate
    # rounding every axis the same way always keeps the order, so a candidate exists
    assert best is not None
    patch = tuple(int(c) for c in best)
    return PatchFit(patch, _matched_batch(planned, planned_batch_size, patch), planned, planned_batch_size)
