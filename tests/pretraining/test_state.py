"""checkpoint_latest.pt: what it holds, generator states, and states written by earlier versions resuming."""
import random

import numpy as np
import pytest
import torch

from nnunet_smit.errors import SMITError
from nnunet_smit.pretraining.state import (
    CHECKPOINT_NAME, capture_rng_state, group_names, read_state, regroup_optimizer_state, restore_rng_state,
)
from nnunet_smit.pretraining.trainer import PretrainTrainer
from tests.pretraining.training_support import phantom_cache, tiny_config


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return phantom_cache(tmp_path_factory)


def test_generator_states_round_trip_through_plain_containers():
    random.seed(1), np.random.seed(1), torch.manual_seed(1)
    state = capture_rng_state(torch.device("cpu"))
    drawn = (random.random(), np.random.rand(), torch.rand(1).item())
    random.seed(2), np.random.seed(2), torch.manual_seed(2)
    restore_rng_state(state, torch.device("cpu"))
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == drawn


def test_a_file_that_is_no_state_is_a_one_line_error(tmp_path):
    (tmp_path / "junk.pt").write_bytes(b"junk")
    with pytest.raises(SMITError, match="cannot be read .*delete it to start over"):
        read_state(tmp_path / "junk.pt")
    torch.save({"format": "something else"}, tmp_path / "other.pt")
    with pytest.raises(SMITError, match="is not a pretraining state"):
        read_state(tmp_path / "other.pt")


def _earlier_rule_decays(name, parameter):
    """The grouping of versions before the one weight-decay rule: the relative position tables were decayed."""
    return not (parameter.ndim <= 1 or name.endswith(".bias") or name == "mask_token")


def test_a_state_saved_with_the_earlier_weight_decay_groups_resumes_with_every_moment(cache, tmp_path):
    PretrainTrainer(tiny_config(max_steps=2), cache, tmp_path).fit()
    state = torch.load(tmp_path / CHECKPOINT_NAME, map_location="cpu", weights_only=True)
    reference = PretrainTrainer(tiny_config(max_steps=2), cache, tmp_path)
    current = group_names(reference.model.student)
    earlier = group_names(reference.model.student, _earlier_rule_decays)
    assert [len(g) for g in earlier] != [len(g) for g in current]  # the tables moved between the groups
    # Parameters without a gradient (the stage norms) have no moments.
    moments = {name: state["optimizer"]["state"][i]["exp_avg"]
               for i, name in enumerate(n for group in current for n in group) if i in state["optimizer"]["state"]}

    # Written as the earlier versions wrote it: the same moments, indexed by the earlier groups.
    state["optimizer"] = regroup_optimizer_state(state["optimizer"], current, earlier)
    assert [len(g["params"]) for g in state["optimizer"]["param_groups"]] == [len(g) for g in earlier]
    torch.save(state, tmp_path / CHECKPOINT_NAME)

    resumed = PretrainTrainer(tiny_config(max_steps=3), cache, tmp_path)
    assert resumed.load_checkpoint() and resumed.step == 2
    loaded = resumed.optimizer.state_dict()
    names = [n for group in group_names(resumed.model.student) for n in group]
    assert {names[i] for i in loaded["state"]} == set(moments)
    for index, name in enumerate(names):
        if name in moments:
            assert torch.equal(loaded["state"][index]["exp_avg"], moments[name]), name
    tables = [i for i, n in enumerate(names) if n.endswith("relative_position_bias_table")]
    assert tables and all(i >= len(group_names(resumed.model.student)[0]) for i in tables)  # now in the group without decay
    assert resumed.fit().is_file() and resumed.step == 3


def test_an_optimizer_state_of_other_parameters_is_refused(cache, tmp_path):
    PretrainTrainer(tiny_config(max_steps=1), cache, tmp_path).fit()
    state = torch.load(tmp_path / CHECKPOINT_NAME, map_location="cpu", weights_only=True)
    state["optimizer"]["param_groups"][0]["params"] = state["optimizer"]["param_groups"][0]["params"][:-3]
    torch.save(state, tmp_path / CHECKPOINT_NAME)
    with pytest.raises(SMITError, match="holds an optimizer for other parameters"):
        PretrainTrainer(tiny_config(max_steps=2), cache, tmp_path).load_checkpoint()


def test_fine_tuning_reads_the_teacher_of_a_run_still_going_and_smit_convert_exports_it(cache, tmp_path, capsys):
    from nnunet_smit.checkpoint import load_encoder_checkpoint
    from nnunet_smit.convert_cli import main as smit_convert

    trainer = PretrainTrainer(tiny_config(max_steps=2), cache, tmp_path / "run")
    trainer.fit()
    (tmp_path / "run" / "smit_encoder_teacher.pt").unlink()  # as while the run goes on: no export yet
    for given in (tmp_path / "run" / CHECKPOINT_NAME, tmp_path / "run"):
        checkpoint = load_encoder_checkpoint(given)
        assert checkpoint.source == "nnunet_smit_state" and checkpoint.path == str(tmp_path / "run" / CHECKPOINT_NAME)
        teacher = trainer.model.teacher.encoder.state_dict()
        assert checkpoint.state_dict.keys() == teacher.keys()
        assert all(torch.equal(checkpoint.state_dict[k], teacher[k]) for k in teacher)
        assert checkpoint.config == trainer.encoder_config and checkpoint.patch_size == (64, 64, 64)
        assert checkpoint.pretraining_scans == trainer.scan_fingerprints and checkpoint.pretraining_scans
        assert checkpoint.notes == ["the teacher encoder of a pretraining state at step 2 (the run had not "
                                    "finished: its export is written at the end)"]
    assert smit_convert([str(tmp_path / "run"), "-o", str(tmp_path / "encoder.pt")]) == 0
    converted = load_encoder_checkpoint(tmp_path / "encoder.pt")
    assert converted.sha256 == checkpoint.sha256 and converted.pretraining_scans == checkpoint.pretraining_scans
    assert "the teacher encoder of a pretraining state at step 2" in capsys.readouterr().out


def test_a_run_started_as_smit_small_with_the_authors_window_reverse_resumes_only_as_smit_small_authors(tmp_path):
    from nnunet_smit.architectures import SMITConfig
    from nnunet_smit.errors import SMITError
    from nnunet_smit.pretraining.config import PretrainConfig
    from nnunet_smit.pretraining.state import check_same_settings

    # what a smit_small run saved before smit_small lost the slip: preset "smit_small", encoder with the slip
    state = {"config": PretrainConfig(preset="smit_small").to_dict(),
             "encoder_config": SMITConfig.preset("smit_small_authors").to_dict()}
    with pytest.raises(SMITError, match="preset: 'smit_small_authors' -> 'smit_small'"):
        check_same_settings(state, PretrainConfig(preset="smit_small"), tmp_path)
    check_same_settings(state, PretrainConfig(preset="smit_small_authors"), tmp_path)
    fresh = {"config": PretrainConfig(preset="smit_small").to_dict(),
             "encoder_config": SMITConfig.preset("smit_small").to_dict()}
    check_same_settings(fresh, PretrainConfig(preset="smit_small"), tmp_path)
