"""KoLeo regulariser: spreads the student's global embeddings of different scans over the unit sphere.

The Kozachenko-Leonenko differential-entropy estimator (as used by DINOv2): for L2-normalised features ``x_i`` of
the n samples of one view slot, ``-mean_i log(min_{j != i} ||x_i - x_j|| + eps)``. Minimising it pushes every
sample away from its nearest neighbour. Applied to the DINO head's bottleneck embedding, it keeps the teacher's
output input-dependent where DINO, iBOT and reconstruction alone let it become the same for every scan
(measurements: ``docs/pretraining.md``, "Teacher collapse and KoLeo").
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def koleo_loss(features: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """KoLeo loss of (n, d) features; 0 (with a gradient path) for fewer than two samples.

    Args:
        features: one row per scan; rows of the same scan (its other view) must not be passed together.
        eps: keeps the logarithm finite for identical rows.
    """
    if features.shape[0] < 2:
        return features.sum() * 0.0
    x = F.normalize(features.float(), dim=-1, p=2, eps=eps)
    distances = torch.cdist(x, x, p=2)
    # A sample is not its own neighbour.
    distances = distances + torch.diag(torch.full((x.shape[0],), float("inf"), device=x.device))
    nearest = distances.min(dim=1).values
    return -torch.log(nearest + eps).mean()
