"""AdamW parameter groups for fine-tuning: layer-wise learning-rate decay over the Swin encoder.

Groups are built from the unwrapped network (``torch.compile``'s ``_orig_mod`` and DDP's ``module`` removed), so
names do not depend on how the trainer wrapped it; the parameter objects are shared with the wrapper.
"""
from __future__ import annotations

import re
from collections import OrderedDict
from typing import Dict, List, Sequence, Tuple

from torch import nn

from nnunet_smit.architectures.decoder import DECODER_PARTS
from nnunet_smit.architectures.weight_decay import uses_weight_decay

_BLOCK = re.compile(r"^layers\.(\d+)\.blocks\.(\d+)\.")
_DOWNSAMPLE = re.compile(r"^layers\.(\d+)\.downsample\.")
_STAGE_NORM = re.compile(r"^norm(\d+)\.")
# Sort keys of the decoder's parts when they are split (higher first, after the encoder's deepest layer).
_SPLIT_ORDER = {"outputs": 3, "skips": 2, "decoder": 1}


def unwrap_network(network: nn.Module) -> nn.Module:
    """The plain module under DDP (``.module``) and ``torch.compile`` (``._orig_mod``) wrappers."""
    while True:
        if hasattr(network, "_orig_mod"):
            network = network._orig_mod
        elif isinstance(network, nn.parallel.DistributedDataParallel) or type(network).__name__ == "DataParallel":
            network = network.module
        else:
            return network


def encoder_layer_id(name: str, depths: Sequence[int]) -> int:
    """Depth index of an encoder parameter: 0 = patch embedding, 1..sum(depths) = Swin blocks in order.

    A stage's patch merging and its output norm share the id of the stage's last block.
    """
    match = _BLOCK.match(name)
    if match:
        stage, block = int(match.group(1)), int(match.group(2))
        return 1 + sum(depths[:stage]) + block
    match = _DOWNSAMPLE.match(name) or _STAGE_NORM.match(name)
    if match:
        return sum(depths[: int(match.group(1)) + 1])
    if name.startswith("patch_embed."):
        return 0
    return sum(depths)


def decoder_part_of(name: str) -> str:
    """The part of SMITNet's decoder a parameter (named inside the decoder) belongs to: ``"skips"`` (the blocks on
    the input and the encoder's skips), ``"decoder"`` (the upsampling blocks), which pretraining may train
    (:data:`~nnunet_smit.architectures.decoder.DECODER_PARTS`), or ``"outputs"`` (the segmentation outputs)."""
    module = name.split(".", 1)[0]
    for part, modules in DECODER_PARTS.items():
        if module in modules:
            return part
    return "outputs"


def build_param_groups(
    network: nn.Module,
    weight_decay: float,
    layer_decay: float = 1.0,
    encoder_attribute: str = "encoder",
    depths: Sequence[int] = (2, 2, 4, 2),
    split_decoder: bool = False,
) -> List[Dict]:
    """Optimizer parameter groups with an ``lr_scale`` each (the scheduler multiplies the rate by it).

    Encoder parameters at depth id ``i`` (see :func:`encoder_layer_id`) get
    ``lr_scale = layer_decay ** (sum(depths) + 1 - i)``: the last Swin block ``layer_decay``, the patch
    embedding ``layer_decay ** (sum(depths) + 1)``; everything outside the encoder (decoder) gets 1. With
    ``layer_decay == 0`` encoder parameters are left out (frozen encoder: the caller sets requires_grad False).
    Parameters with ``requires_grad`` False are left out. The decoder groups come first, so group 0 carries the
    base rate that nnU-Net logs. Each group has ``name``, ``params``, ``weight_decay``, ``lr_scale`` and ``part``
    (``"encoder"``; ``"whole_decoder"`` when the decoder is one group).

    ``split_decoder`` puts the decoder's parts (:func:`decoder_part_of`) in groups of their own, segmentation
    outputs first, so that a schedule can treat the blocks a checkpoint carried apart from the random outputs.
    """
    if layer_decay < 0:
        raise ValueError(f"layer_decay must be >= 0, got {layer_decay}")
    network = unwrap_network(network)
    prefix = encoder_attribute + "."
    num_layers = sum(depths) + 1
    groups: "OrderedDict[Tuple[int, bool], Dict]" = OrderedDict()
    # decoder groups first (key -1), then encoder from the deepest layer to the patch embedding
    for name, parameter in network.named_parameters():
        if not parameter.requires_grad:
            continue
        decay = uses_weight_decay(name, parameter)
        if name.startswith(prefix):
            if layer_decay == 0:
                continue
            layer_id = encoder_layer_id(name[len(prefix):], depths)
            key = (layer_id, decay)
            scale = layer_decay ** (num_layers - layer_id)
            group_name = f"{encoder_attribute}.layer{layer_id}.{'decay' if decay else 'no_decay'}"
            part = "encoder"
        else:
            scale = 1.0
            if split_decoder:
                part = decoder_part_of(name[len("decoder."):]) if name.startswith("decoder.") else "outputs"
                # outputs first (the base rate nnU-Net logs), then the skip blocks, then the upsampling blocks
                key = (num_layers + _SPLIT_ORDER[part], decay)
                group_name = f"decoder.{part}.{'decay' if decay else 'no_decay'}"
            else:
                part = "whole_decoder"
                key = (num_layers, decay)
                group_name = f"decoder.{'decay' if decay else 'no_decay'}"
        if key not in groups:
            groups[key] = {
                "name": group_name,
                "params": [],
                "param_names": [],
                "weight_decay": weight_decay if decay else 0.0,
                "lr_scale": scale,
                "part": part,
            }
        groups[key]["params"].append(parameter)
        groups[key]["param_names"].append(name)
    ordered = sorted(groups.items(), key=lambda item: (-item[0][0], not item[0][1]))
    return [group for _, group in ordered]
