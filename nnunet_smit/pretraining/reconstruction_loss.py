"""The reconstruction objective's loss, and the loss of two trivial predictors on the same voxels.

The loss is the mean absolute error over the voxels of the masked cubes. Its baselines say what that number is
worth: ``recon_l1_view_mean`` predicts every masked voxel of a view as the mean of the view's visible voxels, and
``recon_l1_block_mean`` predicts it as the mean of the visible voxels of its block, the voxels that one bottleneck
token reconstructs (32^3 for SMIT's head at 1/32), falling back to the view's visible mean for a block with none. A
reconstruction that does not beat them has learnt no more than a local intensity average.
"""
from __future__ import annotations

import math
from typing import Dict

import torch

from nnunet_smit.pretraining.masking import cube_mask_to_grid

RECONSTRUCTION_BASELINES = ("recon_l1_view_mean", "recon_l1_block_mean")


def masked_l1(reconstruction: torch.Tensor, target: torch.Tensor, cube_mask: torch.Tensor, cube: int) -> torch.Tensor:
    """Mean absolute error over the voxels of the masked cubes (0, with a gradient path, when none is masked).

    Sums the error per cube and weighs the cubes by the mask, so neither a voxel mask nor a data-dependent selection
    (which would make the host wait for the device) is needed.

    Args:
        reconstruction, target: (N, C, D, H, W).
        cube_mask: bool (N, D/cube, H/cube, W/cube), on the device of the images.
        cube: voxels per cube edge.
    """
    return _mean_over_masked_cubes((reconstruction.float() - target.float()).abs(), cube_mask, cube)


def _mean_over_masked_cubes(error: torch.Tensor, cube_mask: torch.Tensor, cube: int) -> torch.Tensor:
    """Mean of (N, C, D, H, W) ``error`` over the voxels of the masked cubes."""
    n, c = error.shape[:2]
    gd, gh, gw = cube_mask.shape[1:]
    per_cube = error.view(n, c, gd, cube, gh, cube, gw, cube).sum(dim=(1, 3, 5, 7))
    weights = cube_mask.to(per_cube.dtype)
    return (per_cube * weights).sum() / (weights.sum() * (c * cube**3)).clamp_min(1.0)


def _blocks(volume: torch.Tensor, size: int) -> torch.Tensor:
    """(N, C, D, H, W) -> (N, C, D/size, size, H/size, size, W/size, size), a view."""
    n, c, d, h, w = volume.shape
    return volume.view(n, c, d // size, size, h // size, size, w // size, size)


def reconstruction_baselines(
    target: torch.Tensor, cube_mask: torch.Tensor, cube: int, block: int,
) -> Dict[str, torch.Tensor]:
    """:func:`masked_l1` of the two trivial predictors (module docstring) on the voxels the loss counts, without
    gradients and without host synchronisation.

    Visibility is constant on cells of gcd(cube, block) voxels, so the visible sums are taken per cell (one pass over
    the views), and each predictor's error costs one more pass.

    Args:
        target: (N, C, D, H, W) views, intensities as the reconstruction loss sees them.
        cube_mask: bool (N, D/cube, H/cube, W/cube), True where masked.
        cube: voxels per mask cube edge.
        block: voxels per edge of what one bottleneck token reconstructs (the encoder's total stride, 32); divides
            D, H and W.

    Returns:
        0-d float tensors ``recon_l1_view_mean`` and ``recon_l1_block_mean``. A view with no visible voxel predicts 0.
    """
    with torch.no_grad():
        target = target.float()
        n, c = target.shape[:2]
        cell = math.gcd(cube, block)
        visible = (~cube_mask_to_grid(cube_mask, cube, cell))[:, None].to(target.dtype)  # (N, 1, D/cell, ...)
        seen = _blocks(target, cell).sum(dim=(3, 5, 7)) * visible  # visible sum per cell
        count = visible * cell**3
        view_mean = seen.sum(dim=(2, 3, 4), keepdim=True) / count.sum(dim=(2, 3, 4), keepdim=True).clamp_min(1.0)
        cells = block // cell
        block_seen = _blocks(seen, cells).sum(dim=(3, 5, 7))
        block_count = _blocks(count, cells).sum(dim=(3, 5, 7))
        block_mean = torch.where(block_count > 0, block_seen / block_count.clamp_min(1.0), view_mean)
        block_error = (_blocks(target, block) - block_mean[:, :, :, None, :, None, :, None]).abs()
        return {
            "recon_l1_view_mean": _mean_over_masked_cubes((target - view_mean).abs(), cube_mask, cube),
            "recon_l1_block_mean": _mean_over_masked_cubes(block_error.view(target.shape), cube_mask, cube),
        }
