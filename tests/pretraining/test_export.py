"""The end of a run: baselines in every record and in the summary (CPU, tiny preset, 64^3 views)."""
import json

import pytest

from nnunet_smit.checkpoint import load_encoder_checkpoint
from nnunet_smit.pretraining.export import reconstruction_against_baselines
from nnunet_smit.pretraining.trainer import PretrainTrainer
from tests.pretraining.training_support import phantom_cache, tiny_config


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return phantom_cache(tmp_path_factory)


@pytest.fixture(scope="module")
def all_objectives(cache, tmp_path_factory):
    out = tmp_path_factory.mktemp("all_objectives")
    trainer = PretrainTrainer(tiny_config(max_steps=3), cache, out)
    return trainer, trainer.fit()


def _records(out_dir):
    return [json.loads(line) for line in (out_dir / "log.jsonl").read_text().splitlines()]


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
