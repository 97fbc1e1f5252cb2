"""Where the reconstruction reads the encoder: SMIT's 1/32 bottleneck, or SMITNet's own convolutional blocks.

``reconstruct_through`` picks the path (``smit_pretrain --reconstruct_through``):

* ``bottleneck`` (the authors'): a 1x1x1 conv on the bottleneck and a 3D pixel shuffle
  (:class:`~nnunet_smit.pretraining.heads.ReconstructionHead`); no conv block of SMITNet gets a gradient.
* ``skips``: SMITNet's blocks on the raw image and on the encoder's skips (``encoder1``-``encoder4``, ``encoder10``),
  joined by a light upsampling path (a 1x1x1 conv to ``SKIP_PATH_CHANNELS`` per level, trilinear 2x upsampling, sums,
  a 1x1x1 conv to the image).
* ``decoder``: the whole SMIT decoder (those blocks and ``decoder5``-``decoder1``), then a 1x1x1 conv to the image
  where SMITNet has its segmentation outputs.

The trained blocks sit under :attr:`ConvReconstructionHead.decoder` with SMITNet's module names and shapes (the
decoder kind's widths, ``DECODER_NORM``), so the export carries them under SMITNet's keys (``decoder.encoder1...``).

Masked voxels reach no path: the Swin encoder replaces their patch tokens by the mask token, and ``encoder1``, the
only block on the raw image, sees them as 0 together with a separate mask channel (1 where hidden), whose kernels
(``mask_conv1``, ``mask_conv3``) sit beside ``encoder1``'s own first and projection kernels and are not exported. 0
alone would be ambiguous (air, and fat, at the bottom of the scaled window); the channel says which zeros are holes.
A fine-tuning scan has no hole: its mask channel is 0 everywhere, which is exactly ``encoder1`` without those kernels.
"""
from __future__ import annotations

from typing import Dict, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from nnunet_smit.architectures import SMITConfig
from nnunet_smit.architectures.decoder import DECODER_PARTS, EncoderBlock, top_down
from nnunet_smit.architectures.smit_net import DECODERS

RECONSTRUCT_THROUGH = ("bottleneck", "skips", "decoder")
# The checkpoint parts (beside the encoder) each option trains.
PARTS_TRAINED: Dict[str, Tuple[str, ...]] = {"bottleneck": (), "skips": ("skips",), "decoder": ("skips", "decoder")}
# nnU-Net's normalisation, the one nnUNetTrainerSMIT's decoder uses.
DECODER_NORM = "instance"
# Channels of the light upsampling path of ``skips``.
SKIP_PATH_CHANNELS = 16


def masked_input_block(block: EncoderBlock, mask_conv1: nn.Conv3d, mask_conv3: nn.Conv3d, x: torch.Tensor,
                       hidden: torch.Tensor) -> torch.Tensor:
    """``block`` (SMITNet's ``encoder1``) on ``x`` (B, C, D, H, W) with the voxels ``hidden`` (bool, B, D, H, W) set
    to 0 and a mask channel beside the image: its kernels ``mask_conv1`` (3x3x3) and ``mask_conv3`` (1x1x1) add to
    the block's first and projection convolutions, as one more input channel would. The output does not depend on
    the values of hidden voxels (nor does its gradient reach them)."""
    layer = block.layer
    hole = hidden[:, None]
    x = torch.where(hole, torch.zeros((), dtype=x.dtype, device=x.device), x)
    channel = hole.to(x.dtype)
    residual = layer.norm3(layer.conv3(x) + mask_conv3(channel)) if layer.project else x
    out = layer.act(layer.norm1(layer.conv1(x) + mask_conv1(channel)))
    out = layer.norm2(layer.conv2(out))
    return layer.act(out + residual)


class ConvReconstructionHead(nn.Module):
    """The reconstruction through SMITNet's conv blocks (``through`` = ``"skips"`` or ``"decoder"``).

    Args:
        config: the encoder's architecture (F = embed_dim, C = in_channels).
        through: ``"skips"`` or ``"decoder"``.
        decoder: SMITNet's decoder kind whose blocks are trained, ``"smit"`` or ``"light"``.

    Attributes:
        decoder: the trained blocks under SMITNet's names (``encoder1``, ..., and ``decoder1..5`` for ``"decoder"``).
        parts: the checkpoint parts they are, :data:`PARTS_TRAINED` of ``through``.
    """

    def __init__(self, config: SMITConfig, through: str, decoder: str = "smit") -> None:
        super().__init__()
        if through not in ("skips", "decoder"):
            raise ValueError(f"A conv reconstruction goes through 'skips' or 'decoder', got {through!r}.")
        self.through = through
        self.kind = decoder
        self.parts = PARTS_TRAINED[through]
        channels = config.in_channels
        full = DECODERS[decoder](channels, config.embed_dim, channels, DECODER_NORM)
        self.decoder = nn.Module()
        for part in self.parts:
            for name in DECODER_PARTS[part]:
                self.decoder.add_module(name, getattr(full, name))
        w0, _, w2, w3, _, w5 = full.widths
        self.mask_conv1 = nn.Conv3d(1, w0, 3, padding=1, bias=False)
        self.mask_conv3 = nn.Conv3d(1, w0, 1, bias=False)
        if through == "skips":
            # From 1/32 up: encoder10, the encoder's 1/16 stage output (SMITNet's decoder5 takes it without a block),
            # encoder4, encoder3, encoder2, encoder1.
            level_channels = (w5, 8 * config.embed_dim, w3, w2, full.widths[1], w0)
            self.laterals = nn.ModuleList(nn.Conv3d(c, SKIP_PATH_CHANNELS, 1) for c in level_channels)
            self.act = nn.LeakyReLU(negative_slope=0.01)
            self.out = nn.Conv3d(SKIP_PATH_CHANNELS, channels, 1)
        else:
            self.out = nn.Conv3d(w0, channels, 1)

    def forward(self, x: torch.Tensor, hidden: torch.Tensor, features: Sequence[torch.Tensor],
                bottleneck: torch.Tensor) -> torch.Tensor:
        """x: (B, C, D, H, W) the view; hidden: bool (B, D, H, W), True where the encoder saw the mask token;
        features, bottleneck: the encoder's skips and bottleneck. Returns (B, C, D, H, W)."""
        blocks = self.decoder
        enc0 = masked_input_block(blocks.encoder1, self.mask_conv1, self.mask_conv3, x, hidden)
        if self.through == "decoder":
            return self.out(top_down(blocks, enc0, features, bottleneck)[0])
        levels = (blocks.encoder10(bottleneck), features[3], blocks.encoder4(features[2]),
                  blocks.encoder3(features[1]), blocks.encoder2(features[0]), enc0)
        y = self.laterals[0](levels[0])
        for lateral, level in zip(self.laterals[1:], levels[1:]):
            y = F.interpolate(y, scale_factor=2, mode="trilinear", align_corners=False) + lateral(level)
        return self.out(self.act(y))

    def exported_state_dict(self) -> Dict[str, torch.Tensor]:
        """The trained blocks under SMITNet's keys (``decoder.encoder1.layer.conv1.conv.weight``, ...), detached, on
        the CPU."""
        return {f"decoder.{k}": v.detach().cpu() for k, v in self.decoder.state_dict().items()}
