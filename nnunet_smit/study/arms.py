"""One arm of a study trained and scored through nnU-Net's own trainer.

An arm is a trainer class plus, for SMIT arms, the encoder checkpoint handed to it through ``nnUNet_SMIT_weights``,
trained on one study fold of ``splits_final.json``. It runs in this process the way ``nnUNetv2_train`` runs a fold
(trainer from the preprocessed plans, ``run_training``, ``perform_actual_validation``), with the study's budget
set on the trainer and ``nnUNet_results`` pointed at the arm's own folder, so that two encoders fine-tuned by the
same trainer class never share a results folder. nnU-Net's final validation predicts the fold's ``val`` cases, the
held-out test set, and writes ``validation/summary.json``, from which the arm's Dice is read.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Iterator, Optional

import torch

from nnunet_smit.trainers.nnUNetTrainerSMIT import WEIGHTS_ENV, load_nnunet_checkpoint

# nnU-Net's ratio of validation to training iterations per epoch (50 to 250).
VAL_ITERATIONS_RATIO = 50 / 250


@dataclass(frozen=True)
class Arm:
    """A way of training: ``name`` labels it in tables; ``encoder`` is a file path, ``"scratch"`` or ``"nnunet"``.

    Attributes:
        name: short unique label (also the arm's folder name under OUT/arms).
        encoder: what ``study.json`` reports as the arm's encoder.
        trainer: nnU-Net trainer class name.
        weights: checkpoint given to the trainer through ``nnUNet_SMIT_weights`` (None: variable unset). Scratch arms
            get the first encoder here for its architecture; their trainer does not load its weights.
    """

    name: str
    encoder: str
    trainer: str
    weights: Optional[str] = None


@dataclass(frozen=True)
class Budget:
    """Training length of every arm; None keeps the trainer's own value (nnU-Net's 1000 x 250)."""

    epochs: Optional[int] = None
    iterations_per_epoch: Optional[int] = None
    disable_tta: bool = False


def _set_environment(values: Dict[str, Optional[str]]) -> None:
    """Set environment variables; None unsets one."""
    for key, value in values.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


@contextlib.contextmanager
def _environment(**values: Optional[str]) -> Iterator[None]:
    """Set (or, for None, unset) environment variables for the duration of the block."""
    previous = {key: os.environ.get(key) for key in values}
    try:
        _set_environment(values)
        yield
    finally:
        _set_environment(previous)


def apply_budget(trainer: Any, budget: Budget) -> None:
    """Set the study's budget on a constructed trainer, before ``initialize`` builds optimiser and scheduler.

    Validation iterations follow nnU-Net's 1:5 ratio to training iterations, and a SMIT trainer's warm-up keeps its
    share of the schedule (50 of 1000 epochs by default), so a shorter budget runs the same recipe compressed.
    """
    own_epochs = trainer.num_epochs
    if budget.epochs is not None:
        trainer.num_epochs = budget.epochs
        if hasattr(trainer, "warmup_epochs"):
            trainer.warmup_epochs = max(1, int(round(trainer.warmup_epochs * budget.epochs / own_epochs)))
    if budget.iterations_per_epoch is not None:
        trainer.num_iterations_per_epoch = budget.iterations_per_epoch
        trainer.num_val_iterations_per_epoch = max(1, int(round(budget.iterations_per_epoch * VAL_ITERATIONS_RATIO)))


def fold_folder(arm_results: Path, dataset_name: str, trainer: str, plans: str, configuration: str,
                fold: int) -> Path:
    """Where nnU-Net writes the fold when ``nnUNet_results`` is ``arm_results``."""
    return Path(arm_results) / dataset_name / f"{trainer}__{plans}__{configuration}" / f"fold_{fold}"


def read_dice(summary_file: Path, label_names: Dict[str, str]) -> Dict[str, Any]:
    """Mean foreground Dice and Dice per class from nnU-Net's ``validation/summary.json``.

    ``label_names`` maps the label value (as nnU-Net writes it in ``mean``) to its name. A class that is absent
    from both reference and prediction in every case has no Dice (NaN in nnU-Net) and is reported as None.
    """
    summary = json.loads(Path(summary_file).read_text(encoding="utf-8"))

    def number(value: Any) -> Optional[float]:
        return None if value is None or (isinstance(value, float) and math.isnan(value)) else float(value)

    per_class = {label_names.get(key, key): number(metrics.get("Dice")) for key, metrics in summary["mean"].items()}
    return {"dice": number(summary["foreground_mean"]["Dice"]), "dice_per_class": per_class}


def train_arm(trainer_class: type, plans: Dict[str, Any], dataset_json: Dict[str, Any], configuration: str,
              fold: int, arm: Arm, arm_results: Path, budget: Budget, device: torch.device) -> float:
    """Train one arm on one fold and run nnU-Net's final validation; returns the seconds it took.

    Resumes an interrupted arm from its ``checkpoint_latest.pth`` like ``nnUNetv2_train --c``.
    """
    start = time.time()
    with _environment(nnUNet_results=str(arm_results), **{WEIGHTS_ENV: arm.weights}):
        plans = json.loads(json.dumps(plans))  # the trainer edits its plans
        output = fold_folder(arm_results, plans["dataset_name"], arm.trainer, plans["plans_name"], configuration,
                             fold)
        latest = output / "checkpoint_latest.pth"
        plans["continue_training"] = latest.is_file()
        trainer = trainer_class(plans=plans, configuration=configuration, fold=fold, dataset_json=dataset_json,
                                device=device)
        apply_budget(trainer, budget)
        if latest.is_file():  # read weights-only, handed over as a dict (nnU-Net's own reader unpickles anything)
            trainer.load_checkpoint(load_nnunet_checkpoint(str(latest), trainer.device))
        trainer.run_training()
        if budget.disable_tta:
            trainer.inference_allowed_mirroring_axes = None
        trainer.perform_actual_validation(False)
    return time.time() - start
