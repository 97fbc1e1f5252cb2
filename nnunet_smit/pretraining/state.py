"""The resumable state of a pretraining run (``checkpoint_latest.pt``) and the encoder a new run may start from.

``checkpoint_latest.pt`` is a ``torch.save`` file of plain containers and tensors (read with
``torch.load(weights_only=True)``):

    format, format_version         ``nnunet_smit.pretrain_state``, 1
    model, optimizer, scaler       state dicts of the student/teacher/losses, AdamW and the fp16 gradient scaler
    step, epoch, samples_per_epoch, finished
    rng_per_rank                   every process's Python, NumPy, torch (and CUDA) generator states
    world_size, config, encoder_config, preprocessing, data, manifest, pretraining_scans
"""
from __future__ import annotations

import json
import logging
import random
from pathlib import Path
from typing import Any, Callable, Dict, List, Sequence, Tuple

import numpy as np
import torch
from torch import nn

from nnunet_smit.architectures import SMITConfig
from nnunet_smit.architectures.weight_decay import uses_weight_decay
from nnunet_smit.checkpoint import (
    PRETRAIN_STATE_FORMAT, PRETRAIN_STATE_NAME, EncoderCheckpoint, load_encoder_checkpoint, load_encoder_weights,
)
from nnunet_smit.conventions import PretrainPreprocessing
from nnunet_smit.errors import SMITError
from nnunet_smit.pretraining.cache import manifest_fingerprints
from nnunet_smit.pretraining.config import PretrainConfig
from nnunet_smit.pretraining.model import SMITPretrainModel

logger = logging.getLogger(__name__)

# Written in the checkpoint module, which reads such a state as an encoder checkpoint too.
CHECKPOINT_NAME = PRETRAIN_STATE_NAME
STATE_FORMAT = PRETRAIN_STATE_FORMAT
STATE_VERSION = 1

# Settings a run saved before they existed was trained with (the running-mean center and no KoLeo).
DEFAULTS_BEFORE_THEY_EXISTED = {"centering": "center", "weight_koleo": 0.0}

# Encoder settings that shape no weight and no output of a trained encoder (stochastic depth acts in training only).
TRAINING_ONLY_ENCODER_FIELDS = frozenset({"drop_path_rate"})


def json_plain(obj: Any) -> Any:
    """A JSON round trip: only plain containers, numbers and strings remain."""
    return json.loads(json.dumps(obj, default=str))


# ------------------------------------------------------------------------------------------------ RNG state

def capture_rng_state(device: torch.device) -> Dict[str, Any]:
    """Python, NumPy, torch (and this device's CUDA) generator states as plain containers and tensors."""
    version, state, gauss = random.getstate()
    np_state = np.random.get_state()
    captured = {
        "python": [version, list(state), gauss],
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), int(np_state[2]), int(np_state[3]),
                  float(np_state[4])],
        "torch": torch.get_rng_state(),
    }
    if device.type == "cuda":
        captured["cuda"] = torch.cuda.get_rng_state(device)
    return captured


def restore_rng_state(state: Dict[str, Any], device: torch.device) -> None:
    """Set the generators to what :func:`capture_rng_state` captured."""
    version, values, gauss = state["python"]
    random.setstate((int(version), tuple(int(v) for v in values), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), int(pos), int(has_gauss), float(cached)))
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


# ------------------------------------------------------------------------------------------------ reading a state

def read_state(path: Path) -> Dict[str, Any]:
    """The state in ``path``, or one line saying why it cannot be resumed from."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - any unreadable file is reported the same way
        raise SMITError(f"{path} cannot be read ({type(error).__name__}); delete it to start over.") from error
    if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
        raise SMITError(f"{path} is not a pretraining state; use another output folder.")
    return state


# Presets that had the authors' window reverse before it moved to their "_authors" twins.
AUTHORS_PRESETS = {"smit_small": "smit_small_authors", "smit_lung": "smit_lung_authors"}


def check_same_settings(state: Dict[str, Any], config: PretrainConfig, output_dir: Path) -> None:
    """Refuse to resume a run whose training settings differ from ``config`` (runtime settings may differ)."""
    saved_dict = {**DEFAULTS_BEFORE_THEY_EXISTED, **state["config"]}
    if (state.get("encoder_config") or {}).get("legacy_window_reverse") and saved_dict.get("preset") in AUTHORS_PRESETS:
        # runs started before the rename: their smit_small / smit_lung had the authors' window reverse
        saved_dict["preset"] = AUTHORS_PRESETS[saved_dict["preset"]]
    saved = PretrainConfig.from_dict(saved_dict).training_fields()
    current = config.training_fields()
    changed = sorted(k for k in current if saved.get(k) != current[k])
    if changed:
        details = ", ".join(f"{k}: {saved.get(k)!r} -> {current[k]!r}" for k in changed[:4])
        raise SMITError(
            f"{output_dir} holds a run with other settings ({details}); rerun with the same settings to resume, or "
            "choose a new output folder."
        )
    if state.get("encoder_config"):
        # the preset's name is not enough: smit_small meant the authors' window reverse before it became smit_small_authors
        differences = encoder_differences(SMITConfig.from_dict(state["encoder_config"]), config.encoder_config())
        if differences:
            fitting = [name for name in SMITConfig.preset_names() if not encoder_differences(
                SMITConfig.from_dict(state["encoder_config"]), SMITConfig.preset(name, **config.encoder_overrides))]
            hint = f"rerun with --preset {fitting[0]} to resume it" if fitting else "rerun with the run's architecture"
            raise SMITError(f"{output_dir} holds a run of another encoder than preset {config.preset!r} builds now "
                            f"({'; '.join(differences[:3])}): {hint}, or choose a new output folder.")


def scans_of_state(state: Dict[str, Any]) -> Dict[str, str]:
    """{fingerprint: scan name} of every scan the saved run trained on. States saved before ``pretraining_scans``
    existed: their manifest still names the scans of the run so far."""
    return {**manifest_fingerprints(state.get("manifest") or {}), **(state.get("pretraining_scans") or {})}


def decayed_before_the_one_rule(name: str, parameter: nn.Parameter) -> bool:
    """How versions before the one weight-decay rule grouped pretraining's parameters: the same, except that the
    relative position tables were decayed."""
    return not (parameter.ndim <= 1 or name.endswith(".bias") or name == "mask_token")


def group_names(module: nn.Module, decays: Callable[[str, nn.Parameter], bool] = uses_weight_decay) -> List[List[str]]:
    """Names of ``module``'s trainable parameters in the optimizer's two groups (decayed, not decayed) by ``decays``."""
    named = [(n, p) for n, p in module.named_parameters() if p.requires_grad]
    return [[n for n, p in named if decays(n, p)], [n for n, p in named if not decays(n, p)]]


def optimizer_state_for(saved: Dict[str, Any], student: nn.Module, path: Path) -> Tuple[Dict[str, Any], bool]:
    """(the saved optimizer state for today's groups of ``student``, whether it had to be regrouped): states written
    while the relative position tables were still decayed hold them in the decayed group."""
    sizes = [len(group["params"]) for group in saved["param_groups"]]
    current = group_names(student)
    if sizes == [len(names) for names in current]:
        return saved, False
    before = group_names(student, decayed_before_the_one_rule)
    if sizes != [len(names) for names in before]:
        raise SMITError(f"{path} holds an optimizer for other parameters ({sizes} per group, "
                        f"{[len(n) for n in current]} here); delete it to start over.")
    return regroup_optimizer_state(saved, before, current), True


def regroup_optimizer_state(
    saved: Dict[str, Any], saved_groups: Sequence[Sequence[str]], current_groups: Sequence[Sequence[str]],
) -> Dict[str, Any]:
    """An optimizer state saved with parameters grouped as ``saved_groups`` (parameter names per group), rearranged
    for ``current_groups``: each parameter keeps its AdamW moments; each group takes the settings of the saved group
    at its position (the schedules set learning rate and weight decay at every step anyway).

    Used for states written before the one weight-decay rule moved the relative position tables into the group
    without decay.
    """
    saved_index = {name: i for i, name in enumerate(name for group in saved_groups for name in group)}
    missing = [name for group in current_groups for name in group if name not in saved_index]
    if missing or len(saved_index) != sum(len(group) for group in current_groups):
        raise SMITError(f"the saved optimizer state holds other parameters than the model ({missing[:3]}); delete "
                        "checkpoint_latest.pt to start over.")
    state: Dict[int, Any] = {}
    param_groups: List[Dict[str, Any]] = []
    index = 0
    for position, group in enumerate(current_groups):
        settings = {k: v for k, v in saved["param_groups"][position].items() if k != "params"}
        param_groups.append({**settings, "params": list(range(index, index + len(group)))})
        for name in group:
            old = saved_index[name]
            if old in saved["state"]:
                state[index] = saved["state"][old]
            index += 1
    return {"state": state, "param_groups": param_groups}


# ------------------------------------------------------------------------------------------------ init encoder

def encoder_differences(found: SMITConfig, wanted: SMITConfig) -> List[str]:
    """The architecture settings in which ``found`` is not ``wanted``, as "name found instead of wanted"."""
    a, b = found.to_dict(), wanted.to_dict()
    return [f"{k} {a.get(k)} instead of {b[k]}" for k in b
            if k not in TRAINING_ONLY_ENCODER_FIELDS and a.get(k) != b[k]]


def start_from_init_encoder(
    model: SMITPretrainModel, config: PretrainConfig, preprocessing: PretrainPreprocessing, is_main: bool,
) -> Tuple[Dict[str, str], Dict[str, Any]]:
    """Load ``config.init_encoder`` strictly into the student's encoder and copy it to the teacher's (every process
    reads the file).

    Returns:
        (the fingerprints of the scans those weights were pretrained on, what the log's start record keeps of them).
    """
    checkpoint = load_init_encoder(config)
    report = load_encoder_weights(model.student.encoder, checkpoint.state_dict, strict=True)
    if model.teacher is not None:
        model.teacher.encoder.load_state_dict(model.student.encoder.state_dict())
    if is_main:
        logger.info("student and teacher encoders start from %s (%s, sha256 %s): %s", checkpoint.path,
                    checkpoint.source, checkpoint.sha256[:16], report.summary())
        # Files from elsewhere record no preprocessing (the authors' defaults are assumed for them).
        theirs, ours = checkpoint.preprocessing.to_dict(), preprocessing.to_dict()
        changed = [f"{k} {theirs[k]} there, {ours[k]} here" for k in ours if theirs.get(k) != ours[k]]
        if changed and checkpoint.source == "nnunet_smit":
            logger.warning("the --init_encoder weights were pretrained on differently prepared scans (%s): their "
                           "filters meet other intensities or scales at first.", "; ".join(changed))
        if checkpoint.decoder_parts is not None:
            logger.info("the decoder blocks %s carries beside the encoder (%s) are not read: --init_encoder starts "
                        "the encoders only.", checkpoint.path, ", ".join(checkpoint.decoder_parts.parts))
    record = {"init_encoder": {"path": checkpoint.path, "source": checkpoint.source, "sha256": checkpoint.sha256,
                               "tensors": report.loaded, "notes": checkpoint.notes}}
    return dict(checkpoint.pretraining_scans), record


def load_init_encoder(config: PretrainConfig) -> EncoderCheckpoint:
    """The encoder weights ``config.init_encoder`` names (any file fine-tuning reads), or one line saying why they
    cannot start this run: unreadable, or an architecture other than the run's encoder (with the preset that fits)."""
    checkpoint = load_encoder_checkpoint(config.init_encoder)
    differences = encoder_differences(checkpoint.config, config.encoder_config())
    if differences:
        fitting = [name for name in SMITConfig.preset_names()
                   if not encoder_differences(checkpoint.config, SMITConfig.preset(name))]
        hint = f"pass --preset {fitting[0]}" if fitting else "no preset has its architecture"
        raise SMITError(f"--init_encoder {config.init_encoder} holds another encoder than the run's preset "
                        f"{config.preset!r} ({'; '.join(differences[:4])}): {hint}.")
    return checkpoint
