"""Architecture configuration of the SMIT Swin-3D encoder, with named presets.

A config is a plain dataclass that serialises to JSON (``to_dict`` / ``from_dict``), so every checkpoint
and results folder says exactly which encoder it holds.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Dict, Tuple

from nnunet_smit.errors import SMITError

# Offsets (d0, d1, d2) of the 2x2x2 neighbours, in the order patch merging concatenates them.
MERGE_ORDERS: Dict[str, Tuple[Tuple[int, int, int], ...]] = {
    # The authors' SMIT order.
    "smit": ((0, 0, 0), (1, 0, 0), (0, 1, 0), (0, 0, 1), (1, 1, 0), (0, 1, 1), (1, 0, 1), (1, 1, 1)),
    # MONAI SwinUNETR's default downsample "merging" (its PatchMerging, the v0.9 layout).
    "monai": ((0, 0, 0), (1, 0, 0), (0, 1, 0), (0, 0, 1), (1, 1, 0), (1, 0, 1), (0, 1, 1), (1, 1, 1)),
    # MONAI's "mergingv2" (PatchMergingV2): itertools.product order.
    "monai_v2": ((0, 0, 0), (0, 0, 1), (0, 1, 0), (0, 1, 1), (1, 0, 0), (1, 0, 1), (1, 1, 0), (1, 1, 1)),
}

STAGE_OUTPUTS = ("smit", "monai")


@dataclass
class SMITConfig:
    """Swin-3D encoder architecture.

    Attributes:
        embed_dim: channels C of the patch embedding; stage i has C * 2**i channels.
        depths: number of Swin blocks per stage (4 stages).
        num_heads: attention heads per stage.
        window_size: cubic attention window, in tokens.
        mlp_ratio: hidden width of the block MLP relative to the stage width.
        qkv_bias: bias on the qkv projection.
        drop_path_rate: stochastic depth, linear over all blocks (training only).
        patch_size: patch-embedding kernel and stride (2 in SMIT; the 1/32 rule assumes 2).
        in_channels: input channels of the patch embedding.
        layer_norm_eps: epsilon of every LayerNorm of the encoder.
        patch_norm: LayerNorm after the patch embedding (SMIT: yes, MONAI SwinUNETR: no).
        merge_order: neighbour order of patch merging, a key of ``MERGE_ORDERS``.
        stage_outputs: ``"smit"``: the four skip features are each stage's output before its merge through a
            learned LayerNorm ``norm{i}``, the bottleneck is the last merge output, not normalised.
            ``"monai"``: the skips are the patch embedding and the first three merge outputs, the bottleneck
            the last merge output, all through a parameter-free LayerNorm (MONAI SwinViT, normalize=True).
        shrink_window_to_grid: MONAI behaviour: where a grid axis is not larger than the window, the window
            shrinks to the grid and the shift is dropped. SMIT pads the grid up to the window instead.
        legacy_window_reverse: put attention outputs back with the authors' window reverse, which applies the
            partition's axis permutation again instead of its inverse (a 3D slip in their code) and so moves each
            token's attention output to another position. Their released weights were trained that way, so the
            ``*_authors`` presets and the importers of their weights keep it; it is off for new models (``smit_small``).
    """

    embed_dim: int = 48
    depths: Tuple[int, ...] = (2, 2, 4, 2)
    num_heads: Tuple[int, ...] = (4, 4, 4, 4)
    window_size: int = 4
    mlp_ratio: float = 4.0
    qkv_bias: bool = False
    drop_path_rate: float = 0.3
    patch_size: int = 2
    in_channels: int = 1
    layer_norm_eps: float = 1e-5
    patch_norm: bool = True
    merge_order: str = "smit"
    stage_outputs: str = "smit"
    shrink_window_to_grid: bool = False
    legacy_window_reverse: bool = False

    def __post_init__(self) -> None:
        self.depths = tuple(int(d) for d in self.depths)
        self.num_heads = tuple(int(h) for h in self.num_heads)
        if len(self.depths) != 4 or len(self.num_heads) != 4:
            raise SMITError(f"SMIT encoders have 4 stages: got depths {self.depths} and heads {self.num_heads}.")
        for i, heads in enumerate(self.num_heads):
            if self.stage_dims[i] % heads:
                raise SMITError(
                    f"Stage {i} width {self.stage_dims[i]} is not divisible by its {heads} heads; "
                    "pick embed_dim and num_heads so that every stage divides."
                )
        if self.merge_order not in MERGE_ORDERS:
            raise SMITError(f"Unknown merge_order {self.merge_order!r}; choose one of {sorted(MERGE_ORDERS)}.")
        if self.stage_outputs not in STAGE_OUTPUTS:
            raise SMITError(f"Unknown stage_outputs {self.stage_outputs!r}; choose one of {STAGE_OUTPUTS}.")
        if self.patch_size != 2:
            raise SMITError("Only patch_size 2 is supported: the decoder and the 1/32 size rule assume it.")

    # Derived sizes -----------------------------------------------------------------------------------
    @property
    def stage_dims(self) -> Tuple[int, ...]:
        """Channels of the four stages: (C, 2C, 4C, 8C)."""
        return tuple(self.embed_dim * 2**i for i in range(4))

    @property
    def bottleneck_dim(self) -> int:
        """Channels of the bottleneck (last merge output): 16C."""
        return self.embed_dim * 16

    @property
    def size_divisor(self) -> int:
        """Every input axis must be a multiple of this (patch embedding x four merges)."""
        return self.patch_size * 2**4

    # Serialisation -----------------------------------------------------------------------------------
    def to_dict(self) -> Dict[str, Any]:
        d = dataclasses.asdict(self)
        d["depths"] = list(self.depths)
        d["num_heads"] = list(self.num_heads)
        return d

    @classmethod
    def from_dict(cls, d: Dict[str, Any]) -> "SMITConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise SMITError(f"Unknown SMIT config fields {unknown}; the checkpoint is newer than this package.")
        return cls(**d)

    def replace(self, **changes: Any) -> "SMITConfig":
        return dataclasses.replace(self, **changes)

    # Presets -----------------------------------------------------------------------------------------
    @classmethod
    def preset(cls, name: str, **overrides: Any) -> "SMITConfig":
        """A named configuration; keyword overrides change single fields (e.g. ``in_channels=4``)."""
        if name not in PRESETS:
            raise SMITError(f"Unknown SMIT preset {name!r}; choose one of {sorted(PRESETS)}.")
        return dataclasses.replace(PRESETS[name], **overrides)

    @staticmethod
    def preset_names() -> Tuple[str, ...]:
        return tuple(sorted(PRESETS))


_SMIT_LUNG = SMITConfig(depths=(2, 2, 8, 2), num_heads=(4, 4, 8, 16), qkv_bias=True)

# "smit_small" and "smit_lung" are the authors' architectures for new models (correct window reverse); the
# "_authors" presets add the authors' window-reverse slip, which their released weights need (the importers set it
# from the weights themselves).
PRESETS: Dict[str, SMITConfig] = {
    # The authors' SMIT encoder architecture, 8,763,784 parameters, for new pretraining.
    "smit_small": SMITConfig(),
    # The same with the authors' window reverse: the network their released smit_small weights were trained as.
    "smit_small_authors": SMITConfig(legacy_window_reverse=True),
    # The group's later lung-tumour model: deeper third stage, more heads, qkv bias.
    "smit_lung": _SMIT_LUNG,
    "smit_lung_authors": _SMIT_LUNG.replace(legacy_window_reverse=True),
    # A tiny encoder for tests and CPU smoke runs.
    "tiny": SMITConfig(embed_dim=12, depths=(2, 2, 2, 2), num_heads=(2, 2, 2, 2), drop_path_rate=0.0),
    # MONAI SwinUNETR's SwinViT (feature_size 48), for importing MONAI's self-supervised weights.
    "monai_swinvit": SMITConfig(
        embed_dim=48,
        depths=(2, 2, 2, 2),
        num_heads=(3, 6, 12, 24),
        window_size=7,
        qkv_bias=True,
        drop_path_rate=0.0,
        patch_norm=False,
        merge_order="monai",
        stage_outputs="monai",
        shrink_window_to_grid=True,
    ),
}
