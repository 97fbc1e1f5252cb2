"""The learning-rate schedule is a pure function of the epoch (nnU-Net does not checkpoint schedulers)."""
import pytest
import torch

from nnunet_smit.trainers.schedule import EpochLRScheduler, learning_rate_at


def test_warmup_then_cosine():
    lrs = [learning_rate_at(e, 1.0, 10, 3) for e in range(10)]
    assert lrs[:4] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    assert all(a > b for a, b in zip(lrs[3:], lrs[4:]))  # strictly decreasing after warm-up
    assert 0.0 < lrs[-1] < 0.1


def test_poly_without_warmup_matches_nnunet():
    for epoch in range(0, 1000, 97):
        assert learning_rate_at(epoch, 1e-2, 1000, 0, "poly") == pytest.approx(1e-2 * (1 - epoch / 1000) ** 0.9)


def test_warmup_longer_than_run_is_cut():
    assert [learning_rate_at(e, 1.0, 2, 50) for e in range(2)] == pytest.approx([0.5, 1.0])


def test_scheduler_depends_only_on_epoch():
    """Stepping in any order, or in a fresh scheduler (what --c does), gives the same rates."""
    def make():
        params = [torch.nn.Parameter(torch.zeros(1)), torch.nn.Parameter(torch.zeros(1))]
        opt = torch.optim.AdamW([{"params": [params[0]], "lr_scale": 1.0}, {"params": [params[1]], "lr_scale": 0.5}])
        return opt, EpochLRScheduler(opt, 3e-4, 100, 10)

    opt_a, sched_a = make()
    for epoch in range(0, 60):
        sched_a.step(epoch)
    opt_b, sched_b = make()
    sched_b.step(59)
    assert [g["lr"] for g in opt_a.param_groups] == [g["lr"] for g in opt_b.param_groups]
    assert opt_a.param_groups[0]["lr"] == pytest.approx(learning_rate_at(59, 3e-4, 100, 10))
    assert opt_a.param_groups[1]["lr"] == pytest.approx(0.5 * learning_rate_at(59, 3e-4, 100, 10))
    sched_a.step(5)
    sched_b.step(5)
    assert [g["lr"] for g in opt_a.param_groups] == [g["lr"] for g in opt_b.param_groups]


def test_a_held_group_is_at_zero_then_ramps_up_to_the_schedule():
    from nnunet_smit.trainers.schedule import hold_factor

    assert [hold_factor(e, 3) for e in range(8)] == pytest.approx([0, 0, 0, 0.25, 0.5, 0.75, 1, 1])
    assert [hold_factor(e, 0) for e in range(3)] == [1.0, 1.0, 1.0]
    params = [torch.nn.Parameter(torch.zeros(1)), torch.nn.Parameter(torch.zeros(1))]
    opt = torch.optim.AdamW([{"params": [params[0]], "lr_scale": 1.0},
                             {"params": [params[1]], "lr_scale": 0.5, "hold_epochs": 2}])
    scheduler = EpochLRScheduler(opt, 1.0, 10, 0)
    assert opt.param_groups[1]["lr"] == 0.0 and opt.param_groups[0]["lr"] == 1.0
    scheduler.step(2)
    assert opt.param_groups[1]["lr"] == pytest.approx(0.5 * learning_rate_at(2, 1.0, 10, 0) / 3)
    scheduler.step(4)
    assert opt.param_groups[1]["lr"] == pytest.approx(0.5 * learning_rate_at(4, 1.0, 10, 0))
