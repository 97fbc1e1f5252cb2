"""The SMIT convolutional decoder (SwinUNETR-style), with optional deep-supervision heads.

Module names (``encoder1..4``, ``encoder10``, ``decoder1..5``, ``out``) follow the authors' fine-tuning network so
their weights map one to one; the normalisation is selectable (InstanceNorm as nnU-Net, BatchNorm as the
authors).
"""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch
from torch import nn

NORMS = ("instance", "batch")

# The decoder's module names by part: the blocks on the input and on the encoder's skips, the upsampling blocks (from
# 1/32 up to full resolution), and the segmentation outputs. Pretraining may train the first two (``DECODER_PARTS``).
SKIP_BLOCKS = ("encoder1", "encoder2", "encoder3", "encoder4", "encoder10")
UP_BLOCKS = ("decoder5", "decoder4", "decoder3", "decoder2", "decoder1")
SEGMENTATION_OUTPUTS = ("out", "ds_heads")
DECODER_PARTS: Dict[str, Tuple[str, ...]] = {"skips": SKIP_BLOCKS, "decoder": UP_BLOCKS}


def make_norm(kind: str, channels: int) -> nn.Module:
    if kind == "instance":
        return nn.InstanceNorm3d(channels, affine=True)
    if kind == "batch":
        return nn.BatchNorm3d(channels)
    raise ValueError(f"Unknown decoder norm {kind!r}; choose one of {NORMS}.")


class ConvLayer(nn.Module):
    """A bias-free Conv3d kept under ``.conv`` (the authors' key layout ``convN.conv.weight``)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, bias: bool = False) -> None:
        super().__init__()
        self.conv = nn.Conv3d(in_channels, out_channels, kernel_size, padding=kernel_size // 2, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class ResBlock(nn.Module):
    """conv3 -> norm -> LeakyReLU -> conv3 -> norm, plus (1x1x1 conv + norm when channels change), LeakyReLU."""

    def __init__(self, in_channels: int, out_channels: int, norm: str) -> None:
        super().__init__()
        self.conv1 = ConvLayer(in_channels, out_channels, 3)
        self.conv2 = ConvLayer(out_channels, out_channels, 3)
        self.norm1 = make_norm(norm, out_channels)
        self.norm2 = make_norm(norm, out_channels)
        self.act = nn.LeakyReLU(negative_slope=0.01, inplace=True)
        self.project = in_channels != out_channels
        if self.project:
            self.conv3 = ConvLayer(in_channels, out_channels, 1)
            self.norm3 = make_norm(norm, out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        residual = self.norm3(self.conv3(x)) if self.project else x
        out = self.act(self.norm1(self.conv1(x)))
        out = self.norm2(self.conv2(out))
        return self.act(out + residual)


class EncoderBlock(nn.Module):
    """A residual block on a skip feature (``encoderN.layer``)."""

    def __init__(self, in_channels: int, out_channels: int, norm: str) -> None:
        super().__init__()
        self.layer = ResBlock(in_channels, out_channels, norm)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x)


class TransposedConv(nn.Module):
    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.conv = nn.ConvTranspose3d(in_channels, out_channels, kernel_size=2, stride=2, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class UpBlock(nn.Module):
    """2x transposed conv, concatenate the skip (upsampled first), residual block (``decoderN``).

    ``skip_channels`` defaults to ``out_channels`` (the authors' blocks); a narrower block on a wider skip sets it.
    """

    def __init__(self, in_channels: int, out_channels: int, norm: str, skip_channels: Optional[int] = None) -> None:
        super().__init__()
        self.transp_conv = TransposedConv(in_channels, out_channels)
        self.conv_block = ResBlock(out_channels + (skip_channels or out_channels), out_channels, norm)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        return self.conv_block(torch.cat((self.transp_conv(x), skip), dim=1))


class OutBlock(nn.Module):
    """1x1x1 conv with bias to class logits (``out.conv.conv``)."""

    def __init__(self, in_channels: int, num_classes: int) -> None:
        super().__init__()
        self.conv = ConvLayer(in_channels, num_classes, 1, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


def authors_widths(feature_size: int) -> Tuple[int, int, int, int, int, int]:
    """The authors' decoder widths from full resolution to 1/32: F, F, 2F, 4F, 8F, 16F (the encoder's own)."""
    f = feature_size
    return f, f, 2 * f, 4 * f, 8 * f, 16 * f


class SMITDecoder(nn.Module):
    """Decoder on the encoder's skips (F, 2F, 4F, 8F channels at 1/2..1/16) and bottleneck (16F at 1/32).

    ``widths`` are the decoder's own channels from full resolution to 1/32 (default :func:`authors_widths`, the
    authors' decoder, whose weights map one to one); each resolution's blocks and deep-supervision head run at its
    width, and the skips enter at the encoder's widths (:class:`~nnunet_smit.architectures.light_decoder.
    SMITLightDecoder` narrows the top two and caps the bottom two).

    Attributes:
        deep_supervision: when True, ``forward`` returns logits at [1, 1/2, 1/4, 1/8, 1/16] of the input size,
            highest resolution first (nnU-Net toggles this attribute). The deep-supervision heads exist either way.
        widths: the six widths, full resolution first.
    """

    def __init__(self, in_channels: int, feature_size: int, num_classes: int, norm: str = "instance",
                 deep_supervision: bool = False, widths: Optional[Sequence[int]] = None) -> None:
        super().__init__()
        f = feature_size
        self.widths = tuple(int(w) for w in (widths or authors_widths(f)))
        if len(self.widths) != 6 or min(self.widths) < 1:
            raise ValueError(f"A SMIT decoder takes 6 positive widths (full resolution to 1/32), got {widths}.")
        w0, w1, w2, w3, w4, w5 = self.widths
        self.deep_supervision = deep_supervision
        # Blocks on the input and on the encoder's 1/2, 1/4, 1/8 outputs; the 1/16 output enters decoder5 as is.
        self.encoder1 = EncoderBlock(in_channels, w0, norm)
        self.encoder2 = EncoderBlock(f, w1, norm)
        self.encoder3 = EncoderBlock(2 * f, w2, norm)
        self.encoder4 = EncoderBlock(4 * f, w3, norm)
        self.encoder10 = EncoderBlock(16 * f, w5, norm)
        self.decoder5 = UpBlock(w5, w4, norm, skip_channels=8 * f)  # 1/16
        self.decoder4 = UpBlock(w4, w3, norm)  # 1/8
        self.decoder3 = UpBlock(w3, w2, norm)  # 1/4
        self.decoder2 = UpBlock(w2, w1, norm)  # 1/2
        self.decoder1 = UpBlock(w1, w0, norm)  # full resolution
        self.out = OutBlock(w0, num_classes)
        # Heads for decoder2..decoder5 outputs (1/2 .. 1/16).
        self.ds_heads = nn.ModuleList(OutBlock(c, num_classes) for c in (w1, w2, w3, w4))

    def forward(self, x_in: torch.Tensor, features: Sequence[torch.Tensor], bottleneck: torch.Tensor
                ) -> Union[torch.Tensor, List[torch.Tensor]]:
        levels = top_down(self, self.encoder1(x_in), features, bottleneck)
        logits = self.out(levels[0])
        if not self.deep_supervision:
            return logits
        return [logits] + [head(t) for head, t in zip(self.ds_heads, levels[1:])]


def top_down(blocks: nn.Module, enc0: torch.Tensor, features: Sequence[torch.Tensor], bottleneck: torch.Tensor
             ) -> List[torch.Tensor]:
    """The decoder's pass from the bottleneck up, through the blocks of any module that holds ``encoder2..4``,
    ``encoder10`` and ``decoder1..5`` under those names (a :class:`SMITDecoder`, or pretraining's reconstruction path).

    Args:
        enc0: ``encoder1``'s output on the input, (B, w0, D, H, W).
        features: the encoder's four skips (F, 2F, 4F, 8F channels at 1/2 .. 1/16).
        bottleneck: (B, 16F, D/32, H/32, W/32).

    Returns:
        the outputs of decoder1 (full resolution, w0 channels), decoder2 (1/2), decoder3, decoder4, decoder5 (1/16).
    """
    enc1 = blocks.encoder2(features[0])
    enc2 = blocks.encoder3(features[1])
    enc3 = blocks.encoder4(features[2])
    dec4 = blocks.encoder10(bottleneck)
    dec3 = blocks.decoder5(dec4, features[3])  # 1/16
    dec2 = blocks.decoder4(dec3, enc3)  # 1/8
    dec1 = blocks.decoder3(dec2, enc2)  # 1/4
    dec0 = blocks.decoder2(dec1, enc1)  # 1/2
    return [blocks.decoder1(dec0, enc0), dec0, dec1, dec2, dec3]
