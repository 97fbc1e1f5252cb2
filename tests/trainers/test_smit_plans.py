"""smit_plan: a plans variant whose CT clipping is the encoder's HU window, preprocessed with nnU-Net's own code.

A generated CT dataset whose labels cover a soft-tissue blob only (its images hold 700 HU bone too) is planned with
nnU-Net: its foreground clip range is narrow. Through the default plans the encoder's input saturates above the
foreground's 99.5th percentile; through nnUNetPlans_SMIT it equals the windowed HU of the raw image, voxel for voxel.
"""
from __future__ import annotations

import json
import os
import subprocess

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from nnunet_smit.architectures import IntensityMapping, SMITConfig, SwinEncoder
from nnunet_smit.checkpoint import save_encoder_checkpoint
from nnunet_smit.conventions import PretrainPreprocessing
from nnunet_smit.errors import SMITError
from nnunet_smit.trainers import plans_settings
from nnunet_smit.trainers.smit_plans import main as smit_plan
from nnunet_smit.trainers.smit_plans import smit_plans
from tests.trainers.synthetic_dataset import write_dataset

DATASET_ID = 903
WINDOW = (-175.0, 250.0)


@pytest.fixture(scope="module")
def planned(tmp_path_factory):
    """The narrow-foreground dataset planned and preprocessed by nnU-Net, then by smit_plan; its folders."""
    root = tmp_path_factory.mktemp("smit_plan")
    dirs = {name: root / name for name in ("raw", "preprocessed", "results")}
    for folder in dirs.values():
        folder.mkdir()
    name, _ = write_dataset(dirs["raw"], DATASET_ID, num_cases=3, num_test_cases=0, label_bone=False)
    encoder = root / "encoder.pt"
    config = SMITConfig.preset("tiny")
    save_encoder_checkpoint(encoder, SwinEncoder(config).state_dict(), config, PretrainPreprocessing(hu_window=WINDOW))
    env = {k: v for k, v in os.environ.items() if not k.startswith("nnUNet_")}
    env.update(nnUNet_raw=str(dirs["raw"]), nnUNet_preprocessed=str(dirs["preprocessed"]),
               nnUNet_results=str(dirs["results"]), nnUNet_def_n_proc="1", nnUNet_n_proc_DA="1")
    subprocess.run(["nnUNetv2_plan_and_preprocess", "-d", str(DATASET_ID), "-c", "3d_fullres", "-np", "1",
                    "-npfp", "1"], env=env, check=True, capture_output=True, timeout=600)
    return {"dirs": dirs, "name": name, "encoder": encoder, "env": env}


def _mapped_input(folder, plans_name, case="toy_000"):
    """What the encoder receives for a case: the preprocessed array through the trainer's intensity mapping."""
    from nnunetv2.training.dataloading.nnunet_dataset import infer_dataset_class

    plans = json.loads((folder / f"{plans_name}.json").read_text())
    configuration = plans["configurations"]["3d_fullres"]
    data_folder = folder / configuration["data_identifier"]
    data = infer_dataset_class(str(data_folder))(str(data_folder)).load_case(case)[0]
    stats = plans_settings.intensity_statistics(plans, configuration)
    mapping = IntensityMapping([s["mean"] for s in stats], [s["std"] for s in stats], hu_window=WINDOW)
    return mapping(torch.from_numpy(np.asarray(data[:])[None]).float())[0, 0].numpy(), stats[0]


def test_the_smit_plans_give_the_encoder_the_windowed_hu_of_the_raw_image(planned, monkeypatch, capsys):
    for key, value in planned["env"].items():
        if key.startswith("nnUNet_"):
            monkeypatch.setenv(key, value)
    assert smit_plan(["-d", str(DATASET_ID), "--encoder", str(planned["encoder"]), "-np", "1"]) == 0
    folder = planned["dirs"]["preprocessed"] / planned["name"]
    assert capsys.readouterr().out.strip() == str(folder / "nnUNetPlans_SMIT.json")

    raw = sitk.GetArrayFromImage(sitk.ReadImage(str(planned["dirs"]["raw"] / planned["name"] / "imagesTr" /
                                                    "toy_000_0000.nii.gz"))).astype(np.float64)
    windowed = (np.clip(raw, *WINDOW) - WINDOW[0]) / (WINDOW[1] - WINDOW[0])
    default, stats = _mapped_input(folder, "nnUNetPlans")
    smit, smit_stats = _mapped_input(folder, "nnUNetPlans_SMIT")
    assert default.shape == smit.shape == raw.shape  # one spacing: nnU-Net neither crops nor resamples here

    # The default plans: the foreground (soft tissue) clips at its 99.5th percentile, far inside the window.
    top = (stats["percentile_99_5"] - WINDOW[0]) / (WINDOW[1] - WINDOW[0])
    assert stats["percentile_99_5"] < 200 and top < 0.9
    bone = raw > 600
    assert bone.any() and np.allclose(default[bone], top, atol=1e-4)
    assert np.abs(default - windowed).max() > 0.1
    # The SMIT plans: exactly the windowed HU of the raw image (bone at 1.0).
    assert (smit_stats["percentile_00_5"], smit_stats["percentile_99_5"]) == WINDOW
    np.testing.assert_allclose(smit, windowed, atol=1e-4)
    assert np.allclose(smit[bone], 1.0)


def test_the_variant_leaves_the_default_plans_and_shares_the_splits(planned):
    folder = planned["dirs"]["preprocessed"] / planned["name"]
    if not (folder / "nnUNetPlans_SMIT.json").is_file():
        pytest.skip("needs the smit_plan run of the test above")
    default = json.loads((folder / "nnUNetPlans.json").read_text())
    variant = json.loads((folder / "nnUNetPlans_SMIT.json").read_text())
    assert default["configurations"]["3d_fullres"]["data_identifier"] == "nnUNetPlans_3d_fullres"
    configuration = variant["configurations"]["3d_fullres"]
    assert configuration["data_identifier"] == "nnUNetPlans_SMIT_3d_fullres"
    assert configuration["smit_weights"] == str(planned["encoder"].resolve())
    assert all(s % 32 == 0 for s in configuration["patch_size"])
    assert variant["smit_plan"]["dataset_percentiles"]["0"] == [
        default["foreground_intensity_properties_per_channel"]["0"]["percentile_00_5"],
        default["foreground_intensity_properties_per_channel"]["0"]["percentile_99_5"]]
    assert default["foreground_intensity_properties_per_channel"]["0"]["percentile_99_5"] < 200


def test_a_dataset_without_ct_channels_is_refused():
    plans = {"configurations": {"3d_fullres": {"patch_size": [64, 64, 64], "batch_size": 2,
                                               "normalization_schemes": ["ZScoreNormalization"]}},
             "foreground_intensity_properties_per_channel": {}}
    with pytest.raises(SMITError, match="no channel of 3d_fullres uses CTNormalization"):
        smit_plans(plans, "enc.pt", WINDOW, ["3d_fullres"], "nnUNetPlans", "nnUNetPlans_SMIT")


def test_the_trainer_on_default_plans_names_the_window_share_it_loses_and_the_fix():
    stats = [{"percentile_00_5": -449.0, "percentile_99_5": 94.0}]
    warnings = plans_settings.clip_range_warnings(stats, PretrainPreprocessing(hu_window=WINDOW), "Dataset990_X",
                                                  "nnUNetPlans", "/enc.pt")
    assert warnings == [
        "WARNING: nnU-Net's CTNormalization in plans nnUNetPlans clips channel 0 to [-449, 94] HU (the dataset's "
        "foreground 0.5-99.5 percentiles), inside the checkpoint's window [-175, 250] HU: 37% of the window never "
        "reaches the encoder (everything above 94 HU arrives as 94). `smit_plan -d Dataset990_X --encoder /enc.pt` "
        "writes plans that keep the whole window; then train with -p nnUNetPlans_SMIT."]
    wide = [{"percentile_00_5": -1000.0, "percentile_99_5": 1200.0}]
    assert plans_settings.clip_range_warnings(wide, PretrainPreprocessing(hu_window=WINDOW), "D", "P") == []
