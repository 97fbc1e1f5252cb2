"""Linear probes of frozen encoders on an nnU-Net dataset (``smit_probe``, and :func:`probe_encoder` in memory)."""
from nnunet_smit.probe.linear_probe import ProbeRecipe
from nnunet_smit.probe.probe import ONLINE_RECIPE, probe_encoder

__all__ = ["ONLINE_RECIPE", "ProbeRecipe", "probe_encoder"]
