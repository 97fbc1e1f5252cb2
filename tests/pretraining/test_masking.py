"""Cube masking: exact ratio per view, cube layout, grids the consumers need."""
import pytest
import torch

from nnunet_smit.errors import SMITError
from nnunet_smit.pretraining.masking import CubeMaskGenerator, cube_mask_to_grid


@pytest.mark.parametrize("view,ratio", [((64, 64, 64), 0.7), ((96, 96, 96), 0.7), ((96, 64, 128), 0.5)])
def test_exact_number_of_masked_cubes_per_view(view, ratio):
    generator = CubeMaskGenerator(cube_size=16, mask_ratio=ratio)
    masks = generator(32, view, generator=torch.Generator().manual_seed(0))
    grid = tuple(s // 16 for s in view)
    assert masks.shape == (32, *grid) and masks.dtype == torch.bool
    expected = round(ratio * grid[0] * grid[1] * grid[2])
    assert masks.flatten(1).sum(1).tolist() == [expected] * 32


def test_views_are_masked_independently_and_reproducibly():
    generator = CubeMaskGenerator()
    a = generator(16, (96, 96, 96), generator=torch.Generator().manual_seed(1))
    b = generator(16, (96, 96, 96), generator=torch.Generator().manual_seed(1))
    assert torch.equal(a, b)
    distinct = {tuple(m.flatten().tolist()) for m in a}
    assert len(distinct) == 16
    # Every cube gets masked about 70% of the time over many draws (no positional bias).
    many = generator(2000, (96, 96, 96), generator=torch.Generator().manual_seed(2)).float().mean(0)
    assert torch.allclose(many, torch.full_like(many, 151 / 216), atol=0.05)


def test_token_and_voxel_grids_are_whole_cubes():
    masks = CubeMaskGenerator()(4, (64, 64, 64), generator=torch.Generator().manual_seed(3))
    tokens = cube_mask_to_grid(masks, 16, 2)
    voxels = cube_mask_to_grid(masks, 16, 1)
    tap = cube_mask_to_grid(masks, 16, 16)
    assert tokens.shape == (4, 32, 32, 32) and voxels.shape == (4, 64, 64, 64)
    assert torch.equal(tap, masks)  # the 16-voxel tap grid lines up one-to-one with the cubes
    # Each 8^3 block of patch tokens (one cube) is all masked or all visible, matching its cube.
    blocks = tokens.view(4, 4, 8, 4, 8, 4, 8).permute(0, 1, 3, 5, 2, 4, 6).flatten(4)
    assert torch.equal(blocks.all(-1), masks) and torch.equal(blocks.any(-1), masks)
    assert voxels.float().mean().item() == pytest.approx(masks.float().mean().item())


def test_coarser_cells_are_masked_when_any_voxel_is():
    masks = torch.zeros(1, 4, 4, 4, dtype=torch.bool)
    masks[0, 0, 0, 1] = True
    coarse = cube_mask_to_grid(masks, 8, 16)
    assert coarse.shape == (1, 2, 2, 2) and coarse.sum() == 1 and coarse[0, 0, 0, 0]


def test_bad_settings_are_clear_errors():
    with pytest.raises(SMITError, match="multiple of the 16-voxel"):
        CubeMaskGenerator()(1, (72, 64, 64))
    with pytest.raises(SMITError, match="mask ratio"):
        CubeMaskGenerator(mask_ratio=1.5)
