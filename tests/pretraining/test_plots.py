"""The loss curves draw every objective beside what it is measured against (the lines, not the pixels)."""
import json
import math

import matplotlib.pyplot as plt
import pytest

from nnunet_smit.pretraining.plots import loss_figure, plot_loss_curves


def _records(with_distillation=True):
    records = [{"event": "start", "step": 0, "prototypes": {"dino": 128, "ibot": 64} if with_distillation else {}}]
    for step in (1, 2, 3):
        record = {"event": "train", "step": step, "loss": 1.0, "lr": 1e-4, "reconstruction": 0.2,
                  "recon_l1_view_mean": 0.3, "recon_l1_block_mean": 0.25}
        if with_distillation:
            record.update(dino=4.5, ibot=4.0, teacher_entropy=4.6, teacher_patch_entropy=3.9, teacher_dim_std=0.01)
        records.append(record)
    return records


def _lines(ax):
    return {line.get_label(): line for line in ax.get_lines()}


def test_each_objective_is_drawn_beside_its_baselines_dashed():
    fig, panels = loss_figure(_records())
    reconstruction = _lines(panels["reconstruction"])
    assert reconstruction["reconstruction"].get_linestyle() == "-"
    for baseline in ("recon_l1_view_mean", "recon_l1_block_mean"):
        assert reconstruction[baseline].get_linestyle() == "--"
    assert list(reconstruction["recon_l1_block_mean"].get_ydata()) == [0.25] * 3
    for name, entropy, k in (("dino", "teacher_entropy", 128), ("ibot", "teacher_patch_entropy", 64)):
        lines = _lines(panels[name])
        assert lines[name].get_linestyle() == "-"
        assert lines[entropy].get_linestyle() == "--"
        uniform = [line for label, line in lines.items() if label.startswith("log K")]
        assert len(uniform) == 1 and uniform[0].get_linestyle() == "--"
        assert list(uniform[0].get_ydata()) == pytest.approx([math.log(k)] * 2)  # K of that head
    plt.close(fig)


def test_objectives_that_are_off_and_logs_without_k_draw_no_reference():
    fig, panels = loss_figure(_records(with_distillation=False))
    assert panels["dino"].get_lines() == [] and panels["dino"].get_title() == "dino: off"
    assert len(panels["reconstruction"].get_lines()) == 3
    plt.close(fig)
    older = [r for r in _records() if r["event"] == "train"]  # a log written before K was recorded
    fig, panels = loss_figure(older)
    assert not any(label.startswith("log K") for label in _lines(panels["dino"]))
    plt.close(fig)


def test_the_figure_is_written_from_the_log(tmp_path):
    log = tmp_path / "log.jsonl"
    log.write_text("".join(json.dumps(r) + "\n" for r in _records()))
    assert plot_loss_curves(log, tmp_path / "loss_curves.png") == tmp_path / "loss_curves.png"
    assert (tmp_path / "loss_curves.png").stat().st_size > 0
    log.write_text(json.dumps({"event": "start", "step": 0}) + "\n")
    assert plot_loss_curves(log, tmp_path / "none.png") is None
