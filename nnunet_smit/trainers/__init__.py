"""nnU-Net v2 trainers that fine-tune a SMIT encoder (found by nnU-Net through the installed start-up hook)."""
from nnunet_smit.trainers.nnUNetTrainerSMIT import (
    nnUNetTrainerSMIT,
    nnUNetTrainerSMITFrozenEncoder,
    nnUNetTrainerSMITScratch,
)
from nnunet_smit.trainers.variants import (
    nnUNetTrainerSMIT_64,
    nnUNetTrainerSMIT_96,
    nnUNetTrainerSMIT_128,
    nnUNetTrainerSMIT_tiny,
    nnUNetTrainerSMITLight,
    nnUNetTrainerSMITLight_64,
    nnUNetTrainerSMITScratch_64,
    nnUNetTrainerSMITScratch_96,
    nnUNetTrainerSMITScratch_128,
    nnUNetTrainerSMITScratch_tiny,
    nnUNetTrainerSMITLightScratch,
    nnUNetTrainerSMITLightScratch_64,
)

__all__ = [
    "nnUNetTrainerSMIT",
    "nnUNetTrainerSMITFrozenEncoder",
    "nnUNetTrainerSMITScratch",
    "nnUNetTrainerSMIT_64",
    "nnUNetTrainerSMIT_96",
    "nnUNetTrainerSMIT_128",
    "nnUNetTrainerSMIT_tiny",
    "nnUNetTrainerSMITScratch_64",
    "nnUNetTrainerSMITScratch_96",
    "nnUNetTrainerSMITScratch_128",
    "nnUNetTrainerSMITScratch_tiny",
    "nnUNetTrainerSMITLight",
    "nnUNetTrainerSMITLight_64",
    "nnUNetTrainerSMITLightScratch",
    "nnUNetTrainerSMITLightScratch_64",
]
