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


# --- decoder-first warm-up ------------------------------------------------------------------------------------------
def _train_step_changes(trainer, epoch):
    """Run one train_step at ``epoch`` on a random 64^3 batch; the names of the parameters it changed."""
    trainer.lr_scheduler.step(epoch)
    before = {name: p.detach().clone() for name, p in trainer.network.named_parameters()}
    trainer.loss = lambda outputs, target: sum(output.float().pow(2).mean() for output in outputs)
    generator = torch.Generator().manual_seed(epoch)
    trainer.train_step({"data": torch.randn(1, 1, 64, 64, 64, generator=generator), "target": torch.zeros(1)})
    return {name for name, p in trainer.network.named_parameters() if not torch.equal(p.detach(), before[name])}


def test_decoder_first_holds_every_carried_part_then_ramps_it_up_and_the_outputs_train_throughout(
        nnunet_env, tmp_path, monkeypatch):
    from nnunet_smit.trainers import nnUNetTrainerSMITDecoderFirst

    _checkpoint(tmp_path / "skips.pt", ("skips",))
    monkeypatch.setenv(WEIGHTS_ENV, str(tmp_path / "skips.pt"))
    trainer = _trainer_with_network(nnUNetTrainerSMITDecoderFirst)
    trainer.decoder_first_epochs = 2
    trainer.num_epochs, trainer.warmup_epochs = 10, 2
    trainer.optimizer, trainer.lr_scheduler = trainer.configure_optimizers()
    trainer._load_pretrained_encoder()
    held = {group["part"] for group in trainer.optimizer.param_groups if group.get("hold_epochs")}
    assert held == {"encoder", "skips"}  # the upsampling blocks were not carried: they train from the start
    log = Path(trainer.log_file).read_text()
    assert "decoder-first warm-up: the pretrained parts (encoder, skip blocks) are held at rate 0 for epochs 0-1" in log
    assert "(upsampling blocks, segmentation outputs) train" in log

    def carried(name):
        return name.startswith("encoder.") or name.split(".")[1] in DECODER_PARTS["skips"]

    changed = _train_step_changes(trainer, 0)
    assert changed and not any(carried(name) for name in changed)
    assert any(name.startswith("decoder.out") for name in changed)
    assert any(name.startswith("decoder.decoder1.") for name in changed)
    rates = {group["name"]: group["lr"] for group in trainer.optimizer.param_groups}
    assert rates["decoder.skips.decay"] == 0.0 and rates["decoder.outputs.decay"] > 0
    trainer.lr_scheduler.step(2)  # the first ramp epoch: a third of the schedule's rate
    rates = {group["name"]: group["lr"] for group in trainer.optimizer.param_groups}
    assert rates["decoder.skips.decay"] == pytest.approx(rates["decoder.outputs.decay"] / 3)
    changed = _train_step_changes(trainer, 4)
    assert any(name.startswith("encoder.layers.") for name in changed)
    assert any(name.startswith("decoder.encoder1.") for name in changed)
    # --c: the hold lives in the optimizer's state, so a resumed run keeps holding
    state = trainer.optimizer.state_dict()
    resumed = _trainer_with_network(nnUNetTrainerSMITDecoderFirst)
    resumed.decoder_first_epochs = 2
    resumed.num_epochs, resumed.warmup_epochs = 10, 2
    resumed.optimizer, resumed.lr_scheduler = resumed.configure_optimizers()
    resumed.optimizer.load_state_dict(state)
    resumed.lr_scheduler.step(1)
    assert {group["part"] for group in resumed.optimizer.param_groups if group["lr"] == 0} == {"encoder", "skips"}


def test_the_whole_network_warm_up_keeps_one_decoder_group_and_holds_nothing(nnunet_env, tmp_path, monkeypatch):
    _checkpoint(tmp_path / "parts.pt")
    monkeypatch.setenv(WEIGHTS_ENV, str(tmp_path / "parts.pt"))
    trainer = _trainer_with_network(nnUNetTrainerSMIT)
    trainer.optimizer, trainer.lr_scheduler = trainer.configure_optimizers()
    trainer._load_pretrained_encoder()
    assert not any(group.get("hold_epochs") for group in trainer.optimizer.param_groups)
    assert [g["part"] for g in trainer.optimizer.param_groups[:2]] == ["whole_decoder"] * 2
    assert "decoder-first" not in Path(trainer.log_file).read_text()
