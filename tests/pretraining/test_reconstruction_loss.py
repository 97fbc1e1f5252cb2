"""The reconstruction loss's trivial baselines on hand-made views, and the summary's comparison with them."""
import pytest
import torch

from nnunet_smit.pretraining.export import reconstruction_against_baselines
from nnunet_smit.pretraining.reconstruction_loss import masked_l1, reconstruction_baselines

# float32 sums of a few hundred thousand voxels: relative error well below 1e-5.
REL = 1e-5


def test_baselines_of_a_hand_made_view_with_voxel_cubes():
    # One 2x2x6 view, mask cubes of 1 voxel, blocks of 2^3 voxels: three blocks along W.
    views = torch.zeros(1, 1, 2, 2, 6)
    masks = torch.zeros(1, 2, 2, 6, dtype=torch.bool)

    def block(index, visible, masked):
        views[0, 0, :, :, 2 * index:2 * index + 2] = torch.tensor(visible + masked, dtype=torch.float32).view(2, 2, 2)
        masks[0, :, :, 2 * index:2 * index + 2] = torch.tensor([False] * len(visible) + [True] * len(masked)).view(
            2, 2, 2)

    block(0, [0, 0, 0, 4], [1, 3, 5, 7])  # visible mean 1
    block(1, [10] * 6, [12, 8])  # visible mean 10
    block(2, [], [2] * 8)  # nothing visible: the view's visible mean, (4 + 60) / 10 = 6.4
    baselines = reconstruction_baselines(views, masks, cube=1, block=2)
    # View mean 6.4 on the 14 masked voxels: (5.4 + 3.4 + 1.4 + 0.6) + (5.6 + 1.6) + 8 * 4.4 = 53.2.
    assert baselines["recon_l1_view_mean"].item() == pytest.approx(53.2 / 14, rel=REL)
    # Block means 1, 10 and 6.4: (0 + 2 + 4 + 6) + (2 + 2) + 8 * 4.4 = 51.2.
    assert baselines["recon_l1_block_mean"].item() == pytest.approx(51.2 / 14, rel=REL)


def test_baselines_in_the_smit_geometry_count_the_voxels_the_loss_counts():
    # 64^3 views, 16^3 mask cubes, 32^3 blocks (one bottleneck token each). View 0: block b holds the value b; four
    # of the eight cubes of blocks 0-6 are masked, all of block 7. View 1: 100 everywhere, half its cubes masked.
    views = torch.zeros(2, 1, 64, 64, 64)
    masks = torch.zeros(2, 4, 4, 4, dtype=torch.bool)
    for b in range(8):
        d, h, w = (b >> 2) & 1, (b >> 1) & 1, b & 1
        views[0, 0, 32 * d:32 * d + 32, 32 * h:32 * h + 32, 32 * w:32 * w + 32] = b
        cubes = masks[0, 2 * d:2 * d + 2, 2 * h:2 * h + 2, 2 * w:2 * w + 2]
        cubes[0] = True
        if b == 7:
            cubes[1] = True
    views[1] = 100.0
    masks[1, :2] = True
    assert int(masks.sum()) == 7 * 4 + 8 + 32
    baselines = reconstruction_baselines(views, masks, cube=16, block=32)
    # Block means are exact for blocks 0-6 and view 1; block 7 falls back to view 0's visible mean 3: 8 cubes off
    # by 4, over 68 masked cubes.
    assert baselines["recon_l1_block_mean"].item() == pytest.approx(8 * 4 / 68, rel=REL)
    # View 0's mean 3 everywhere: 4 cubes x (3+2+1+0+1+2+3) in blocks 0-6, 8 x 4 in block 7; view 1 exact.
    assert baselines["recon_l1_view_mean"].item() == pytest.approx((4 * 12 + 8 * 4) / 68, rel=REL)
    # The same normalisation as the loss: the loss of a reconstruction that predicts 3 on view 0 and 100 on view 1.
    prediction = torch.cat([torch.full((1, 1, 64, 64, 64), 3.0), torch.full((1, 1, 64, 64, 64), 100.0)])
    assert masked_l1(prediction, views, masks, 16).item() == pytest.approx(
        baselines["recon_l1_view_mean"].item(), rel=REL)


def test_baselines_need_no_gradient():
    views = torch.rand(2, 1, 32, 32, 32, requires_grad=True)
    masks = torch.rand(2, 2, 2, 2) < 0.5
    assert not any(v.requires_grad for v in reconstruction_baselines(views, masks, 16, 32).values())


def _record(step, reconstruction, view_mean, block_mean):
    return {"event": "train", "step": step, "reconstruction": reconstruction, "recon_l1_view_mean": view_mean,
            "recon_l1_block_mean": block_mean}


def test_the_summary_compares_the_last_records_mean_with_the_best_baseline():
    records = [_record(1, 9.0, 9.0, 9.0)]  # earlier than the last five: not counted
    records += [_record(step, r, 0.2, b) for step, r, b in
                [(2, 0.10, 0.15), (3, 0.12, 0.15), (4, 0.08, 0.14), (5, 0.10, 0.16), (6, 0.10, 0.15)]]
    records.append({"event": "train", "step": 7, "dino": 3.0})  # no reconstruction: not counted
    comparison = reconstruction_against_baselines(records)
    assert comparison["best_baseline"] == "recon_l1_block_mean"
    assert comparison["recon_l1"] == pytest.approx(0.10)
    assert comparison["best_baseline_l1"] == pytest.approx(0.15)
    assert comparison["ratio"] == pytest.approx(0.10 / 0.15)
    assert comparison["baselines_l1"]["recon_l1_view_mean"] == pytest.approx(0.2)
    assert comparison["train_records"] == 5 and comparison["steps"] == [2, 6]
    assert reconstruction_against_baselines([{"event": "train", "step": 1, "dino": 3.0}]) is None
