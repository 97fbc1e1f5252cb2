"""The frozen encoder's features, taken exactly where SMITNet's decoder takes them.

The encoder sits inside the SMITNet that :func:`nnunet_smit.trainers.plans_settings.build_network` builds from the
dataset's plans with the encoder's own ``smit`` settings (the fine-tuning network), so its input goes through the same
intensity mapping (HU window, nnU-Net's zero padding as the pretraining's pad) and the same axis order
(``transpose_forward`` undone) as in fine-tuning: :meth:`SMITNet.encoder_input`. It is frozen: eval mode, no gradients.

A scale is one feature map at its own resolution, in the encoder's (z, y, x) order:

* the encoder's own: ``stage0`` .. ``stage3``, the four skip features (1/2 .. 1/16 of the patch), and ``bottleneck``,
  the 1/32 bottleneck (:data:`ENCODER_SCALES`);
* the outputs of SMITNet's conv blocks that a checkpoint of ``smit_pretrain --reconstruct_through skips`` carries:
  ``encoder1`` (on the input, full resolution), ``encoder2`` .. ``encoder4`` (on the 1/2 .. 1/8 skips), ``stage3``
  (which SMITNet's decoder takes without a block) and ``encoder10`` (on the bottleneck) (:data:`SKIP_SCALES`);
* the outputs of the decoder's up blocks that a ``--reconstruct_through decoder`` checkpoint carries: ``decoder1``
  (full resolution) .. ``decoder5`` (1/16) (:data:`DECODER_SCALES`);
* ``input``, the mapped input voxel itself (the intensity baseline's only scale).

A probe of a checkpoint reads the last blocks it carries (:func:`pretrained_scales`): what fine-tuning starts from,
the whole pretrained part, frozen.
"""
from __future__ import annotations

import contextlib
import copy
import hashlib
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

import torch
from torch import nn

from nnunet_smit.architectures import SMITConfig, SMITNet, SwinEncoder
from nnunet_smit.architectures.decoder import top_down
from nnunet_smit.checkpoint import DecoderParts, load_decoder_parts, load_encoder_weights
from nnunet_smit.conventions import PretrainPreprocessing
from nnunet_smit.errors import SMITError
from nnunet_smit.trainers import plans_settings
from nnunet_smit.trainers.patch_fitting import fit_patch_size

ENCODER_SCALES = ("stage0", "stage1", "stage2", "stage3", "bottleneck")
SKIP_SCALES = ("encoder1", "encoder2", "encoder3", "encoder4", "stage3", "encoder10")
DECODER_SCALES = ("decoder1", "decoder2", "decoder3", "decoder4", "decoder5")
INPUT_SCALE = "input"
KNOWN_SCALES = tuple(dict.fromkeys(ENCODER_SCALES + SKIP_SCALES + DECODER_SCALES + (INPUT_SCALE,)))
# Named sets of scales a probe reads; "all" is the default (docs/probe.md has the comparison).
SCALE_SETS: Dict[str, Tuple[str, ...]] = {
    "all": ENCODER_SCALES,
    "finest2": ("stage0", "stage1"),
    "deepest2": ("stage3", "bottleneck"),
    INPUT_SCALE: (INPUT_SCALE,),
}
# The random-init baseline's weights are drawn from this seed, so every probe compares with the same network.
RANDOM_ENCODER_SEED = 0


def pretrained_scales(scale_set: str, parts: Sequence[str] = ()) -> Tuple[str, ...]:
    """The scales a probe reads for the feature set ``scale_set`` of :data:`SCALE_SETS` from a checkpoint carrying
    the decoder ``parts`` beside its encoder: ``"all"`` is every output of the last pretrained blocks (the encoder's
    for an encoder alone, :data:`SKIP_SCALES` with ``skips``, :data:`DECODER_SCALES` with ``decoder``); the other
    sets name encoder scales and read them whatever the checkpoint carries."""
    if scale_set != "all":
        return SCALE_SETS[scale_set]
    if "decoder" in parts:
        return DECODER_SCALES
    if "skips" in parts:
        return SKIP_SCALES
    return ENCODER_SCALES


def probe_plans(plans: Dict[str, Any], configuration: str, config: SMITConfig, preprocessing: PretrainPreprocessing,
                patch_size: Optional[Sequence[int]] = None, decoder: Optional[Tuple[str, str]] = None
                ) -> Dict[str, Any]:
    """A copy of ``plans`` whose ``configuration`` holds the ``smit`` settings of an encoder (architecture,
    pretraining preprocessing, the dataset's CT statistics, ``transpose_forward``) and the patch fitted to the Swin
    size rule, as the SMIT trainer writes them (``patch_size`` None: nnU-Net's planned patch fitted as
    ``nnUNetTrainerSMIT`` fits it). ``decoder``: the network's decoder (kind, norm), those of the conv blocks a
    checkpoint carries (None: SMITNet's default)."""
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    plans = copy.deepcopy(plans)
    resolved = PlansManager(plans).get_configuration(configuration).configuration
    fit = fit_patch_size(resolved["patch_size"], resolved["batch_size"], fixed_patch_size=patch_size)
    target = plans["configurations"][configuration]
    network = {} if decoder is None else {"decoder": decoder[0], "decoder_norm": decoder[1]}
    target[plans_settings.SMIT_PLANS_KEY] = plans_settings.settings_for_plans(plans, resolved, config, preprocessing,
                                                                             fit, None, **network)
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
        network: the SMITNet built from the plans (:func:`build_frozen_network`); its input path, its encoder and,
            for the conv blocks' scales, its decoder blocks are used (never its segmentation outputs).
        scales: names from :data:`KNOWN_SCALES`, in the order they are returned (the conv blocks' scales read the
            network's decoder blocks, pretrained or not).

    ``forward(x)``: x (B, C_in, *patch) as nnU-Net's loader or sliding window gives it (CT-normalised, nnU-Net's axes)
    -> one tensor per scale, (B, C_s, *patch / 2**(s+1)) in (z, y, x) order. While :meth:`memoised` is active, the
    features of an input seen before are returned from memory (every probe head of one encoder reuses one pass over a
    test case's sliding windows).
    """

    def __init__(self, network: SMITNet, scales: Sequence[str]) -> None:
        super().__init__()
        unknown = [s for s in scales if s not in KNOWN_SCALES]
        if unknown or not scales:
            raise SMITError(f"unknown feature scale(s) {unknown or list(scales)}; choose from {list(KNOWN_SCALES)}.")
        self.network = network.eval().requires_grad_(False)
        self.scales = tuple(scales)
        self._memo: Optional[Dict[str, List[torch.Tensor]]] = None

    @property
    def needs_encoder(self) -> bool:
        return any(s != INPUT_SCALE for s in self.scales)

    def channels(self) -> List[int]:
        """Channels C_s of every scale."""
        config = self.network.config
        w0, w1, w2, w3, w4, w5 = self.network.decoder.widths
        widths = dict(zip(ENCODER_SCALES, (*config.stage_dims, config.bottleneck_dim)))
        widths.update(zip(SKIP_SCALES, (w0, w1, w2, w3, config.stage_dims[3], w5)))
        widths.update(zip(DECODER_SCALES, (w0, w1, w2, w3, w4)))
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
            blocks = self.network.decoder
            if any(s in DECODER_SCALES for s in self.scales):
                levels = top_down(blocks, blocks.encoder1(encoder_input), output.features, output.bottleneck)
                named.update(zip(DECODER_SCALES, levels))
            for scale in set(self.scales) & (set(SKIP_SCALES) - set(ENCODER_SCALES)):
                source = {"encoder1": encoder_input, "encoder2": output.features[0], "encoder3": output.features[1],
                          "encoder4": output.features[2], "encoder10": output.bottleneck}[scale]
                named[scale] = getattr(blocks, scale)(source)
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
                         encoder: SwinEncoder, decoder_parts: Optional[DecoderParts] = None,
                         seed: int = RANDOM_ENCODER_SEED) -> SMITNet:
    """The fine-tuning SMITNet of ``plans`` (from :func:`probe_plans`) holding a frozen copy of ``encoder``'s weights
    and of the ``decoder_parts`` blocks, loaded as the trainer loads them (multi-channel input too). The blocks no
    checkpoint carries are drawn from ``seed`` (the random baseline's conv blocks); the segmentation outputs are
    never run."""
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    resolved = PlansManager(plans).get_configuration(configuration).configuration
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        network = plans_settings.build_network(resolved, num_input_channels, 1, deep_supervision=False)
    load_encoder_weights(network.encoder, encoder.state_dict())
    if decoder_parts is not None:
        settings = plans_settings.settings_of(resolved)
        load_decoder_parts(network.decoder, decoder_parts, settings.get("decoder", plans_settings.DEFAULT_DECODER),
                           settings.get("decoder_norm", "instance"))
    return network.eval().requires_grad_(False)
