"""Re-exports the SMIT trainers for nnU-Net's lookup through ``nnUNet_extTrainer``.

nnU-Net imports every module of this folder as a top-level name, so this file holds only absolute imports;
the trainers live in :mod:`nnunet_smit.trainers`.
"""
from nnunet_smit.trainers import *  # noqa: F401,F403
from nnunet_smit.trainers import __all__  # noqa: F401
