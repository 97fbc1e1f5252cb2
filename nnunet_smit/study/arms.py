"""One arm of a study trained and scored through nnU-Net's own trainer.

An arm is a trainer class and its plans plus, for SMIT arms, the encoder checkpoint handed to it through
``nnUNet_SMIT_weights``, trained on one study fold of ``splits_final.json``. It runs in this process the way ``nnUNetv2_train`` runs a fold
(trainer from the preprocessed plans, ``run_training``, ``perform_actual_validation``), with the study's budget
set on the trainer and ``nnUNet_results`` pointed at the arm's own folder, so that two encoders fine-tuned by the
same trainer class never share a results folder. nnU-Net's final validation predicts the fold's ``val`` cases, the
held-out test set, and writes ``validation/summary.json``, from which the arm's Dice is read.

Each fold folder keeps a record of what trained it (:func:`arm_identity`: trainer, plans, configuration, budget, cases
and the sha256 of the encoder's weights) in ``smit_study_arm.json``; a study reuses a fold only when that record is the
one it would write now.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Sequence

import torch

from nnunet_smit.errors import SMITError
from nnunet_smit.files import atomic_write
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
        plans: nnU-Net plans identifier of this arm (None: the study's ``-p``). nnU-Net's default arm always trains
            on nnU-Net's default plans.
    """

    name: str
    encoder: str
    trainer: str
    weights: Optional[str] = None
    plans: Optional[str] = None


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

    Validation iterations follow nnU-Net's 1:5 ratio to training iterations, and a SMIT trainer's warm-up (and a
    decoder-first hold) keeps its share of the schedule (50 of 1000 epochs by default), so a shorter budget runs the
    same recipe compressed.
    """
    own_epochs = trainer.num_epochs
    if budget.epochs is not None:
        def compressed(epochs: int) -> int:
            return max(1, int(round(epochs * budget.epochs / own_epochs)))

        trainer.num_epochs = budget.epochs
        if hasattr(trainer, "warmup_epochs"):
            trainer.warmup_epochs = compressed(trainer.warmup_epochs)
        if getattr(trainer, "decoder_first_epochs", 0) > 0:
            trainer.decoder_first_epochs = compressed(trainer.decoder_first_epochs)
    if budget.iterations_per_epoch is not None:
        trainer.num_iterations_per_epoch = budget.iterations_per_epoch
        trainer.num_val_iterations_per_epoch = max(1, int(round(budget.iterations_per_epoch * VAL_ITERATIONS_RATIO)))


def fold_folder(arm_results: Path, dataset_name: str, trainer: str, plans: str, configuration: str,
                fold: int) -> Path:
    """Where nnU-Net writes the fold when ``nnUNet_results`` is ``arm_results``."""
    return Path(arm_results) / dataset_name / f"{trainer}__{plans}__{configuration}" / f"fold_{fold}"


ARM_RECORD = "smit_study_arm.json"


def arm_identity(arm: Arm, plans: str, configuration: str, budget: Budget, train_cases: Sequence[str],
                 test_cases: Sequence[str], encoder_sha256: Optional[str],
                 architecture: Optional[Dict[str, Any]]) -> Dict[str, Any]:
    """What makes a trained fold this arm's: reused only when every field is the same.

    Args:
        encoder_sha256: sha256 of the weights the arm starts from (pretrained arms), else None.
        architecture: the encoder architecture a scratch arm builds (from the first encoder), else None.
    """
    return {"trainer": arm.trainer, "plans": plans, "configuration": configuration, "budget": asdict(budget),
            "train_cases": sorted(train_cases), "test_cases": sorted(test_cases), "encoder_sha256": encoder_sha256,
            "architecture": architecture}


def identity_differences(recorded: Optional[Dict[str, Any]], wanted: Dict[str, Any]) -> List[str]:
    """Why a trained fold is not the arm wanted now ([] when it is), in words for the log."""
    if recorded is None:
        return ["it has no record of what trained it (an earlier version of smit_study, or nnUNetv2_train by hand)"]
    names = {"encoder_sha256": "the encoder file's weights", "architecture": "the encoder architecture",
             "budget": "the budget"}
    reasons = []
    for key, value in wanted.items():
        if recorded.get(key) != value:
            was, now = recorded.get(key), value
            if key == "encoder_sha256":  # "<encoder>" or "<encoder>+<decoder blocks>": 12 digits of each
                was, now = ("+".join(part[:12] for part in str(v).split("+")) if v else v for v in (was, now))
            reasons.append(f"{names.get(key, key)} changed ({was} then, {now} now)")
    return reasons


def read_arm_record(fold: Path) -> Optional[Dict[str, Any]]:
    """The record a study wrote into a fold folder, or None (none, or unreadable)."""
    try:
        record = json.loads((Path(fold) / ARM_RECORD).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def write_arm_record(fold: Path, identity: Dict[str, Any]) -> None:
    Path(fold).mkdir(parents=True, exist_ok=True)
    text = json.dumps(identity, indent=2) + "\n"
    atomic_write(Path(fold) / ARM_RECORD, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


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

    Resumes an interrupted arm from its ``checkpoint_latest.pth`` like ``nnUNetv2_train --c``; an arm whose
    ``checkpoint_final.pth`` is on disk (interrupted during its final validation) is validated, not trained again.
    """
    start = time.time()
    with _environment(nnUNet_results=str(arm_results), **{WEIGHTS_ENV: arm.weights}):
        plans = json.loads(json.dumps(plans))  # the trainer edits its plans
        output = fold_folder(arm_results, plans["dataset_name"], arm.trainer, plans["plans_name"], configuration,
                             fold)
        final, latest = output / "checkpoint_final.pth", output / "checkpoint_latest.pth"
        resume = final if final.is_file() else latest if latest.is_file() else None
        plans["continue_training"] = resume is not None
        trainer = trainer_class(plans=plans, configuration=configuration, fold=fold, dataset_json=dataset_json,
                                device=device)
        apply_budget(trainer, budget)
        if resume is not None:  # read weights-only, handed over as a dict (nnU-Net's own reader unpickles anything)
            try:
                saved = load_nnunet_checkpoint(str(resume), trainer.device)
            except Exception as error:  # noqa: BLE001 - any unreadable file is reported the same way
                raise SMITError(f"{resume} cannot be read ({type(error).__name__}: {str(error).splitlines()[0][:120]}"
                                f"); move it away and rerun: arm {arm.name} then trains this fold again.") from None
            trainer.load_checkpoint(saved)
        if resume is final:
            print(f"[smit_study]   {final.name} is on disk: validating it, not training again", flush=True)
        else:
            trainer.run_training()
        if budget.disable_tta:
            trainer.inference_allowed_mirroring_axes = None
        trainer.perform_actual_validation(False)
    return time.time() - start
