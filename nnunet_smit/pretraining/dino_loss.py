"""DINO global-token self-distillation loss.

The student's and the teacher's DINO heads map each view's global token to logits over K prototypes. The teacher's
logits become target probabilities by the centering of :class:`~nnunet_smit.pretraining.centering.CenteredTeacherLoss`
(running-mean center and a sharpening softmax, or Sinkhorn-Knopp); the loss is the cross-entropy of every teacher
view against every *other* student view, the student's logits softened by the student temperature. The center is a
(1, K) buffer named ``center``, so it travels with ``state_dict`` into ``checkpoint_latest``.

With DINO, iBOT and reconstruction alone a fresh encoder's teacher becomes uniform, the same for every scan; the
KoLeo term (:mod:`nnunet_smit.pretraining.koleo_loss`) on the DINO head's embedding keeps it input-dependent.
Measurements: ``docs/pretraining.md``, "Teacher collapse and KoLeo".
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

from nnunet_smit.pretraining.centering import CenteredTeacherLoss


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
