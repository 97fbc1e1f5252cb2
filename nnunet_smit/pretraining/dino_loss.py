"""DINO global-token self-distillation loss with a centred, sharpened teacher.

The loss owns its center (a buffer, so it travels with ``state_dict`` into ``checkpoint_latest``) and updates it
with an exponential moving average of the teacher's logits, averaged over all processes under data parallelism.

Collapse to uniform, and what keeps it away. A freshly initialised encoder gives nearly the same global token for
every view (mean cosine 0.97 across scans, also for ``smit_small``: the flat regions of CT dominate the pooled
tokens), so the teacher's logits differ between scans by only ~0.3 of the teacher temperature. Once the center has
absorbed the common output (about 20 steps at momentum 0.9) the centred, sharpened teacher is nearly uniform, its
targets carry no information, and DINO, iBOT and reconstruction together then drive every scan to the *same*
embedding (student global-token cosine 0.9999 after 24 steps of the tiny test run). No error was found in
centering, temperatures, EMA, heads or last-layer freezing; temperature 0.02, momentum 0.99, 5x the learning rate,
flips and jitter, 30% masking, no reconstruction and Sinkhorn-Knopp centering all collapse the same way.

The remedy is DINOv2's KoLeo regulariser (:mod:`nnunet_smit.pretraining.koleo_loss`, ``weight_koleo`` 0.1 by
default) on the DINO head's L2-normalised bottleneck, the vector the prototypes are compared with: spread over the
sphere, different scans meet the prototypes at different angles and the teacher becomes input-dependent. Measured:

* tiny preset, 4 phantoms, 24 steps of the short-run test settings (2 scans per step, momentum 0.98): per-prototype
  spread of the teacher over 8 fresh views 1.16/K with KoLeo against 0.07/K without; teacher entropy 1.20 against
  4.34 (log K = 4.85). KoLeo on the backbone's global token instead (DINOv2's place) reached about 0.55/K.
* ``smit_small``, 16 phantoms, 96^3, batch 6, the authors' schedule, 300 steps on one H200: the spread (x K) goes
  0.17 -> 0.16 -> 0.26 -> 0.28 (steps 1, 80, 160, 300) with KoLeo on the embedding, but 0.17 -> 0.05 -> 0.03 -> 0.02
  without KoLeo (and 0.17 -> 0.04 with KoLeo on the backbone token). The teacher is still close to uniform after these
  300 steps (entropy 0.99 log K, DINO loss at log K): the trend is reversed, a full run has to show the rest.
* The teacher temperature matters as much: with the full-size heads (K = 8192) and the authors' rise from 0.04 to
  0.07, the teacher goes back to uniform once 0.07 is reached, KoLeo or not (tiny encoder, CPU: spread x K 0.46 at
  step 240, 0.07 at step 520, DINO and iBOT at log K), while at a constant 0.04, DINO's default and ours, both losses
  leave log K (DINO 8.23, iBOT 6.52 against log K = 9.01 at step 400; spread 0.85/K).

Sinkhorn-Knopp centering (``centering="sinkhorn_knopp"``, the DINOv2/SwAV normalisation, 3 iterations over the
global batch) is available; alone it does not prevent the collapse (its targets are uniform from the first step
when the views' logits differ by less than the temperature), so the running-mean center stays the default.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F


CENTERING_MODES = ("sinkhorn_knopp", "center")


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum ``tensor`` over all processes in place (no-op without an initialised process group)."""
    if _distributed():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


@torch.no_grad()
def sinkhorn_knopp(teacher_logits: torch.Tensor, teacher_temp: float, n_iterations: int = 3) -> torch.Tensor:
    """Sinkhorn-Knopp centering: (N, K) teacher logits -> (N, K) per-sample probabilities (fp32).

    ``Q = exp(logits / teacher_temp)`` is read as a K x N_total transport plan over the samples of *all*
    processes (N_total = sum of N over ranks, so ranks may hold different N, as with masked tokens) and
    normalised ``n_iterations`` times alternately: every prototype gets mass 1/K, then every sample mass
    1/N_total. The returned rows (one per local sample) sum to 1. Every sum is all-reduced under data parallelism,
    so the result equals the single-process computation on the concatenated batch; every process must call it, also
    with N = 0. A constant added to all logits, or to one prototype's logits, does not change the result (a per-sample
    constant only once converged); each prototype's logits are shifted by their maximum before ``exp`` so that
    nothing overflows.
    """
    logits = teacher_logits.float()
    # A per-prototype shift cancels in the first (prototype) normalisation; shifting by each prototype's maximum
    # over all samples of all processes keeps exp() finite and every prototype's largest entry at 1.
    shift = logits.new_full((1, logits.shape[1]), float("-inf"))
    if logits.shape[0]:
        shift = logits.max(dim=0, keepdim=True).values
    if _distributed():
        dist.all_reduce(shift, op=dist.ReduceOp.MAX)
    if not bool(torch.isfinite(shift).all()):  # no sample on any process
        return torch.zeros_like(logits)
    q = torch.exp((logits - shift) / teacher_temp).t()  # (K, N)
    num_prototypes = q.shape[0]
    num_samples = all_reduce_sum(q.new_full((1,), float(q.shape[1])))
    tiny = torch.finfo(q.dtype).tiny
    q /= all_reduce_sum(q.sum().reshape(1)).clamp_min(tiny)
    for _ in range(n_iterations):
        q /= all_reduce_sum(q.sum(dim=1, keepdim=True)).clamp_min(tiny)  # prototypes: equal mass ...
        q /= num_prototypes  # ... of 1/K each
        q /= q.sum(dim=0, keepdim=True).clamp_min(tiny)  # samples: equal mass ...
        q /= num_samples  # ... of 1/N_total each
    q *= num_samples  # per-sample distributions
    return q.t()


def check_centering(centering: str) -> str:
    if centering not in CENTERING_MODES:
        raise ValueError(f"centering must be one of {', '.join(CENTERING_MODES)}, got {centering!r}.")
    return centering


def all_reduce_mean(tensor: torch.Tensor) -> torch.Tensor:
    """Average ``tensor`` over all processes in place (no-op without an initialised process group)."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        tensor /= dist.get_world_size()
    return tensor


class CenteredTeacherLoss(nn.Module):
    """What the DINO and iBOT losses share: the teacher's centring and sharpening, and the center buffer.

    Args:
        out_dim: number of prototypes K.
        student_temp: softmax temperature of the student (0.1).
        center_momentum: EMA momentum of the teacher center (0.9).
        centering: ``"center"`` (running-mean center, default) or ``"sinkhorn_knopp"`` (over the global batch, or
            all masked tokens of all processes); the center buffer is updated in both modes.
        sinkhorn_iterations: Sinkhorn-Knopp iterations (3).
    """

    def __init__(
        self,
        out_dim: int,
        student_temp: float = 0.1,
        center_momentum: float = 0.9,
        centering: str = "center",
        sinkhorn_iterations: int = 3,
    ) -> None:
        super().__init__()
        self.student_temp = float(student_temp)
        self.center_momentum = float(center_momentum)
        self.centering = check_centering(centering)
        self.sinkhorn_iterations = int(sinkhorn_iterations)
        self.register_buffer("center", torch.zeros(1, out_dim))

    @torch.no_grad()
    def teacher_probs(self, teacher_logits: torch.Tensor, teacher_temp: float) -> torch.Tensor:
        """(N, K) teacher logits -> (N, K) teacher probabilities with this loss's centering.

        Under data parallelism every process must call this (also with N = 0): Sinkhorn-Knopp all-reduces its sums
        and the sample count.
        """
        if self.centering == "sinkhorn_knopp":
            return sinkhorn_knopp(teacher_logits, teacher_temp, self.sinkhorn_iterations)
        return self.softmax_center_teacher(teacher_logits, teacher_temp)

    @torch.no_grad()
    def softmax_center_teacher(self, teacher_logits: torch.Tensor, teacher_temp: float) -> torch.Tensor:
        """(N, K) teacher logits -> (N, K) centred, sharpened probabilities (fp32)."""
        return F.softmax((teacher_logits.float() - self.center) / teacher_temp, dim=-1)

    @torch.no_grad()
    def update_center(self, teacher_logits: torch.Tensor) -> None:
        """EMA update of the center from this step's (N, K) teacher logits, the mean over all processes' rows.

        Every process contributes its sum and row count, so processes with different N (masked iBOT tokens) weigh
        by their rows.
        """
        rows = teacher_logits.new_full((1,), float(teacher_logits.shape[0]), dtype=torch.float32)  # no host copy
        stats = torch.cat([teacher_logits.float().sum(dim=0), rows])
        all_reduce_mean(stats)
        batch_center = (stats[:-1] / stats[-1].clamp_min(1e-12))[None]
        self.center.mul_(self.center_momentum).add_(batch_center, alpha=1.0 - self.center_momentum)


class DINOLoss(CenteredTeacherLoss):
    """Cross-view cross-entropy between teacher and student global-token distributions.

    For views a and b: ``mean(CE(teacher[a], student[b]), CE(teacher[b], student[a]))``, i.e. every teacher view
    against every *other* student view. Arguments as :class:`CenteredTeacherLoss`.
    """

    def forward(self, student_logits: Sequence[torch.Tensor], teacher_probs: Sequence[torch.Tensor]) -> torch.Tensor:
        """Cross-view loss.

        Args:
            student_logits: one (B, K) tensor per view.
            teacher_probs: one (B, K) tensor per view (from :meth:`teacher_probs`).

        Returns:
            scalar loss averaged over batch and view pairs.
        """
        total = student_logits[0].new_zeros((), dtype=torch.float32)
        pairs = 0
        for t_index, t in enumerate(teacher_probs):
            for s_index, s in enumerate(student_logits):
                if s_index == t_index:
                    continue
                log_p = F.log_softmax(s.float() / self.student_temp, dim=-1)
                total = total - (t * log_p).sum(dim=-1).mean()
                pairs += 1
        return total / max(pairs, 1)
