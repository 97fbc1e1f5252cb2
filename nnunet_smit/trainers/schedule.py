"""Learning-rate schedule of the SMIT fine-tuning recipe: linear warm-up, then cosine or polynomial decay.

nnU-Net steps its scheduler once per epoch with an explicit epoch and does not checkpoint it, so the rate is a
pure function of the epoch (``--c`` resumes on the same curve). Each optimizer parameter group carries an
``lr_scale`` (layer-wise decay, see :mod:`nnunet_smit.trainers.param_groups`) that multiplies the rate.
"""
from __future__ import annotations

import math
from typing import List, Optional

import torch

DECAYS = ("cosine", "poly")


def learning_rate_at(
    epoch: int,
    base_lr: float,
    num_epochs: int,
    warmup_epochs: int,
    decay: str = "cosine",
    final_lr_fraction: float = 0.0,
    poly_exponent: float = 0.9,
) -> float:
    """Learning rate of epoch ``epoch`` (0-based) out of ``num_epochs``.

    Warm-up: ``base_lr * (epoch + 1) / (warmup_epochs + 1)`` for the first ``warmup_epochs`` epochs (never 0, and
    the first decay epoch is the first at ``base_lr``). Then, with ``t`` going from 0 at the first decay epoch towards 1
    (``t = 1`` would be the epoch after the last), ``cosine`` falls from ``base_lr`` towards
    ``final_lr_fraction * base_lr`` and ``poly`` is nnU-Net's ``base_lr * (1 - t) ** 0.9``, floored at that rate. Warm-up longer than the run is cut to ``num_epochs - 1`` epochs.
    """
    if decay not in DECAYS:
        raise ValueError(f"decay must be one of {DECAYS}, got {decay!r}")
    if num_epochs < 1:
        raise ValueError(f"num_epochs must be at least 1, got {num_epochs}")
    epoch = min(max(int(epoch), 0), num_epochs - 1)
    warmup_epochs = min(max(int(warmup_epochs), 0), num_epochs - 1)
    final_lr = base_lr * final_lr_fraction
    if epoch < warmup_epochs:
        return base_lr * (epoch + 1) / (warmup_epochs + 1)
    decay_epochs = num_epochs - warmup_epochs
    progress = (epoch - warmup_epochs) / decay_epochs  # 0 at the first decay epoch, below 1 at the last
    if decay == "cosine":
        return final_lr + (base_lr - final_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))
    return max(final_lr, base_lr * (1.0 - progress) ** poly_exponent)


def hold_factor(epoch: int, hold_epochs: int) -> float:
    """The share of the schedule's rate that a held parameter group gets at ``epoch``: 0 for the first
    ``hold_epochs`` epochs, then a linear ramp over as many epochs (``(epoch - hold + 1) / (hold + 1)``, never 0),
    then 1. ``hold_epochs`` 0 is 1 throughout. The decoder-first warm-up holds the pretrained parts this way."""
    hold_epochs = max(int(hold_epochs), 0)
    epoch = max(int(epoch), 0)
    if hold_epochs == 0 or epoch >= 2 * hold_epochs:
        return 1.0
    if epoch < hold_epochs:
        return 0.0
    return (epoch - hold_epochs + 1) / (hold_epochs + 1)


class EpochLRScheduler:
    """Sets every group's rate to ``learning_rate_at(epoch) * group['lr_scale']`` on ``step(epoch)``, times
    :func:`hold_factor` for a group with ``hold_epochs`` (kept in the optimizer's state, so ``--c`` restores it).

    Holds no state beyond its arguments, so nothing needs checkpointing.
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        base_lr: float,
        num_epochs: int,
        warmup_epochs: int,
        decay: str = "cosine",
        final_lr_fraction: float = 0.0,
    ) -> None:
        self.optimizer = optimizer
        self.base_lr = base_lr
        self.num_epochs = num_epochs
        self.warmup_epochs = warmup_epochs
        self.decay = decay
        self.final_lr_fraction = final_lr_fraction
        self._next_epoch = 0
        self._last_lr: List[float] = []
        self.step(0)

    def lr_at(self, epoch: int) -> float:
        return learning_rate_at(
            epoch, self.base_lr, self.num_epochs, self.warmup_epochs, self.decay, self.final_lr_fraction
        )

    def step(self, epoch: Optional[int] = None) -> None:
        if epoch is None:
            epoch = self._next_epoch
        self._next_epoch = epoch + 1
        lr = self.lr_at(epoch)
        for group in self.optimizer.param_groups:
            group["lr"] = lr * group.get("lr_scale", 1.0) * hold_factor(epoch, group.get("hold_epochs", 0))
        self._last_lr = [group["lr"] for group in self.optimizer.param_groups]

    def get_last_lr(self) -> List[float]:
        return list(self._last_lr)

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state_dict: dict) -> None:
        pass
