"""nnunet_smit: SMIT self-supervised Swin-3D pretraining and nnU-Net v2 fine-tuning."""

__version__ = "0.1.0"
