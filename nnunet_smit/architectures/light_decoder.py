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

from typing import List, Sequence, Union

import torch
from torch import nn

from nnunet_smit.architectures.decoder import EncoderBlock, OutBlock, UpBlock

# Full- and 1/2-resolution widths, chosen among measured candidates (docs/performance.md, "The light decoder").
LIGHT_FULL_RES_CHANNELS = 16
LIGHT_HALF_RES_CHANNELS = 32


class SMITLightDecoder(nn.Module):
    """Decoder on the encoder's skips (F, 2F, 4F, 8F at 1/2..1/16) and bottleneck (16F at 1/32), narrow on top.

    Widths per resolution, full to 1/32: min(``full_res_channels``, F), min(``half_res_channels``, F), 2F, 4F, 8F,
    16F.

    Attributes:
        deep_supervision: when True, ``forward`` returns logits at [1, 1/2, 1/4, 1/8, 1/16] of the input size,
            highest resolution first, as :class:`SMITDecoder` (nnU-Net toggles this attribute). The heads exist
            either way, so state-dict keys never depend on it.
    """

    def __init__(self, in_channels: int, feature_size: int, num_classes: int, norm: str = "instance",
                 deep_supervision: bool = False, full_res_channels: int = LIGHT_FULL_RES_CHANNELS,
                 half_res_channels: int = LIGHT_HALF_RES_CHANNELS) -> None:
        super().__init__()
        f = feature_size
        c0, c1 = min(full_res_channels, f), min(half_res_channels, f)
        self.deep_supervision = deep_supervision
        self.encoder1 = EncoderBlock(in_channels, c0, norm)  # full resolution, on the input
        self.encoder2 = EncoderBlock(f, c1, norm)  # 1/2, on the first stage output (F channels)
        self.encoder3 = EncoderBlock(2 * f, 2 * f, norm)
        self.encoder4 = EncoderBlock(4 * f, 4 * f, norm)
        self.encoder10 = EncoderBlock(16 * f, 16 * f, norm)
        self.decoder5 = UpBlock(16 * f, 8 * f, norm)
        self.decoder4 = UpBlock(8 * f, 4 * f, norm)
        self.decoder3 = UpBlock(4 * f, 2 * f, norm)
        self.decoder2 = UpBlock(2 * f, c1, norm)
        self.decoder1 = UpBlock(c1, c0, norm)
        self.out = OutBlock(c0, num_classes)
        # Heads for decoder2..decoder5 outputs (1/2 .. 1/16).
        self.ds_heads = nn.ModuleList(OutBlock(c, num_classes) for c in (c1, 2 * f, 4 * f, 8 * f))

    def forward(self, x_in: torch.Tensor, features: Sequence[torch.Tensor], bottleneck: torch.Tensor
                ) -> Union[torch.Tensor, List[torch.Tensor]]:
        """x_in (B, C_in, D, H, W); features as :class:`SMITDecoder`; logits (B, num_classes, D, H, W) or the list."""
        enc0 = self.encoder1(x_in)
        enc1 = self.encoder2(features[0])
        enc2 = self.encoder3(features[1])
        enc3 = self.encoder4(features[2])
        dec4 = self.encoder10(bottleneck)
        dec3 = self.decoder5(dec4, features[3])  # 1/16
        dec2 = self.decoder4(dec3, enc3)  # 1/8
        dec1 = self.decoder3(dec2, enc2)  # 1/4
        dec0 = self.decoder2(dec1, enc1)  # 1/2
        logits = self.out(self.decoder1(dec0, enc0))
        if not self.deep_supervision:
            return logits
        return [logits] + [head(t) for head, t in zip(self.ds_heads, (dec0, dec1, dec2, dec3))]
