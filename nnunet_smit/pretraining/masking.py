"""Masking generator for SMIT pretraining: random cubes of voxels, an exact share of them per view.

A view of shape (D, H, W) is tiled into cubes of ``cube_size`` voxels per axis (16 in SMIT, so a 96^3 view has a
6x6x6 cube grid that lines up one-to-one with the encoder's stage-2 merge tokens). For every view independently,
``round(mask_ratio * n_cubes)`` cubes are masked. The cube grid is expanded to whichever grid a consumer needs: the
patch-token grid of the encoder (``token_mask``), the distillation tap grid, or voxels (reconstruction loss).
"""
from __future__ import annotations

from typing import Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from nnunet_smit.errors import SMITError


class CubeMaskGenerator:
    """Draws boolean cube masks with an exact number of masked cubes per view.

    Args:
        cube_size: edge of a masking cube in voxels (16 in SMIT).
        mask_ratio: share of cubes masked in every view (0.7 in SMIT); the count is ``round(ratio * n_cubes)``.
    """

    def __init__(self, cube_size: int = 16, mask_ratio: float = 0.7) -> None:
        if cube_size < 1:
            raise SMITError(f"mask cube size must be a positive number of voxels, got {cube_size}.")
        if not 0.0 <= mask_ratio <= 1.0:
            raise SMITError(f"mask ratio must lie in [0, 1], got {mask_ratio}.")
        self.cube_size = int(cube_size)
        self.mask_ratio = float(mask_ratio)

    def grid_shape(self, view_shape: Sequence[int]) -> Tuple[int, int, int]:
        """Cube grid (gD, gH, gW) of a view of ``view_shape`` (D, H, W) voxels."""
        if len(view_shape) != 3:
            raise SMITError(f"views are 3D, got shape {tuple(view_shape)}.")
        for size in view_shape:
            if size % self.cube_size:
                raise SMITError(
                    f"view shape {tuple(view_shape)} is not a multiple of the {self.cube_size}-voxel mask cube; "
                    "choose a view size that the cube divides."
                )
        return tuple(int(s) // self.cube_size for s in view_shape)  # type: ignore[return-value]

    def num_masked(self, view_shape: Sequence[int]) -> int:
        """Number of masked cubes per view."""
        gd, gh, gw = self.grid_shape(view_shape)
        return int(round(self.mask_ratio * gd * gh * gw))

    def __call__(
        self, batch_size: int, view_shape: Sequence[int], generator: Optional[torch.Generator] = None
    ) -> torch.Tensor:
        """Draw masks for ``batch_size`` views.

        Returns:
            bool tensor (B, D/cube, H/cube, W/cube), True where the cube is masked; each view has exactly
            :meth:`num_masked` True entries, placed uniformly at random.
        """
        grid = self.grid_shape(view_shape)
        n_cubes = grid[0] * grid[1] * grid[2]
        n_masked = self.num_masked(view_shape)
        scores = torch.rand(batch_size, n_cubes, generator=generator)
        order = scores.argsort(dim=1)
        mask = torch.zeros(batch_size, n_cubes, dtype=torch.bool)
        mask.scatter_(1, order[:, :n_masked], True)
        return mask.view(batch_size, *grid)


def upsample_mask(mask: torch.Tensor, factor: int) -> torch.Tensor:
    """Repeat every cell of a (B, d, h, w) mask ``factor`` times along each axis -> (B, d*f, h*f, w*f)."""
    if factor == 1:
        return mask
    return mask.repeat_interleave(factor, 1).repeat_interleave(factor, 2).repeat_interleave(factor, 3)


def cube_mask_to_grid(mask: torch.Tensor, cube_size: int, cell_size: int) -> torch.Tensor:
    """Express a cube mask on a grid whose cells are ``cell_size`` voxels wide.

    A cell is masked when any voxel in it is masked (cells smaller than cubes simply repeat the cube's value).

    Args:
        mask: bool (B, D/cube_size, H/cube_size, W/cube_size).
        cube_size: voxels per cube edge.
        cell_size: voxels per target cell edge (2 for the patch-token grid, 16 for the SMIT distillation tap,
            1 for voxels).

    Returns:
        bool (B, D/cell_size, H/cell_size, W/cell_size).
    """
    if cube_size % cell_size == 0:
        return upsample_mask(mask, cube_size // cell_size)
    if cell_size % cube_size == 0:
        pooled = F.max_pool3d(mask[:, None].float(), kernel_size=cell_size // cube_size)
        return pooled[:, 0] > 0.5
    # Neither divides the other: go through voxels.
    voxels = upsample_mask(mask, cube_size)
    pooled = F.max_pool3d(voxels[:, None].float(), kernel_size=cell_size)
    return pooled[:, 0] > 0.5
