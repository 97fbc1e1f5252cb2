"""The linear voxel classifier on frozen features, and its training on sampled voxels.

:class:`LinearProbe` is "upsample every scale trilinearly to the patch, concatenate, standardise every channel, one
1x1x1 convolution" (3DINO's linear head, with its BatchNorm3d replaced by the training features' own per-channel
statistics). Trilinear weights sum to one, so upsampling commutes with a per-voxel affine map: the head standardises and
convolves each scale at its own resolution and upsamples the K-channel logits instead, which never holds the
upsampled features (1488 channels per voxel for smit_small, 372 for the tiny preset).

Training reads the same function at voxels: for a voxel, its feature vector is every scale's trilinear interpolation at
the voxel's centre (:func:`sample_at_voxels`, ``grid_sample`` with the sampling convention of ``F.interpolate``,
equal to float precision), so cross-entropy on voxels drawn uniformly from the labelled voxels of the training patches
is an unbiased estimate of the patch cross-entropy, at a cost that does not grow with the patch.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

# Targets outside the image (nnU-Net's -1 padding of segmentations) and nnU-Net's ignore label count nowhere.
IGNORE_INDEX = -1
# Standard deviations below this are treated as this (a constant channel is centred, not blown up).
MIN_STD = 1e-6


def sample_at_voxels(scale: torch.Tensor, voxels: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """A feature map (1, C, d, h, w) read at voxels of a patch of ``size`` (D, H, W) as ``F.interpolate(scale, size,
    mode="trilinear", align_corners=False)`` would give them there: voxels (P, 3) integer indices -> (P, C)."""
    centres = [(2.0 * voxels[:, axis].to(scale.dtype) + 1.0) / size[axis] - 1.0 for axis in range(3)]
    grid = torch.stack(centres[::-1], dim=-1).view(1, 1, 1, -1, 3)  # grid_sample wants (x, y, z) = (w, h, d)
    values = F.grid_sample(scale, grid.to(scale.device), mode="bilinear", padding_mode="border", align_corners=False)
    return values.view(scale.shape[1], -1).t()


@dataclass
class VoxelFeatures:
    """Frozen features at sampled voxels of the training patches, and their labels.

    Attributes:
        scales: one tensor per scale, (P, C_s) float16 on the CPU.
        targets: (P,) int64 class indices.
    """

    scales: List[torch.Tensor]
    targets: torch.Tensor

    def __len__(self) -> int:
        return int(self.targets.shape[0])

    @staticmethod
    def concatenate(parts: Sequence["VoxelFeatures"]) -> "VoxelFeatures":
        return VoxelFeatures([torch.cat([p.scales[i] for p in parts]) for i in range(len(parts[0].scales))],
                             torch.cat([p.targets for p in parts]))


class LinearProbe(nn.Module):
    """Per-channel standardisation and one 1x1x1 convolution per scale; logits upsampled to the patch and summed.

    Args:
        channels: C_s of every scale.
        num_classes: output classes K (nnU-Net's segmentation heads).

    ``forward(scales, size)``: feature maps [(B, C_s, ...)] -> logits (B, K, *size);
    ``classify(vectors)``: the same function at voxels, [(P, C_s)] -> logits (P, K).
    """

    def __init__(self, channels: Sequence[int], num_classes: int) -> None:
        super().__init__()
        self.convs = nn.ModuleList(nn.Conv3d(c, num_classes, 1, bias=i == 0) for i, c in enumerate(channels))
        for i, c in enumerate(channels):
            self.register_buffer(f"mean{i}", torch.zeros(c))
            self.register_buffer(f"std{i}", torch.ones(c))
        for conv in self.convs:  # a deterministic start: every class equally likely everywhere
            nn.init.zeros_(conv.weight)
            if conv.bias is not None:
                nn.init.zeros_(conv.bias)

    def _statistics(self, i: int) -> Tuple[torch.Tensor, torch.Tensor]:
        return getattr(self, f"mean{i}"), getattr(self, f"std{i}")

    @torch.no_grad()
    def fit_statistics(self, scales: Sequence[torch.Tensor]) -> None:
        """Per-channel mean and standard deviation of the training features, [(P, C_s)]."""
        for i, values in enumerate(scales):
            mean, std = self._statistics(i)
            values = values.float()  # float32 sums are pairwise in torch: ample for a standardisation
            mean.copy_(values.mean(dim=0))
            std.copy_(values.std(dim=0).clamp_min(MIN_STD))

    @torch.no_grad()
    def set_weights(self, weight: torch.Tensor, bias: torch.Tensor) -> None:
        """Weights over the standardised channels of all scales, (K, sum C_s), and the bias (K,)."""
        for conv, part in zip(self.convs, weight.split([c.in_channels for c in self.convs], dim=1)):
            conv.weight.copy_(part.view(conv.weight.shape))
        self.convs[0].bias.copy_(bias)

    def classify(self, vectors: Sequence[torch.Tensor]) -> torch.Tensor:
        logits: Optional[torch.Tensor] = None
        for i, (values, conv) in enumerate(zip(vectors, self.convs)):
            mean, std = self._statistics(i)
            out = F.linear((values.float() - mean) / std, conv.weight.flatten(1), conv.bias)
            logits = out if logits is None else logits + out
        return logits

    def forward(self, scales: Sequence[torch.Tensor], size: Sequence[int]) -> torch.Tensor:
        logits: Optional[torch.Tensor] = None
        for i, (values, conv) in enumerate(zip(scales, self.convs)):
            mean, std = self._statistics(i)
            out = conv((values.float() - mean.view(1, -1, 1, 1, 1)) / std.view(1, -1, 1, 1, 1))
            if tuple(out.shape[2:]) != tuple(size):
                out = F.interpolate(out, size=tuple(size), mode="trilinear", align_corners=False)
            logits = out if logits is None else logits + out
        return logits


@dataclass(frozen=True)
class ProbeRecipe:
    """How a probe is trained (serialised into ``probe.json``).

    Attributes:
        scales: the feature set, a key of :data:`nnunet_smit.probe.features.SCALE_SETS`.
        patches_per_case: nnU-Net patches sampled from every labelled case (a third centred on foreground, as
            nnU-Net's loader does); their features are computed once per encoder.
        voxels_per_patch: labelled voxels drawn uniformly from each patch to train on.
        iterations: optimiser steps.
        batch_voxels: voxels per step.
        learning_rate: AdamW's peak, decayed to zero along a cosine.
        weight_decay: AdamW's.
        patch_size: the patch (nnU-Net's axes); None: the plans' patch fitted as ``nnUNetTrainerSMIT`` fits it.
        tile_step_size: nnU-Net's sliding-window step on the test cases (0.5 as nnU-Net's prediction).
    """

    scales: str = "all"
    patches_per_case: int = 8
    voxels_per_patch: int = 4096
    iterations: int = 1000
    batch_voxels: int = 4096
    learning_rate: float = 0.1
    weight_decay: float = 1e-4
    patch_size: Optional[Tuple[int, int, int]] = None
    tile_step_size: float = 0.5


def train_probe(voxels: VoxelFeatures, num_classes: int, recipe: ProbeRecipe, seed: int,
                device: torch.device) -> LinearProbe:
    """Train a :class:`LinearProbe` with cross-entropy on voxel features (minibatches drawn by ``seed``).

    The standardised features of all scales are held as one (P, sum C_s) float32 matrix on ``device`` while training
    (P = labelled cases x patches x voxels per patch), and one weight matrix over all channels is learnt.
    """
    probe = LinearProbe([s.shape[1] for s in voxels.scales], num_classes)
    probe.fit_statistics(voxels.scales)
    matrix = torch.cat([(s.float() - probe._statistics(i)[0].float()) / probe._statistics(i)[1].float()
                        for i, s in enumerate(voxels.scales)], dim=1).to(device)
    targets = voxels.targets.to(device)
    weight = torch.zeros(num_classes, matrix.shape[1], device=device, requires_grad=True)
    bias = torch.zeros(num_classes, device=device, requires_grad=True)
    optimiser = torch.optim.AdamW([weight, bias], lr=recipe.learning_rate, weight_decay=recipe.weight_decay)
    generator = torch.Generator().manual_seed(seed)
    for step in range(recipe.iterations):
        for group in optimiser.param_groups:  # cosine decay to zero: the last steps settle instead of jittering
            group["lr"] = recipe.learning_rate * 0.5 * (1.0 + math.cos(math.pi * step / recipe.iterations))
        chosen = torch.randint(len(voxels), (min(recipe.batch_voxels, len(voxels)),), generator=generator).to(device)
        loss = F.cross_entropy(F.linear(matrix.index_select(0, chosen), weight, bias), targets.index_select(0, chosen))
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()
    probe.set_weights(weight.detach(), bias.detach())
    return probe.to(device).eval()
