"""Projection heads of SMIT pretraining: the DINO/iBOT head and the dense reconstruction head."""
from __future__ import annotations

from typing import List

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange
from torch.nn.utils.parametrizations import weight_norm


class DINOHead(nn.Module):
    """MLP projection head for global (DINO) or patch (iBOT) tokens.

    ``in_dim -> hidden_dim -> ... -> bottleneck_dim`` with GELU between layers, L2 normalisation, then a
    weight-normalised ``Linear(bottleneck_dim -> out_dim, no bias)`` whose norm is fixed to 1 (only its direction
    is learned). SMIT: 384-2048-2048-256 then 8192 prototypes.

    Args:
        in_dim: token channels (8C for the SMIT tap).
        out_dim: number of prototypes K.
        hidden_dim: width of the hidden MLP layers.
        bottleneck_dim: width before L2 normalisation.
        num_layers: number of Linear layers in the MLP (>= 1).
    """

    def __init__(
        self, in_dim: int, out_dim: int = 8192, hidden_dim: int = 2048, bottleneck_dim: int = 256, num_layers: int = 3
    ) -> None:
        super().__init__()
        num_layers = max(int(num_layers), 1)
        layers: List[nn.Module] = []
        if num_layers == 1:
            layers.append(nn.Linear(in_dim, bottleneck_dim))
        else:
            layers += [nn.Linear(in_dim, hidden_dim), nn.GELU()]
            for _ in range(num_layers - 2):
                layers += [nn.Linear(hidden_dim, hidden_dim), nn.GELU()]
            layers.append(nn.Linear(hidden_dim, bottleneck_dim))
        self.mlp = nn.Sequential(*layers)
        self.apply(self._init_weights)
        self.last_layer = weight_norm(nn.Linear(bottleneck_dim, out_dim, bias=False))
        # The magnitude g (original0) stays 1: prototypes are unit vectors, only their direction trains.
        magnitude = self.last_layer.parametrizations.weight.original0
        with torch.no_grad():
            magnitude.fill_(1.0)
        magnitude.requires_grad_(False)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.trunc_normal_(module.weight, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)

    def last_layer_parameters(self) -> List[nn.Parameter]:
        """Trainable parameters of the prototype layer (frozen during the first epoch)."""
        return [p for p in self.last_layer.parameters() if p.requires_grad]

    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        """Tokens -> L2-normalised bottleneck vectors (what the prototypes are compared with)."""
        x = self.mlp(tokens)
        # eps guards the L2 normalisation in low precision.
        return F.normalize(x, dim=-1, p=2, eps=1e-6 if x.dtype == torch.float32 else 1e-4)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """(N, in_dim) or (B, N, in_dim) tokens -> logits with the same leading shape and ``out_dim`` channels."""
        return self.last_layer(self.embed(tokens))


def pixel_shuffle_3d(x: torch.Tensor, factor: int) -> torch.Tensor:
    """3D pixel shuffle: (B, C*f^3, d, h, w) -> (B, C, d*f, h*f, w*f).

    The channel index is read as (c, f_d, f_h, f_w) in C order, the 3D analogue of ``torch.nn.PixelShuffle``.
    """
    return rearrange(x, "b (c fd fh fw) d h w -> b c (d fd) (h fh) (w fw)", fd=factor, fh=factor, fw=factor)


class ReconstructionHead(nn.Module):
    """Dense voxel regression from the bottleneck: 1x1x1 conv to ``out_channels * factor^3`` then 3D pixel shuffle.

    SMIT: bottleneck (B, 16C, D/32, H/32, W/32) -> conv to 32^3 channels -> (B, 1, D, H, W).

    Args:
        in_dim: bottleneck channels (16C).
        out_channels: image channels to reconstruct.
        factor: upsampling factor per axis (the encoder's total stride, 32).
    """

    def __init__(self, in_dim: int, out_channels: int = 1, factor: int = 32) -> None:
        super().__init__()
        self.factor = int(factor)
        self.proj = nn.Conv3d(in_dim, out_channels * self.factor**3, kernel_size=1)

    def forward(self, bottleneck: torch.Tensor) -> torch.Tensor:
        """(B, in_dim, d, h, w) -> (B, out_channels, d*factor, h*factor, w*factor)."""
        return pixel_shuffle_3d(self.proj(bottleneck), self.factor)
