"""What makes a trained study fold an arm's: the weights it starts from, decoder blocks included."""
from __future__ import annotations

import torch

from nnunet_smit.architectures import SMITConfig, SMITNet
from nnunet_smit.architectures.decoder import DECODER_PARTS
from nnunet_smit.checkpoint import DecoderParts, load_encoder_checkpoint, save_encoder_checkpoint
from nnunet_smit.study.arms import Arm, identity_differences
from nnunet_smit.study.study import _arm_inputs


def _checkpoint(path, decoder_seed=None):
    config = SMITConfig.preset("tiny")
    torch.manual_seed(0)
    network = SMITNet(config, 1, 1)
    parts = None
    if decoder_seed is not None:
        torch.manual_seed(decoder_seed)
        blocks = {f"decoder.{k}": torch.randn_like(v) for k, v in network.decoder.state_dict().items()
                  if k.split(".")[0] in DECODER_PARTS["skips"]}
        parts = DecoderParts(("skips",), "smit", "instance", blocks)
    save_encoder_checkpoint(path, network.encoder.state_dict(), config, decoder_parts=parts)
    return load_encoder_checkpoint(path)


def test_other_decoder_blocks_beside_the_same_encoder_make_another_arm(tmp_path):
    plain = _checkpoint(tmp_path / "plain.pt")
    first, second = _checkpoint(tmp_path / "a.pt", decoder_seed=1), _checkpoint(tmp_path / "b.pt", decoder_seed=2)
    assert plain.sha256 == first.sha256 == second.sha256  # the encoders are equal
    arm = Arm("enc", "enc.pt", "nnUNetTrainerSMIT", weights="enc.pt")
    (weights_plain, _), (weights_a, _), (weights_b, _) = (_arm_inputs(arm, {"enc.pt": c})
                                                          for c in (plain, first, second))
    assert weights_plain == plain.sha256  # encoder-only files keep the identity earlier studies recorded
    assert weights_a == f"{first.sha256}+{first.decoder_parts.sha256}" and weights_a != weights_b
    reasons = identity_differences({"encoder_sha256": weights_a}, {"encoder_sha256": weights_b})
    short = {w: f"{w[:12]}+{w.split('+')[1][:12]}" for w in (weights_a, weights_b)}
    assert reasons == [f"the encoder file's weights changed ({short[weights_a]} then, {short[weights_b]} now)"]
    assert short[weights_a] != short[weights_b]
    scratch = Arm("scratch", "scratch", "nnUNetTrainerSMITScratch", weights="enc.pt")
    assert _arm_inputs(scratch, {"enc.pt": first}) == (None, first.config.to_dict())


def test_a_shorter_budget_compresses_the_warm_up_and_the_decoder_first_hold_alike():
    from types import SimpleNamespace

    from nnunet_smit.study.arms import Budget, apply_budget

    trainer = SimpleNamespace(num_epochs=1000, warmup_epochs=50, decoder_first_epochs=50,
                              num_iterations_per_epoch=250, num_val_iterations_per_epoch=50)
    apply_budget(trainer, Budget(epochs=40, iterations_per_epoch=5))
    assert (trainer.num_epochs, trainer.warmup_epochs, trainer.decoder_first_epochs) == (40, 2, 2)
    assert (trainer.num_iterations_per_epoch, trainer.num_val_iterations_per_epoch) == (5, 1)
    whole = SimpleNamespace(num_epochs=1000, warmup_epochs=50, decoder_first_epochs=0)
    apply_budget(whole, Budget(epochs=40, iterations_per_epoch=None))
    assert whole.decoder_first_epochs == 0  # the whole-network warm-up stays one
