"""iBOT masked patch-token self-distillation loss.

On every masked token of a view, the student (which saw the mask token there) predicts the teacher's distribution
of the same token (the teacher saw the whole view): (M, K) student logits against (M, K) teacher probabilities of
the M masked tokens of all views, averaged per view, then over views. The teacher is centred as in
:mod:`nnunet_smit.pretraining.centering`: by a running-mean center (default) or by Sinkhorn-Knopp over all masked
tokens of all processes; the center buffer is updated in both modes, like DINO's, from the masked teacher tokens and
all-reduced under data parallelism.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from nnunet_smit.pretraining.centering import CenteredTeacherLoss


class IBOTPatchLoss(CenteredTeacherLoss):
    """Cross-entropy between teacher and student patch-token distributions on masked tokens.

    Arguments as :class:`~nnunet_smit.pretraining.centering.CenteredTeacherLoss`; with ``"sinkhorn_knopp"`` the
    teacher is normalised over all masked tokens of all processes.
    """

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
        # Mean over the views that have tokens, written without a data-dependent branch or selection (which would
        # make the host wait for the device); 0 with a gradient path when no view has any.
        has_tokens = (counts > 0).to(sums.dtype)
        per_view = sums / counts.clamp_min(1.0)
        return (per_view * has_tokens).sum() / has_tokens.sum().clamp_min(1.0)
