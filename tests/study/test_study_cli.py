"""smit_study end to end on a tiny planned dataset: arms, outputs, resume, leakage and one-line errors.

Trains 6 tiny arms (1 epoch of 1 iteration each) through nnU-Net on the CPU, then retrains 4 and validates 1 in
reruns: about 8 minutes of CPU time (2 cores).
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from nnunet_smit.architectures import SMITConfig, SwinEncoder
from nnunet_smit.checkpoint import load_encoder_checkpoint, save_encoder_checkpoint
from nnunet_smit.fingerprints import fingerprint_image_file
from nnunet_smit.study.cli import main
from nnunet_smit.study.study import check_leakage, resolve_dataset
from tests.trainers.synthetic_dataset import write_dataset

DATASET_ID = 902
ROW_FIELDS = {"encoder", "labelled", "seed", "train_cases", "test_cases", "dice", "dice_per_class"}


def _encoder(path: Path, scans: dict) -> Path:
    config = SMITConfig.preset("tiny")
    save_encoder_checkpoint(path, SwinEncoder(config).state_dict(), config, scan_fingerprints=scans)
    return path


@pytest.fixture(scope="module")
def nnunet_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("study")
    dirs = {name: root / name for name in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results")}
    for d in dirs.values():
        d.mkdir()
    name, _ = write_dataset(dirs["nnUNet_raw"], DATASET_ID, num_cases=6, num_test_cases=0)
    saved = {k: os.environ.get(k) for k in (*dirs, "nnUNet_n_proc_DA", "nnUNet_def_n_proc", "nnUNet_compile")}
    os.environ.update({k: str(v) for k, v in dirs.items()})
    os.environ.update(nnUNet_def_n_proc="1", nnUNet_compile="f", nnUNet_n_proc_DA="0")
    yield root, dirs, name
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


def _one_line_error(capsys, argv) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err, err
    return err


def test_bad_input_is_one_line_before_anything_trains(nnunet_dirs, capsys):
    root, dirs, name = nnunet_dirs
    out = root / "never"
    err = _one_line_error(capsys, ["-d", str(DATASET_ID), "-o", str(out), "--baselines", "scratch",
                                   "--trainer", "nnUNetTrainerSMIT_tiny", "-device", "cpu"])
    assert f"nnUNetv2_plan_and_preprocess -d {DATASET_ID} -c 3d_fullres" in err
    assert not out.exists()


@pytest.fixture(scope="module")
def study(nnunet_dirs):
    """Plan the dataset, then one study: an encoder whose pretraining saw the held-out case, scratch, nnunet."""
    root, dirs, name = nnunet_dirs
    subprocess.run(["nnUNetv2_plan_and_preprocess", "-d", str(DATASET_ID), "-c", "3d_fullres", "-np", "1",
                    "-npfp", "1"], env={**os.environ, "nnUNet_n_proc_DA": "1"}, check=True, capture_output=True)
    images = dirs["nnUNet_raw"] / name / "imagesTr"
    leaky = _encoder(root / "leaky.pt", {fingerprint_image_file(p): p.name for p in sorted(images.iterdir())})
    # the SMIT arms train on smit_plan's plans (the encoder's whole HU window), nnU-Net's arm on its default plans
    subprocess.run(["smit_plan", "-d", str(DATASET_ID), "--encoder", str(leaky), "-np", "1"],
                   env={**os.environ, "nnUNet_n_proc_DA": "1"}, check=True, capture_output=True)
    argv = ["-d", str(DATASET_ID), "-o", str(root / "out"), "--encoder", str(leaky), "--labelled", "1", "2",
            "--seeds", "1", "--trainer", "nnUNetTrainerSMIT_tiny", "--epochs", "1", "--iterations_per_epoch", "1",
            "--disable_tta", "-device", "cpu", "-p", "nnUNetPlans_SMIT"]
    assert main(argv) == 0
    return root, dirs, name, argv, leaky


def test_every_arm_trains_on_the_same_cases_and_is_scored_on_the_held_out_set(study):
    root, dirs, name, _, leaky = study
    result = json.loads((root / "out" / "study.json").read_text(encoding="utf-8"))
    rows = result["rows"]
    assert len(rows) == 6  # 3 arms x k in {1, 2} x 1 seed
    assert {r["encoder"] for r in rows} == {str(leaky), "scratch", "nnunet"}
    for row in rows:
        assert ROW_FIELDS <= set(row)
        assert 0.0 <= row["dice"] <= 1.0 and set(row["dice_per_class"]) == {"liver", "bone"}
        assert row["test_cases"] == result["test_cases"] and len(row["test_cases"]) == 1
        assert not set(row["train_cases"]) & set(row["test_cases"]) and len(row["train_cases"]) == row["labelled"]
        assert (Path(row["results_folder"]) / "validation" / "summary.json").is_file()
    by_k = {k: {tuple(r["train_cases"]) for r in rows if r["labelled"] == k} for k in (1, 2)}
    assert len(by_k[1]) == len(by_k[2]) == 1  # identical cases across arms
    (one,), (two,) = by_k[1], by_k[2]
    assert set(one) < set(two)  # nested
    assert len({r["results_folder"] for r in rows}) == 6  # every arm has its own folder

    from nnunetv2.utilities.crossval_split import generate_crossval_split

    splits = json.loads((dirs["nnUNet_preprocessed"] / name / "splits_final.json").read_text(encoding="utf-8"))
    cases = sorted(f"toy_{i:03d}" for i in range(6))
    assert splits[:5] == generate_crossval_split(cases, seed=12345, n_splits=5)
    assert sorted(r["fold"] for r in rows) == [5, 5, 5, 6, 6, 6]
    assert splits[5] == {"train": list(one), "val": result["test_cases"]}
    assert splits[6] == {"train": sorted(two), "val": result["test_cases"]}
    assert (root / "out" / "study.md").read_text(encoding="utf-8").count("(n=1)") == 6
    assert (root / "out" / "study.png").read_bytes()[:4] == b"\x89PNG"


def test_the_nnunet_arm_trains_on_nnunets_default_plans_and_patch_under_smit_plans(study):
    root, dirs, name, _, _ = study
    rows = json.loads((root / "out" / "study.json").read_text(encoding="utf-8"))["rows"]
    default = json.loads((dirs["nnUNet_preprocessed"] / name / "nnUNetPlans.json").read_text(encoding="utf-8"))
    smit = json.loads((dirs["nnUNet_preprocessed"] / name / "nnUNetPlans_SMIT.json").read_text(encoding="utf-8"))
    default_patch = default["configurations"]["3d_fullres"]["patch_size"]
    assert default_patch != smit["configurations"]["3d_fullres"]["patch_size"]  # the test would otherwise say nothing
    for row in rows:
        trained = json.loads((Path(row["results_folder"]).parent / "plans.json").read_text(encoding="utf-8"))
        if row["arm"] == "nnunet":
            assert row["plans"] == trained["plans_name"] == "nnUNetPlans"
            assert trained["configurations"]["3d_fullres"]["patch_size"] == default_patch
            assert trained["foreground_intensity_properties_per_channel"] == \
                default["foreground_intensity_properties_per_channel"]
        else:
            assert row["plans"] == trained["plans_name"] == "nnUNetPlans_SMIT"
    encoder_rows = [r for r in rows if r["arm"] not in ("scratch", "nnunet")]
    assert {r["exported_side"] for r in encoder_rows} == {None}  # saved by hand, not by a pretraining run
    assert all(r["encoder_sha256"] == load_encoder_checkpoint(r["encoder"]).sha256 for r in encoder_rows)


def test_an_encoder_whose_window_the_plans_clip_is_refused_in_one_line(study, capsys, tmp_path):
    root, dirs, name, argv, leaky = study
    err = _one_line_error(capsys, ["-d", str(DATASET_ID), "-o", str(tmp_path / "out"), "--encoder", str(leaky),
                                   "--labelled", "1", "--seeds", "1", "--trainer", "nnUNetTrainerSMIT_tiny",
                                   "-device", "cpu"])
    assert "clip CT inside the HU window of the encoder of arm(s) leaky" in err and "smit_plan" in err, err
    assert not (tmp_path / "out").exists()


def test_a_held_out_case_seen_in_pretraining_is_reported_and_a_clean_encoder_is_not(study, caplog):
    root, dirs, name, _, leaky = study
    result = json.loads((root / "out" / "study.json").read_text(encoding="utf-8"))
    test_case = result["test_cases"][0]
    assert result["leakage"] == {str(leaky): {test_case: [f"{test_case}_0000.nii.gz"]}}
    assert f"held-out cases seen in pretraining: {leaky}: {test_case}" in (root / "out" / "study.md").read_text(encoding="utf-8")

    images = dirs["nnUNet_raw"] / name / "imagesTr"
    clean = _encoder(root / "clean.pt", {fingerprint_image_file(p): p.name for p in sorted(images.iterdir())
                                         if not p.name.startswith(test_case)})
    leakage, notes = check_leakage(resolve_dataset(str(DATASET_ID), "3d_fullres", "nnUNetPlans"), [test_case],
                                   {str(clean): load_encoder_checkpoint(clean)})
    assert leakage == {} and notes == []


def test_a_rerun_skips_finished_arms(study, capsys):
    root, dirs, name, argv, _ = study
    rows = json.loads((root / "out" / "study.json").read_text(encoding="utf-8"))["rows"]
    stamps = {r["results_folder"]: (Path(r["results_folder"]) / "checkpoint_final.pth").stat().st_mtime_ns
              for r in rows}
    capsys.readouterr()
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert out.count("finished earlier, skipped") == 6 and "training on" not in out
    again = json.loads((root / "out" / "study.json").read_text(encoding="utf-8"))["rows"]
    assert [(r["arm"], r["labelled"], r["dice"]) for r in again] == [(r["arm"], r["labelled"], r["dice"]) for r in rows]
    assert all((Path(f) / "checkpoint_final.pth").stat().st_mtime_ns == t for f, t in stamps.items())


@pytest.mark.parametrize("change, message", [
    (["--labelled", "9"], "--labelled 9 is larger than the 5 cases left"),
    (["--trainer", "nnUNetTrainerSMIT_nope"], "unknown trainer 'nnUNetTrainerSMIT_nope'"),
    (["--trainer", "nnUNetTrainer"], "is not a SMIT trainer"),
    (["--encoder", "BROKEN"], "does not load"),
])
def test_bad_input_on_a_planned_dataset_is_one_line(study, capsys, tmp_path, change, message):
    root, dirs, name, argv, _ = study
    broken = tmp_path / "broken.pt"
    broken.write_bytes(b"not a checkpoint")
    args = ["-d", str(DATASET_ID), "-o", str(tmp_path / "out"), "--seeds", "1", "--labelled", "1",
            "--trainer", "nnUNetTrainerSMIT_tiny", "-device", "cpu"]
    if change[0] != "--encoder":
        args += ["--encoder", str(root / "leaky.pt")]
    args += [str(broken) if item == "BROKEN" else item for item in change]  # argparse: the later value wins
    err = _one_line_error(capsys, args)
    assert message in err, err
    assert not (tmp_path / "out").exists()


def test_the_scratch_twin_of_each_smit_trainer():
    from nnunet_smit.study.study import scratch_trainer_name

    assert scratch_trainer_name("nnUNetTrainerSMIT") == "nnUNetTrainerSMITScratch"
    assert scratch_trainer_name("nnUNetTrainerSMIT_96") == "nnUNetTrainerSMITScratch_96"
    assert scratch_trainer_name("nnUNetTrainerSMITLight") == "nnUNetTrainerSMITLightScratch"
    assert scratch_trainer_name("nnUNetTrainerSMITLight_64") == "nnUNetTrainerSMITLightScratch_64"


def test_a_rerun_after_the_encoder_file_changed_retrains_its_arms(study, capsys):
    root, dirs, name, argv, leaky = study
    before = {(r["arm"], r["labelled"]): r for r in json.loads((root / "out" / "study.json").read_text())["rows"]}
    # re-pretrained to the same path: same architecture, other weights
    config = SMITConfig.preset("tiny")
    torch.manual_seed(7)
    save_encoder_checkpoint(leaky, SwinEncoder(config).state_dict(), config)
    capsys.readouterr()
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert out.count("the encoder file's weights changed") == 2, out  # the leaky arm at k=1 and k=2
    assert out.count("finished earlier, skipped") == 4  # scratch (same architecture) and nnunet are reused
    after = {(r["arm"], r["labelled"]): r for r in json.loads((root / "out" / "study.json").read_text())["rows"]}
    new_sha = load_encoder_checkpoint(leaky).sha256
    for k in (1, 2):
        assert before[("leaky", k)]["encoder_sha256"] != new_sha == after[("leaky", k)]["encoder_sha256"]
        folder = Path(after[("leaky", k)]["results_folder"])
        record = json.loads((folder / "smit_study_arm.json").read_text())
        assert record["encoder_sha256"] == new_sha
        assert list(folder.parent.glob(folder.name + ".replaced-*"))  # the old fold is kept, renamed


def _rows(root: Path) -> dict:
    return {(r["arm"], r["labelled"], r["seed"]): r
            for r in json.loads((root / "out" / "study.json").read_text(encoding="utf-8"))["rows"]}


def _argv_with(argv, flags):
    """The study's command line with options replaced or added (``{"--labelled": ["1"], "-o": [folder]}``)."""
    kept, skipping = [], False
    for item in argv:
        if item.startswith("-"):
            skipping = item in flags
        if not skipping:
            kept.append(item)
    for flag, values in flags.items():
        kept += [flag, *values]
    return kept


def test_a_second_study_on_a_folder_in_use_is_refused_naming_the_holder(study, capsys):
    from nnunet_smit.files import FolderLock

    root, dirs, name, argv, _ = study
    before = (root / "out" / "study.json").read_bytes()
    with FolderLock(root / "out" / ".smit_study.lock", "the study folder"):  # the first study, still running
        err = _one_line_error(capsys, argv)
    assert f"is in use by pid {os.getpid()} on host " in err and "use another -o folder" in err, err
    assert (root / "out" / "study.json").read_bytes() == before


def test_a_rerun_with_fewer_k_keeps_every_earlier_row(study, capsys, monkeypatch):
    from nnunet_smit.study import report

    root, dirs, name, argv, _ = study
    before = _rows(root)
    plotted, plot = [], report.plot_study

    def recording_plot(path, rows, arms, *args, **kwargs):
        plotted.append((list(rows), list(arms)))
        return plot(path, rows, arms, *args, **kwargs)

    monkeypatch.setattr(report, "plot_study", recording_plot)
    capsys.readouterr()
    assert main(_argv_with(argv, {"--labelled": ["1"], "--baselines": ["scratch"]})) == 0
    out = capsys.readouterr().out
    assert out.count("finished earlier, skipped") == 2 and "training on" not in out  # leaky and scratch at k=1
    after = _rows(root)
    assert after.keys() == before.keys() and len(after) == 6
    assert all(after[key]["dice"] == row["dice"] for key, row in before.items())
    rows, arms = plotted[-1]
    assert {(r["arm"], r["labelled"], r["seed"]) for r in rows} == set(before) and set(arms) == {"leaky", "scratch",
                                                                                                  "nnunet"}
    md = (root / "out" / "study.md").read_text(encoding="utf-8")
    assert "| arm | k=1 | k=2 |" in md and md.count("(n=1)") == 6 and "| nnunet |" in md
    assert "This run added no row: every arm was trained earlier in this folder." in md


def test_an_arm_killed_during_its_final_validation_is_validated_not_trained_again(study, capsys):
    root, dirs, name, argv, _ = study
    before = _rows(root)
    folder = Path(before[("scratch", 2, 0)]["results_folder"])
    final = folder / "checkpoint_final.pth"
    stamp = final.stat().st_mtime_ns
    (folder / "validation" / "summary.json").unlink()
    capsys.readouterr()
    assert main(_argv_with(argv, {"--labelled": ["2"], "--baselines": ["scratch"]})) == 0
    out = capsys.readouterr().out
    assert "checkpoint_final.pth is on disk: validating it, not training again" in out
    assert out.count("finished earlier, skipped") == 1  # the leaky arm at k=2
    assert final.stat().st_mtime_ns == stamp
    assert (folder / "validation" / "summary.json").is_file()
    after = _rows(root)
    assert after.keys() == before.keys()
    assert after[("scratch", 2, 0)]["dice"] == pytest.approx(before[("scratch", 2, 0)]["dice"], abs=1e-6)
    md = (root / "out" / "study.md").read_text(encoding="utf-8")
    assert "This run added 1 row(s): scratch k=2 seed 0; the others were trained earlier in this folder." in md


def test_a_damaged_checkpoint_of_an_interrupted_arm_is_one_line(study, capsys, tmp_path):
    root, dirs, name, argv, _ = study
    folder = Path(_rows(root)[("nnunet", 1, 0)]["results_folder"])
    kept = tmp_path / "kept"
    shutil.copytree(folder, kept)
    try:  # killed mid-training: no final checkpoint, no validation, a checkpoint_latest.pth cut short
        (folder / "checkpoint_final.pth").unlink()
        (folder / "validation" / "summary.json").unlink()
        (folder / "checkpoint_latest.pth").write_bytes((kept / "checkpoint_final.pth").read_bytes()[:1000])
        err = _one_line_error(capsys, _argv_with(argv, {"--labelled": ["1"], "--baselines": ["nnunet"]}))
        assert f"{folder / 'checkpoint_latest.pth'} cannot be read" in err and "move it away and rerun" in err, err
    finally:
        shutil.rmtree(folder)
        shutil.copytree(kept, folder)


def test_a_partly_preprocessed_dataset_is_refused_before_anything_is_written(study, capsys, tmp_path):
    root, dirs, name, argv, _ = study
    # a copy of the planned dataset under another id (the study's own dataset is shared by the other tests)
    copy_id = DATASET_ID + 1
    copy = name.replace(f"Dataset{DATASET_ID}", f"Dataset{copy_id}")
    shutil.copytree(dirs["nnUNet_raw"] / name, dirs["nnUNet_raw"] / copy)
    shutil.copytree(dirs["nnUNet_preprocessed"] / name, dirs["nnUNet_preprocessed"] / copy,
                    ignore=shutil.ignore_patterns("splits_final.json*", ".splits_final.json*"))
    for plans_file in (dirs["nnUNet_preprocessed"] / copy).glob("nnUNetPlans*.json"):
        plans = json.loads(plans_file.read_text(encoding="utf-8"))
        plans_file.write_text(json.dumps({**plans, "dataset_name": copy}), encoding="utf-8")
    data = dirs["nnUNet_preprocessed"] / copy / "nnUNetPlans_SMIT_3d_fullres"
    removed = sorted(data.glob("toy_003*"))
    assert removed  # the case's files in the SMIT plans' data folder
    for path in removed:
        path.unlink()
    out = tmp_path / "out"
    err = _one_line_error(capsys, _argv_with(argv, {"-d": [str(copy_id)], "-o": [str(out)]}))
    assert err == (f"error: {copy} is only partly preprocessed for 3d_fullres: 1 of its 6 training cases are missing "
                   f"(toy_003); run nnUNetv2_plan_and_preprocess -d {copy_id} -c 3d_fullres to finish it."), err
    assert not out.exists()
    assert not (dirs["nnUNet_preprocessed"] / copy / "splits_final.json").exists()


def test_an_encoder_re_pretrained_with_another_architecture_retrains_every_fold_of_its_arm(study, capsys):
    root, dirs, name, argv, leaky = study
    # the same path, another architecture: both folds of the arm (one results folder, one plans.json) are stale
    config = SMITConfig.preset("tiny", embed_dim=24)
    save_encoder_checkpoint(leaky, SwinEncoder(config).state_dict(), config)
    capsys.readouterr()
    assert main(_argv_with(argv, {"--baselines": []})) == 0
    out = capsys.readouterr().out
    assert out.count("moved to fold_") == 2 and out.count("training on") == 2, out
    rows = _rows(root)
    for k in (1, 2):
        folder = Path(rows[("leaky", k, 0)]["results_folder"])
        plans = json.loads((folder.parent / "plans.json").read_text(encoding="utf-8"))
        assert plans["configurations"]["3d_fullres"]["smit"]["encoder_config"]["embed_dim"] == 24
        assert rows[("leaky", k, 0)]["encoder_sha256"] == load_encoder_checkpoint(leaky).sha256


def test_sigterm_during_an_arm_ends_like_ctrl_c_and_frees_the_folder(study, capsys, monkeypatch):
    """A scheduler's stop (SIGTERM) during the first arm: the interrupted line and exit 130, no traceback, the lock
    released, and study.json holds every finished arm, also the scratch arm this command line had not reached yet."""
    import signal

    from nnunet_smit.files import FolderLock
    from nnunet_smit.study import study as study_module

    root, dirs, name, argv, leaky = study
    # the encoder file back at the tiny architecture, with other weights: the leaky fold of k=1 is stale and the
    # first job trains again, while the scratch twin (the tiny architecture it was trained with) is up to date
    _encoder(leaky, {})
    before = _rows(root)
    stopped = []

    def stopped_mid_arm(*args, **kwargs):
        stopped.append(True)
        os.kill(os.getpid(), signal.SIGTERM)
        raise AssertionError("SIGTERM did not stop the arm")

    monkeypatch.setattr(study_module, "train_arm", stopped_mid_arm)
    previous = signal.getsignal(signal.SIGTERM)
    try:
        capsys.readouterr()
        assert main(_argv_with(argv, {"--labelled": ["1"], "--baselines": ["scratch"]})) == 130
    finally:
        signal.signal(signal.SIGTERM, previous)
    captured = capsys.readouterr()
    err = captured.err.strip().splitlines()
    assert stopped == [True] and err[-1] == "interrupted; rerun the same command to resume (finished arms are kept)."
    assert not any("Traceback" in line for line in err)
    assert "arm 1 of 2: leaky, k=1, seed 0 (fold 5): the fold on disk is not this arm" in captured.out
    with FolderLock(root / "out" / ".smit_study.lock", "the study folder"):  # released
        pass
    after = _rows(root)  # the stale leaky fold of this command line went aside; every other finished arm stays
    assert after.keys() == before.keys() - {("leaky", 1, 0)}
    assert ("scratch", 1, 0) in after and all(after[key]["dice"] == before[key]["dice"] for key in after)
