"""Which parameters take weight decay: the one rule of pretraining and fine-tuning.

Norm weights, biases (1-D tensors), the relative position tables and learned tokens must not shrink towards zero;
every matrix and kernel does. Pretraining's AdamW groups and fine-tuning's layer-wise groups both ask
:func:`uses_weight_decay` (and :meth:`SwinEncoder.no_weight_decay` names the encoder's exceptions, as timm's models
do).
"""
from __future__ import annotations

from typing import Iterable, List, Set, Tuple

from torch import nn

# Parameters named with one of these take no weight decay whatever their shape.
NO_WEIGHT_DECAY_NAMES = ("relative_position_bias_table", "mask_token", "absolute_pos_embed", "pos_embed")


def uses_weight_decay(name: str, parameter: nn.Parameter) -> bool:
    """No weight decay on norms, biases (1-D tensors), position tables and learned tokens; decay on the rest."""
    if parameter.ndim <= 1 or name.endswith(".bias"):
        return False
    return not any(part in name for part in NO_WEIGHT_DECAY_NAMES)


def no_weight_decay_names(named_parameters: Iterable[Tuple[str, nn.Parameter]]) -> Set[str]:
    """The names among ``named_parameters`` that take no weight decay."""
    return {name for name, parameter in named_parameters if not uses_weight_decay(name, parameter)}


def split_by_weight_decay(module: nn.Module) -> Tuple[List[nn.Parameter], List[nn.Parameter]]:
    """(decayed, not decayed) trainable parameters of ``module``, each in ``named_parameters`` order."""
    decay: List[nn.Parameter] = []
    no_decay: List[nn.Parameter] = []
    for name, parameter in module.named_parameters():
        if parameter.requires_grad:
            (decay if uses_weight_decay(name, parameter) else no_decay).append(parameter)
    return decay, no_decay
