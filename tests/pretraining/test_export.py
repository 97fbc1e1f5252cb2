"""The end of a run: baselines in every record and in the summary, and one export rule for every objective
combination (CPU, tiny preset, 64^3 views)."""
import json
import logging

import pytest
import torch

from nnunet_smit.architectures import SMITConfig, SwinEncoder
from nnunet_smit.checkpoint import load_encoder_checkpoint, save_encoder_checkpoint
from nnunet_smit.pretraining.export import exported_side, reconstruction_against_baselines
from nnunet_smit.pretraining.state import CHECKPOINT_NAME
from nnunet_smit.pretraining.trainer import PretrainTrainer
from tests.pretraining.training_support import phantom_cache, tiny_config

RECONSTRUCTION_ONLY = dict(weight_dino=0.0, weight_ibot=0.0)


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return phantom_cache(tmp_path_factory)


@pytest.fixture(scope="module")
def all_objectives(cache, tmp_path_factory):
    out = tmp_path_factory.mktemp("all_objectives")
    trainer = PretrainTrainer(tiny_config(max_steps=3), cache, out)
    return trainer, trainer.fit()


@pytest.fixture(scope="module")
def reconstruction_only(cache, tmp_path_factory):
    out = tmp_path_factory.mktemp("reconstruction_only")
    trainer = PretrainTrainer(tiny_config(max_steps=2, **RECONSTRUCTION_ONLY), cache, out)
    initial_teacher = {k: v.clone() for k, v in trainer.model.teacher.encoder.state_dict().items()}
    return trainer, trainer.fit(), initial_teacher


def _records(out_dir):
    return [json.loads(line) for line in (out_dir / "log.jsonl").read_text().splitlines()]


def _same_weights(a, b):
    return all(torch.equal(value, b[key]) for key, value in a.items())


def test_every_train_record_carries_the_baselines_and_the_summary_compares_with_them(all_objectives):
    trainer, exported = all_objectives
    records = _records(trainer.output_dir)
    train = [r for r in records if r["event"] == "train"]
    assert len(train) == 3
    for record in train:
        for key in ("reconstruction", "recon_l1_view_mean", "recon_l1_block_mean", "teacher_entropy",
                    "teacher_patch_entropy"):
            assert isinstance(record[key], float) and record[key] >= 0, (key, record)
    assert records[0]["event"] == "start" and records[0]["prototypes"] == {"dino": 128, "ibot": 128}
    summary = json.loads((trainer.output_dir / "run_summary.json").read_text())
    comparison = summary["recon_vs_best_baseline"]
    assert comparison == reconstruction_against_baselines(train)  # from the same records of the log
    assert comparison["ratio"] == pytest.approx(comparison["recon_l1"] / comparison["best_baseline_l1"])
    assert load_encoder_checkpoint(exported).summary["recon_vs_best_baseline"] == comparison


def test_the_export_records_its_side_at_the_top_of_its_metadata(all_objectives):
    trainer, exported = all_objectives
    checkpoint = load_encoder_checkpoint(exported)
    assert checkpoint.exported_side == checkpoint.summary["exported"] == "teacher"
    assert torch.load(exported, map_location="cpu", weights_only=True)["exported_side"] == "teacher"
    assert _same_weights(checkpoint.state_dict, trainer.model.teacher.encoder.state_dict())


def test_a_reconstruction_only_run_keeps_an_ema_teacher_and_exports_it(reconstruction_only):
    trainer, exported, initial_teacher = reconstruction_only
    assert exported.name == "smit_encoder_teacher.pt"
    checkpoint = load_encoder_checkpoint(exported)
    assert checkpoint.exported_side == "teacher"
    teacher = trainer.model.teacher.encoder.state_dict()
    assert _same_weights(checkpoint.state_dict, teacher)
    # The teacher followed the student by EMA: it moved from its start, and lags behind the student.
    assert not _same_weights(teacher, initial_teacher)
    assert not _same_weights(teacher, trainer.model.student.encoder.state_dict())
    state = torch.load(trainer.output_dir / CHECKPOINT_NAME, map_location="cpu", weights_only=True)
    assert any(k.startswith("teacher.encoder.") for k in state["model"])
    assert json.loads((trainer.output_dir / "run_summary.json").read_text())["recon_vs_best_baseline"] is not None


def test_export_student_picks_the_student_whatever_the_objectives(all_objectives, reconstruction_only):
    for trainer in (all_objectives[0], reconstruction_only[0]):
        assert exported_side(trainer.model, "student") == ("student", trainer.model.student)
        assert exported_side(trainer.model, "teacher") == ("teacher", trainer.model.teacher)
    trainer = reconstruction_only[0]
    trainer.config.export = "student"  # a runtime setting: what a rerun with --export student does
    try:
        path = trainer.export()
    finally:
        trainer.config.export = "teacher"
    checkpoint = load_encoder_checkpoint(path)
    assert path.name == "smit_encoder_student.pt" and checkpoint.exported_side == "student"
    assert _same_weights(checkpoint.state_dict, trainer.model.student.encoder.state_dict())


def test_resume_of_a_reconstruction_only_run_is_bit_exact(cache, reconstruction_only, tmp_path):
    reference = reconstruction_only[0]
    PretrainTrainer(tiny_config(max_steps=1, **RECONSTRUCTION_ONLY), cache, tmp_path).fit()
    resumed = PretrainTrainer(tiny_config(max_steps=2, **RECONSTRUCTION_ONLY), cache, tmp_path)
    resumed.fit()
    assert resumed.step == reference.step == 2
    assert _same_weights(resumed.model.state_dict(), reference.model.state_dict())


def test_a_state_without_teacher_resumes_with_the_teacher_copied_from_the_student(
    cache, reconstruction_only, tmp_path, caplog,
):
    # What a reconstruction-only run wrote before every run kept a teacher: no teacher entries.
    saved = torch.load(reconstruction_only[0].output_dir / CHECKPOINT_NAME, map_location="cpu", weights_only=True)
    saved["model"] = {k: v for k, v in saved["model"].items() if not k.startswith("teacher.")}
    torch.save(saved, tmp_path / CHECKPOINT_NAME)
    assert load_encoder_checkpoint(tmp_path / CHECKPOINT_NAME).exported_side == "student"

    trainer = PretrainTrainer(tiny_config(max_steps=3, **RECONSTRUCTION_ONLY), cache, tmp_path)
    with caplog.at_level(logging.WARNING, logger="nnunet_smit.pretraining.trainer"):
        assert trainer.load_checkpoint()
    assert "holds no teacher" in caplog.text
    assert _same_weights(trainer.model.teacher.state_dict(),
                         {k: v for k, v in trainer.model.student.state_dict().items()
                          if k in trainer.model.teacher.state_dict()})
    trainer.fit()
    assert trainer.step == 3
    resume = [r for r in _records(tmp_path) if r["event"] == "resume"]
    assert resume[-1]["teacher_copied_from_student"] is True


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_exported_side_travels_with_the_checkpoint_and_older_exports_read_it_from_the_summary(tmp_path, suffix):
    config = SMITConfig.preset("tiny")
    weights = SwinEncoder(config).state_dict()
    save_encoder_checkpoint(tmp_path / f"new{suffix}", weights, config, summary={"exported": "student"},
                            exported_side="student")
    assert load_encoder_checkpoint(tmp_path / f"new{suffix}").exported_side == "student"
    save_encoder_checkpoint(tmp_path / f"old{suffix}", weights, config, summary={"exported": "teacher"})
    assert load_encoder_checkpoint(tmp_path / f"old{suffix}").exported_side == "teacher"
    save_encoder_checkpoint(tmp_path / f"none{suffix}", weights, config)
    assert load_encoder_checkpoint(tmp_path / f"none{suffix}").exported_side is None


def test_a_fresh_smit_small_run_exports_the_correct_window_reverse(cache, tmp_path):
    """New pretraining never inherits the authors' window-reverse slip (only their weights carry it)."""
    trainer = PretrainTrainer(tiny_config(preset="smit_small", max_steps=1, **RECONSTRUCTION_ONLY), cache, tmp_path)
    trainer.fit()
    exported = load_encoder_checkpoint(next(tmp_path.glob("smit_encoder_*.pt")))
    assert exported.config.embed_dim == 48 and exported.config.legacy_window_reverse is False

