"""How the device part of a pretraining step runs: eager, compiled, data parallel, and every state that needs.

:class:`StepRunner` owns all of ``torch.compile``'s state in one place: what is compiled (the whole device part in
one process, the DDP-wrapped student under data parallelism), whether the first step has run eagerly yet, CUDA
graph step marks, and falling back to eager mode when compiling fails.
"""
from __future__ import annotations

from typing import Any, Callable, Dict, Optional

import torch
from torch.nn.parallel import DistributedDataParallel

from nnunet_smit.pretraining.model import LossOutput, SMITPretrainModel, StudentOutput

# torch.compile modes that capture CUDA graphs, whose outputs are overwritten at the next replay.
CUDA_GRAPH_MODES = ("reduce-overhead", "max-autotune")


class StepRunner:
    """Runs :meth:`SMITPretrainModel.losses_on_device` for each step, eagerly or compiled.

    Args:
        model: student, teacher and losses.
        student: what runs the student (its DDP wrapper under data parallelism); default ``model.student``.
    """

    def __init__(self, model: SMITPretrainModel, student: Optional[Callable[..., StudentOutput]] = None) -> None:
        self.model = model
        self.eager_student: Callable[..., StudentOutput] = student if student is not None else model.student
        self.student: Callable[..., StudentOutput] = self.eager_student
        self.compiled_losses: Optional[Callable[..., Dict[str, torch.Tensor]]] = None
        self.cuda_graphs = False
        # The first step runs eagerly: it fills the encoders' shift-mask caches, which a graph traced before would
        # have to be traced again for (a second compilation).
        self.first_step_done = False

    @property
    def compiled(self) -> bool:
        return self.compiled_losses is not None or self.student is not self.eager_student

    def compile(self, **compile_kwargs: Any) -> None:
        """Run through ``torch.compile`` from the second step on; ``compile_kwargs`` go to it (``mode``, ``backend``).

        One process: student, teacher and losses as one graph (the device part has no host synchronisation or
        data-dependent shape, so it traces whole). Under DDP the wrapped student is compiled (DDP's own graph
        splitting at its gradient buckets).
        """
        if isinstance(self.eager_student, DistributedDataParallel):
            self.student = torch.compile(self.eager_student, **compile_kwargs)
        else:
            self.compiled_losses = torch.compile(self.model.losses_on_device, **compile_kwargs)
            self.cuda_graphs = compile_kwargs.get("mode") in CUDA_GRAPH_MODES

    def disable_compile(self) -> None:
        """Eager mode from now on (after compiling failed)."""
        self.compiled_losses = None
        self.cuda_graphs = False
        self.student = self.eager_student

    def __call__(
        self, views: torch.Tensor, cube_masks: torch.Tensor, teacher_temp: float, update_centers: bool = True,
        with_preview: bool = False,
    ) -> LossOutput:
        """What :meth:`SMITPretrainModel.compute_losses` computes, through the compiled functions once allowed."""
        inputs = self.model.prepare_inputs(views, cube_masks, teacher_temp)
        eager = self.compiled_losses is None or not self.first_step_done
        student = self.student if self.first_step_done else self.eager_student
        # CUDA graphs reuse their output memory at the next replay: a new step begins here, and what outlives the
        # step (logged terms, teacher probabilities, the preview) is copied.
        graphs = not eager and self.cuda_graphs
        if graphs:
            torch.compiler.cudagraph_mark_step_begin()
        losses = self.model.losses_on_device if eager else self.compiled_losses
        outputs = losses(student, *inputs.device_arguments(update_centers))
        self.first_step_done = True
        if graphs:
            outputs = {k: v if k == "total" else v.clone() for k, v in outputs.items()}
        return self.model.loss_output(outputs, inputs, with_preview)
