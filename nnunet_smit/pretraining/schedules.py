"""Schedules of SMIT pretraining, all functions of the global optimisation step.

Learning rate (linear warm-up then cosine), weight decay (cosine), EMA momentum of the teacher (cosine towards 1)
and teacher temperature (linear warm-up then constant). Indexing by the global step (not the step within an epoch)
is what lets the momentum anneal and a resumed run follow the same curve.
"""
from __future__ import annotations

import math
from dataclasses import dataclass


def cosine(step: int, total_steps: int, start: float, end: float) -> float:
    """Half-cosine from ``start`` at step 0 to ``end`` at ``total_steps`` (clamped beyond)."""
    if total_steps <= 0:
        return end
    progress = min(max(step / total_steps, 0.0), 1.0)
    return end + 0.5 * (start - end) * (1.0 + math.cos(math.pi * progress))


def warmup_cosine(
    step: int, total_steps: int, warmup_steps: int, peak: float, end: float, warmup_start: float = 0.0
) -> float:
    """Linear warm-up from ``warmup_start`` to ``peak`` over ``warmup_steps``, then cosine to ``end`` at the end."""
    if warmup_steps > 0 and step < warmup_steps:
        return warmup_start + (peak - warmup_start) * step / warmup_steps
    return cosine(step - warmup_steps, total_steps - warmup_steps, peak, end)


def linear_warmup(step: int, warmup_steps: int, start: float, end: float) -> float:
    """Linear from ``start`` to ``end`` over ``warmup_steps``, then constant ``end``."""
    if warmup_steps <= 0 or step >= warmup_steps:
        return end
    return start + (end - start) * step / warmup_steps


@dataclass
class PretrainSchedules:
    """All per-step values of a run.

    Attributes:
        total_steps: optimisation steps of the full run (epochs x steps per epoch).
        steps_per_epoch: optimisation steps per epoch.
        peak_lr: learning rate after warm-up.
        min_lr: final learning rate.
        warmup_epochs: epochs of linear learning-rate warm-up.
        weight_decay: weight decay at step 0.
        weight_decay_end: weight decay at the end (equal to ``weight_decay`` for a constant one).
        momentum_start: EMA momentum of the teacher at step 0 (0.996), annealed to 1.
        teacher_temp_start: teacher temperature at step 0 (0.04).
        teacher_temp_end: teacher temperature after its warm-up (0.04 in PretrainConfig; the authors use 0.07).
        teacher_temp_warmup_epochs: epochs of teacher temperature warm-up (30).
    """

    total_steps: int
    steps_per_epoch: int
    peak_lr: float
    min_lr: float
    warmup_epochs: float
    weight_decay: float
    weight_decay_end: float
    momentum_start: float
    teacher_temp_start: float
    teacher_temp_end: float
    teacher_temp_warmup_epochs: float

    def _epochs_to_steps(self, epochs: float) -> int:
        return int(round(epochs * self.steps_per_epoch))

    def lr(self, step: int) -> float:
        return warmup_cosine(step, self.total_steps, self._epochs_to_steps(self.warmup_epochs), self.peak_lr, self.min_lr)

    def weight_decay_at(self, step: int) -> float:
        return cosine(step, self.total_steps, self.weight_decay, self.weight_decay_end)

    def momentum(self, step: int) -> float:
        return cosine(step, self.total_steps, self.momentum_start, 1.0)

    def teacher_temp(self, step: int) -> float:
        return linear_warmup(
            step, self._epochs_to_steps(self.teacher_temp_warmup_epochs), self.teacher_temp_start, self.teacher_temp_end
        )
