"""smit_plan: a plans variant whose CT clipping is the encoder's HU window, preprocessed with nnU-Net's own code.

A generated CT dataset whose labels cover a soft-tissue blob only (its images hold 700 HU bone too) is planned with
nnU-Net: its foreground clip range is narrow. Through the default plans the encoder's input saturates above the
foreground's 99.5th percentile; through nnUNetPlans_SMIT it equals the windowed HU of the raw image, voxel for voxel.
"""
from __future__ import annotations

import json
import re
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

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
REPO = Path(__file__).resolve().parents[2]


def write_encoder(path: Path) -> Path:
    """A tiny encoder checkpoint whose HU window is ``WINDOW``."""
    config = SMITConfig.preset("tiny")
    save_encoder_checkpoint(path, SwinEncoder(config).state_dict(), config, PretrainPreprocessing(hu_window=WINDOW))
    return path


@pytest.fixture(scope="module")
def planned(tmp_path_factory):
    """The narrow-foreground dataset planned and preprocessed by nnU-Net, then by smit_plan; its folders."""
    root = tmp_path_factory.mktemp("smit_plan")
    dirs = {name: root / name for name in ("raw", "preprocessed", "results")}
    for folder in dirs.values():
        folder.mkdir()
    name, _ = write_dataset(dirs["raw"], DATASET_ID, num_cases=3, num_test_cases=0, label_bone=False)
    encoder = write_encoder(root / "encoder.pt")
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


# ------------------------------------------------------------------------------------------------ refusals

FAKE_ID = 904
FAKE_PLANS = {
    "plans_name": "nnUNetPlans",
    "configurations": {
        "3d_fullres": {"data_identifier": "nnUNetPlans_3d_fullres", "patch_size": [64, 64, 64], "batch_size": 2,
                       "normalization_schemes": ["CTNormalization"]},
        "2d": {"data_identifier": "nnUNetPlans_2d", "patch_size": [64, 64], "batch_size": 12,
               "normalization_schemes": ["CTNormalization"]},
    },
    "foreground_intensity_properties_per_channel": {"0": {"percentile_00_5": -449.0, "percentile_99_5": 94.0,
                                                          "mean": -100.0, "std": 120.0}},
}


@pytest.fixture
def fake(tmp_path, monkeypatch):
    """A dataset as nnU-Net's planning leaves its plans, written by hand (no image, nothing preprocessed), with a
    second planner's plans and an encoder; nnU-Net's folder variables point at it."""
    folders = {name: tmp_path / name for name in ("raw", "preprocessed", "results")}
    for name, folder in folders.items():
        folder.mkdir()
        monkeypatch.setenv(f"nnUNet_{name}", str(folder))
    dataset = folders["preprocessed"] / f"Dataset{FAKE_ID}_Fake"
    dataset.mkdir()
    (dataset / "nnUNetPlans.json").write_text(json.dumps(FAKE_PLANS))
    (dataset / "nnUNetResEncUNetMPlans.json").write_text(json.dumps({**FAKE_PLANS, "plans_name": "ResEnc"}))
    return {"folder": dataset, "encoder": write_encoder(tmp_path / "encoder.pt"), "env": dict(os.environ)}


def refused(fake, capsys, *args):
    """smit_plan's stderr line for ``args``, after checking that it exits 2 with one line and writes nothing."""
    before = {p.name: p.read_bytes() for p in fake["folder"].iterdir()}
    capsys.readouterr()
    assert smit_plan(["-d", str(FAKE_ID), "--encoder", str(fake["encoder"]), *args]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.count("\n") == 1 and err.startswith("error: "), err
    assert {p.name: p.read_bytes() for p in fake["folder"].iterdir()} == before
    return err.strip()


def test_a_variant_never_replaces_its_source_nnunets_default_or_other_plans(fake, capsys):
    assert refused(fake, capsys, "-o", "nnUNetPlans") == (
        "error: -o nnUNetPlans would overwrite the plans it starts from and re-preprocess their data in place; choose "
        "another name (the default is nnUNetPlans_SMIT).")
    assert refused(fake, capsys, "-pl", "nnUNetResEncUNetMPlans", "-o", "nnUNetPlans") == (
        "error: -o nnUNetPlans would overwrite nnU-Net's default plans and re-preprocess their data in place; choose "
        "another name (the default is nnUNetResEncUNetMPlans_SMIT).")
    assert "holds plans smit_plan did not write" in refused(fake, capsys, "-o", "nnUNetResEncUNetMPlans")
    # A variant as the source: its percentiles are the window, which a second variant would record as the dataset's.
    variant = smit_plans(FAKE_PLANS, "enc.pt", WINDOW, ["3d_fullres"], "nnUNetPlans", "nnUNetPlans_SMIT")
    (fake["folder"] / "nnUNetPlans_SMIT.json").write_text(json.dumps(variant))
    assert refused(fake, capsys, "-pl", "nnUNetPlans_SMIT") == (
        "error: the plans nnUNetPlans_SMIT are a smit_plan variant already (of nnUNetPlans), whose CT percentiles are "
        "an encoder's window; pass -pl nnUNetPlans.")


def test_every_argument_is_checked_before_anything_is_written(fake, capsys):
    assert refused(fake, capsys, "-np", "0") == "error: -np must be at least 1 (preprocessing processes), got 0."
    assert "is not a 3D configuration" in refused(fake, capsys, "-c", "3d_fullres", "2d")
    assert "configuration '3d_lowres' is not in nnUNetPlans" in refused(fake, capsys, "-c", "3d_lowres")
    assert "is not a plans name" in refused(fake, capsys, "-o", "../elsewhere")
    assert "cannot be read" in refused(fake, capsys, "--encoder", str(fake["folder"] / "nnUNetPlans.json"))


@pytest.mark.parametrize("content, says", [
    (json.dumps(FAKE_PLANS)[:200], "is not valid JSON (Expecting property name enclosed in double quotes at line 1, "
                                   "column 201: a truncated or hand-edited file?)"),
    (b"\x00\xff" * 8, "is not text (byte 1 is not UTF-8"),
    ("[1, 2]", "holds an array where an object is expected"),
    ('{"plans_name": "nnUNetPlans"}', "have no configurations mapping"),
])
def test_a_broken_plans_file_is_one_line(fake, capsys, content, says):
    path = fake["folder"] / "nnUNetPlans.json"
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    err = refused(fake, capsys)
    assert err.startswith(f"error: the nnUNetPlans plans of Dataset{FAKE_ID}_Fake {path} {says}"), err
    assert err.endswith(f"restore them, or plan the dataset again (nnUNetv2_plan_and_preprocess -d {FAKE_ID}).")


# ------------------------------------------------------------------------------------------------ Ctrl-C

DRIVER = """
import sys
from nnunet_smit.trainers import smit_plans
from tests.trainers.plan_support import workers_that_sleep
smit_plans._preprocess = workers_that_sleep  # nnU-Net's preprocessing: a pool of workers, here asleep
sys.exit(smit_plans.main(sys.argv[1:]))
"""


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError):
        return False


def test_ctrl_c_while_preprocessing_is_one_line_and_stops_every_worker(fake, tmp_path):
    pids_file = tmp_path / "pids"
    env = {**fake["env"], "PLAN_TEST_PIDS": str(pids_file)}
    # A terminal's Ctrl-C is a SIGINT to its foreground process group: smit_plan leads one here.
    plan = subprocess.Popen([sys.executable, "-c", DRIVER, "-d", str(FAKE_ID), "--encoder", str(fake["encoder"]),
                             "-np", "2"], cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while not (pids_file.is_file() and len(pids_file.read_text().split()) == 3) and time.monotonic() < deadline:
            time.sleep(0.1)
        workers = [int(pid) for pid in pids_file.read_text().split()]
        os.killpg(plan.pid, signal.SIGINT)
        out, err = plan.communicate(timeout=60)
    finally:
        plan.kill()
    assert plan.returncode == 130
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err
    assert err.strip().splitlines()[-1] == ("smit_plan interrupted; rerun the same command to write the plans and "
                                            "preprocess them again.")
    deadline = time.monotonic() + 10
    while any(map(_alive, workers)) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(map(_alive, workers))


def test_a_window_without_an_encoder_writes_plans_that_name_no_weights(fake):
    """smit_plan --hu_window: the plans of an encoder still to be pretrained (smit_pretrain --probe scores on them)."""
    from nnunet_smit.errors import SMITError
    from nnunet_smit.trainers.plans_settings import WEIGHTS_PLANS_KEY
    from nnunet_smit.trainers.smit_plans import write_smit_plans

    target = write_smit_plans(str(FAKE_ID), None, hu_window=(-175, 250), preprocess=False)
    variant = json.loads(target.read_text())
    assert variant["smit_plan"]["encoder"] is None and variant["smit_plan"]["hu_window"] == [-175.0, 250.0]
    assert WEIGHTS_PLANS_KEY not in variant["configurations"]["3d_fullres"]
    properties = variant["foreground_intensity_properties_per_channel"]["0"]
    assert (properties["percentile_00_5"], properties["percentile_99_5"]) == (-175.0, 250.0)
    # the same variant from an encoder of that window carries its path
    again = json.loads(write_smit_plans(str(FAKE_ID), fake["encoder"], preprocess=False).read_text())
    assert again["configurations"]["3d_fullres"][WEIGHTS_PLANS_KEY] == str(fake["encoder"])
    for encoder, window, says in [(None, (250, -175), "--hu_window needs LOW < HIGH in HU, got [250, -175]."),
                                  (None, None, "give either --encoder FILE"),
                                  (fake["encoder"], (0, 1), "give either --encoder FILE")]:
        with pytest.raises(SMITError, match=re.escape(says)):
            write_smit_plans(str(FAKE_ID), encoder, hu_window=window, preprocess=False)


def test_nnunets_file_listing_runs_in_threads_so_np_alone_decides_the_worker_processes(monkeypatch):
    """nnU-Net lists raw files through a pool of 12 processes whatever -np says; spawned from smit_plan's child,
    each would import torch again. During smit_plan's preprocessing that pool is a thread pool."""
    import multiprocessing.pool

    import nnunetv2.experiment_planning.plan_and_preprocess_api as api
    import nnunetv2.utilities.utils as nnunet_utils

    from nnunet_smit.trainers import smit_plans

    seen = {}

    def preprocess_dataset(dataset_id, plans_name, configurations, num_processes, show_progress_bar):
        seen.update(pool=nnunet_utils.Pool, num_processes=num_processes)

    monkeypatch.setattr(api, "preprocess_dataset", preprocess_dataset)
    smit_plans._preprocess(990, "nnUNetPlans_SMIT", ["3d_fullres"], 1)
    assert seen == {"pool": multiprocessing.pool.ThreadPool, "num_processes": [1]}
    assert nnunet_utils.Pool is not multiprocessing.pool.ThreadPool  # nnU-Net's own again afterwards
