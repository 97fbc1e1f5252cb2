"""Pretraining engine on phantoms (CPU, tiny preset, 64^3 views): learning, no collapse, resume, export."""
from __future__ import annotations

import json
import math
import signal

import pytest
import torch

from nnunet_smit.architectures import SMITConfig, SMITNet
from nnunet_smit.checkpoint import load_encoder_checkpoint, load_encoder_weights
from nnunet_smit.errors import SMITError, TrainingDiverged, TrainingInterrupted
from nnunet_smit.pretraining.config import PretrainConfig
from nnunet_smit.pretraining.state import CHECKPOINT_NAME
from nnunet_smit.pretraining.trainer import PretrainTrainer
from nnunet_smit.pretraining.model import teacher_collapse_stats
from tests.pretraining.training_support import N_PHANTOMS, phantom_cache, tiny_config

RESUME_STEPS = 6  # spans an epoch boundary (4 steps per epoch)


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return phantom_cache(tmp_path_factory)


@pytest.fixture(scope="module")
def uninterrupted(cache, tmp_path_factory):
    """A run of RESUME_STEPS steps without interruption: (trainer, exported path)."""
    out = tmp_path_factory.mktemp("uninterrupted")
    trainer = PretrainTrainer(tiny_config(max_steps=RESUME_STEPS), cache, out)
    return trainer, trainer.fit()


def _train_records(out_dir):
    records = [json.loads(line) for line in (out_dir / "log.jsonl").read_text().splitlines()]
    return [r for r in records if r["event"] == "train"]


def test_each_objective_decreases_against_a_fixed_teacher(cache, tmp_path):
    # With the teacher frozen (momentum 1, center fixed at 0, constant temperature) the distillation targets are
    # fixed, so every term measures only how well the student learns its task; a broken gradient path stays flat.
    config = tiny_config(
        max_steps=12, base_lr=1e-3, momentum_teacher=1.0, center_momentum=1.0,
        teacher_temp_start=0.04, teacher_temp_end=0.04,
    )
    PretrainTrainer(config, cache, tmp_path).fit()
    records = _train_records(tmp_path)
    assert len(records) == 12
    for term in ("dino", "ibot", "reconstruction"):
        first = sum(r[term] for r in records[:4]) / 4
        last = sum(r[term] for r in records[-4:]) / 4
        # Observed: dino 3.0 -> 1.8, ibot 2.9 -> 1.0, reconstruction 0.40 -> 0.25; demand a clear 15% drop.
        assert last < 0.85 * first, (term, first, last)


def test_log_records_every_term_and_runtime_figures(uninterrupted):
    trainer, _ = uninterrupted
    record = _train_records(trainer.output_dir)[-1]
    for key in ("loss", "dino", "ibot", "reconstruction", "lr", "weight_decay", "momentum", "teacher_temp",
                "grad_norm", "samples_per_s", "memory_mb", "teacher_entropy", "teacher_dim_std"):
        assert key in record and record[key] is not None, key
    assert (trainer.output_dir / "plots" / "loss_curves.png").stat().st_size > 0
    saved = json.loads((trainer.output_dir / "pretrain_config.json").read_text())
    assert saved["pretrain_config"]["max_steps"] == RESUME_STEPS
    assert saved["pretrain_config"]["centering"] == trainer.config.centering == trainer.model.dino_loss.centering


def test_collapse_floors_reject_collapsed_outputs():
    k = 128
    uniform = torch.full((8, k), 1.0 / k)
    one_prototype = torch.zeros(8, k)
    one_prototype[:, 3] = 1.0
    assert teacher_collapse_stats(uniform)["dim_std"] < 1e-6
    assert teacher_collapse_stats(one_prototype)["marginal_entropy"] < 1e-6


def test_teacher_output_does_not_collapse(uninterrupted):
    trainer, _ = uninterrupted
    model = trainer.model
    batch = torch.utils.data.default_collate([trainer.dataset.sample(i % 4, 1000 + i) for i in range(4)])
    views = batch["views"].flatten(0, 1)
    with torch.no_grad():
        logits = model.teacher(views, None, None).global_logits
        probs = model.dino_loss.teacher_probs(logits, trainer.schedules.teacher_temp(trainer.step))
    stats = teacher_collapse_stats(probs)
    k = probs.shape[1]
    # Floors: not one prototype for every view (marginal entropy well above 0), not uniform (per-view entropy
    # below log K), and views differ (per-prototype spread clearly above the ~0 of a collapsed teacher).
    assert stats["marginal_entropy"] > 0.25 * math.log(k), stats
    assert stats["entropy"] < math.log(k) - 0.01, stats
    assert stats["dim_std"] > 1e-4, stats


# A short run in which a DINO teacher can move: 2 scans per step (KoLeo compares the scans of a step), a faster
# teacher (EMA momentum 0.98 instead of 0.996, which would leave it at its initial weights for these 24 steps), a
# higher learning rate and DINO's constant teacher temperature 0.04.
SHORT_RUN = dict(max_steps=24, batch_size=2, base_lr=5e-4, momentum_teacher=0.98, teacher_temp_end=0.04)


def _fresh_teacher_stats(trainer):
    """Collapse indicators of the teacher's global output on 8 new views (fresh crops, 2 per scan) of the 4 scans."""
    batch = torch.utils.data.default_collate([trainer.dataset.sample(i % 4, 2000 + i) for i in range(4)])
    with torch.no_grad():
        logits = trainer.model.teacher(batch["views"].flatten(0, 1), None, None).global_logits
        probs = trainer.model.dino_loss.teacher_probs(logits, trainer.schedules.teacher_temp(trainer.step))
    return teacher_collapse_stats(probs)


def test_teacher_stays_sharp_and_input_dependent_over_training(cache, tmp_path):
    # The 6-step check above cannot see a collapse to uniform: the EMA center needs ~20 steps (momentum 0.9) to
    # absorb the teacher's common output, after which an input-invariant teacher is uniform.
    trainer = PretrainTrainer(tiny_config(**SHORT_RUN), cache, tmp_path)
    trainer.fit()
    k = trainer.config.head_out_dim
    late = _train_records(tmp_path)[-8:]
    entropy = sum(r["teacher_entropy"] for r in late) / len(late)
    # Sharp: the teacher's entropy stays clearly below the log K of a uniform output.
    assert entropy < 0.9 * math.log(k), (entropy, math.log(k))
    stats = _fresh_teacher_stats(trainer)
    # Input-dependent: views land on different prototypes (per-prototype spread at least half the mean probability
    # 1/K; a uniform teacher has 0), and not all on one prototype (marginal entropy well above 0).
    assert stats["dim_std"] > 0.5 / k, stats
    assert stats["marginal_entropy"] > 0.25 * math.log(k), stats


def test_without_koleo_the_same_run_collapses_to_uniform(cache, tmp_path):
    # What KoLeo prevents (see nnunet_smit/pretraining/dino_loss.py): with DINO, iBOT and reconstruction alone the
    # global embeddings of all scans converge and the centred teacher output becomes the same for every view.
    trainer = PretrainTrainer(tiny_config(weight_koleo=0.0, **SHORT_RUN), cache, tmp_path)
    trainer.fit()
    k = trainer.config.head_out_dim
    assert _fresh_teacher_stats(trainer)["dim_std"] < 0.25 / k


def test_resume_reaches_the_same_weights(cache, uninterrupted, tmp_path, monkeypatch):
    reference, _ = uninterrupted
    # 1) stop after 2 steps (exports like a finished run), 2) rerun: resume, interrupted by SIGINT after step 4,
    # 3) rerun: resume to the end. CPU, deterministic algorithms: bitwise equal to the uninterrupted run.
    PretrainTrainer(tiny_config(max_steps=2), cache, tmp_path).fit()
    assert (tmp_path / CHECKPOINT_NAME).exists()

    trainer = PretrainTrainer(tiny_config(max_steps=RESUME_STEPS), cache, tmp_path)
    original_step = trainer.train_step

    def step_then_signal(*args, **kwargs):
        result = original_step(*args, **kwargs)
        if trainer.step == 4:
            signal.raise_signal(signal.SIGINT)
        return result

    monkeypatch.setattr(trainer, "train_step", step_then_signal)
    handler_before = signal.getsignal(signal.SIGINT)
    with pytest.raises(TrainingInterrupted) as interrupted:
        trainer.fit()
    assert "rerun the same command" in interrupted.value.message
    saved = torch.load(tmp_path / CHECKPOINT_NAME, map_location="cpu", weights_only=True)
    assert saved["step"] == 4
    assert signal.getsignal(signal.SIGINT) == handler_before

    resumed = PretrainTrainer(tiny_config(max_steps=RESUME_STEPS), cache, tmp_path)
    resumed.fit()
    assert resumed.step == reference.step == RESUME_STEPS
    expected = reference.model.state_dict()
    for key, value in resumed.model.state_dict().items():
        assert torch.equal(value, expected[key]), key
    for group, ref_group in zip(resumed.optimizer.state_dict()["state"].values(),
                                reference.optimizer.state_dict()["state"].values()):
        assert torch.equal(group["exp_avg"], ref_group["exp_avg"])


def test_a_diverged_run_stops_and_keeps_the_last_good_checkpoint(cache, tmp_path, monkeypatch):
    # A NaN voxel reaching step 4 makes its loss NaN and the update writes NaN into the weights.
    trainer = PretrainTrainer(tiny_config(max_steps=8, checkpoint_every_steps=2), cache, tmp_path)
    original_step = trainer.train_step

    def nan_at_step_four(batch, *args, **kwargs):
        if trainer.step == 3:
            batch = {**batch, "views": batch["views"].clone()}
            batch["views"][0, 0, 0, 10, 10, 10] = float("nan")
        return original_step(batch, *args, **kwargs)

    monkeypatch.setattr(trainer, "train_step", nan_at_step_four)
    with pytest.raises(TrainingDiverged) as diverged:
        trainer.fit()
    message = str(diverged.value)
    assert message.startswith("pretraining diverged: the weights are not finite numbers any more at step 4")
    assert "loss nan" in message and f"{tmp_path / CHECKPOINT_NAME} still holds step 2" in message
    assert "\n" not in message
    saved = torch.load(tmp_path / CHECKPOINT_NAME, map_location="cpu", weights_only=True)
    assert saved["step"] == 2
    assert all(torch.isfinite(v).all() for v in saved["model"].values() if v.is_floating_point())
    assert not list(tmp_path.glob("smit_encoder_*.pt"))
    records = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert records[-1]["event"] == "diverged" and records[-1]["last_saved_step"] == 2
    # Rerunning resumes from the good state (and, with clean data, trains on).
    rerun = PretrainTrainer(tiny_config(max_steps=8, checkpoint_every_steps=2), cache, tmp_path)
    rerun.fit()
    assert rerun.step == 8 and rerun.weights_finite()


def test_schedules_the_run_cuts_short_are_warned_about(cache, tmp_path, caplog):
    config = tiny_config(epochs=2, warmup_epochs=3, teacher_temp_end=0.07, teacher_temp_warmup_epochs=5,
                         freeze_last_layer_epochs=2)
    with caplog.at_level("WARNING", logger="nnunet_smit.pretraining"):
        PretrainTrainer(config, cache, tmp_path)
    warned = "\n".join(r.getMessage() for r in caplog.records)
    assert "the learning-rate warm-up (3 epochs) is not shorter than the run (2 epochs)" in warned
    assert "the temperature never reaches 0.07" in warned
    assert "the prototypes stay frozen for the whole run" in warned
    caplog.clear()
    with caplog.at_level("WARNING", logger="nnunet_smit.pretraining"):
        PretrainTrainer(tiny_config(), cache, tmp_path / "fine")
    assert not [r for r in caplog.records if "epochs" in r.getMessage()]


def test_a_compiled_student_runs_eagerly_in_the_first_step(cache, tmp_path):
    # As under DDP with --compile: traced while the first step fills the shift-mask caches, the student would be
    # compiled a second time at the next step.
    trainer = PretrainTrainer(tiny_config(max_steps=3), cache, tmp_path)
    eager, compiled_at = trainer.runner.eager_student, []

    def compiled(*args, **kwargs):
        compiled_at.append(trainer.step)
        return eager(*args, **kwargs)

    trainer.runner.student = compiled
    trainer.fit()
    assert compiled_at == [1, 2]


def test_the_weights_are_read_back_once_per_step_that_logs_saves_and_exports(cache, tmp_path, monkeypatch):
    trainer = PretrainTrainer(tiny_config(max_steps=3, checkpoint_every_steps=1, log_every_steps=1), cache, tmp_path)
    checked_at, original = [], trainer.weights_finite
    monkeypatch.setattr(trainer, "weights_finite", lambda: checked_at.append(trainer.step) or original())
    trainer.fit()
    assert checked_at == [1, 2, 3]


def test_zero_intervals_turn_periodic_checkpoints_off(cache, tmp_path, monkeypatch):
    # 0 minutes, like 0 steps, means no checkpoint by that measure (it meant one after every step): within an epoch
    # of 4 steps a 3-step run saves only at its end.
    trainer = PretrainTrainer(tiny_config(max_steps=3, checkpoint_every_steps=0, checkpoint_every_minutes=0),
                              cache, tmp_path)
    saved_at, save = [], trainer.save_checkpoint
    monkeypatch.setattr(trainer, "save_checkpoint", lambda: saved_at.append(trainer.step) or save())
    trainer.fit()
    assert saved_at == [3]


def test_a_checkpoint_that_cannot_be_written_is_a_one_line_error_and_keeps_the_last_one(cache, tmp_path,
                                                                                           monkeypatch):
    import errno

    trainer = PretrainTrainer(tiny_config(max_steps=6, checkpoint_every_steps=2), cache, tmp_path)
    save = torch.save

    def disk_full_after_step_two(obj, path, *args, **kwargs):
        if trainer.step > 2:
            with open(path, "wb") as handle:
                handle.write(b"partial")
            raise OSError(errno.ENOSPC, "No space left on device")
        return save(obj, path, *args, **kwargs)

    monkeypatch.setattr(torch, "save", disk_full_after_step_two)
    with pytest.raises(SMITError) as failed:
        trainer.fit()
    assert str(failed.value) == (
        f"could not write {tmp_path / CHECKPOINT_NAME} at step 4 (No space left on device); the one of step 2 is "
        "kept. Free space and rerun the same command to resume.")
    monkeypatch.setattr(torch, "save", save)
    assert torch.load(tmp_path / CHECKPOINT_NAME, map_location="cpu", weights_only=True)["step"] == 2
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []

    # The export at the end of a run: the state is saved first, and a rerun exports from it.
    def no_space_for_the_export(obj, path, *args, **kwargs):
        if "smit_encoder" in str(path):
            raise OSError(errno.ENOSPC, "No space left on device")
        return save(obj, path, *args, **kwargs)

    monkeypatch.setattr(torch, "save", no_space_for_the_export)
    with pytest.raises(SMITError) as failed:
        PretrainTrainer(tiny_config(max_steps=3, checkpoint_every_steps=2), cache, tmp_path).fit()
    assert str(failed.value) == (
        f"could not write {tmp_path / 'smit_encoder_teacher.pt'} (No space left on device); the training state of "
        f"step 3 is in {tmp_path / CHECKPOINT_NAME}. Free space and rerun the same command to export.")
    monkeypatch.undo()
    exported = PretrainTrainer(tiny_config(max_steps=3, checkpoint_every_steps=2), cache, tmp_path).fit()
    assert exported.is_file()


def test_resume_with_other_settings_is_refused(cache, tmp_path):
    PretrainTrainer(tiny_config(max_steps=1), cache, tmp_path).fit()
    with pytest.raises(SMITError, match="other settings"):
        PretrainTrainer(tiny_config(max_steps=2, mask_ratio=0.5), cache, tmp_path).fit()
    with pytest.raises(SMITError, match="centering"):
        PretrainTrainer(tiny_config(max_steps=2, centering="sinkhorn_knopp"), cache, tmp_path).fit()


def test_a_run_with_the_authors_teacher_temperature_resumes_only_with_it(cache, tmp_path):
    # The default changed from the authors' 0.07 to 0.04: such a run is not silently continued at another temperature.
    assert PretrainConfig().teacher_temp_end == 0.04
    PretrainTrainer(tiny_config(max_steps=1, teacher_temp_end=0.07), cache, tmp_path).fit()
    with pytest.raises(SMITError, match="teacher_temp_end: 0.07 -> 0.04"):
        PretrainTrainer(tiny_config(max_steps=2), cache, tmp_path).fit()
    resumed = PretrainTrainer(tiny_config(max_steps=2, teacher_temp_end=0.07), cache, tmp_path)
    resumed.fit()
    assert resumed.step == 2


def test_checkpoint_from_before_a_setting_existed_resumes_with_the_behaviour_it_was_trained_with(cache, tmp_path):
    # Checkpoints written before the settings existed were trained with the running-mean center and no KoLeo.
    PretrainTrainer(tiny_config(max_steps=1, centering="center", weight_koleo=0.0), cache, tmp_path).fit()
    state = torch.load(tmp_path / CHECKPOINT_NAME, map_location="cpu", weights_only=True)
    del state["config"]["centering"], state["config"]["weight_koleo"]
    torch.save(state, tmp_path / CHECKPOINT_NAME)
    with pytest.raises(SMITError, match="centering: 'center' -> 'sinkhorn_knopp'"):
        PretrainTrainer(tiny_config(max_steps=2, centering="sinkhorn_knopp", weight_koleo=0.0), cache, tmp_path).fit()
    with pytest.raises(SMITError, match="weight_koleo: 0.0 -> 0.1"):
        PretrainTrainer(tiny_config(max_steps=2, centering="center"), cache, tmp_path).fit()
    resumed = PretrainTrainer(tiny_config(max_steps=2, centering="center", weight_koleo=0.0), cache, tmp_path)
    resumed.fit()
    assert resumed.step == 2


def test_checkpoint_holds_everything_to_resume(uninterrupted):
    trainer, _ = uninterrupted
    state = torch.load(trainer.output_dir / CHECKPOINT_NAME, map_location="cpu", weights_only=True)
    keys = state["model"].keys()
    assert any(k.startswith("student.encoder.") for k in keys) and any(k.startswith("teacher.encoder.") for k in keys)
    assert {"student.mask_token", "dino_loss.center", "ibot_loss.center"} <= set(keys)
    assert any(k.startswith("student.recon_head.") for k in keys)
    for key in ("optimizer", "scaler", "step", "epoch", "rng_per_rank", "config", "manifest", "preprocessing"):
        assert key in state, key
    assert state["config"]["centering"] == trainer.config.centering
    assert state["manifest"]["cases"], "the data manifest travels with the state"


def test_export_loads_into_the_fine_tuning_network_with_no_missing_keys(uninterrupted):
    trainer, exported = uninterrupted
    assert exported.name == "smit_encoder_teacher.pt"
    checkpoint = load_encoder_checkpoint(exported)
    assert checkpoint.config == SMITConfig.preset("tiny")
    assert checkpoint.summary["steps"] == RESUME_STEPS
    assert checkpoint.summary["exported"] == "teacher"
    assert tuple(checkpoint.patch_size) == (64, 64, 64)
    network = SMITNet(checkpoint.config, 1, 3)
    report = load_encoder_weights(network.encoder, checkpoint.state_dict, strict=True)
    assert report.missing == [] and report.unexpected == [] and report.mismatched == []
    # What was exported is the teacher's encoder.
    teacher = trainer.model.teacher.encoder.state_dict()
    for key, value in network.encoder.state_dict().items():
        assert torch.equal(value, teacher[key]), key


class FirstCachedScans:
    """The first ``count`` scans of a cache, with its reading interface and manifest (a folder some scans left)."""

    def __init__(self, cache, count):
        self.case_ids = cache.case_ids[:count]
        self.preprocessing = cache.preprocessing
        self.shape, self.load = cache.shape, cache.load
        self.manifest = {**cache.manifest, "cases": cache.manifest["cases"][:count]}


def test_the_export_records_the_fingerprint_of_every_scan_the_weights_have_seen(uninterrupted, cache, tmp_path):
    _, exported = uninterrupted
    every_scan = load_encoder_checkpoint(exported).pretraining_scans
    assert every_scan == cache.scan_fingerprints() and sorted(every_scan.values()) == sorted(cache.case_ids)
    assert len(every_scan) == len(cache.case_ids) == N_PHANTOMS
    # A run resumed after a scan left the folders: that scan was trained on all the same.
    PretrainTrainer(tiny_config(max_steps=1), cache, tmp_path / "resumed").fit()
    fewer = FirstCachedScans(cache, N_PHANTOMS - 1)
    resumed = PretrainTrainer(tiny_config(max_steps=2), fewer, tmp_path / "resumed").fit()
    assert load_encoder_checkpoint(resumed).pretraining_scans == every_scan
    # A new run on one scan, starting from weights pretrained on all of them, has seen all of them.
    one = FirstCachedScans(cache, 1)
    started = PretrainTrainer(tiny_config(max_steps=1, init_encoder=str(exported)), one, tmp_path / "init").fit()
    assert load_encoder_checkpoint(started).pretraining_scans == every_scan
    assert json.loads((tmp_path / "init" / "run_summary.json").read_text())["fingerprinted_scans"] == N_PHANTOMS


def test_a_killed_loader_worker_is_a_one_line_error_that_names_the_kept_state(cache, tmp_path):
    import os

    trainer = PretrainTrainer(tiny_config(max_steps=8, num_workers=1, checkpoint_every_steps=2), cache, tmp_path)
    sample = trainer.dataset.sample

    def killed_once_a_state_is_saved(case_index, sample_key):
        if (tmp_path / CHECKPOINT_NAME).exists():  # as the kernel's out-of-memory killer does
            os.kill(os.getpid(), signal.SIGKILL)
        return sample(case_index, sample_key)

    trainer.dataset.sample = killed_once_a_state_is_saved  # the forked worker inherits it
    with pytest.raises(SMITError) as failed:
        trainer.fit()
    message = str(failed.value)
    assert message.startswith("the data loader failed near step ") and "killed by signal: Killed" in message
    assert f"{tmp_path / CHECKPOINT_NAME} holds step " in message and "\n" not in message
    saved = torch.load(tmp_path / CHECKPOINT_NAME, map_location="cpu", weights_only=True)["step"]
    assert f"holds step {saved}" in message


def test_unreadable_cached_scans_are_replaced_and_reported_once(cache, caplog):
    from nnunet_smit.pretraining.sampler import TwoViewDataset, ViewSampling

    dataset = TwoViewDataset(cache, ViewSampling((64,) * 3, (80,) * 3))
    expected = dataset.sample(1, 7)
    load = cache.load

    def first_scan_damaged(case_id, region=None):
        if case_id == cache.case_ids[0]:
            raise RuntimeError("blosc2 decompression error: chunk 3")
        return load(case_id, region)

    dataset.source = type("Damaged", (), {"case_ids": cache.case_ids, "shape": cache.shape,
                                          "load": staticmethod(first_scan_damaged),
                                          "preprocessing": cache.preprocessing})()
    with caplog.at_level("WARNING"):
        replaced = [dataset.sample(0, 7), dataset.sample(0, 7)]
    # the same draws from the next scan, as if the sample had been drawn from it
    for item in replaced:
        assert torch.equal(item["views"], expected["views"]) and torch.equal(item["masks"], expected["masks"])
    warnings = [r.getMessage() for r in caplog.records if "cannot be read" in r.getMessage()]
    assert warnings == [f"cached scan {cache.case_ids[0]} cannot be read (RuntimeError: blosc2 decompression error: "
                        "chunk 3); its samples come from the next scan."]


def test_no_readable_scan_left_is_a_one_line_error_from_the_workers(cache, tmp_path):
    trainer = PretrainTrainer(tiny_config(max_steps=2, num_workers=1), cache, tmp_path)

    def unreadable(case_id, region=None):
        raise OSError("Input/output error")

    trainer.dataset.source = type("Gone", (), {"case_ids": cache.case_ids, "shape": cache.shape,
                                               "load": staticmethod(unreadable),
                                               "preprocessing": cache.preprocessing})()
    with pytest.raises(SMITError) as failed:
        trainer.fit()
    assert str(failed.value) == "no cached scan can be read any more; rebuild the cache."


def test_scans_added_between_runs_are_sampled_and_the_schedules_go_on(cache, tmp_path, caplog):
    class FirstScans:
        """The cache as it was before the last scan was added to the folders."""

        def __init__(self, count):
            self.case_ids = cache.case_ids[:count]
            self.preprocessing = cache.preprocessing
            self.shape, self.load = cache.shape, cache.load
            self.manifest = {**cache.manifest, "cases": cache.manifest["cases"][:count]}

    before = len(cache.case_ids) - 1
    first = PretrainTrainer(tiny_config(max_steps=2, samples_per_epoch=None), FirstScans(before), tmp_path)
    first.fit()
    assert first.samples_per_epoch == before

    resumed = PretrainTrainer(tiny_config(max_steps=4, samples_per_epoch=None), cache, tmp_path)
    with caplog.at_level("WARNING"):
        resumed.fit()
    assert (f"the cache holds {before + 1} scans, the run started with {before} (1 added, 0 gone); all {before + 1} "
            f"are sampled from now on, and an epoch stays {before} samples so that the schedules go on unchanged."
            ) in caplog.text
    assert resumed.samples_per_epoch == before and resumed.total_steps == first.total_steps
    assert resumed.schedules.lr(3) == first.schedules.lr(3)
    assert resumed.step == 4


def test_a_new_run_starts_both_encoders_from_init_encoder_and_records_it(uninterrupted, cache, tmp_path):
    _, exported = uninterrupted
    start = load_encoder_checkpoint(exported)
    trainer = PretrainTrainer(tiny_config(max_steps=1, init_encoder=str(exported)), cache, tmp_path)
    seen = {}
    original = trainer._start_from_init_encoder

    def start_and_look():
        record = original()
        seen["student"] = {k: v.clone() for k, v in trainer.model.student.encoder.state_dict().items()}
        seen["teacher"] = {k: v.clone() for k, v in trainer.model.teacher.encoder.state_dict().items()}
        return record

    trainer._start_from_init_encoder = start_and_look
    trainer.fit()
    for side in ("student", "teacher"):
        assert seen[side].keys() == start.state_dict.keys()
        assert all(torch.equal(seen[side][k], start.state_dict[k]) for k in start.state_dict), side
    first = json.loads((tmp_path / "log.jsonl").read_text().splitlines()[0])
    assert first["event"] == "start"
    assert first["init_encoder"]["sha256"] == start.sha256 and first["init_encoder"]["tensors"] == len(start.state_dict)
    summary = json.loads((tmp_path / "run_summary.json").read_text())
    assert summary["init_encoder"]["path"] == str(exported) and summary["init_encoder"]["source"] == "nnunet_smit"


def test_init_encoder_is_not_read_when_the_run_resumes(uninterrupted, cache, tmp_path):
    _, exported = uninterrupted
    copy = tmp_path / "start.pt"
    copy.write_bytes(exported.read_bytes())
    config = tiny_config(max_steps=1, init_encoder=str(copy))
    PretrainTrainer(config, cache, tmp_path / "run").fit()
    copy.unlink()  # moved away after the start: resuming needs the run's own checkpoint only
    resumed = PretrainTrainer(tiny_config(max_steps=2, init_encoder=str(copy)), cache, tmp_path / "run")
    resumed.fit()
    assert resumed.step == 2


def test_init_encoder_of_another_architecture_is_refused_naming_the_preset_that_fits(uninterrupted, tmp_path):
    from nnunet_smit.pretraining.state import load_init_encoder

    _, exported = uninterrupted
    with pytest.raises(SMITError) as refused:
        load_init_encoder(PretrainConfig(preset="smit_small", init_encoder=str(exported)))
    message = str(refused.value)
    assert "embed_dim 12 instead of 48" in message and message.endswith("pass --preset tiny.")
    # The authors' released layout ({'state_dict': ...} with a DDP prefix and their mask token) fits smit_small_authors.
    from nnunet_smit.architectures.swin_encoder import SwinEncoder

    authors = {f"module.{k}": v for k, v in SwinEncoder(SMITConfig.preset("smit_small")).state_dict().items()}
    authors["module.mask_token"] = torch.zeros(1, 1, 48)
    torch.save({"epoch": 10, "state_dict": authors}, tmp_path / "pre_train_weight.pt")
    authors_file = str(tmp_path / "pre_train_weight.pt")
    # they carry the authors' window-reverse slip: a fresh smit_small is told which preset keeps it
    with pytest.raises(SMITError, match="legacy_window_reverse True instead of False.*pass --preset smit_small_authors"):
        load_init_encoder(PretrainConfig(preset="smit_small", init_encoder=authors_file))
    checkpoint = load_init_encoder(PretrainConfig(preset="smit_small_authors", init_encoder=authors_file))
    assert checkpoint.source == "official_pretrain" and "mask_token" not in checkpoint.state_dict
    assert checkpoint.config.legacy_window_reverse
    (tmp_path / "broken.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(SMITError, match="cannot be read"):
        load_init_encoder(PretrainConfig(preset="tiny", init_encoder=str(tmp_path / "broken.pt")))


def test_init_encoder_pretrained_on_other_preprocessing_is_warned_about(uninterrupted, cache, tmp_path, caplog):
    from nnunet_smit.conventions import PretrainPreprocessing

    _, exported = uninterrupted
    trainer = PretrainTrainer(tiny_config(init_encoder=str(exported)), cache, tmp_path)
    with caplog.at_level("WARNING", logger="nnunet_smit.pretraining"):
        trainer._start_from_init_encoder()
    assert "differently prepared" not in caplog.text
    trainer.preprocessing = PretrainPreprocessing(hu_window=(-1000.0, 400.0))
    with caplog.at_level("WARNING", logger="nnunet_smit.pretraining"):
        trainer._start_from_init_encoder()
    assert "hu_window [-175.0, 250.0] there, [-1000.0, 400.0] here" in caplog.text
