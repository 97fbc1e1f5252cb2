"""Trainer variants: each overrides one or two settings of nnUNetTrainerSMIT and says so in its name."""
from __future__ import annotations

import torch

from nnunet_smit.trainers.nnUNetTrainerSMIT import nnUNetTrainerSMIT, nnUNetTrainerSMITScratch


class nnUNetTrainerSMIT_64(nnUNetTrainerSMIT):
    """Fixed 64^3 patch, the smallest the Swin encoder takes: CPU-sized runs such as smit_demo's."""

    fixed_patch_size = (64, 64, 64)


class nnUNetTrainerSMIT_96(nnUNetTrainerSMIT):
    """Fixed 96^3 patch, as the authors fine-tune (batch size matched to the planned voxel budget)."""

    fixed_patch_size = (96, 96, 96)


class nnUNetTrainerSMIT_128(nnUNetTrainerSMIT):
    """Fixed 128^3 patch (batch size matched to the planned voxel budget)."""

    fixed_patch_size = (128, 128, 128)


class nnUNetTrainerSMITScratch_64(nnUNetTrainerSMITScratch):
    """Random-init baseline of nnUNetTrainerSMIT_64."""

    fixed_patch_size = (64, 64, 64)


class nnUNetTrainerSMITScratch_96(nnUNetTrainerSMITScratch):
    """Random-init baseline of nnUNetTrainerSMIT_96."""

    fixed_patch_size = (96, 96, 96)


class nnUNetTrainerSMITScratch_128(nnUNetTrainerSMITScratch):
    """Random-init baseline of nnUNetTrainerSMIT_128."""

    fixed_patch_size = (128, 128, 128)


class nnUNetTrainerSMITLight(nnUNetTrainerSMIT):
    """The light decoder (SMITLightDecoder: 16 channels at full resolution, 32 at 1/2, at most 320 at 1/16 and
    1/32, as nnU-Net's U-Net) on the pretrained encoder, with the encoder's gradient checkpointing, so a step
    takes less time and memory than nnU-Net's default U-Net (docs/performance.md). The plans' ``smit`` entry says
    ``"decoder": "light"`` for prediction."""

    decoder = "light"
    gradient_checkpointing = True


class nnUNetTrainerSMITLightScratch(nnUNetTrainerSMITScratch):
    """Random-init baseline of nnUNetTrainerSMITLight (named nnUNetTrainerSMIT<Variant>Scratch[_<size>], which
    smit_study derives for the scratch arm of nnUNetTrainerSMIT<Variant>[_<size>])."""

    decoder = "light"
    gradient_checkpointing = True


class nnUNetTrainerSMITLight_64(nnUNetTrainerSMITLight):
    """nnUNetTrainerSMITLight with a fixed 64^3 patch: CPU-sized studies."""

    fixed_patch_size = (64, 64, 64)


class nnUNetTrainerSMITLightScratch_64(nnUNetTrainerSMITLightScratch):
    """Random-init baseline of nnUNetTrainerSMITLight_64."""

    fixed_patch_size = (64, 64, 64)


class nnUNetTrainerSMITDecoderFirst(nnUNetTrainerSMIT):
    """Decoder-first warm-up: for the first 50 epochs the parts the checkpoint carried (the encoder, and the skip or
    decoder blocks of a ``--reconstruct_through`` checkpoint) are held at rate 0 while the parts at their
    initialisation (always the segmentation outputs) train; over the next 50 the pretrained parts ramp up to the
    recipe's rate (layer-wise decay kept). The same schedule as nnUNetTrainerSMIT otherwise; its scratch twin is
    nnUNetTrainerSMITScratch (a random network has nothing to hold)."""

    decoder_first_epochs = 50


class nnUNetTrainerSMITDecoderFirst_64(nnUNetTrainerSMITDecoderFirst):
    """nnUNetTrainerSMITDecoderFirst with a fixed 64^3 patch: CPU-sized studies."""

    fixed_patch_size = (64, 64, 64)


class nnUNetTrainerSMITDecoderFirstScratch(nnUNetTrainerSMITScratch):
    """The scratch twin smit_study derives for nnUNetTrainerSMITDecoderFirst: nnUNetTrainerSMITScratch itself (a
    random network has no pretrained part to hold)."""


class nnUNetTrainerSMITDecoderFirstScratch_64(nnUNetTrainerSMITDecoderFirstScratch):
    """Random-init baseline of nnUNetTrainerSMITDecoderFirst_64."""

    fixed_patch_size = (64, 64, 64)


class _TinyRun:
    """2 epochs of 2 iterations, 1 validation iteration, 1 warm-up epoch, no mirroring (so the final validation
    runs without 8-fold mirror averaging): CPU smoke runs and tests."""

    scratch_preset = "tiny"
    warmup_epochs = 1

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.num_epochs = 2
        self.num_iterations_per_epoch = 2
        self.num_val_iterations_per_epoch = 1

    def configure_rotation_dummyDA_mirroring_and_inital_patch_size(self):
        rotation, dummy_2d, initial_patch_size, _ = super().configure_rotation_dummyDA_mirroring_and_inital_patch_size()
        self.inference_allowed_mirroring_axes = None
        return rotation, dummy_2d, initial_patch_size, None


class nnUNetTrainerSMIT_tiny(_TinyRun, nnUNetTrainerSMIT):
    """nnUNetTrainerSMIT for 2 epochs x 2 iterations; still needs nnUNet_SMIT_weights (e.g. a tiny-preset checkpoint)."""


class nnUNetTrainerSMITScratch_tiny(_TinyRun, nnUNetTrainerSMITScratch):
    """Random-init tiny-preset encoder for 2 epochs x 2 iterations; needs no weights."""
