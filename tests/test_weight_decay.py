"""One weight-decay rule for the encoder, asked by pretraining and fine-tuning alike."""
import torch

from nnunet_smit.architectures import SMITConfig, SMITNet, SwinEncoder
from nnunet_smit.architectures.weight_decay import uses_weight_decay
from nnunet_smit.pretraining.model import HeadConfig, SMITPretrainModel
from nnunet_smit.trainers.param_groups import build_param_groups

CONFIG = SMITConfig.preset("tiny")


def test_the_rule_spares_norms_biases_tables_and_tokens():
    assert not uses_weight_decay("x.bias", torch.nn.Parameter(torch.zeros(3, 3)))
    assert not uses_weight_decay("norm.weight", torch.nn.Parameter(torch.zeros(3)))
    assert not uses_weight_decay("mask_token", torch.nn.Parameter(torch.zeros(1, 1, 3)))
    assert not uses_weight_decay("layers.0.blocks.0.attn.relative_position_bias_table",
                                 torch.nn.Parameter(torch.zeros(27, 3)))
    assert uses_weight_decay("x.weight", torch.nn.Parameter(torch.zeros(3, 3)))


def test_the_encoder_names_its_exceptions():
    encoder = SwinEncoder(CONFIG)
    spared = encoder.no_weight_decay()
    tables = {n for n, _ in encoder.named_parameters() if n.endswith("relative_position_bias_table")}
    assert tables and tables <= spared
    assert all(p.ndim <= 1 or n in tables for n, p in encoder.named_parameters() if n in spared)
    assert any(p.ndim > 1 for n, p in encoder.named_parameters() if n not in spared)


def test_pretraining_and_fine_tuning_decay_the_same_encoder_parameters():
    """The encoder's parameters without decay are the same set in pretraining's AdamW groups and in fine-tuning's
    layer-wise groups: what the encoder names (the relative position tables among them)."""
    from nnunet_smit.architectures.weight_decay import split_by_weight_decay

    torch.manual_seed(0)
    model = SMITPretrainModel(CONFIG, heads=HeadConfig(hidden_dim=32, bottleneck_dim=16, out_dim=64))
    _, no_decay = split_by_weight_decay(model.student)
    spared_in_pretraining = {n[len("encoder."):] for n, p in model.student.named_parameters()
                             if n.startswith("encoder.") and any(p is q for q in no_decay)}

    network = SMITNet(CONFIG, in_channels=1, num_classes=3)
    groups = build_param_groups(network, 0.05, 0.9, depths=CONFIG.depths)
    spared_in_fine_tuning = {n[len("encoder."):] for g in groups if g["weight_decay"] == 0.0
                             for n in g["param_names"] if n.startswith("encoder.")}

    assert spared_in_pretraining == spared_in_fine_tuning == network.encoder.no_weight_decay()
    assert any(n.endswith("relative_position_bias_table") for n in spared_in_pretraining)
