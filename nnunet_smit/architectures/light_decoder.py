"""A lighter decoder for SMITNet: the authors' residual blocks, with the full- and half-resolution stages narrowed.

The authors' decoder (:class:`~nnunet_smit.architectures.decoder.SMITDecoder`) runs its full-resolution stem and
last up-block at F = 48 channels (F = the encoder's embed dim) and its 1/2-resolution stages at F as well; those
randomly initialised convolutions are about 95% of smit_small's arithmetic on a 96^3 patch, while the pretrained
encoder is under 5%. This decoder keeps the same block types, module names and deep-supervision outputs, and narrows
only the two highest resolutions: ``full_res_channels`` at full resolution and ``half_res_channels`` at 1/2, never
wider than F (the tiny preset's F = 12 gives 12 and 12). The defaults, 16 and 32, are half of what nnU-Net's default
U-Net runs there: with 32 at full resolution the whole network still trained slower than that U-Net on the CPU
(docs/performance.md). The 1/4..1/32 stages keep the encoder's widths (2F, 4F, 8F, 16F).
"""
from __future__ import annotations

from nnunet_smit.architectures.decoder import SMITDecoder

# Full- and 1/2-resolution widths, chosen among measured candidates (docs/performance.md, "The light decoder").
LIGHT_FULL_RES_CHANNELS = 16
LIGHT_HALF_RES_CHANNELS = 32


class SMITLightDecoder(SMITDecoder):
    """The authors' decoder with narrow top stages: widths per resolution, full to 1/32,
    min(``full_res_channels``, F), min(``half_res_channels``, F), 2F, 4F, 8F, 16F. Same module names, forward and
    deep-supervision outputs as :class:`SMITDecoder`; at F <= 16 (the tiny preset) it is the authors' decoder."""

    def __init__(self, in_channels: int, feature_size: int, num_classes: int, norm: str = "instance",
                 deep_supervision: bool = False, full_res_channels: int = LIGHT_FULL_RES_CHANNELS,
                 half_res_channels: int = LIGHT_HALF_RES_CHANNELS) -> None:
        super().__init__(in_channels, feature_size, num_classes, norm, deep_supervision,
                         full_res_channels=min(full_res_channels, feature_size),
                         half_res_channels=min(half_res_channels, feature_size))
