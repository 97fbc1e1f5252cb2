"""``smit_study``: label efficiency of SMIT encoders against scratch and nnU-Net's default, through nnU-Net."""
