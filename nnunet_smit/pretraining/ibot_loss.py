"""iBOT masked patch-token self-distillation loss.

On every masked token of a view, the student (which saw the mask token there) predicts the teacher's distribution
of the same token (the teacher saw the whole view). The teacher is centred by a running-mean center (default) or
by Sinkhorn-Knopp over all masked tokens of all processes; the center buffer is updated in both modes, like
DINO's, from the masked teacher tokens and all-reduced under data parallelism.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from nnunet_smit.pretraining.dino_loss import all_reduce_mean, check_centering, sinkhorn_knopp


class IBOTPatchLoss(nn.Module):
    """Cross-entropy between teacher and student patch-token distributions on masked tokens.

    Args:
        out_dim: number of prototypes K.
        student_temp: softmax temperature of the student (0.1).
        center_momentum: EMA momentum of the teacher center (0.9).
        centering: ``"center"`` (running-mean center, default) or ``"sinkhorn_knopp"`` (over all masked tokens
            of all processes); the center buffer is updated in both modes.
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
        """(M, K) teacher logits of masked tokens -> (M, K) probabilities with this loss's centering.

        Under data parallelism every process must call this (also with M = 0): Sinkhorn-Knopp all-reduces its sums
        and the token count.
        """
        if self.centering == "sinkhorn_knopp":
            return sinkhorn_knopp(teacher_logits, teacher_temp, self.sinkhorn_iterations)
        return self.softmax_center_teacher(teacher_logits, teacher_temp)

    @torch.no_grad()
    def softmax_center_teacher(self, teacher_logits: torch.Tensor, teacher_temp: float) -> torch.Tensor:
        """(M, K) teacher logits of masked tokens -> (M, K) centred, sharpened probabilities (fp32)."""
        return F.softmax((teacher_logits.float() - self.center) / teacher_temp, dim=-1)

    def forward(
        self, student_logits: torch.Tensor, teacher_probs: torch.Tensor, token_view_index: torch.Tensor, num_views: int
    ) -> torch.Tensor:
        """Loss averaged over the masked tokens of each view, then over views.

        Args:
            student_logits: (M, K) student logits of the M masked tokens of all views.
            teacher_probs: (M, K) teacher probabilities of the same tokens.
            token_view_index: (M,) long, the view (row of the batch) each token belongs to.
            num_views: number of views in the batch (2B).

        Returns:
            scalar loss; views without masked tokens do not count.
        """
        per_token = -(teacher_probs * F.log_softmax(student_logits.float() / self.student_temp, dim=-1)).sum(dim=-1)
        sums = per_token.new_zeros(num_views).index_add_(0, token_view_index, per_token)
        counts = per_token.new_zeros(num_views).index_add_(0, token_view_index, torch.ones_like(per_token))
        has_tokens = counts > 0
        if not bool(has_tokens.any()):
            return per_token.sum() * 0.0
        return (sums[has_tokens] / counts[has_tokens]).mean()

    @torch.no_grad()
    def update_center(self, teacher_logits: torch.Tensor) -> None:
        """EMA update of the center from (M, K) masked teacher logits, averaged over all processes.

        Every process contributes its token sum and count so that the center is the mean over all masked tokens.
        """
        stats = torch.cat([teacher_logits.float().sum(dim=0), teacher_logits.new_tensor([teacher_logits.shape[0]]).float()])
        all_reduce_mean(stats)
        count = stats[-1].clamp_min(1e-12)
        batch_center = (stats[:-1] / count)[None]
        self.center.mul_(self.center_momentum).add_(batch_center, alpha=1.0 - self.center_momentum)
