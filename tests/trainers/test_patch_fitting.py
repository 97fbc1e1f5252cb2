"""Patch fitting: nnU-Net's planned 3D patch -> every axis a multiple of 32, >= 64, aspect and budget kept."""
import math

import pytest

from nnunet_smit.errors import SMITError
from nnunet_smit.trainers.patch_fitting import fit_patch_size

PLANS = [
    ((40, 64, 56), 2),  # the synthetic test dataset
    ((48, 80, 80), 2),
    ((80, 160, 160), 2),
    ((128, 112, 112), 2),
    ((56, 224, 192), 2),
    ((40, 48, 56), 2),
    ((96, 160, 160), 2),
    ((28, 256, 256), 2),
]


@pytest.mark.parametrize("planned,batch", PLANS)
def test_axes_are_multiples_of_32_and_at_least_64(planned, batch):
    fit = fit_patch_size(planned, batch)
    assert all(p % 32 == 0 and p >= 64 for p in fit.patch_size)
    assert fit.batch_size >= min(2, batch)


@pytest.mark.parametrize("planned,batch", PLANS)
def test_each_axis_is_rounded_to_a_neighbouring_allowed_size(planned, batch):
    fit = fit_patch_size(planned, batch)
    for p, f in zip(planned, fit.patch_size):
        assert f in {max(64, (p // 32) * 32), max(64, -(-p // 32) * 32)}


@pytest.mark.parametrize("planned,batch", PLANS)
def test_planned_axis_order_is_kept(planned, batch):
    fit = fit_patch_size(planned, batch)
    for i in range(3):
        for j in range(3):
            if planned[i] == planned[j]:
                assert fit.patch_size[i] == fit.patch_size[j]
            if planned[i] < planned[j]:
                assert fit.patch_size[i] <= fit.patch_size[j]


def test_conforming_plan_is_unchanged():
    fit = fit_patch_size((96, 160, 160), 2)
    assert fit.patch_size == (96, 160, 160) and fit.batch_size == 2 and fit.voxel_ratio == 1.0


def test_known_choices():
    # What the README reports; the test dataset plans (40, 64, 56) x 2.
    assert fit_patch_size((40, 64, 56), 2).patch_size == (64, 64, 64)
    assert fit_patch_size((48, 80, 80), 2).patch_size == (64, 64, 64)
    assert fit_patch_size((80, 160, 160), 2).patch_size == (96, 160, 160)
    assert fit_patch_size((128, 112, 112), 2).patch_size == (128, 128, 128)


def test_batch_is_scaled_to_keep_the_voxel_budget():
    fit = fit_patch_size((80, 160, 160), 2, fixed_patch_size=(96, 96, 96))
    assert fit.patch_size == (96, 96, 96)
    assert fit.batch_size == round(2 * 80 * 160 * 160 / 96**3)  # 5
    assert abs(math.log(fit.voxel_ratio)) < math.log(1.25)


def test_batch_never_drops_below_two():
    fit = fit_patch_size((64, 64, 64), 2, fixed_patch_size=(128, 128, 128))
    assert fit.batch_size == 2


def test_pure_function():
    assert fit_patch_size((56, 224, 192), 2) == fit_patch_size([56, 224, 192], 2)


def test_2d_patch_refused():
    with pytest.raises(SMITError, match="3D"):
        fit_patch_size((512, 512), 12)


def test_fixed_patch_must_follow_the_rule():
    with pytest.raises(SMITError, match="multiple of 32"):
        fit_patch_size((64, 64, 64), 2, fixed_patch_size=(80, 96, 96))
