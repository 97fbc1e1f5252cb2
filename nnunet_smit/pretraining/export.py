"""The end of a pretraining run: the encoder checkpoint fine-tuning reads, and the run's summary.

``smit_encoder_teacher.pt`` (or ``_student`` with ``export="student"``) is an encoder checkpoint in the project's
format (:mod:`nnunet_smit.checkpoint`): the encoder's weights, its architecture, the cache's preprocessing, the view
size as patch size, the side exported (``exported_side``), the summary below and the fingerprints of every scan the
weights have seen. The side is ``export``'s whatever the objectives: every run keeps an EMA teacher. A run whose
reconstruction goes through SMITNet's conv blocks (``reconstruct_through`` ``skips`` or ``decoder``) exports that
side's blocks too, under SMITNet's keys (:class:`~nnunet_smit.checkpoint.DecoderParts`).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

from torch import nn

from nnunet_smit.checkpoint import DecoderParts, save_encoder_checkpoint, state_dict_sha256
from nnunet_smit.conventions import PretrainPreprocessing
from nnunet_smit.errors import SMITError
from nnunet_smit.pretraining.config import PretrainConfig
from nnunet_smit.pretraining.distributed import DistInfo, gather_objects
from nnunet_smit.pretraining.model import SMITPretrainModel
from nnunet_smit.pretraining.reconstruction_loss import RECONSTRUCTION_BASELINES
from nnunet_smit.pretraining.reconstruction_paths import DECODER_NORM, ConvReconstructionHead
from nnunet_smit.pretraining.run_log import RunLog
from nnunet_smit.pretraining.state import json_plain

logger = logging.getLogger(__name__)

# Train records whose means the summary compares the reconstruction loss with its baselines over (each record is
# already the mean of --log_every_steps steps), so that no single batch decides the comparison.
BASELINE_RECORDS = 5


@dataclass
class Progress:
    """How far the run has come: steps done, the epoch length in steps and the schedule's total."""

    step: int
    steps_per_epoch: int
    total_steps: int


def exported_side(model: SMITPretrainModel, which: str) -> Tuple[str, nn.Module]:
    """(name, module) of the side to export, ``"teacher"`` or ``"student"``: the one asked for, whatever the
    objectives."""
    return which, model.teacher if which == "teacher" else model.student


def exported_decoder_parts(side: nn.Module) -> Optional[DecoderParts]:
    """The SMITNet blocks of ``side``'s conv reconstruction head under SMITNet's keys, or None (SMIT's bottleneck
    head, or no reconstruction)."""
    head = getattr(side, "recon_head", None)
    if not isinstance(head, ConvReconstructionHead):
        return None
    return DecoderParts(head.parts, head.kind, DECODER_NORM, head.exported_state_dict())


def weights_checksums(model: SMITPretrainModel) -> Dict[str, str]:
    """sha256 of the student's and the teacher's weights (equal on every process of a healthy DDP run)."""
    return {side: state_dict_sha256(getattr(model, side).state_dict()) for side in ("student", "teacher")}


def reconstruction_against_baselines(
    train_records: Sequence[Dict[str, Any]], count: int = BASELINE_RECORDS,
) -> Optional[Dict[str, Any]]:
    """How far below its best trivial baseline (:mod:`~nnunet_smit.pretraining.reconstruction_loss`) the
    reconstruction loss ended: means over the last ``count`` train records that hold the loss and both baselines;
    None when there is none (reconstruction off)."""
    names = ("reconstruction", *RECONSTRUCTION_BASELINES)
    last = [r for r in train_records if all(isinstance(r.get(n), (int, float)) for n in names)][-count:]
    if not last:
        return None
    means = {name: sum(r[name] for r in last) / len(last) for name in names}
    best = min(RECONSTRUCTION_BASELINES, key=means.__getitem__)
    return {
        "recon_l1": means["reconstruction"],
        "best_baseline": best,
        "best_baseline_l1": means[best],
        "ratio": means["reconstruction"] / means[best] if means[best] > 0 else None,
        "baselines_l1": {name: means[name] for name in RECONSTRUCTION_BASELINES},
        "train_records": len(last),
        "steps": [last[0]["step"], last[-1]["step"]],
    }


def online_probe_summary(probes: Sequence[Dict[str, Any]],
                         schedule: Optional[Dict[str, Any]]) -> Optional[Dict[str, Any]]:
    """The last online probe (its Dice, per class, step) with the first one's Dice beside it and what the probes
    cost; None when the run had no probe."""
    if not probes and schedule is None:
        return None
    scored = [r for r in probes if r.get("probe_dice") is not None]
    last = probes[-1] if probes else {}
    return {
        "dice": last.get("probe_dice"), "dice_per_class": last.get("probe_dice_per_class"), "step": last.get("step"),
        "first_dice": scored[0]["probe_dice"] if scored else None, "first_step": scored[0]["step"] if scored else None,
        "probes_logged": len(probes), **(schedule or {}),
    }


def run_summary(
    config: PretrainConfig, model: SMITPretrainModel, which: str, progress: Progress, info: DistInfo,
    run_log: RunLog, data_summary: Dict[str, Any], fingerprinted_scans: int, checksums_per_rank: List[Any],
    probe_schedule: Optional[Dict[str, Any]] = None,
) -> Dict[str, Any]:
    """What the export's metadata and ``run_summary.json`` say of the run."""
    records = run_log.records()
    train = [r for r in records if r.get("event") == "train"]
    probes = [r for r in records if r.get("event") == "probe"]
    init = next((r["init_encoder"] for r in records if r.get("event") == "start" and "init_encoder" in r), None)
    return json_plain({
        "kind": "smit_pretraining",
        "exported": which,
        "steps": progress.step,
        "epochs_completed": progress.step / progress.steps_per_epoch,
        "total_steps": progress.total_steps,
        "finished": progress.step >= progress.total_steps,
        "world_size": info.world_size,
        "global_batch": config.batch_size * info.world_size,
        "last_log": train[-1] if train else None,
        "recon_vs_best_baseline": reconstruction_against_baselines(train),
        "online_probe": online_probe_summary(probes, probe_schedule),
        "objectives": model.weights.enabled(),
        "pretrain_config": config.to_dict(),
        "init_encoder": init,
        "data": data_summary,
        "fingerprinted_scans": fingerprinted_scans,
        "weights_checksums_per_rank": checksums_per_rank,
    })


def export_encoder(
    model: SMITPretrainModel, config: PretrainConfig, preprocessing: PretrainPreprocessing, progress: Progress,
    info: DistInfo, run_log: RunLog, data_summary: Dict[str, Any], scan_fingerprints: Dict[str, str],
    kept_state: str, probe_schedule: Optional[Dict[str, Any]] = None,
) -> Path:
    """Write the encoder checkpoint and ``run_summary.json`` (rank 0); returns the checkpoint's path on every
    process (every process must call this: the weights' checksums are gathered from all).

    Args:
        kept_state: what is kept if the write fails (names the last saved training state), for the error's line.
        probe_schedule: the online probe's count and cost since the run (or its resume) started, if it had one.
    """
    which, side = exported_side(model, config.export)
    path = run_log.output_dir / f"smit_encoder_{which}.pt"
    checksums_per_rank = gather_objects(info, weights_checksums(model))
    if info.is_main:
        summary = run_summary(config, model, which, progress, info, run_log, data_summary, len(scan_fingerprints),
                              checksums_per_rank, probe_schedule)
        state_dict = {k: v.detach().cpu() for k, v in side.encoder.state_dict().items()}
        try:
            save_encoder_checkpoint(
                path, state_dict, model.config, preprocessing, patch_size=(config.view_size,) * 3, summary=summary,
                scan_fingerprints=scan_fingerprints, exported_side=which, decoder_parts=exported_decoder_parts(side),
            )
            run_log.write_json("run_summary.json", summary)
        except OSError as error:
            raise SMITError(f"could not write {path} ({error.strerror or error}); {kept_state}. Free space and "
                            "rerun the same command to export.") from None
        run_log.write({"event": "export", "step": progress.step, "path": str(path)})
        run_log.loss_curves()
    return path
