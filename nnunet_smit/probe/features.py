"""The frozen encoder's features, taken exactly where SMITNet's decoder takes them.

The encoder sits inside the SMITNet that :func:`nnunet_smit.trainers.plans_settings.build_network` builds from the
dataset's plans with the encoder's own ``smit`` settings (the fine-tuning network), so its input goes through the same
intensity mapping (HU window, nnU-Net's zero padding as the pretraining's pad) and the same axis order
(``transpose_forward`` undone) as in fine-tuning: :meth:`SMITNet.encoder_input`. It is frozen: eval mode, no gradients.

A scale is one tensor of the encoder's output at its own resolution, in the encoder's (z, y, x) order:
``stage0`` .. ``stage3`` are the four skip features (1/2 .. 1/16 of the patch), ``bottleneck`` the 1/32 bottleneck,
and ``input`` the mapped input voxel itself (the intensity baseline's only scale).
"""
from __future__ import annotations

import contextlib
import copy
import hashlib
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

import torch
from torch import nn

from nnunet_smit.architectures import SMITConfig, SMITNet, SwinEncoder
from nnunet_smit.checkpoint import load_encoder_weights
from nnunet_smit.conventions import PretrainPreprocessing
from nnunet_smit.errors import SMITError
from nnunet_smit.trainers import plans_settings
from nnunet_smit.trainers.patch_fitting import fit_patch_size

ENCODER_SCALES = ("stage0", "stage1", "stage2", "stage3", "bottleneck")
INPUT_SCALE = "input"
# Named sets of scales a probe reads; "all" is the default (docs/probe.md has the comparison).
SCALE_SETS: Dict[str, Tuple[str, ...]] = {
    "all": ENCODER_SCALES,
    "finest2": ("stage0", "stage1"),
    "deepest2": ("stage3", "bottleneck"),
    INPUT_SCALE: (INPUT_SCALE,),
}
# The random-init baseline's weights are drawn from this seed, so every probe compares with the same network.
RANDOM_ENCODER_SEED = 0


def probe_plans(plans: Dict[str, Any], configuration: str, config: SMITConfig, preprocessing: PretrainPreprocessing,
                patch_size: Optional[Sequence[int]] = None) -> Dict[str, Any]:
    """A copy of ``plans`` whose ``configuration`` holds the ``smit`` settings of an encoder (architecture,
    pretraining preprocessing, the dataset's CT statistics, ``transpose_forward``) and the patch fitted to the Swin
    size rule, as the SMIT trainer writes them (``patch_size`` None: nnU-Net's planned patch fitted as
    ``nnUNetTrainerSMIT`` fits it)."""
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    plans = copy.deepcopy(plans)
    resolved = PlansManager(plans).get_configuration(configuration).configuration
    fit = fit_patch_size(resolved["patch_size"], resolved["batch_size"], fixed_patch_size=patch_size)
    target = plans["configurations"][configuration]
    target[plans_settings.SMIT_PLANS_KEY] = plans_settings.settings_for_plans(plans, resolved, config, preprocessing,
                                                                             fit, None)
    target["patch_size"] = list(fit.patch_size)
    return plans


def random_encoder(config: SMITConfig, seed: int = RANDOM_ENCODER_SEED) -> SwinEncoder:
    """The baseline encoder: ``config``'s architecture with the initial weights drawn from ``seed``."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return SwinEncoder(config)


class FrozenFeatures(nn.Module):
    """Frozen multi-scale features of an nnU-Net patch, through the fine-tuning network's own input path.

    Args:
        network: the SMITNet built from the plans (:func:`build_frozen_network`); only its input path and encoder
            are used.
        scales: names from :data:`ENCODER_SCALES` and/or :data:`INPUT_SCALE`, in the order they are returned.

    ``forward(x)``: x (B, C_in, *patch) as nnU-Net's loader or sliding window gives it (CT-normalised, nnU-Net's axes)
    -> one tensor per scale, (B, C_s, *patch / 2**(s+1)) in (z, y, x) order. While :meth:`memoised` is active, the
    features of an input seen before are returned from memory (every probe head of one encoder reuses one pass over a
    test case's sliding windows).
    """

    def __init__(self, network: SMITNet, scales: Sequence[str]) -> None:
        super().__init__()
        unknown = [s for s in scales if s not in ENCODER_SCALES + (INPUT_SCALE,)]
        if unknown or not scales:
            raise SMITError(f"unknown feature scale(s) {unknown or list(scales)}; choose from "
                            f"{list(ENCODER_SCALES + (INPUT_SCALE,))}.")
        self.network = network.eval().requires_grad_(False)
        self.scales = tuple(scales)
        self._memo: Optional[Dict[str, List[torch.Tensor]]] = None

    @property
    def needs_encoder(self) -> bool:
        return any(s in ENCODER_SCALES for s in self.scales)

    def channels(self) -> List[int]:
        """Channels C_s of every scale."""
        config = self.network.config
        widths = dict(zip(ENCODER_SCALES, (*config.stage_dims, config.bottleneck_dim)))
        return [config.in_channels if s == INPUT_SCALE else widths[s] for s in self.scales]

    def train(self, mode: bool = True) -> "FrozenFeatures":
        """Always eval: the encoder is frozen whatever the module around it does."""
        return super().train(False)

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> List[torch.Tensor]:
        key = None
        if self._memo is not None:
            key = hashlib.sha1(x.detach().float().cpu().contiguous().numpy().tobytes()).hexdigest()
            if key in self._memo:
                return self._memo[key]
        encoder_input = self.network.encoder_input(x)
        named = {INPUT_SCALE: encoder_input}
        if self.needs_encoder:
            output = self.network.encoder(encoder_input)
            named.update(zip(ENCODER_SCALES, (*output.features, output.bottleneck)))
        features = [named[s] for s in self.scales]
        if key is not None:
            self._memo[key] = features
        return features

    @contextlib.contextmanager
    def memoised(self) -> Iterator[None]:
        """Keep the features of every input seen inside the block (one test case's windows, for several heads)."""
        self._memo = {}
        try:
            yield
        finally:
            self._memo = None


def build_frozen_network(plans: Dict[str, Any], configuration: str, num_input_channels: int,
                         encoder: SwinEncoder) -> SMITNet:
    """The fine-tuning SMITNet of ``plans`` (from :func:`probe_plans`) holding a frozen copy of ``encoder``'s weights;
    its decoder is never run."""
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    resolved = PlansManager(plans).get_configuration(configuration).configuration
    network = plans_settings.build_network(resolved, num_input_channels, 1, deep_supervision=False)
    load_encoder_weights(network.encoder, encoder.state_dict())  # as the trainer loads it (multi-channel input too)
    return network.eval().requires_grad_(False)
