"""PretrainConfig: the one place of every default and allowed value (the CLI reads them), its checks, its warnings.

The checks as ``smit_pretrain`` reports them (one line, before any scan is read) are in test_cli.py.
"""
import dataclasses

import pytest

from nnunet_smit.errors import SMITError
from nnunet_smit.pretraining.centering import CENTERING_MODES
from nnunet_smit.pretraining.cli import build_parser
from nnunet_smit.pretraining.config import (
    COMPILE_MODES, EXPORTS, PRECISIONS, RUNTIME_FIELDS, PretrainConfig, default_of, schedule_warnings,
)


@pytest.mark.parametrize("field, allowed", [
    ("precision", PRECISIONS), ("export", EXPORTS), ("compile_mode", COMPILE_MODES), ("centering", CENTERING_MODES),
])
def test_a_value_outside_an_options_choices_names_them(field, allowed):
    with pytest.raises(SMITError, match=f"must be one of {', '.join(allowed)}, got 'bogus'"):
        PretrainConfig(**{field: "bogus"})


def test_the_cli_offers_the_configs_choices_and_shows_its_defaults():
    actions = {a.dest: a for a in build_parser()._actions}
    assert tuple(actions["precision"].choices) == PRECISIONS and tuple(actions["export"].choices) == EXPORTS
    assert tuple(actions["compile_mode"].choices) == COMPILE_MODES
    assert tuple(actions["centering"].choices) == CENTERING_MODES
    assert "(0.0001)" in actions["base_lr"].help and f"(default {default_of('epochs')})" in actions["epochs"].help
    # Every option's default stays None: what the user did not give is taken from PretrainConfig.
    assert all(a.default in (None, False, []) for a in actions.values() if a.dest not in ("help", "output"))


def test_runtime_fields_exist_and_are_left_out_of_the_resume_check():
    names = {f.name for f in dataclasses.fields(PretrainConfig)}
    assert RUNTIME_FIELDS <= names
    assert not RUNTIME_FIELDS & set(PretrainConfig().training_fields())


def test_a_config_saved_by_an_earlier_version_loads_with_the_defaults_of_newer_fields():
    saved = {k: v for k, v in PretrainConfig(preset="tiny", view_size=64).to_dict().items() if k != "tensorboard"}
    saved["a_field_of_a_later_version"] = 1
    assert PretrainConfig.from_dict(saved) == PretrainConfig(preset="tiny", view_size=64)


def test_schedules_a_short_run_cuts_are_named():
    warned = schedule_warnings(PretrainConfig(preset="tiny", view_size=64, epochs=10))
    assert len(warned) == 1 and "warm-up (20 epochs)" in warned[0]  # the teacher temperature is constant
    assert schedule_warnings(PretrainConfig(preset="tiny", view_size=64, epochs=10, warmup_epochs=2)) == []
