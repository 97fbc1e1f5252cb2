"""Teacher centering shared by the DINO and iBOT losses.

The teacher's (N, K) logits over K prototypes become (N, K) target probabilities in one of two modes
(:data:`CENTERING_MODES`):

* ``"center"`` (default): subtract the center, a (1, K) running mean of the teacher's logits (EMA, momentum 0.9,
  averaged over all processes), and sharpen with a softmax at the teacher temperature. Centering keeps one
  prototype from taking all the mass; sharpening keeps the targets from being uniform.
* ``"sinkhorn_knopp"``: normalise ``exp(logits / teacher_temp)`` over the global batch so that every prototype gets
  the same share of the mass (DINOv2, SwAV).

The center is a buffer named ``center`` of :class:`CenteredTeacherLoss`, so it travels with ``state_dict`` into
``checkpoint_latest``; it is updated in both modes. Why the teacher can still become uniform, and what prevents
it: ``docs/pretraining.md``, "Teacher collapse and KoLeo".
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from nnunet_smit.errors import SMITError

CENTERING_MODES = ("sinkhorn_knopp", "center")


def check_centering(centering: str) -> str:
    """Return ``centering`` if it is one of :data:`CENTERING_MODES`, else raise :class:`SMITError`."""
    if centering not in CENTERING_MODES:
        raise SMITError(f"centering must be one of {', '.join(CENTERING_MODES)}, got {centering!r}.")
    return centering


def _multi_process() -> bool:
    """Whether a process group with more than one process is initialised."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum ``tensor`` over all processes in place (no-op without an initialised process group)."""
    if _multi_process():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def all_reduce_mean(tensor: torch.Tensor) -> torch.Tensor:
    """Average ``tensor`` over all processes in place (no-op without an initialised process group)."""
    if _multi_process():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        tensor /= dist.get_world_size()
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
    if _multi_process():
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


class CenteredTeacherLoss(nn.Module):
    """What the DINO and iBOT losses share: the teacher's centring and sharpening, and the center buffer.

    Args:
        out_dim: number of prototypes K.
        student_temp: softmax temperature of the student (0.1).
        center_momentum: EMA momentum of the teacher center (0.9).
        centering: ``"center"`` (running-mean center, default) or ``"sinkhorn_knopp"`` (over the global batch, or
            all masked tokens of all processes); the center buffer is updated in both modes.
        sinkhorn_iterations: Sinkhorn-Knopp iterations (3).

    Raises:
        SMITError: ``centering`` is not one of :data:`CENTERING_MODES`.
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
