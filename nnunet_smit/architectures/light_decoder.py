"""A lighter decoder for SMITNet: the authors' residual blocks at nnU-Net's widths.

The authors' decoder (:class:`~nnunet_smit.architectures.decoder.SMITDecoder`) runs its full- and 1/2-resolution
stages at F = 48 channels (F = the encoder's embed dim) and its 1/16 and 1/32 stages at 8F = 384 and 16F = 768.
The decoder is 95% of smit_small's arithmetic on a 96^3 patch (its two full-resolution blocks alone 74%), the
pretrained encoder under 5%; the 1/16 and 1/32 stages hold 46 of the network's 63 M parameters (the 1/32 block
alone 32 M) for almost no arithmetic. All of that is randomly initialised. This decoder keeps the same block types, module names and deep-supervision outputs and sizes
the stages the way nnU-Net sizes its U-Net:

- full and 1/2 resolution: ``full_res_channels`` and ``half_res_channels`` (16 and 32, half of nnU-Net's U-Net
  there: with 32 at full resolution the whole network still trained slower than that U-Net on the CPU);
- 1/4 and 1/8: the encoder's widths, 2F and 4F;
- 1/16 and 1/32: capped at ``max_channels`` (320, nnU-Net's cap for 3D networks).

No width exceeds the authors' (the tiny preset's F = 12 gives 12, 12, 24, 48, 96, 192: the authors' decoder).
Measured choices in docs/performance.md ("The light decoder").
"""
from __future__ import annotations

from typing import Tuple

from nnunet_smit.architectures.decoder import SMITDecoder, authors_widths

LIGHT_FULL_RES_CHANNELS = 16
LIGHT_HALF_RES_CHANNELS = 32
LIGHT_MAX_CHANNELS = 320  # nnU-Net's default cap on 3D feature maps


def light_widths(feature_size: int, full_res_channels: int = LIGHT_FULL_RES_CHANNELS,
                 half_res_channels: int = LIGHT_HALF_RES_CHANNELS,
                 max_channels: int = LIGHT_MAX_CHANNELS) -> Tuple[int, int, int, int, int, int]:
    """Widths from full resolution to 1/32: min(full, F), min(half, F), 2F, 4F, min(8F, cap), min(16F, cap)."""
    f0, f1, f2, f3, f4, f5 = authors_widths(feature_size)
    return (min(full_res_channels, f0), min(half_res_channels, f1), f2, f3, min(f4, max_channels),
            min(f5, max_channels))


class SMITLightDecoder(SMITDecoder):
    """The authors' decoder at :func:`light_widths`: same module names, forward and deep-supervision outputs as
    :class:`SMITDecoder`; at F <= 16 (the tiny preset) it is the authors' decoder."""

    def __init__(self, in_channels: int, feature_size: int, num_classes: int, norm: str = "instance",
                 deep_supervision: bool = False, full_res_channels: int = LIGHT_FULL_RES_CHANNELS,
                 half_res_channels: int = LIGHT_HALF_RES_CHANNELS, max_channels: int = LIGHT_MAX_CHANNELS) -> None:
        super().__init__(in_channels, feature_size, num_classes, norm, deep_supervision,
                         widths=light_widths(feature_size, full_res_channels, half_res_channels, max_channels))
