"""smit_probe end to end on a tiny planned dataset: cases, outputs, baselines, scoring, online probe, one-line errors.

The dataset (tests/trainers/synthetic_dataset.py) plants its labels in the intensities (liver 90 HU, bone 700 HU in
20 HU soft tissue and air): the intensity baseline must find them, which checks sampling, training, nnU-Net's sliding
window, export and scoring together. About a minute on 2 cores.
"""
from __future__ import annotations

import json
import os
import subprocess

import pytest
import torch

from nnunet_smit.architectures import SMITConfig, SwinEncoder
from nnunet_smit.checkpoint import save_encoder_checkpoint
from nnunet_smit.conventions import PretrainPreprocessing
from nnunet_smit.probe.cli import main
from tests.trainers.synthetic_dataset import write_dataset

DATASET_ID = 904
ROW_FIELDS = {"encoder", "labelled", "seed", "train_cases", "test_cases", "dice", "dice_per_class", "seconds"}
SMALL = ["--patches_per_case", "2", "--iterations", "300", "-device", "cpu"]


@pytest.fixture(scope="module")
def nnunet_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("probe")
    dirs = {name: root / name for name in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results")}
    name, _ = write_dataset(dirs["nnUNet_raw"], DATASET_ID, num_cases=6, num_test_cases=0)
    config = SMITConfig.preset("tiny")
    encoder = root / "encoder.pt"
    save_encoder_checkpoint(encoder, SwinEncoder(config).state_dict(), config)
    with pytest.MonkeyPatch.context() as environment:
        for variable, folder in dirs.items():
            folder.mkdir(exist_ok=True)
            environment.setenv(variable, str(folder))
        yield root, dirs, name, encoder


def _one_line_error(capsys, argv) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("error: ") and "Traceback" not in err, err
    return err


def test_an_unplanned_dataset_is_one_line(nnunet_dirs, capsys):
    root, dirs, name, encoder = nnunet_dirs
    if (dirs["nnUNet_preprocessed"] / name).exists():
        pytest.skip("the dataset is planned already (tests run out of order)")
    err = _one_line_error(capsys, ["-d", str(DATASET_ID), "-o", str(root / "never"), "--encoder", str(encoder)])
    assert f"nnUNetv2_plan_and_preprocess -d {DATASET_ID} -c 3d_fullres" in err
    assert not (root / "never").exists()


@pytest.fixture(scope="module")
def planned(nnunet_dirs):
    root, dirs, name, encoder = nnunet_dirs
    subprocess.run(["nnUNetv2_plan_and_preprocess", "-d", str(DATASET_ID), "-c", "3d_fullres", "-np", "1",
                    "-npfp", "1"], env={**os.environ, "nnUNet_n_proc_DA": "1"}, check=True, capture_output=True)
    return root, dirs, name, encoder


@pytest.fixture(scope="module")
def probe(planned):
    root, dirs, name, encoder = planned
    argv = ["-d", str(DATASET_ID), "-o", str(root / "out"), "--encoder", str(encoder), "--labelled", "1", "2",
            "--seeds", "1", *SMALL]
    assert main(argv) == 0
    return root, name, encoder, json.loads((root / "out" / "probe.json").read_text(encoding="utf-8"))


def test_every_encoder_and_both_baselines_are_probed_on_smit_studys_cases(probe):
    from nnunet_smit.probe import probe as probe_module
    from nnunet_smit.study import splits
    from nnunet_smit.study.study import resolve_dataset

    root, name, encoder, result = probe
    assert {"dataset", "plans", "configuration", "test_cases", "rows"} <= set(result)
    assert (result["dataset"], result["plans"], result["configuration"]) == (name, "nnUNetPlans", "3d_fullres")
    # the study's own functions, so the study's cases
    assert probe_module.held_out_cases is splits.held_out_cases and probe_module.labelled_sets is splits.labelled_sets
    case_ids = resolve_dataset(str(DATASET_ID), "3d_fullres", "nnUNetPlans").case_ids
    test_cases = splits.held_out_cases(case_ids, 0.2)
    assert result["test_cases"] == test_cases and len(test_cases) == 1
    pool = [c for c in case_ids if c not in test_cases]
    study_sets = {(s.labelled, s.seed): list(s.train_cases) for s in splits.labelled_sets(pool, [1, 2], 1)}
    rows = result["rows"]
    assert [(r["encoder"], r["labelled"]) for r in rows] == [
        (str(encoder), 1), (str(encoder), 2), ("random", 1), ("random", 2), ("intensity", 1), ("intensity", 2)]
    for row in rows:
        assert ROW_FIELDS <= set(row)
        assert row["test_cases"] == test_cases and row["train_cases"] == study_sets[(row["labelled"], row["seed"])]
        assert set(row["dice_per_class"]) == {"liver", "bone"} and row["seconds"] > 0
        summary = root / "out" / "predictions" / row["name"] / f"k{row['labelled']}_seed{row['seed']}"
        assert (summary / "summary.json").is_file() and (summary / f"{test_cases[0]}.nii.gz").is_file()
    assert (root / "out" / "probe.md").read_text(encoding="utf-8").count("(n=1)") == 6
    assert (root / "out" / "probe.png").read_bytes()[:4] == b"\x89PNG"


def test_the_labels_planted_in_the_intensities_are_found_and_a_random_encoder_scores_lower(probe):
    *_, result = probe
    dice = {(r["name"], r["labelled"]): r["dice"] for r in result["rows"]}
    # liver (90 HU) and bone (700 HU) against 20 HU tissue with 15 HU noise: thresholds on the voxel nearly suffice
    assert dice[("intensity", 2)] > 0.9
    assert dice[("random", 2)] < dice[("intensity", 2)]


def test_scores_are_nnunets_compute_metrics_on_folder(probe):
    from nnunetv2.evaluation.evaluate_predictions import compute_metrics_on_folder
    from nnunetv2.imageio.simpleitk_reader_writer import SimpleITKIO

    root, name, _, result = probe
    folder = root / "out" / "predictions" / "intensity" / "k2_seed0"
    ours = json.loads((folder / "summary.json").read_text(encoding="utf-8"))
    theirs = compute_metrics_on_folder(str(root / "nnUNet_preprocessed" / name / "gt_segmentations"), str(folder),
                                       None, SimpleITKIO(), ".nii.gz", [1, 2], None, num_processes=1)
    assert ours["foreground_mean"]["Dice"] == pytest.approx(theirs["foreground_mean"]["Dice"], abs=1e-12)
    assert [ours["mean"][k]["Dice"] for k in ("1", "2")] == pytest.approx([theirs["mean"][k]["Dice"] for k in (1, 2)])


def test_the_probe_gives_the_encoder_what_smitnet_gives_it(planned):
    """The fine-tuning network, built by plans_settings from the same plans, feeds its encoder the same tensor."""
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    from nnunet_smit.probe.features import ENCODER_SCALES, FrozenFeatures, build_frozen_network, probe_plans
    from nnunet_smit.study.study import resolve_dataset
    from nnunet_smit.trainers.plans_settings import build_network

    dataset = resolve_dataset(str(DATASET_ID), "3d_fullres", "nnUNetPlans")
    encoder = SwinEncoder(SMITConfig.preset("tiny"))
    # as nnU-Net plans a scan with thick coronal slices (this dataset's thick slices are axial already)
    transposed = {**dataset.plans, "transpose_forward": [1, 0, 2], "transpose_backward": [1, 0, 2]}
    plans = probe_plans(transposed, "3d_fullres", encoder.config, PretrainPreprocessing())
    resolved = PlansManager(plans).get_configuration("3d_fullres").configuration
    assert resolved["smit"]["transpose_forward"] == [1, 0, 2]
    x = torch.randn(1, 1, *resolved["patch_size"])
    x[..., :5] = 0  # nnU-Net's padding
    fine_tuning = build_network(resolved, 1, 3, deep_supervision=False).eval()
    seen = []
    fine_tuning.encoder.register_forward_pre_hook(lambda module, args: seen.append(args[0]))
    features = FrozenFeatures(build_frozen_network(plans, "3d_fullres", 1, encoder), ("input",) + ENCODER_SCALES)
    with torch.no_grad():
        fine_tuning(x)
    assert torch.equal(features(x)[0], seen[0])


def test_an_encoder_in_memory_is_probed_without_files_and_left_as_it_was(planned):
    from nnunet_smit.probe import ProbeRecipe, probe_encoder

    encoder = SwinEncoder(SMITConfig.preset("tiny")).train()
    before = {k: v.clone() for k, v in encoder.state_dict().items()}
    result = probe_encoder(encoder, PretrainPreprocessing(), str(DATASET_ID), labelled=1, seed=0,
                           recipe=ProbeRecipe(patches_per_case=1, iterations=20))
    assert 0.0 <= result["dice"] <= 1.0 and set(result["dice_per_class"]) == {"liver", "bone"}
    assert len(result["train_cases"]) == 1 and len(result["test_cases"]) == 1
    assert encoder.training and all(p.requires_grad for p in encoder.parameters())
    assert all(torch.equal(before[k], v) for k, v in encoder.state_dict().items())


@pytest.mark.parametrize("problem", ["k larger than the pool", "encoder that does not load"])
def test_bad_input_is_one_line_before_any_work(planned, capsys, tmp_path, problem):
    root, dirs, name, encoder = planned
    argv = ["-d", str(DATASET_ID), "-o", str(tmp_path / "out"), "--encoder", str(encoder), *SMALL]
    if problem == "k larger than the pool":
        err = _one_line_error(capsys, argv + ["--labelled", "9"])
        assert "--labelled 9 is larger than the 5 cases" in err
    else:
        broken = tmp_path / "broken.pt"
        broken.write_bytes(b"not a checkpoint")
        err = _one_line_error(capsys, argv + ["--encoder", str(broken)])
        assert f"--encoder {broken} does not load" in err
    assert not (tmp_path / "out").exists()


def test_the_online_probe_writes_its_records_plot_summary_and_names_the_probe_cases_seen_in_pretraining(
        planned, tmp_path, caplog):
    """smit_pretrain --probe on the dataset's own raw images: every probe case is a pretraining scan, so the leakage
    guard names them; each epoch end leaves a probe record (teacher probed), and the last Dice reaches
    run_summary.json, the export's metadata and the loss curves' probe panel."""
    import logging

    from nnunet_smit.checkpoint import load_encoder_checkpoint
    from nnunet_smit.pretraining import plots
    from nnunet_smit.pretraining.cli import main as pretrain

    root, dirs, name, _ = planned
    out = tmp_path / "run"
    argv = ["-d", str(dirs["nnUNet_raw"] / name / "imagesTr"), "-o", str(out), "--preset", "tiny",
            "--view_size", "64", "--region_size", "64", "--batch_size", "1", "--samples_per_epoch", "2",
            "--epochs", "2", "--warmup_epochs", "0", "--head_hidden_dim", "32", "--head_bottleneck_dim", "16",
            "--head_out_dim", "64", "--num_workers", "0", "--device", "cpu", "--no_progress",
            "--preview_every_epochs", "0", "--spacing", "1", "1", "1",
            "--probe", str(DATASET_ID), "--probe_every", "1"]
    with caplog.at_level(logging.WARNING):
        assert pretrain(argv) == 0
    records = [json.loads(line) for line in (out / "log.jsonl").read_text(encoding="utf-8").splitlines()]
    start = next(r for r in records if r["event"] == "start")
    assert start["probe"]["dataset"] == name and start["probe"]["every_epochs"] == 1
    cases = start["probe"]["train_cases"] + start["probe"]["test_cases"]
    assert len(start["probe_leakage"]) == len(cases) == 2
    for case in cases:
        role = "labelled" if case in start["probe"]["train_cases"] else "held-out"
        (line,) = [line for line in start["probe_leakage"] if f" {case} " in line]
        assert line.startswith(f"probe leakage: {role} case {case} of {name} is also a pretraining scan")
        assert line in caplog.text
    probes = [r for r in records if r["event"] == "probe"]
    assert [(r["step"], r["epoch"]) for r in probes] == [(2, 1), (4, 2)]
    for record in probes:
        assert 0.0 <= record["probe_dice"] <= 1.0 and set(record["probe_dice_per_class"]) == {"liver", "bone"}
        assert record["probe_seconds"] > 0
    summary = json.loads((out / "run_summary.json").read_text(encoding="utf-8"))["online_probe"]
    assert summary["dice"] == probes[-1]["probe_dice"] and summary["step"] == 4
    assert summary["first_dice"] == probes[0]["probe_dice"] and summary["probes"] == 2
    assert 0 < summary["share_of_run"] < 1
    exported = load_encoder_checkpoint(out / "smit_encoder_teacher.pt")
    assert exported.summary["online_probe"]["dice"] == summary["dice"]
    _, panels = plots.loss_figure(records)
    line = panels["probe"].lines[0]
    assert list(line.get_xdata()) == [2, 4] and list(line.get_ydata()) == [r["probe_dice"] for r in probes]
    assert (out / "plots" / "loss_curves.png").is_file()


@pytest.mark.parametrize("argv, message", [
    (["--probe", "999"], "--probe 999: dataset '999' is not known to nnU-Net"),
    (["--probe", str(DATASET_ID), "--probe_labelled", "9"], "--probe_labelled 9 is larger than the 5 cases"),
    (["--probe_every", "2"], "--probe_every needs --probe DATASET"),
])
def test_a_bad_online_probe_is_one_line_before_the_cache_is_built(planned, capsys, tmp_path, argv, message):
    from nnunet_smit.pretraining.cli import main as pretrain

    root, dirs, name, _ = planned
    assert pretrain(["-d", str(dirs["nnUNet_raw"] / name / "imagesTr"), "-o", str(tmp_path / "run"), "--preset",
                     "tiny", "--device", "cpu", *argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: ") and message in err[-1], err
    assert not (tmp_path / "run").exists()


def test_a_checkpoint_with_conv_blocks_is_probed_at_its_last_pretrained_blocks_with_a_random_twin(planned, tmp_path):
    """``--reconstruct_through skips/decoder`` exports: the probe loads the carried blocks as the trainer does and
    reads their outputs; the random baseline of such a checkpoint has random blocks read at the same scales."""
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    from nnunet_smit.architectures import SMITNet
    from nnunet_smit.architectures.decoder import DECODER_PARTS, top_down
    from nnunet_smit.checkpoint import DecoderParts
    from nnunet_smit.probe.features import (DECODER_SCALES, ENCODER_SCALES, SKIP_SCALES, FrozenFeatures,
                                            build_frozen_network, probe_plans)
    from nnunet_smit.probe.probe import load_encoders
    from nnunet_smit.study.study import resolve_dataset

    root, dirs, name, encoder_only = planned
    config = SMITConfig.preset("tiny")
    torch.manual_seed(3)
    pretrained = SMITNet(config, 1, 1)  # stands for a pretraining run's encoder and blocks
    files = {}
    for parts in (("skips",), ("skips", "decoder")):
        blocks = {f"decoder.{k}": v for k, v in pretrained.decoder.state_dict().items()
                  if k.split(".")[0] in {m for p in parts for m in DECODER_PARTS[p]}}
        files[parts[-1]] = tmp_path / f"with_{parts[-1]}.pt"
        save_encoder_checkpoint(files[parts[-1]], pretrained.encoder.state_dict(), config,
                                decoder_parts=DecoderParts(parts, "smit", "instance", blocks))
    probed = load_encoders([str(encoder_only), str(files["skips"]), str(files["decoder"])], "all")
    assert [p.name for p in probed] == ["encoder", "with_skips", "with_decoder", "random", "random_with_skips",
                                        "random_with_decoder", "intensity"]
    assert [tuple(p.scales) for p in probed[:3]] == [ENCODER_SCALES, SKIP_SCALES, DECODER_SCALES]
    assert [tuple(p.scales) for p in probed[3:6]] == [ENCODER_SCALES, SKIP_SCALES, DECODER_SCALES]
    assert [p.parts for p in probed[3:6]] == [(), ("skips",), ("skips", "decoder")]
    assert all(p.decoder_parts is None for p in probed[3:])

    dataset = resolve_dataset(str(DATASET_ID), "3d_fullres", "nnUNetPlans")
    with_decoder, random_twin = probed[2], probed[5]
    plans = probe_plans(dataset.plans, "3d_fullres", config, PretrainPreprocessing(), decoder=with_decoder.decoder)
    patch = PlansManager(plans).get_configuration("3d_fullres").patch_size
    x = torch.randn(1, 1, *patch)
    features = FrozenFeatures(build_frozen_network(plans, "3d_fullres", 1, with_decoder.module,
                                                   with_decoder.decoder_parts), DECODER_SCALES + SKIP_SCALES)
    maps = features(x)
    with torch.no_grad():
        mapped = features.network.encoder_input(x)
        out = pretrained.encoder(mapped)
        blocks = pretrained.decoder
        expected = top_down(blocks, blocks.encoder1(mapped), out.features, out.bottleneck)
        expected += [blocks.encoder1(mapped), blocks.encoder2(out.features[0]), blocks.encoder3(out.features[1]),
                     blocks.encoder4(out.features[2]), out.features[3], blocks.encoder10(out.bottleneck)]
    assert [m.shape[1] for m in maps] == features.channels()
    for got, want in zip(maps, expected):
        assert torch.allclose(got, want, atol=1e-5)
    random_features = FrozenFeatures(build_frozen_network(plans, "3d_fullres", 1, random_twin.module), DECODER_SCALES)
    again = FrozenFeatures(build_frozen_network(plans, "3d_fullres", 1, random_twin.module), DECODER_SCALES)
    assert not torch.allclose(random_features(x)[0], maps[0])
    assert torch.equal(random_features(x)[0], again(x)[0])  # the same random blocks every time
