"""When the online probe runs during pretraining, and what the log records of it.

The probe itself is a callable handed in by ``smit_pretrain``'s CLI (``nnunet_smit.probe.online.OnlineProbe``):
``probe(encoder, preprocessing) -> {"dice", "dice_per_class", "seconds", ...}``. The loop only decides when to call
it (:class:`ProbeSchedule`), calls it on rank 0 with the exported side's encoder and writes a ``probe`` record.

Schedule: with ``every_epochs`` given, at the end of every that many epochs; otherwise (``None``, the default) at the
end of the first epoch and then whenever the probes' time so far plus the last probe's stays within ``share`` (5%) of
the training time since the run (or its resume) started. The run's last step is always probed, so the export and
``run_summary.json`` carry the final value.
"""
from __future__ import annotations

import logging
import time
from typing import Any, Callable, Dict, Optional

from torch import nn

from nnunet_smit.conventions import PretrainPreprocessing

logger = logging.getLogger(__name__)

EncoderProbe = Callable[[nn.Module, PretrainPreprocessing], Dict[str, Any]]
DEFAULT_SHARE = 0.05


class ProbeSchedule:
    """Decides at each epoch end whether the probe runs, and keeps the time it has cost.

    Args:
        every_epochs: probe at the end of every that many epochs (None: keep the probes within ``share`` of the
            training time).
        share: the part of the run the automatic schedule gives the probe.
    """

    def __init__(self, every_epochs: Optional[int] = None, share: float = DEFAULT_SHARE) -> None:
        self.every_epochs = every_epochs
        self.share = share
        self.started = time.monotonic()
        self.probe_seconds = 0.0  # time spent probing since started
        self.last_cost: Optional[float] = None
        self.probes = 0

    def due(self, epoch: int, last: bool) -> bool:
        """Whether to probe now, at the end of 0-based ``epoch`` (``last``: the run's final step)."""
        if last:
            return True
        if self.every_epochs is not None:
            return (epoch + 1) % self.every_epochs == 0
        if self.last_cost is None:
            return True
        training = time.monotonic() - self.started - self.probe_seconds
        return self.probe_seconds + self.last_cost <= self.share * training

    def spent(self, seconds: float) -> None:
        self.probe_seconds += seconds
        self.last_cost = seconds
        self.probes += 1

    def summary(self) -> Dict[str, Any]:
        """Probes run and their share of the wall time since the run (or its resume) started."""
        elapsed = time.monotonic() - self.started
        return {"probes": self.probes, "probe_seconds": round(self.probe_seconds, 1),
                "share_of_run": round(self.probe_seconds / elapsed, 4) if elapsed > 0 else None}


def probe_record(step: int, epoch: int, result: Dict[str, Any], seconds: float) -> Dict[str, Any]:
    """The ``probe`` record of ``log.jsonl``: the Dice (foreground mean) and per class, and what it cost."""
    return {"event": "probe", "step": step, "epoch": epoch + 1, "probe_dice": result.get("dice"),
            "probe_dice_per_class": result.get("dice_per_class") or {}, "probe_seconds": round(seconds, 1)}


def run_probe(probe: EncoderProbe, encoder: nn.Module, preprocessing: PretrainPreprocessing, step: int,
              epoch: int) -> Dict[str, Any]:
    """Probe ``encoder`` and return its record; a probe that fails is logged and recorded, never stops the run."""
    start = time.monotonic()
    try:
        result = probe(encoder, preprocessing)
    except Exception as error:  # noqa: BLE001 - a measurement must never stop days of pretraining
        seconds = time.monotonic() - start
        logger.warning("online probe at step %d failed (%s: %s); pretraining goes on.", step,
                       type(error).__name__, str(error).splitlines()[0] if str(error) else "")
        return {**probe_record(step, epoch, {}, seconds), "probe_error": f"{type(error).__name__}: {error}"[:300]}
    seconds = time.monotonic() - start
    record = probe_record(step, epoch, result, seconds)
    dice = record["probe_dice"]
    logger.info("online probe at step %d: Dice %s (%.0f s)", step, "none" if dice is None else f"{dice:.3f}", seconds)
    return record
