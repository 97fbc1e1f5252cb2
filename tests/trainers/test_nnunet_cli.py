"""The stock nnU-Net CLI end to end on CPU with nnUNetTrainerSMIT_tiny, and prediction through nnUNetPredictor.

Runs the real console commands in subprocesses, without nnUNet_extTrainer in their environment: the installed
start-up hook must register the trainers. About 2-3 minutes on 2 CPU cores.
"""
from __future__ import annotations

import json
import os
import subprocess
import sysconfig
import time
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from nnunet_smit.architectures import SMITConfig, SwinEncoder
from nnunet_smit.checkpoint import save_encoder_checkpoint
from tests.trainers.synthetic_dataset import LABELS, write_dataset

DATASET_ID = 901
TRAINER = "nnUNetTrainerSMIT_tiny"
CONFIGURATION = "3d_fullres"


def _run(command, env, log_path: Path, timeout=600) -> float:
    start = time.time()
    with open(log_path, "w") as log:
        result = subprocess.run(command, env=env, stdout=log, stderr=subprocess.STDOUT, timeout=timeout)
    if result.returncode != 0:
        pytest.fail(f"{' '.join(command)} failed ({result.returncode}):\n" + log_path.read_text()[-4000:])
    return time.time() - start


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    """Plan, train, --val, --c and predict with the stock commands; returns paths, logs and timings."""
    purelib = Path(sysconfig.get_paths()["purelib"])
    if not (purelib / "nnunet_smit_trainers.pth").is_file():
        pytest.fail(f"nnunet_smit is not installed with its start-up hook in {purelib}; run `pip install -e .`.")
    root = tmp_path_factory.mktemp("nnunet")
    dirs = {name: root / name for name in ("raw", "preprocessed", "results", "logs", "pred")}
    for d in dirs.values():
        d.mkdir()
    dataset_name, test_images = write_dataset(dirs["raw"], DATASET_ID)
    config = SMITConfig.preset("tiny")
    weights = root / "tiny_encoder.pt"
    sha = save_encoder_checkpoint(weights, SwinEncoder(config).state_dict(), config)

    env = {k: v for k, v in os.environ.items() if k != "nnUNet_extTrainer" and not k.startswith("nnUNet_")}
    env.update(nnUNet_raw=str(dirs["raw"]), nnUNet_preprocessed=str(dirs["preprocessed"]),
               nnUNet_results=str(dirs["results"]), nnUNet_def_n_proc="1", nnUNet_n_proc_DA="0",
               nnUNet_compile="f")
    train = ["nnUNetv2_train", str(DATASET_ID), CONFIGURATION, "0", "-tr", TRAINER, "-device", "cpu"]
    timings = {}
    # nnU-Net 2.8.1's planner calls torch.set_num_threads(nnUNet_n_proc_DA), which rejects 0
    timings["plan_and_preprocess"] = _run(
        ["nnUNetv2_plan_and_preprocess", "-d", str(DATASET_ID), "-c", CONFIGURATION, "-np", "1", "-npfp", "1"],
        {**env, "nnUNet_n_proc_DA": "1"}, dirs["logs"] / "plan.log")
    timings["train"] = _run(train, {**env, "nnUNet_SMIT_weights": str(weights)}, dirs["logs"] / "train.log")
    output_folder = dirs["results"] / dataset_name / f"{TRAINER}__nnUNetPlans__{CONFIGURATION}"
    first_logs = set((output_folder / "fold_0").glob("training_log_*.txt"))
    timings["val"] = _run(train + ["--val"], env, dirs["logs"] / "val.log")
    # --c must not touch the encoder checkpoint: point the variable at a file that does not exist
    timings["continue"] = _run(train + ["--c"], {**env, "nnUNet_SMIT_weights": str(root / "missing.pt")},
                               dirs["logs"] / "continue.log")
    timings["predict"] = _run(
        ["nnUNetv2_predict", "-i", str(test_images[0].parent), "-o", str(dirs["pred"]), "-d", str(DATASET_ID),
         "-c", CONFIGURATION, "-tr", TRAINER, "-f", "0", "-npp", "1", "-nps", "1", "--disable_tta",
         "--save_probabilities", "-device", "cpu"], env, dirs["logs"] / "predict.log")
    later_logs = set((output_folder / "fold_0").glob("training_log_*.txt")) - first_logs
    # The SMIT plans variant: smit_plan writes and preprocesses it; training and prediction then need no variable.
    timings["smit_plan"] = _run(["smit_plan", "-d", str(DATASET_ID), "--encoder", str(weights), "-np", "1"],
                                env, dirs["logs"] / "smit_plan.log")
    timings["train_smit_plans"] = _run(train + ["-p", "nnUNetPlans_SMIT"], env, dirs["logs"] / "train_smit_plans.log")
    (root / "pred_smit_plans").mkdir()
    timings["predict_smit_plans"] = _run(
        ["nnUNetv2_predict", "-i", str(test_images[0].parent), "-o", str(root / "pred_smit_plans"), "-d",
         str(DATASET_ID), "-c", CONFIGURATION, "-tr", TRAINER, "-p", "nnUNetPlans_SMIT", "-f", "0", "-npp", "1",
         "-nps", "1", "--disable_tta", "-device", "cpu"], env, dirs["logs"] / "predict_smit_plans.log")
    print("stock CLI timings (s):", json.dumps({k: round(v, 1) for k, v in timings.items()}))
    return {
        "dirs": dirs, "dataset_name": dataset_name, "test_images": test_images, "weights": weights, "sha": sha,
        "output_folder": output_folder, "first_logs": sorted(first_logs), "later_logs": sorted(later_logs),
        "timings": timings, "root": root, "env": env,
    }


def test_stock_cli_end_to_end(pipeline):
    out = pipeline["output_folder"]
    fold = out / "fold_0"
    assert (fold / "checkpoint_final.pth").is_file() and (fold / "validation" / "summary.json").is_file()

    # the first training log: encoder loaded strictly from the given checkpoint, zero missing keys
    train_log = "\n".join(p.read_text() for p in pipeline["first_logs"])
    assert f"SMIT: loaded pretrained encoder from {pipeline['weights']}" in train_log
    assert f"sha256 {pipeline['sha']}" in train_log
    assert "missing keys: 0; unexpected keys: 0; shape mismatches: 0" in train_log
    assert "SMIT patch fitting: planned patch [40, 64, 56] x batch 2 -> patch [64, 64, 64] x batch 2" in train_log
    # --val and --c: nothing reloaded; --c resumes after the last epoch
    later = "\n".join(p.read_text() for p in pipeline["later_logs"])
    assert "loaded pretrained encoder" not in later
    assert "SMIT: continuing at epoch 2; encoder not reloaded." in later

    # the results plans.json rebuilds the network: fitted patch and SMIT settings
    plans = json.loads((out / "plans.json").read_text())
    conf = plans["configurations"][CONFIGURATION]
    assert conf["patch_size"] == [64, 64, 64] and conf["batch_size"] == 2
    assert conf["smit"]["patch_fit"] == {"planned_patch_size": [40, 64, 56], "planned_batch_size": 2,
                                         "patch_size": [64, 64, 64], "batch_size": 2}
    assert conf["smit"]["weights"]["sha256"] == pipeline["sha"]
    assert conf["smit"]["encoder_config"] == SMITConfig.preset("tiny").to_dict()

    # predictions: one per input, same geometry, labels in range
    for image_path in pipeline["test_images"]:
        seg_path = pipeline["dirs"]["pred"] / image_path.name.replace("_0000.nii.gz", ".nii.gz")
        assert seg_path.is_file()
        image, seg = sitk.ReadImage(str(image_path)), sitk.ReadImage(str(seg_path))
        assert seg.GetSize() == image.GetSize()
        np.testing.assert_allclose(seg.GetSpacing(), image.GetSpacing(), rtol=1e-6)
        np.testing.assert_allclose(seg.GetOrigin(), image.GetOrigin(), atol=1e-4)
        np.testing.assert_allclose(seg.GetDirection(), image.GetDirection(), atol=1e-6)
        labels = np.unique(sitk.GetArrayFromImage(seg))
        assert set(labels.tolist()) <= set(LABELS.values())


def test_the_smit_plans_variant_trains_and_predicts_with_the_stock_cli_and_no_weights_variable(pipeline):
    folder = pipeline["dirs"]["results"] / pipeline["dataset_name"] / f"{TRAINER}__nnUNetPlans_SMIT__{CONFIGURATION}"
    assert (folder / "fold_0" / "checkpoint_final.pth").is_file()
    log = "\n".join(p.read_text() for p in (folder / "fold_0").glob("training_log_*.txt"))
    assert f"SMIT: loaded pretrained encoder from {pipeline['weights']}" in log  # from the plans, not the variable
    assert "clips channel" not in log  # the variant keeps the whole window
    plans = json.loads((folder / "plans.json").read_text())
    stats = plans["configurations"][CONFIGURATION]["smit"]["intensity_mapping"][0]
    assert (stats["percentile_00_5"], stats["percentile_99_5"]) == (-175.0, 250.0)
    predictions = sorted((pipeline["root"] / "pred_smit_plans").glob("*.nii.gz"))
    assert len(predictions) == len(pipeline["test_images"])


def test_results_folder_predicts_through_nnunet_predictor(pipeline, tmp_path, monkeypatch):
    """nnUNetPredictor rebuilds SMITNet from the results plans.json (deep supervision off) and loads the
    trained weights strictly; its probabilities equal the CLI's and so does its segmentation, up to voxels where
    two classes tie to within float rounding."""
    import nnunetv2.inference.predict_from_raw_data as predict_module
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    from nnunet_smit.architectures import SMITNet
    from nnunet_smit.trainers.nnUNetTrainerSMIT import load_nnunet_checkpoint

    monkeypatch.delenv("nnUNet_SMIT_weights", raising=False)
    # the CLI ran with nnUNet_def_n_proc=1, which caps its torch threads at 1 while predicting; use the same count
    # here so both sum in the same order
    monkeypatch.setattr(predict_module, "default_num_processes", 1)
    predictor = nnUNetPredictor(tile_step_size=0.5, use_gaussian=True, use_mirroring=False,
                                perform_everything_on_device=False, device=torch.device("cpu"), verbose=False,
                                allow_tqdm=False)
    predictor.initialize_from_trained_model_folder(str(pipeline["output_folder"]), use_folds=(0,),
                                                   checkpoint_name="checkpoint_final.pth")
    network = predictor.network
    assert isinstance(network, SMITNet) and network.decoder.deep_supervision is False
    assert network.input_mapping is not None
    # nnU-Net's own checkpoint reads weights-only (tensors, plain types, numpy scalars)
    saved = load_nnunet_checkpoint(str(pipeline["output_folder"] / "fold_0" / "checkpoint_final.pth"),
                                   "cpu")["network_weights"]
    network.load_state_dict(predictor.list_of_parameters[0])  # strict: raises on any key difference
    assert list(network.state_dict()) == list(saved)
    for key, value in network.state_dict().items():
        assert torch.equal(value, saved[key]), key

    image = pipeline["test_images"][0]
    out_file = tmp_path / "seg"
    predictor.predict_from_files([[str(image)]], [str(out_file)], save_probabilities=True, overwrite=True,
                                 num_processes_preprocessing=1, num_processes_segmentation_export=1)
    cli_file = pipeline["dirs"]["pred"] / image.name.replace("_0000.nii.gz", "")
    ours = sitk.GetArrayFromImage(sitk.ReadImage(str(out_file) + ".nii.gz"))
    cli = sitk.GetArrayFromImage(sitk.ReadImage(str(cli_file) + ".nii.gz"))
    ours_p = np.load(str(out_file) + ".npz")["probabilities"].astype(np.float64)
    cli_p = np.load(str(cli_file) + ".npz")["probabilities"].astype(np.float64)
    assert ours_p.shape == cli_p.shape == (len(LABELS), *cli.shape)
    np.testing.assert_allclose(ours_p, cli_p, atol=1e-5)
    # a voxel may change label only where the CLI's two most likely classes are within rounding of each other
    top2 = np.sort(cli_p, axis=0)[-2:]
    differ = ours != cli
    assert differ.sum() <= 10, int(differ.sum())
    assert np.all(top2[1][differ] - top2[0][differ] < 1e-4), (top2[1] - top2[0])[differ]


def test_another_network_in_the_results_folder_is_refused_before_anything_is_written(pipeline, tmp_path):
    """The results folder's plans.json serves every fold: with fold 0 trained from the tiny encoder, an encoder of
    another architecture for a new fold, for --c of a fold without a checkpoint, or for fold 0's --val is one line and
    a failing exit code, and no file in the folder changes; fold 0 still predicts."""
    out = pipeline["output_folder"]
    other_config = SMITConfig.preset("tiny", embed_dim=24)
    other = tmp_path / "other_encoder.pt"
    save_encoder_checkpoint(other, SwinEncoder(other_config).state_dict(), other_config)
    env = {**pipeline["env"], "nnUNet_SMIT_weights": str(other)}
    plans_before = (out / "plans.json").read_bytes()
    files_before = {p: p.stat().st_mtime_ns for p in out.rglob("*")}
    for fold, flags in (("1", []), ("1", ["--c"]), ("0", ["--val"])):
        command = ["nnUNetv2_train", str(DATASET_ID), CONFIGURATION, fold, "-tr", TRAINER, "-device", "cpu", *flags]
        result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
        errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
        assert result.returncode != 0 and len(errors) == 1 and "Traceback" not in result.stderr, (
            command, result.stdout[-2000:], result.stderr[-4000:])
        assert errors[0].startswith(f"error: nnUNet_SMIT_weights={other} gives another SMIT network (embed_dim 12 "
                                    "there, 24 here"), errors[0]
        assert f"(fold 0, started from {pipeline['weights']})" in errors[0]
        assert "another -tr trainer variant, another -p plans, or another nnUNet_results" in errors[0]
        assert (out / "plans.json").read_bytes() == plans_before
        assert {p: p.stat().st_mtime_ns for p in out.rglob("*")} == files_before, command
    (tmp_path / "pred").mkdir()
    _run(["nnUNetv2_predict", "-i", str(pipeline["test_images"][0].parent), "-o", str(tmp_path / "pred"), "-d",
          str(DATASET_ID), "-c", CONFIGURATION, "-tr", TRAINER, "-f", "0", "-npp", "1", "-nps", "1", "--disable_tta",
          "-device", "cpu"], pipeline["env"], tmp_path / "predict.log")
    assert len(list((tmp_path / "pred").glob("*.nii.gz"))) == len(pipeline["test_images"])
