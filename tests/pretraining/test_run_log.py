"""log.jsonl, its TensorBoard twin, and what only rank 0 writes."""
import json
import sys

import pytest

from nnunet_smit.errors import SMITError
from nnunet_smit.pretraining.cli import build_parser, config_from_args
from nnunet_smit.pretraining.run_log import RunLog, check_tensorboard_available

RECORD = {"event": "train", "step": 3, "epoch": 0, "loss": 1.5, "dino": 0.25, "lr": 1e-4, "samples_per_s": None,
          "memory_mb": 512.0}


def test_train_records_go_to_the_log_and_to_tensorboard_as_scalars(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    log = RunLog(tmp_path, tensorboard=True)
    log.write({"event": "start", "step": 0})
    log.write(RECORD)
    log.write({**RECORD, "step": 4, "loss": 1.25})
    log.close()
    records = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert [r["event"] for r in records] == ["start", "train", "train"] and all("time" in r for r in records)

    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert tags == {"train/loss", "train/dino", "train/lr", "train/memory_mb"}  # numbers only; None is left out
    assert [(e.step, e.value) for e in events.Scalars("train/loss")] == [(3, 1.5), (4, 1.25)]


def test_without_tensorboard_nothing_is_written_there(tmp_path):
    log = RunLog(tmp_path)
    log.write(RECORD)
    assert (tmp_path / "log.jsonl").is_file() and not (tmp_path / "tensorboard").exists()


def test_only_the_writing_process_writes(tmp_path):
    log = RunLog(tmp_path, writes=False, tensorboard=True)
    log.write(RECORD)
    log.write_json("pretrain_config.json", {"a": 1})
    log.epoch_figures(0, None)
    assert list(tmp_path.iterdir()) == []


def test_a_missing_tensorboard_package_is_one_line(monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorboard", None)  # what Python does for a package that is not installed
    with pytest.raises(SMITError, match="^--tensorboard needs the tensorboard package: pip install tensorboard"):
        check_tensorboard_available()


def test_the_option_is_a_runtime_setting():
    config = config_from_args(build_parser().parse_args(["-o", "out", "--tensorboard"]))
    assert config.tensorboard and "tensorboard" not in config.training_fields()


def test_a_run_with_tensorboard_writes_every_logged_step(tmp_path_factory, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from nnunet_smit.pretraining.trainer import PretrainTrainer
    from tests.pretraining.training_support import phantom_cache, tiny_config

    PretrainTrainer(tiny_config(max_steps=2, tensorboard=True), phantom_cache(tmp_path_factory), tmp_path).fit()
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    logged = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in logged if r["event"] == "train"]
    assert [e.step for e in events.Scalars("train/loss")] == steps == [1, 2]
    assert [e.value for e in events.Scalars("train/reconstruction")] == pytest.approx(
        [r["reconstruction"] for r in logged if r["event"] == "train"])


def test_a_half_written_line_of_a_killed_run_does_not_swallow_the_next_record(tmp_path):
    (tmp_path / "log.jsonl").write_text('{"event": "train", "step": 1}\n{"event": "train", "st')
    RunLog(tmp_path).write({"event": "resume", "step": 1})
    lines = (tmp_path / "log.jsonl").read_text().splitlines()
    assert len(lines) == 3 and json.loads(lines[2])["event"] == "resume"
