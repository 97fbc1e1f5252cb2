"""nnUNetTrainerSMIT set-up without data: plans settings, refusals, network from plans, optimizer, weights, and the
check of validation cases against the encoder's pretraining scans."""
import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

from nnunet_smit.architectures import SMITConfig, SwinEncoder
from nnunet_smit.checkpoint import load_encoder_checkpoint, save_encoder_checkpoint
from nnunet_smit.conventions import PretrainPreprocessing
from nnunet_smit.errors import SMITError
from nnunet_smit.fingerprints import fingerprint_array
from nnunet_smit.trainers import (
    nnUNetTrainerSMIT,
    nnUNetTrainerSMIT_96,
    nnUNetTrainerSMITFrozenEncoder,
    nnUNetTrainerSMITScratch_tiny,
)
from nnunet_smit.trainers.nnUNetTrainerSMIT import WEIGHTS_ENV

CPU = torch.device("cpu")


def _configuration(patch, spacing, batch=2):
    return {
        "data_identifier": f"nnUNetPlans_{len(patch)}d",
        "preprocessor_name": "DefaultPreprocessor",
        "batch_size": batch,
        "patch_size": list(patch),
        "median_image_size_in_voxels": list(patch),
        "spacing": list(spacing),
        "normalization_schemes": None,  # filled per dataset
        "use_mask_for_norm": None,
        "architecture": {"network_class_name": "unused", "arch_kwargs": {}, "_kw_requires_import": []},
        "batch_dice": False,
    }


def make_plans(schemes=("CTNormalization",)):
    configurations = {
        "2d": _configuration((80, 72), (1.5, 1.5), batch=12),
        "3d_fullres": _configuration((48, 80, 80), (2.5, 1.5, 1.5)),
        "3d_lowres": {**_configuration((40, 56, 56), (3.5, 2.1, 2.1)), "next_stage": "3d_cascade_fullres"},
        "3d_cascade_fullres": {"inherits_from": "3d_fullres", "previous_stage": "3d_lowres"},
    }
    for name, conf in configurations.items():
        if "normalization_schemes" in conf:
            conf["normalization_schemes"] = list(schemes)
            conf["use_mask_for_norm"] = [False] * len(schemes)
    props = {
        str(i): {"mean": 100.0 + i, "std": 50.0, "percentile_00_5": -200.0, "percentile_99_5": 800.0,
                 "min": -1000.0, "max": 1000.0, "median": 90.0}
        for i in range(len(schemes))
    }
    return {
        "dataset_name": "Dataset999_Unit",
        "plans_name": "nnUNetPlans",
        "original_median_spacing_after_transp": [2.5, 1.5, 1.5],
        "original_median_shape_after_transp": [48, 80, 72],
        "image_reader_writer": "SimpleITKIO",
        "transpose_forward": [0, 1, 2],
        "transpose_backward": [0, 1, 2],
        "configurations": configurations,
        "experiment_planner_used": "ExperimentPlanner",
        "label_manager": "LabelManager",
        "foreground_intensity_properties_per_channel": props,
    }


def make_dataset_json(num_channels=1):
    return {"channel_names": {str(i): f"ch{i}" for i in range(num_channels)},
            "labels": {"background": 0, "a": 1, "b": 2}, "numTraining": 5, "file_ending": ".nii.gz"}


@pytest.fixture()
def nnunet_env(tmp_path, monkeypatch):
    for var in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        (tmp_path / var).mkdir()
        monkeypatch.setenv(var, str(tmp_path / var))
    monkeypatch.delenv(WEIGHTS_ENV, raising=False)
    return tmp_path


@pytest.fixture()
def tiny_weights(tmp_path, monkeypatch):
    """A tiny-preset encoder checkpoint with random weights, given through the environment variable."""
    config = SMITConfig.preset("tiny")
    path = tmp_path / "tiny_encoder.pt"
    sha = save_encoder_checkpoint(path, SwinEncoder(config).state_dict(), config,
                                  PretrainPreprocessing(hu_window=(-500.0, 500.0)))
    monkeypatch.setenv(WEIGHTS_ENV, str(path))
    return path, sha


def make_trainer(cls, plans, configuration="3d_fullres", num_channels=1):
    plans = {**plans, "continue_training": False}
    return cls(plans=plans, configuration=configuration, fold=0, dataset_json=make_dataset_json(num_channels),
               device=CPU)


def test_missing_weights_is_one_clear_sentence(nnunet_env):
    with pytest.raises(SMITError) as info:
        make_trainer(nnUNetTrainerSMIT, make_plans())
    message = str(info.value)
    assert WEIGHTS_ENV in message and "nnUNetTrainerSMITScratch" in message
    assert message.count(". ") == 0 and message.endswith(".")


def test_2d_configuration_refused(nnunet_env, tiny_weights):
    with pytest.raises(SMITError, match="3D configuration") as info:
        make_trainer(nnUNetTrainerSMIT, make_plans(), configuration="2d")
    assert "'2d'" in str(info.value)


def test_plans_carry_settings_fitted_patch_and_checkpoint(nnunet_env, tiny_weights):
    path, sha = tiny_weights
    trainer = make_trainer(nnUNetTrainerSMIT, make_plans())
    conf = trainer.plans_manager.plans["configurations"]["3d_fullres"]
    assert conf["patch_size"] == [64, 64, 64] and conf["batch_size"] == 2
    assert trainer.configuration_manager.patch_size == [64, 64, 64]
    settings = conf["smit"]
    assert settings["encoder_config"] == SMITConfig.preset("tiny").to_dict()  # architecture from the checkpoint
    assert settings["weights"]["sha256"] == sha and settings["weights"]["path"] == str(path)
    assert settings["pretrain_preprocessing"]["hu_window"] == [-500.0, 500.0]
    assert settings["intensity_mapping"][0]["mean"] == 100.0
    assert settings["patch_fit"]["planned_patch_size"] == [48, 80, 80]


def test_fixed_patch_variant(nnunet_env, tiny_weights):
    trainer = make_trainer(nnUNetTrainerSMIT_96, make_plans())
    assert trainer.configuration_manager.patch_size == [96, 96, 96]


def test_network_from_plans_alone_with_and_without_deep_supervision(nnunet_env, tiny_weights):
    trainer = make_trainer(nnUNetTrainerSMIT, make_plans())
    plans_manager = PlansManager(trainer.plans_manager.plans)  # what prediction rebuilds from plans.json
    cm = plans_manager.get_configuration("3d_fullres")
    with_ds = nnUNetTrainerSMIT.build_network_architecture(plans_manager, cm, 1, 3, True)
    without = nnUNetTrainerSMIT.build_network_architecture(plans_manager, cm, 1, 3, False)
    assert list(with_ds.state_dict()) == list(without.state_dict())
    x = torch.randn(1, 1, 64, 64, 64)
    with torch.no_grad():
        outputs = with_ds.train()(torch.randn(2, 1, 64, 64, 64))
    assert [tuple(o.shape[2:]) for o in outputs] == [(64 // 2**i,) * 3 for i in range(5)]
    assert trainer._get_deep_supervision_scales() == [[1 / 2**i] * 3 for i in range(5)]
    assert without.eval()(x).shape == (1, 3, 64, 64, 64)


def test_cascade_extra_channels_are_not_intensity_mapped(nnunet_env, tiny_weights):
    trainer = make_trainer(nnUNetTrainerSMIT, make_plans(), configuration="3d_cascade_fullres")
    cm = trainer.configuration_manager
    assert cm.previous_stage_name == "3d_lowres" and cm.patch_size == [64, 64, 64]
    net = nnUNetTrainerSMIT.build_network_architecture(trainer.plans_manager, cm, 3, 3, False)
    assert net.input_mapping.mapped.flatten().tolist() == [True, False, False]
    one_hot = torch.zeros(1, 2, 64, 64, 64)
    one_hot[:, 0, :32] = 1.0
    mapped = net.input_mapping(torch.cat([torch.randn(1, 1, 64, 64, 64), one_hot], 1))
    assert torch.equal(mapped[:, 1:], one_hot)


def test_lowres_configuration_is_fitted(nnunet_env, tiny_weights):
    trainer = make_trainer(nnUNetTrainerSMIT, make_plans(), configuration="3d_lowres")
    assert trainer.configuration_manager.patch_size == [64, 64, 64]


def test_multichannel_dataset_loads_single_channel_checkpoint(nnunet_env, tiny_weights):
    trainer = make_trainer(nnUNetTrainerSMIT, make_plans(("CTNormalization", "ZScoreNormalization")), num_channels=2)
    settings = trainer.configuration_manager.configuration["smit"]
    assert settings["intensity_mapping"][1] is None
    trainer.network = trainer.build_network_architecture(trainer.plans_manager, trainer.configuration_manager, 2, 3)
    trainer._load_pretrained_encoder()
    log = Path(trainer.log_file).read_text()
    assert "missing keys: 0; unexpected keys: 0; shape mismatches: 0" in log
    assert "repeated over 2 input channels" in log
    assert tiny_weights[1] in log


def test_scratch_needs_no_weights_and_uses_its_preset(nnunet_env):
    trainer = make_trainer(nnUNetTrainerSMITScratch_tiny, make_plans())
    settings = trainer.configuration_manager.configuration["smit"]
    assert settings["encoder_config"] == SMITConfig.preset("tiny").to_dict() and settings["weights"] is None


def test_spacing_far_from_pretraining_is_warned_with_numbers(nnunet_env, tiny_weights):
    plans = make_plans()
    plans["configurations"]["3d_fullres"]["spacing"] = [5.0, 0.7, 0.7]
    trainer = make_trainer(nnUNetTrainerSMIT, plans)
    log = Path(trainer.log_file).read_text()
    assert "WARNING: the dataset spacing [5.0, 0.7, 0.7] mm" in log and "[2.0, 2.0, 2.0]" in log


def test_optimizer_groups_and_frozen_encoder(nnunet_env, tiny_weights):
    for cls, encoder_trains in ((nnUNetTrainerSMIT, True), (nnUNetTrainerSMITFrozenEncoder, False)):
        trainer = make_trainer(cls, make_plans())
        trainer.network = trainer.build_network_architecture(trainer.plans_manager, trainer.configuration_manager,
                                                             1, 3)
        optimizer, scheduler = trainer.configure_optimizers()
        assert isinstance(optimizer, torch.optim.AdamW)
        in_optimizer = {id(p) for g in optimizer.param_groups for p in g["params"]}
        encoder_params = list(trainer.network.encoder.parameters())
        assert all((id(p) in in_optimizer) == encoder_trains for p in encoder_params)
        assert all(p.requires_grad == encoder_trains for p in encoder_params)
        scheduler.step(trainer.warmup_epochs)
        assert optimizer.param_groups[0]["lr"] == pytest.approx(trainer.initial_lr)


def test_compile_only_when_asked(nnunet_env, tiny_weights, monkeypatch):
    trainer = make_trainer(nnUNetTrainerSMIT, make_plans())
    trainer.device = torch.device("cuda")  # the decision, not a CUDA run
    monkeypatch.delenv("nnUNet_compile", raising=False)
    assert trainer._do_i_compile() is False
    monkeypatch.setenv("nnUNet_compile", "t")
    assert trainer._do_i_compile() is True


# --- leakage check: validation cases against the encoder's pretraining scans --------------------------------------
def write_raw_cases(raw_root: Path, case_ids, num_channels=1):
    """Small int16 CT-like raw images of Dataset999_Unit; returns {case id: (z, y, x) array of channel 0}."""
    arrays = {}
    for seed, case_id in enumerate(case_ids):
        array = np.random.default_rng(seed).integers(-1000, 1500, size=(6, 9, 8)).astype(np.int16)
        for channel in range(num_channels):
            path = raw_root / "Dataset999_Unit" / "imagesTr" / f"{case_id}_{channel:04d}.nii.gz"
            path.parent.mkdir(parents=True, exist_ok=True)
            sitk.WriteImage(sitk.GetImageFromArray(array + channel), str(path))
        arrays[case_id] = array
    return arrays


def fingerprinted_weights(tmp_path, monkeypatch, scans):
    config = SMITConfig.preset("tiny")
    path = tmp_path / "fingerprinted_encoder.pt"
    save_encoder_checkpoint(path, SwinEncoder(config).state_dict(), config, scan_fingerprints=scans)
    monkeypatch.setenv(WEIGHTS_ENV, str(path))
    return path


def leakage_lines(trainer):
    return [line.strip() for line in Path(trainer.log_file).read_text().splitlines() if "SMIT leakage check" in line]


def test_leakage_check_names_the_validation_case_seen_in_pretraining(nnunet_env, tmp_path, monkeypatch):
    arrays = write_raw_cases(nnunet_env / "nnUNet_raw", ["ct_000", "ct_001", "ct_002"], num_channels=2)
    # Pretraining saw ct_001 as a float32 NRRD (another format, another dtype: the same voxels).
    scans = {fingerprint_array(arrays["ct_001"].astype(np.float32)): "ct_001_nrrd_5f3a2b1c",
             fingerprint_array(np.zeros((4, 4, 4))): "unrelated_00000000"}
    fingerprinted_weights(tmp_path, monkeypatch, scans)
    trainer = make_trainer(nnUNetTrainerSMIT, make_plans(), num_channels=2)
    checkpoint = load_encoder_checkpoint(trainer._weights_path(trainer.configuration_manager.configuration))

    trainer.check_pretraining_leakage(checkpoint, val_keys=["ct_000", "ct_001"])
    (line,) = leakage_lines(trainer)
    assert line.endswith("WARNING: SMIT leakage check: 1 of the 2 validation cases were seen in pretraining "
                         "(ct_001 = pretraining scan ct_001_nrrd_5f3a2b1c): this fold's validation scores overstate "
                         "performance on unseen scans; pretrain without the held-out cases for an unbiased estimate.")
    trainer.check_pretraining_leakage(checkpoint, val_keys=["ct_000", "ct_002", "ct_404"])
    assert leakage_lines(trainer)[1].endswith(
        "SMIT leakage check: 2 validation cases checked against 2 pretraining scans; none was seen in pretraining "
        f"(1 validation cases without raw images under {nnunet_env / 'nnUNet_raw' / 'Dataset999_Unit'} were not "
        "checked, first ct_404).")


def test_leakage_check_runs_when_the_encoder_is_loaded_on_the_folds_validation_cases(nnunet_env, tmp_path,
                                                                                     monkeypatch):
    arrays = write_raw_cases(nnunet_env / "nnUNet_raw", ["ct_000", "ct_001", "ct_002"])
    fingerprinted_weights(tmp_path, monkeypatch, {fingerprint_array(arrays["ct_002"]): "scan_2"})
    preprocessed = nnunet_env / "nnUNet_preprocessed" / "Dataset999_Unit"
    (preprocessed / "nnUNetPlans_3d").mkdir(parents=True)
    for case_id in arrays:  # what nnU-Net's do_split looks at in the preprocessed folder
        (preprocessed / "nnUNetPlans_3d" / f"{case_id}.b2nd").touch()
    (preprocessed / "splits_final.json").write_text(json.dumps([{"train": ["ct_000", "ct_001"], "val": ["ct_002"]}]))
    trainer = make_trainer(nnUNetTrainerSMIT, make_plans())
    trainer.network = trainer.build_network_architecture(trainer.plans_manager, trainer.configuration_manager, 1, 3)
    trainer._load_pretrained_encoder()
    (line,) = leakage_lines(trainer)
    assert "WARNING: SMIT leakage check: 1 of the 1 validation cases were seen in pretraining (ct_002 = " in line


def test_leakage_check_says_why_it_was_skipped_and_never_stops_training(nnunet_env, tiny_weights, tmp_path,
                                                                        monkeypatch):
    trainer = make_trainer(nnUNetTrainerSMIT, make_plans())
    foreign = load_encoder_checkpoint(tiny_weights[0])  # records no fingerprints, like the authors' weights
    trainer.check_pretraining_leakage(foreign, val_keys=["ct_000"])
    assert "SMIT leakage check skipped: the encoder checkpoint" in leakage_lines(trainer)[-1]
    assert "records no fingerprints of its pretraining scans" in leakage_lines(trainer)[-1]

    fingerprinted = load_encoder_checkpoint(fingerprinted_weights(tmp_path, monkeypatch, {"0" * 16: "scan"}))
    trainer.check_pretraining_leakage(fingerprinted, val_keys=["ct_000"])
    assert leakage_lines(trainer)[-1].endswith(
        "SMIT leakage check skipped: the raw images of the 1 validation cases were not found under "
        f"{nnunet_env / 'nnUNet_raw' / 'Dataset999_Unit' / 'imagesTr'}.")

    def broken_split():
        raise RuntimeError("no preprocessed data")

    monkeypatch.setattr(trainer, "do_split", broken_split)
    trainer.check_pretraining_leakage(fingerprinted)
    assert leakage_lines(trainer)[-1].endswith(
        "SMIT leakage check skipped: it failed (RuntimeError: no preprocessed data).")


def test_continuing_keeps_the_results_folders_network_and_says_the_weights_are_not_read(nnunet_env, tiny_weights,
                                                                                       tmp_path, monkeypatch):
    started = make_trainer(nnUNetTrainerSMIT, make_plans())
    folder = Path(started.output_folder_base)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "plans.json").write_text(json.dumps(started.plans_manager.plans))
    other = SMITConfig.preset("tiny", embed_dim=24)
    path = tmp_path / "other.pt"
    save_encoder_checkpoint(path, SwinEncoder(other).state_dict(), other, PretrainPreprocessing())
    monkeypatch.setenv(WEIGHTS_ENV, str(path))
    notes, checkpoint = nnUNetTrainerSMIT._write_smit_plans({**make_plans(), "continue_training": True}, "3d_fullres")
    assert checkpoint is None
    assert notes[0] == (f"SMIT: continuing; network settings taken from the results folder's plans.json "
                        f"({WEIGHTS_ENV}={path} is not loaded when continuing).")


def test_continuing_with_weights_of_another_architecture_is_one_line(nnunet_env, tiny_weights, tmp_path,
                                                                     monkeypatch):
    # A run started from the tiny encoder; its nnU-Net checkpoint records the plans it was built from.
    started = make_trainer(nnUNetTrainerSMIT, make_plans())
    saved = {"init_args": {"plans": started.plans_manager.plans}, "network_weights": {}}
    other = SMITConfig.preset("tiny", embed_dim=24)
    path = tmp_path / "other.pt"
    save_encoder_checkpoint(path, SwinEncoder(other).state_dict(), other, PretrainPreprocessing())
    monkeypatch.setenv(WEIGHTS_ENV, str(path))
    continued = make_trainer(nnUNetTrainerSMIT, make_plans())
    with pytest.raises(SMITError) as info:
        continued._check_same_network(saved, "checkpoint_latest.pth")
    message = str(info.value)
    assert message.startswith("checkpoint_latest.pth holds another SMIT network than this run builds (embed_dim 12 "
                              "there, 24 here")
    assert f"the run started from ({tiny_weights[0]})" in message and "\n" not in message
    started._check_same_network(saved, "checkpoint_latest.pth")  # the same network: nothing to say


def _trained_fold_0(tiny_weights) -> Path:
    """A results folder as fold 0 of a tiny-encoder run leaves it: plans.json and a checkpoint; returns the folder."""
    started = make_trainer(nnUNetTrainerSMIT, make_plans())
    folder = Path(started.output_folder_base)
    (folder / "plans.json").write_text(json.dumps(started.plans_manager.plans))
    (folder / "fold_0" / "checkpoint_final.pth").write_bytes(b"")
    return folder


def _encoder_file(path, config, preprocessing=None, seed=0):
    torch.manual_seed(seed)
    save_encoder_checkpoint(path, SwinEncoder(config).state_dict(), config, preprocessing or PretrainPreprocessing())
    return path


@pytest.mark.parametrize("continue_training, fold", [(False, 1), (True, 1), (False, 0)])  # a new fold, --c, --val
def test_another_network_in_a_results_folder_with_a_trained_fold_is_refused_before_anything_is_written(
        nnunet_env, tiny_weights, tmp_path, monkeypatch, continue_training, fold):
    folder = _trained_fold_0(tiny_weights)
    before, fold_0 = (folder / "plans.json").read_bytes(), sorted((folder / "fold_0").iterdir())
    other = _encoder_file(tmp_path / "other.pt", SMITConfig.preset("tiny", embed_dim=24))
    monkeypatch.setenv(WEIGHTS_ENV, str(other))
    with pytest.raises(SMITError) as info:
        nnUNetTrainerSMIT(plans={**make_plans(), "continue_training": continue_training}, configuration="3d_fullres",
                          fold=fold, dataset_json=make_dataset_json(), device=CPU)
    message = str(info.value)
    assert message.startswith(f"{WEIGHTS_ENV}={other} gives another SMIT network (embed_dim 12 there, 24 here")
    assert f"than the one {folder} holds (fold 0, started from {tiny_weights[0]})" in message
    assert "another -tr trainer variant, another -p plans, or another nnUNet_results" in message
    assert "\n" not in message
    assert (folder / "plans.json").read_bytes() == before
    assert sorted(p.name for p in folder.iterdir()) == ["fold_0", "plans.json"]  # no fold_1, no log
    assert sorted((folder / "fold_0").iterdir()) == fold_0  # no training log either


@pytest.mark.parametrize("preprocessing, expected", [
    (PretrainPreprocessing(hu_window=(-175.0, 250.0)), "hu_window [-500.0, 500.0] there, [-175.0, 250.0] here"),
    (PretrainPreprocessing(hu_window=(-500.0, 500.0), scaled_range=(-1.0, 1.0)), "scaled_range [0.0, 1.0] there"),
])
def test_the_same_architecture_on_another_input_is_refused_too(nnunet_env, tiny_weights, tmp_path, monkeypatch,
                                                               preprocessing, expected):
    _trained_fold_0(tiny_weights)
    monkeypatch.setenv(WEIGHTS_ENV, str(_encoder_file(tmp_path / "other.pt", SMITConfig.preset("tiny"),
                                                       preprocessing)))
    with pytest.raises(SMITError, match="gives another SMIT network") as info:
        nnUNetTrainerSMIT._write_smit_plans({**make_plans(), "continue_training": False}, "3d_fullres", 1)
    assert expected in str(info.value)


def test_other_weights_of_the_same_network_train_another_fold_and_continuing_keeps_the_folders_network(
        nnunet_env, tiny_weights, tmp_path, monkeypatch):
    _trained_fold_0(tiny_weights)
    # the same architecture and input, other weights (another fold's pretraining, drop path of another run)
    same = _encoder_file(tmp_path / "same.pt", SMITConfig.preset("tiny", drop_path_rate=0.0),
                         PretrainPreprocessing(hu_window=(-500.0, 500.0)), seed=3)
    monkeypatch.setenv(WEIGHTS_ENV, str(same))
    trainer = make_trainer(nnUNetTrainerSMIT, make_plans())
    assert trainer.plans_manager.plans["configurations"]["3d_fullres"]["smit"]["weights"]["path"] == str(same)
    # --c of the trained fold 0 with other weights of the same network: the folder's network, the weights unloaded
    notes, checkpoint = nnUNetTrainerSMIT._write_smit_plans({**make_plans(), "continue_training": True},
                                                            "3d_fullres", 0)
    assert checkpoint is None and "is not loaded when continuing" in notes[0]
    # --c of the trained fold 0 with weights of another architecture: refused, as a new fold would be (the run would
    # otherwise go on quietly with the folder's network, not the one asked for)
    monkeypatch.setenv(WEIGHTS_ENV, str(_encoder_file(tmp_path / "other.pt", SMITConfig.preset("tiny", embed_dim=24))))
    with pytest.raises(SMITError, match=r"gives another SMIT network \(embed_dim 12 there, 24 here"):
        nnUNetTrainerSMIT._write_smit_plans({**make_plans(), "continue_training": True}, "3d_fullres", 0)


@pytest.mark.parametrize("fold_0_becomes", ["killed before its first checkpoint", "moved aside by smit_study"])
def test_a_results_folder_without_a_trained_fold_takes_another_network(nnunet_env, tiny_weights, tmp_path,
                                                                       monkeypatch, fold_0_becomes):
    folder = _trained_fold_0(tiny_weights)
    if fold_0_becomes == "killed before its first checkpoint":
        (folder / "fold_0" / "checkpoint_final.pth").unlink()
    else:
        (folder / "fold_0").rename(folder / "fold_0.replaced-20261203-090000")
    other = _encoder_file(tmp_path / "other.pt", SMITConfig.preset("tiny", embed_dim=24))
    monkeypatch.setenv(WEIGHTS_ENV, str(other))
    trainer = make_trainer(nnUNetTrainerSMIT, make_plans())
    assert trainer.plans_manager.plans["configurations"]["3d_fullres"]["smit"]["encoder_config"]["embed_dim"] == 24


def test_older_settings_count_as_what_they_meant():
    from nnunet_smit.trainers import plans_settings

    settings = {"encoder_config": SMITConfig.preset("tiny").to_dict(),
                "pretrain_preprocessing": PretrainPreprocessing().to_dict(), "decoder": "smit",
                "decoder_norm": "instance", "intensity_mapping": [None], "patch_fit": {"patch_size": [64, 64, 64]},
                "transpose_forward": [0, 1, 2], "pad_value": 0.0, "weights": {"path": "a.pt"}}
    older = {key: value for key, value in settings.items() if key not in ("decoder", "transpose_forward", "pad_value")}
    assert plans_settings.network_differences(older, {**settings, "weights": {"path": "b.pt"}}) == []
    mapped = {**settings, "intensity_mapping": [{"scheme": "CTNormalization", "mean": 1.0, "std": 2.0,
                                                 "percentile_00_5": -100.0, "percentile_99_5": 300.0}]}
    older_mapped = {key: value for key, value in mapped.items() if key != "pad_value"}
    assert plans_settings.network_differences(older_mapped, mapped) == [
        "pad_value nnU-Net's 0 (plans before format 2) there, 0.0 here"]
    moved = {**mapped, "intensity_mapping": [{**mapped["intensity_mapping"][0], "mean": 5.0}]}
    assert plans_settings.network_differences(mapped, moved) == ["channel 0 mean 1 there, 5 here"]


def test_a_pretraining_run_folder_gives_its_encoder_and_says_which(nnunet_env, tmp_path, monkeypatch):
    config = SMITConfig.preset("tiny")
    run = tmp_path / "run"
    run.mkdir()
    encoder = SwinEncoder(config)
    save_encoder_checkpoint(run / "smit_encoder_teacher.pt", encoder.state_dict(), config, PretrainPreprocessing())
    monkeypatch.setenv(WEIGHTS_ENV, str(run))
    trainer = make_trainer(nnUNetTrainerSMIT, make_plans())
    settings = trainer.plans_manager.plans["configurations"]["3d_fullres"]["smit"]
    assert settings["weights"]["path"] == str(run) and settings["weights"]["source"] == "nnunet_smit"
    assert settings["weights"]["sha256"] == load_encoder_checkpoint(run / "smit_encoder_teacher.pt").sha256


def test_a_project_error_in_a_process_running_the_trainer_is_one_line():
    import subprocess
    import sys

    code = ("import nnunet_smit.trainers.nnUNetTrainerSMIT\n"
            "from nnunet_smit.errors import CheckpointError\n"
            "raise CheckpointError('weights.pt is truncated; copy it again.')\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 1 and result.stderr == "error: weights.pt is truncated; copy it again.\n"
    other = subprocess.run([sys.executable, "-c", "import nnunet_smit.trainers.nnUNetTrainerSMIT\nraise KeyError(1)"],
                           capture_output=True, text=True, timeout=120)
    assert "Traceback" in other.stderr  # anything else keeps its traceback


# --- the decoder named in the plans: the light variants, and plans written before the key existed ------------------
LIGHT_VARIANTS = ("nnUNetTrainerSMITLight", "nnUNetTrainerSMITLight_64", "nnUNetTrainerSMITLightScratch",
                  "nnUNetTrainerSMITLightScratch_64")


@pytest.mark.parametrize("name", LIGHT_VARIANTS)
def test_light_variants_write_the_light_decoder_and_prediction_rebuilds_it_from_plans_json(nnunet_env, tiny_weights,
                                                                                          name):
    import nnunet_smit.trainers as trainers
    from nnunet_smit.architectures import SMITLightDecoder

    trainer = make_trainer(getattr(trainers, name), make_plans())
    settings = trainer.configuration_manager.configuration["smit"]
    assert settings["decoder"] == "light" and settings["gradient_checkpointing"] is True
    trained = trainer.build_network_architecture(trainer.plans_manager, trainer.configuration_manager, 1, 3, True)
    # what nnUNetv2_predict does: plans.json from disk, the static method on the class, no trainer instance
    plans_manager = PlansManager(json.loads(json.dumps(trainer.plans_manager.plans)))
    cm = plans_manager.get_configuration("3d_fullres")
    rebuilt = getattr(trainers, name).build_network_architecture(plans_manager, cm, 1, 3, False)
    assert isinstance(trained.decoder, SMITLightDecoder) and isinstance(rebuilt.decoder, SMITLightDecoder)
    assert all(stage.gradient_checkpointing for net in (trained, rebuilt) for stage in net.encoder.layers)
    shapes = {k: v.shape for k, v in trained.state_dict().items()}
    assert {k: v.shape for k, v in rebuilt.state_dict().items()} == shapes
    rebuilt.load_state_dict(trained.state_dict())  # strict: prediction loads the trained checkpoint
    if name.endswith("_64"):
        assert cm.patch_size == [64, 64, 64]
    with torch.no_grad():
        outputs = trained.train()(torch.randn(1, 1, *cm.patch_size))
    assert [tuple(o.shape[2:]) for o in outputs] == [tuple(n // 2**i for n in cm.patch_size) for i in range(5)]
    assert trainer._get_deep_supervision_scales() == [[1 / 2**i] * 3 for i in range(5)]


def test_the_default_trainer_writes_the_authors_decoder_and_plans_without_the_key_build_it(nnunet_env, tiny_weights):
    from nnunet_smit.architectures import SMITDecoder

    trainer = make_trainer(nnUNetTrainerSMIT, make_plans())
    plans = json.loads(json.dumps(trainer.plans_manager.plans))
    settings = plans["configurations"]["3d_fullres"]["smit"]
    assert settings["decoder"] == "smit" and settings["gradient_checkpointing"] is False
    del settings["decoder"], settings["gradient_checkpointing"]  # plans.json of a run before the light decoder
    plans_manager = PlansManager(plans)
    net = nnUNetTrainerSMIT.build_network_architecture(plans_manager, plans_manager.get_configuration("3d_fullres"),
                                                       1, 3, True)
    assert type(net.decoder) is SMITDecoder
    assert not any(stage.gradient_checkpointing for stage in net.encoder.layers)


def test_an_unknown_decoder_in_the_plans_is_one_sentence(nnunet_env, tiny_weights):
    trainer = make_trainer(nnUNetTrainerSMIT, make_plans())
    plans = json.loads(json.dumps(trainer.plans_manager.plans))
    plans["configurations"]["3d_fullres"]["smit"]["decoder"] = "unet3000"
    plans_manager = PlansManager(plans)
    with pytest.raises(SMITError) as info:
        nnUNetTrainerSMIT.build_network_architecture(plans_manager, plans_manager.get_configuration("3d_fullres"),
                                                     1, 3, True)
    message = str(info.value)
    assert "'unet3000'" in message and "['light', 'smit']" in message and message.count(". ") == 0


@pytest.mark.parametrize("name", ["nnUNetTrainerSMITLight", "nnUNetTrainerSMITLight_64"])
def test_smit_study_finds_the_scratch_twin_of_a_light_variant(name):
    from nnunet_smit.study.study import find_trainer, scratch_trainer_name

    trainer, twin = find_trainer(name), find_trainer(scratch_trainer_name(name))
    assert trainer.require_pretrained_weights and not twin.require_pretrained_weights
    assert (twin.decoder, twin.fixed_patch_size, twin.gradient_checkpointing) == (
        trainer.decoder, trainer.fixed_patch_size, trainer.gradient_checkpointing)
