"""Layer-wise learning-rate decay groups: built from the unwrapped network, no decay on norms/biases/tables."""
import pytest
import torch

from nnunet_smit.architectures import SMITConfig, SMITNet
from nnunet_smit.trainers.param_groups import build_param_groups, encoder_layer_id

CONFIG = SMITConfig.preset("tiny")


@pytest.fixture(scope="module")
def network():
    return SMITNet(CONFIG, in_channels=1, num_classes=3, deep_supervision=True)


def _by_name(groups):
    return {name: group for group in groups for name in group["param_names"]}


def test_every_trainable_parameter_in_exactly_one_group(network):
    groups = build_param_groups(network, 0.05, 0.9, depths=CONFIG.depths)
    ids = [id(p) for g in groups for p in g["params"]]
    assert len(ids) == len(set(ids)) == len(list(network.parameters()))


def test_no_weight_decay_on_norms_biases_and_position_tables(network):
    groups = _by_name(build_param_groups(network, 0.05, 0.9, depths=CONFIG.depths))
    for name, param in network.named_parameters():
        no_decay = param.ndim <= 1 or "relative_position_bias_table" in name
        assert groups[name]["weight_decay"] == (0.0 if no_decay else 0.05), name
    assert any("relative_position_bias_table" in n for n in groups)
    assert groups["encoder.layers.0.blocks.0.attn.relative_position_bias_table"]["weight_decay"] == 0.0
    assert groups["encoder.layers.0.blocks.0.norm1.weight"]["weight_decay"] == 0.0
    decoder_bias = next(n for n in groups if n.startswith("decoder.") and n.endswith(".bias"))
    assert groups[decoder_bias]["weight_decay"] == 0.0
    assert groups["encoder.layers.0.blocks.0.attn.qkv.weight"]["weight_decay"] == 0.05


def test_learning_rate_decays_with_depth(network):
    groups = _by_name(build_param_groups(network, 0.05, 0.5, depths=CONFIG.depths))
    num_layers = sum(CONFIG.depths) + 1
    assert groups["encoder.patch_embed.proj.weight"]["lr_scale"] == pytest.approx(0.5**num_layers)
    assert groups["encoder.layers.3.blocks.1.attn.qkv.weight"]["lr_scale"] == pytest.approx(0.5)
    assert all(g["lr_scale"] == 1.0 for n, g in groups.items() if n.startswith("decoder."))
    scales = [groups[f"encoder.layers.{s}.blocks.{b}.mlp.fc1.weight"]["lr_scale"] for s in range(4) for b in range(2)]
    assert scales == sorted(scales) and len(set(scales)) == len(scales)


def test_layer_ids_follow_block_order():
    depths = (2, 2, 4, 2)
    assert encoder_layer_id("patch_embed.proj.weight", depths) == 0
    assert encoder_layer_id("layers.0.blocks.0.attn.qkv.weight", depths) == 1
    assert encoder_layer_id("layers.2.blocks.3.mlp.fc2.bias", depths) == 8
    assert encoder_layer_id("layers.2.downsample.reduction.weight", depths) == 8
    assert encoder_layer_id("norm3.weight", depths) == 10


def test_decoder_group_first(network):
    groups = build_param_groups(network, 0.05, 0.9, depths=CONFIG.depths)
    assert groups[0]["name"].startswith("decoder.") and groups[0]["lr_scale"] == 1.0


def test_names_ignore_torch_compile_wrapper(network):
    plain = build_param_groups(network, 0.05, 0.9, depths=CONFIG.depths)
    compiled = build_param_groups(torch.compile(network), 0.05, 0.9, depths=CONFIG.depths)
    assert [g["param_names"] for g in plain] == [g["param_names"] for g in compiled]
    assert not any("_orig_mod" in n for g in compiled for n in g["param_names"])


def test_frozen_encoder_leaves_encoder_out(network):
    groups = build_param_groups(network, 0.05, 0.0, depths=CONFIG.depths)
    names = [n for g in groups for n in g["param_names"]]
    assert names and not any(n.startswith("encoder.") for n in names)



def test_the_scratch_twin_trains_its_random_encoder_at_one_learning_rate():
    from nnunet_smit import trainers

    scratch = [getattr(trainers, n) for n in dir(trainers) if "Scratch" in n and n.startswith("nnUNetTrainerSMIT")]
    assert scratch and all(t.layer_decay == 1.0 for t in scratch)
    assert trainers.nnUNetTrainerSMIT.layer_decay < 1.0  # the pretrained encoder keeps its layer-wise decay


def test_a_split_decoder_puts_outputs_skips_and_upsampling_blocks_in_groups_of_their_own(network):
    whole = build_param_groups(network, 0.05, 0.9, depths=CONFIG.depths)
    split = build_param_groups(network, 0.05, 0.9, depths=CONFIG.depths, split_decoder=True)
    by_name = _by_name(split)
    assert by_name["decoder.out.conv.conv.weight"]["part"] == "outputs"
    assert by_name["decoder.encoder10.layer.conv1.conv.weight"]["part"] == "skips"
    assert by_name["decoder.decoder1.transp_conv.conv.weight"]["part"] == "decoder"
    assert by_name["encoder.patch_embed.proj.weight"]["part"] == "encoder"
    assert split[0]["name"] == "decoder.outputs.decay"  # group 0 carries the base rate nnU-Net logs
    assert sorted(n for g in split for n in g["param_names"]) == sorted(n for g in whole for n in g["param_names"])
    assert all(g["lr_scale"] == 1.0 for g in split if g["part"] != "encoder")
