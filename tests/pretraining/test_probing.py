"""The online probe's schedule and records (nnunet_smit.pretraining.probing); the probe itself on a real dataset is in
tests/probe/test_probe_cli.py."""
from __future__ import annotations

import pytest
from torch import nn

from nnunet_smit.conventions import PretrainPreprocessing
from nnunet_smit.pretraining import probing


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_every_n_epochs_and_always_the_last_step():
    schedule = probing.ProbeSchedule(every_epochs=3)
    assert [epoch for epoch in range(9) if schedule.due(epoch, last=False)] == [2, 5, 8]
    assert schedule.due(0, last=True)


def test_the_automatic_schedule_keeps_the_probes_within_five_percent_of_the_run(monkeypatch):
    clock = Clock()
    monkeypatch.setattr(probing.time, "monotonic", clock)
    schedule = probing.ProbeSchedule()
    probed = []
    for epoch in range(200):  # 10 s of training per epoch, 20 s per probe
        clock.now += 10.0
        if schedule.due(epoch, last=epoch == 199):
            clock.now += 20.0
            schedule.spent(20.0)
            probed.append(epoch)
    assert probed[0] == 0 and probed[-1] == 199  # the first epoch's end, and the last step
    summary = schedule.summary()
    assert summary["probes"] == len(probed) and summary["probe_seconds"] == 20.0 * len(probed)
    assert 0.04 < summary["share_of_run"] <= 0.05 + 20.0 / (200 * 10.0)  # within 5%, but for the last probe
    assert probed == [0, 79, 119, 159, 199]  # 20 s probes, 10 s epochs: one probe per 400 s of training


def test_a_failing_probe_is_recorded_and_never_stops_the_run(caplog):
    def broken(encoder, preprocessing):
        raise RuntimeError("CUDA out of memory\nmore detail")

    record = probing.run_probe(broken, nn.Linear(1, 1), PretrainPreprocessing(), step=7, epoch=0)
    assert record["event"] == "probe" and record["step"] == 7 and record["epoch"] == 1
    assert record["probe_dice"] is None and record["probe_error"].startswith("RuntimeError: CUDA out of memory")
    assert "online probe at step 7 failed (RuntimeError: CUDA out of memory); pretraining goes on." in caplog.text


@pytest.mark.parametrize("dice", [0.42, None])
def test_the_record_carries_the_dice_per_class_and_cost(dice):
    result = {"dice": dice, "dice_per_class": {"liver": dice}, "seconds": 3.0}
    record = probing.run_probe(lambda encoder, preprocessing: result, nn.Linear(1, 1), PretrainPreprocessing(), 4, 1)
    assert record["probe_dice"] == dice and record["probe_dice_per_class"] == {"liver": dice}
    assert record["epoch"] == 2 and record["probe_seconds"] >= 0.0
