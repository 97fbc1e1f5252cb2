"""study.md and study.png from rows: mean and sample sd over seeds, and files written as UTF-8 whatever the locale."""
from __future__ import annotations

import locale

import pytest

from nnunet_smit.study.report import markdown_table, plot_study, summarise, write_study_md

ROWS = [
    {"arm": "enc", "labelled": 1, "seed": 0, "dice": 0.2},
    {"arm": "enc", "labelled": 1, "seed": 1, "dice": 0.4},
    {"arm": "enc", "labelled": 4, "seed": 0, "dice": 0.5},
    {"arm": "scratch", "labelled": 1, "seed": 0, "dice": None},  # no foreground predicted or present
]
HEADER = {"dataset": "Dataset1_X", "configuration": "3d_fullres", "plans": "nnUNetPlans", "test_cases": ["a", "b"],
          "seeds": 2, "budget": {"epochs": 2, "iterations_per_epoch": 4}, "device": "cpu",
          "arms": [{"name": "enc", "encoder": "/e.pt", "trainer": "T"}], "leakage": {"/e.pt": {"a": ["a.nii.gz"]}}}


def test_mean_and_sample_sd_over_seeds():
    stats = summarise(ROWS)
    assert stats[("enc", 1)] == pytest.approx((0.3, 0.14142135, 2))  # sample sd (ddof=1) of 0.2 and 0.4
    assert stats[("enc", 4)] == (0.5, 0.0, 1)
    assert ("scratch", 1) not in stats
    table = markdown_table(ROWS, ["enc", "scratch"], [1, 4])
    assert "| enc | 0.300 ± 0.141 (n=2) | 0.500 ± 0.000 (n=1) |" in table
    assert "| scratch | – | – |" in table


def test_files_are_utf8_under_a_c_locale(tmp_path):
    previous = locale.setlocale(locale.LC_CTYPE)
    locale.setlocale(locale.LC_CTYPE, "C")  # some libraries set it mid-process; open() would then write ASCII
    try:
        write_study_md(tmp_path / "study.md", HEADER, ROWS, ["enc", "scratch"], [1, 4])
        plot_study(tmp_path / "study.png", ROWS, ["enc", "scratch"], "Dice ± sd")
    finally:
        locale.setlocale(locale.LC_CTYPE, previous)
    text = (tmp_path / "study.md").read_text(encoding="utf-8")
    assert "0.300 ± 0.141" in text and "held-out cases seen in pretraining: /e.pt: a" in text
    assert (tmp_path / "study.png").read_bytes()[:4] == b"\x89PNG"
