"""Turn foreign state dicts (the authors' SMIT, MONAI's SwinViT) into this package's layout.

One small function per source, in the spirit of timm's ``checkpoint_filter_fn``: each strips wrappers, renames
keys, drops tensors that are derived or belong to other parts, and infers the architecture from the shapes.
Pure functions on dicts of tensors: no file I/O here (see ``nnunet_smit.checkpoint``).
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Dict, List, Mapping, Tuple

import torch

from nnunet_smit.architectures.config import SMITConfig
from nnunet_smit.errors import CheckpointError

StateDict = Dict[str, torch.Tensor]

# Wrapper prefixes seen in the wild (DataParallel/DDP, DINO-style backbones, the authors' fine-tuning net).
WRAPPER_PREFIXES = ("module.", "backbone.", "transformer.", "student.", "teacher.", "encoder.", "swinViT.")


@dataclass
class Conversion:
    """A converted encoder state dict, the inferred architecture and what was dropped and why."""

    state_dict: StateDict
    config: SMITConfig
    source: str
    dropped: Dict[str, List[str]] = field(default_factory=dict)

    def notes(self) -> List[str]:
        return [f"dropped {len(keys)} tensor(s): {why}" for why, keys in self.dropped.items() if keys]


def strip_prefixes(state_dict: Mapping[str, torch.Tensor], prefixes=WRAPPER_PREFIXES) -> StateDict:
    """Remove leading wrapper prefixes shared by all keys, repeatedly (``module.backbone.x`` -> ``x``)."""
    sd = dict(state_dict)
    changed = True
    while changed and sd:
        changed = False
        for prefix in prefixes:
            if all(k.startswith(prefix) for k in sd):
                sd = {k[len(prefix):]: v for k, v in sd.items()}
                changed = True
    return sd


def select_prefix(state_dict: Mapping[str, torch.Tensor], prefix: str) -> Tuple[StateDict, List[str]]:
    """Keys under ``prefix`` (prefix removed) and the list of the other keys."""
    inside = {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}
    outside = [k for k in state_dict if not k.startswith(prefix)]
    return inside, outside


def _window_from_table(rows: int) -> int:
    span = round(rows ** (1.0 / 3.0))
    if span ** 3 != rows or span % 2 == 0:
        raise CheckpointError(f"A relative position bias table of {rows} rows is not (2w-1)^3 for any window w.")
    return (span + 1) // 2


def infer_encoder_config(sd: Mapping[str, torch.Tensor], **fixed) -> SMITConfig:
    """Infer a :class:`SMITConfig` from an encoder state dict in this package's key layout."""
    if "patch_embed.proj.weight" not in sd:
        raise CheckpointError("No 'patch_embed.proj.weight' found: this is not a Swin encoder state dict.")
    embed_dim, in_channels = sd["patch_embed.proj.weight"].shape[:2]
    depths, heads = [], []
    for stage in range(4):
        blocks = {int(m.group(1)) for k in sd if (m := re.match(rf"layers\.{stage}\.blocks\.(\d+)\.", k))}
        if not blocks:
            raise CheckpointError(f"No blocks found for encoder stage {stage}: the state dict is incomplete.")
        depths.append(max(blocks) + 1)
        heads.append(sd[f"layers.{stage}.blocks.0.attn.relative_position_bias_table"].shape[1])
    table_rows = sd["layers.0.blocks.0.attn.relative_position_bias_table"].shape[0]
    hidden = sd["layers.0.blocks.0.mlp.fc1.weight"].shape[0]
    values = dict(
        embed_dim=int(embed_dim),
        in_channels=int(in_channels),
        depths=tuple(depths),
        num_heads=tuple(heads),
        window_size=_window_from_table(table_rows),
        mlp_ratio=hidden / embed_dim,
        qkv_bias="layers.0.blocks.0.attn.qkv.bias" in sd,
        patch_norm="patch_embed.norm.weight" in sd,
    )
    values.update(fixed)
    return SMITConfig(**values)


def convert_official_encoder(state_dict: Mapping[str, torch.Tensor]) -> Conversion:
    """The authors' encoder: pretraining output or released ``pre_train_weight.pt`` (flat or wrapped)."""
    sd = strip_prefixes(state_dict)
    dropped: Dict[str, List[str]] = {"pretraining-only mask token": [], "derived position index (rebuilt)": []}
    out: StateDict = {}
    for key, value in sd.items():
        if key == "mask_token":
            dropped["pretraining-only mask token"].append(key)
        elif key.endswith("relative_position_index"):
            dropped["derived position index (rebuilt)"].append(key)
        else:
            out[key] = value
    # The authors' weights were trained with their window reverse: keep it for identical numerics.
    return Conversion(out, infer_encoder_config(out, legacy_window_reverse=True), "official_pretrain", dropped)


DECODER_MODULES = ("encoder1", "encoder2", "encoder3", "encoder4", "encoder10",
                   "decoder1", "decoder2", "decoder3", "decoder4", "decoder5", "out")
# Residual projections that the authors' old MONAI created even where channels do not change (never used).
UNUSED_PROJECTION = re.compile(r"^encoder(2|3|4|10)\.layer\.(conv3|norm3)\.")


def convert_official_finetune(state_dict: Mapping[str, torch.Tensor]) -> Tuple[StateDict, SMITConfig, int]:
    """The authors' complete fine-tuning network -> (``SMITNet`` state dict, encoder config, number of classes)."""
    sd = strip_prefixes(state_dict, ("module.",))
    encoder_part, rest = select_prefix(sd, "transformer.")
    if not encoder_part:
        raise CheckpointError("No 'transformer.*' keys: this is not the authors' fine-tuning network.")
    encoder = convert_official_encoder(encoder_part)
    out: StateDict = {f"encoder.{k}": v for k, v in encoder.state_dict.items()}
    unknown = []
    for key in rest:
        if UNUSED_PROJECTION.match(key):
            continue
        if key.split(".", 1)[0] in DECODER_MODULES:
            out[f"decoder.{key}"] = sd[key]
        else:
            unknown.append(key)
    if unknown:
        raise CheckpointError(f"Unexpected keys in the authors' fine-tuning state dict: {unknown[:5]}.")
    if "out.conv.conv.weight" not in sd:
        raise CheckpointError("The authors' fine-tuning state dict has no output layer 'out.conv.conv.weight'.")
    num_classes = int(sd["out.conv.conv.weight"].shape[0])
    return out, encoder.config, num_classes


_MONAI_STAGE = re.compile(r"^layers([1-4])\.0\.(.*)$")


def convert_monai_swinvit(state_dict: Mapping[str, torch.Tensor]) -> Conversion:
    """MONAI SwinUNETR's Swin encoder (``swinViT.*`` keys, or ``module.*`` as in MONAI's ``model_swinvit.pt``).

    Keys outside the encoder (SwinUNETR's decoder, self-supervised heads) are dropped and reported.
    """
    sd = dict(state_dict)
    if any(k.startswith("swinViT.") for k in sd):
        sd, others = select_prefix(sd, "swinViT.")
    else:
        sd = strip_prefixes(sd, ("module.",))
        others = [k for k in sd if not (k.startswith("patch_embed.") or _MONAI_STAGE.match(k))]
        sd = {k: v for k, v in sd.items() if k not in others}
    dropped: Dict[str, List[str]] = {"outside the Swin encoder": others, "derived position index (rebuilt)": []}
    out: StateDict = {}
    for key, value in sd.items():
        if key.endswith("relative_position_index"):
            dropped["derived position index (rebuilt)"].append(key)
            continue
        match = _MONAI_STAGE.match(key)
        if match:
            key = f"layers.{int(match.group(1)) - 1}.{match.group(2)}"
        key = key.replace(".mlp.linear1.", ".mlp.fc1.").replace(".mlp.linear2.", ".mlp.fc2.")
        out[key] = value
    config = infer_encoder_config(
        out, merge_order="monai", stage_outputs="monai", shrink_window_to_grid=True, drop_path_rate=0.0
    )
    return Conversion(out, config, "monai_swinvit", dropped)
