"""nnUNetTrainerSMIT loads every part an encoder checkpoint carries (the encoder, and the decoder blocks that
``smit_pretrain --reconstruct_through`` trained), strictly, and says so; the segmentation outputs stay random; an
encoder-only file loads as before; the Scratch twin loads nothing (no data, CPU, tiny preset)."""
from pathlib import Path

import pytest
import torch

from nnunet_smit.architectures import SMITConfig, SMITNet
from nnunet_smit.architectures.decoder import DECODER_PARTS
from nnunet_smit.checkpoint import DecoderParts, save_encoder_checkpoint
from nnunet_smit.errors import SMITError
from nnunet_smit.trainers import nnUNetTrainerSMIT, nnUNetTrainerSMITLight, nnUNetTrainerSMITScratch_tiny
from nnunet_smit.trainers.nnUNetTrainerSMIT import WEIGHTS_ENV
from nnunet_smit.trainers.param_groups import build_param_groups
from tests.trainers.test_trainer_setup import make_plans, make_trainer, nnunet_env  # noqa: F401 (a fixture)


def _checkpoint(path: Path, parts=("skips", "decoder"), kind="smit") -> SMITNet:
    """A tiny checkpoint with a random encoder and ``parts`` of a random SMITNet decoder of ``kind``; returns that
    network (the weights the file holds)."""
    config = SMITConfig.preset("tiny")
    torch.manual_seed(7)
    source = SMITNet(config, 1, 1, decoder=kind)
    modules = [name for part in parts for name in DECODER_PARTS[part]]
    blocks = {f"decoder.{k}": v for k, v in source.decoder.state_dict().items() if k.split(".")[0] in modules}
    save_encoder_checkpoint(path, source.encoder.state_dict(), config,
                            decoder_parts=DecoderParts(tuple(parts), kind, "instance", blocks) if parts else None)
    return source


def _trainer_with_network(cls, num_channels=1):
    schemes = ("CTNormalization",) * num_channels
    trainer = make_trainer(cls, make_plans(schemes), num_channels=num_channels)
    trainer.network = trainer.build_network_architecture(trainer.plans_manager, trainer.configuration_manager,
                                                         num_channels, 3)
    return trainer


@pytest.mark.parametrize("parts", [("skips",), ("skips", "decoder")])
def test_every_part_the_checkpoint_carries_is_loaded_strictly_and_the_outputs_stay_random(nnunet_env, tmp_path,
                                                                                            monkeypatch, parts):
    source = _checkpoint(tmp_path / "parts.pt", parts)
    monkeypatch.setenv(WEIGHTS_ENV, str(tmp_path / "parts.pt"))
    trainer = _trainer_with_network(nnUNetTrainerSMIT)
    before = {k: v.clone() for k, v in trainer.network.decoder.state_dict().items()}
    trainer._load_pretrained_encoder()
    carried = [name for part in parts for name in DECODER_PARTS[part]]
    loaded, expected = trainer.network.decoder.state_dict(), source.decoder.state_dict()
    for key, value in loaded.items():
        module = key.split(".")[0]
        assert torch.equal(value, expected[key] if module in carried else before[key]), key
    assert all(torch.equal(v, source.encoder.state_dict()[k]) for k, v in trainer.network.encoder.state_dict().items())
    log = Path(trainer.log_file).read_text()
    assert f"SMIT: loaded pretrained decoder blocks ({', '.join(parts)})" in log
    assert log.count("missing keys: 0; unexpected keys: 0; shape mismatches: 0") == 2
    assert "at their initialisation: " in log and "out, ds_heads" in log
    # The pretrained blocks learn at the decoder's rate (group 0, lr_scale 1), as the random ones do.
    decoder_group = build_param_groups(trainer.network, 0.05, 0.9, depths=(2, 2, 2, 2))[0]
    assert decoder_group["lr_scale"] == 1.0
    assert "decoder.encoder1.layer.conv1.conv.weight" in decoder_group["param_names"]


def test_a_single_channel_encoder1_loads_into_a_two_channel_network(nnunet_env, tmp_path, monkeypatch):
    source = _checkpoint(tmp_path / "parts.pt", ("skips",))
    monkeypatch.setenv(WEIGHTS_ENV, str(tmp_path / "parts.pt"))
    trainer = _trainer_with_network(nnUNetTrainerSMIT, num_channels=2)
    trainer._load_pretrained_encoder()
    kernel = trainer.network.decoder.encoder1.layer.conv1.conv.weight
    assert torch.equal(kernel, source.decoder.encoder1.layer.conv1.conv.weight.repeat(1, 2, 1, 1, 1) / 2)
    assert "encoder1.layer.conv1.conv.weight: 1-channel kernel repeated over 2" in Path(trainer.log_file).read_text()


def test_blocks_of_the_light_decoder_need_the_light_trainer(nnunet_env, tmp_path, monkeypatch):
    source = _checkpoint(tmp_path / "light.pt", ("skips",), kind="light")
    monkeypatch.setenv(WEIGHTS_ENV, str(tmp_path / "light.pt"))
    trainer = _trainer_with_network(nnUNetTrainerSMIT)
    encoder_before = {k: v.clone() for k, v in trainer.network.encoder.state_dict().items()}
    with pytest.raises(SMITError, match="nnUNetTrainerSMITLight"):
        trainer._load_pretrained_encoder()
    assert all(torch.equal(v, encoder_before[k]) for k, v in trainer.network.encoder.state_dict().items())
    light = _trainer_with_network(nnUNetTrainerSMITLight)
    light._load_pretrained_encoder()
    assert torch.equal(light.network.decoder.encoder10.layer.conv1.conv.weight,
                       source.decoder.encoder10.layer.conv1.conv.weight)


def test_an_encoder_only_checkpoint_loads_the_encoder_alone(nnunet_env, tmp_path, monkeypatch):
    source = _checkpoint(tmp_path / "encoder.pt", parts=())
    monkeypatch.setenv(WEIGHTS_ENV, str(tmp_path / "encoder.pt"))
    trainer = _trainer_with_network(nnUNetTrainerSMIT)
    before = {k: v.clone() for k, v in trainer.network.decoder.state_dict().items()}
    trainer._load_pretrained_encoder()
    assert all(torch.equal(v, source.encoder.state_dict()[k]) for k, v in trainer.network.encoder.state_dict().items())
    assert all(torch.equal(v, before[k]) for k, v in trainer.network.decoder.state_dict().items())
    assert "decoder blocks" not in Path(trainer.log_file).read_text()


def test_the_scratch_twin_loads_nothing(nnunet_env, tmp_path, monkeypatch):
    _checkpoint(tmp_path / "parts.pt")
    monkeypatch.setenv(WEIGHTS_ENV, str(tmp_path / "parts.pt"))
    trainer = _trainer_with_network(nnUNetTrainerSMITScratch_tiny)
    before = {k: v.clone() for k, v in trainer.network.state_dict().items()}
    trainer._load_pretrained_encoder()
    assert all(torch.equal(v, before[k]) for k, v in trainer.network.state_dict().items())
