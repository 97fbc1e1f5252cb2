"""smit_demo's pieces: labelled phantoms as an nnU-Net raw dataset, Dice, and the overlay picture."""
from __future__ import annotations

import json

import numpy as np
import pytest
import SimpleITK as sitk

from nnunet_smit.demo import DATASET_NAME, dice_per_class, plot_overlay, write_labelled_dataset
from nnunet_smit.pretraining.phantoms import (
    DEMO_PHANTOM,
    ORGAN_LABELS,
    generate_labelled_phantom,
    generate_phantom_volume,
)


def test_labelled_phantom_has_every_organ_inside_the_body_and_is_cropped_to_the_abdomen():
    hu, labels, spacing = generate_labelled_phantom(np.random.default_rng([1000, 0]), **DEMO_PHANTOM)
    full, full_spacing = generate_phantom_volume(np.random.default_rng([1000, 0]), **DEMO_PHANTOM)
    assert spacing == full_spacing and hu.shape == labels.shape and labels.dtype == np.uint8
    assert all(s_crop <= s_full for s_crop, s_full in zip(hu.shape, full.shape)) and hu.size < full.size
    assert set(np.unique(labels)) == set(ORGAN_LABELS.values())
    for name in ("liver", "spleen", "kidney"):
        organ = hu[labels == ORGAN_LABELS[name]]
        assert organ.size > 500, name
        # soft tissue, tens of HU from its neighbours (muscle 40-60, bowel 15-35); enhanced kidneys up to 180
        assert -20 < np.median(organ) < 200, (name, np.median(organ))
    assert (hu[labels > 0] > -500).mean() > 0.99  # organs lie inside the body
    # in-plane the crop is the body's box: its first and last rows and columns hold body, the table lies beyond
    assert all((np.moveaxis(hu, axis, 0)[index] > -500).any() for axis in (1, 2) for index in (0, -1))


def test_labelled_dataset_is_an_nnunet_raw_dataset(tmp_path):
    folder = write_labelled_dataset(tmp_path, n_cases=2)
    assert folder.name == DATASET_NAME
    meta = json.loads((folder / "dataset.json").read_text())
    assert meta["labels"] == ORGAN_LABELS and meta["numTraining"] == 2 and meta["channel_names"] == {"0": "CT"}
    for i in range(2):
        image = sitk.ReadImage(str(folder / "imagesTr" / f"demo_{i:03d}_0000.nii.gz"))
        seg = sitk.ReadImage(str(folder / "labelsTr" / f"demo_{i:03d}.nii.gz"))
        assert image.GetSize() == seg.GetSize() and image.GetSpacing() == seg.GetSpacing()
        assert 2.4 < min(image.GetSpacing()) and max(image.GetSpacing()) < 3.8  # DEMO_PHANTOM's ~3 mm voxels


def test_dice_per_class():
    reference = np.zeros((4, 4, 4), np.uint8)
    reference[:2] = 1
    prediction = np.zeros_like(reference)
    prediction[1:3] = 1
    dice = dice_per_class(prediction, reference, ORGAN_LABELS)
    assert dice == {"liver": 0.5, "spleen": 1.0, "kidney": 1.0}  # absent from both: 1


def test_overlay_is_written(tmp_path):
    hu, labels, _ = generate_labelled_phantom(np.random.default_rng([1000, 1]), **DEMO_PHANTOM)
    plot_overlay(hu, labels, labels, tmp_path / "overlay.png", "test")
    assert (tmp_path / "overlay.png").read_bytes()[:4] == b"\x89PNG"


def test_the_demo_steps_run_and_write_every_table(tmp_path, monkeypatch):
    """The whole demo at smoke size (2 pretraining steps, 6 phantoms, 1 step per arm): every step runs through its
    public command and the summary holds the verdicts (study, probe, online probe), the study and probe tables, the
    prediction table and the pictures.
    The real demo is timed by hand (docs/demo.md), not here."""
    import os
    import sys

    from nnunet_smit.demo import DemoSettings, run_demo

    bin_dir = os.path.dirname(sys.executable)  # the commands the demo runs are this environment's
    monkeypatch.setenv("PATH", bin_dir + os.pathsep + os.environ.get("PATH", ""))
    smoke = DemoSettings(labelled_cases=6, labelled=(1,), seeds=1, epochs=1, iterations_per_epoch=1,
                         pretrain_args=("--max_steps", "2"), trainer="nnUNetTrainerSMIT_64", baselines=("scratch",),
                         probe_seeds=1)
    summary = run_demo(tmp_path / "demo", "cpu", smoke).read_text(encoding="utf-8")
    for heading in ("## Does pretraining help?", "## Held-out Dice of every arm",
                    "## Linear-probe Dice of the frozen encoders", "## nnUNetv2_predict on the held-out cases"):
        assert heading in summary, heading
    assert "| scratch |" in summary and "Fine-tuning (smit_study): k=1: pretrained" in summary
    assert "| random |" in summary and "| intensity |" in summary
    assert "Frozen features (smit_probe): k=1: pretrained encoder" in summary
    assert "Against the input intensity alone: k=1: pretrained" in summary
    assert "Online probe of the teacher during pretraining (k=1): Dice " in summary
    for picture in ("study/study.png", "probe/probe.png", "overlay.png", "pretrain/plots/loss_curves.png"):
        assert (tmp_path / "demo" / picture).read_bytes()[:4] == b"\x89PNG", picture


def test_the_cpu_demo_trains_nnunets_reference_arm_at_k1_only_into_the_same_study(tmp_path):
    from nnunet_smit.demo import CPU_SETTINGS, GPU_SETTINGS, study_commands

    first, second = study_commands(CPU_SETTINGS, tmp_path / "study", tmp_path / "enc.pt", "cpu")
    assert first[first.index("--labelled") + 1:first.index("--baselines")] == ["1", "4"]
    assert first[first.index("--baselines") + 1:] == ["scratch"] and "--encoder" in first
    assert second[second.index("--labelled") + 1:second.index("--baselines")] == ["1"]
    assert second[second.index("--baselines") + 1:] == ["nnunet"] and "--encoder" not in second
    for option in ("-o", "--seeds", "--trainer", "-p", "--epochs", "--iterations_per_epoch"):
        assert first[first.index(option) + 1] == second[second.index(option) + 1], option  # same folder and budget
    (only,) = study_commands(GPU_SETTINGS, tmp_path / "study", tmp_path / "enc.pt", "cuda")
    assert only[only.index("--baselines") + 1:] == ["scratch", "nnunet"]


def test_the_pretrained_arm_is_found_by_its_encoder_file_whatever_order_the_calls_wrote(tmp_path):
    from nnunet_smit.demo import pretrained_arm
    from nnunet_smit.errors import SMITError

    encoder = tmp_path / "pretrain" / "smit_encoder_teacher.pt"
    rows = [{"arm": "nnunet", "encoder": "nnunet"}, {"arm": "scratch", "encoder": "scratch"},
            {"arm": "smit_encoder_teacher", "encoder": str(encoder)}]
    assert pretrained_arm(rows, encoder) == "smit_encoder_teacher"
    with pytest.raises(SMITError, match="no arm of the encoder"):
        pretrained_arm(rows[:2], encoder)
