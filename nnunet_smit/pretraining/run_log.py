"""What a pretraining run writes for people to read: ``log.jsonl``, its TensorBoard twin, the config and summary
files and the figures.

Output folder (rank 0 writes; the other processes' :class:`RunLog` writes nothing):
    ``pretrain_config.json``   the run's settings, encoder config, preprocessing, epoch length and data summary
    ``log.jsonl``              one JSON record per event (start, resume, train, interrupted, diverged, export); a
                               ``train`` record holds every loss term, lr, wd, momentum, teacher temperature, collapse
                               indicators, gradient norm, throughput, loader wait and memory
    ``tensorboard/``           with ``--tensorboard``: the numbers of every ``train`` record as TensorBoard scalars
    ``plots/``                 loss curves and per-epoch reconstruction previews (PNG)
    ``run_summary.json``       what the export's metadata summary holds
"""
from __future__ import annotations

import json
import logging
import resource
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch

from nnunet_smit.errors import SMITError
from nnunet_smit.files import atomic_write
from nnunet_smit.pretraining.distributed import DistInfo, mean_over_processes
from nnunet_smit.pretraining.model import teacher_collapse_stats

logger = logging.getLogger(__name__)

# Fields of a train record that are positions, not measurements (TensorBoard's x axis is the step).
_NOT_SCALARS = frozenset({"time", "event", "step", "epoch"})


def check_tensorboard_available() -> None:
    """One line when ``--tensorboard`` cannot work because the ``tensorboard`` package is missing."""
    try:
        import tensorboard  # noqa: F401 - the package torch.utils.tensorboard writes through
    except ImportError:
        raise SMITError("--tensorboard needs the tensorboard package: pip install tensorboard (or leave "
                        "--tensorboard out; log.jsonl holds the same numbers).") from None


class StepWindow:
    """The values of the steps since the last log record, reduced into one ``train`` record.

    Values stay on the device until the record is made, so between logged steps the host queues work while the
    device computes.
    """

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.values: Dict[str, List[Any]] = {}
        self.teacher_probs: List[torch.Tensor] = []
        self.steps = 0
        self.data_time = 0.0
        self.start = time.perf_counter()

    def add(self, scalars: Dict[str, Any], teacher_probs: Optional[torch.Tensor]) -> None:
        """One step's values (tensors are averaged over the window, floats keep their last value)."""
        for key, value in scalars.items():
            self.values.setdefault(key, []).append(value)
        if teacher_probs is not None:
            self.teacher_probs.append(teacher_probs)
        self.steps += 1

    def record(self, step: int, epoch: int, info: DistInfo, batch_size: int) -> Dict[str, Any]:
        """The ``train`` record: means over the window's steps and over the processes (every process must call
        this), the schedules' last values, the teacher's collapse indicators and the throughput."""
        elapsed = time.perf_counter() - self.start
        keys = sorted(k for k, v in self.values.items() if v and torch.is_tensor(v[0]))
        record: Dict[str, Any] = {"event": "train", "step": step, "epoch": epoch}
        if keys:
            means = torch.stack([torch.stack([v.float() for v in self.values[k]]).mean() for k in keys])
            means = mean_over_processes(info, means)
            record.update({k: float(v) for k, v in zip(keys, means.cpu())})
        for key in ("lr", "weight_decay", "momentum", "teacher_temp"):
            if self.values.get(key):
                record[key] = float(self.values[key][-1])
        if self.teacher_probs:
            stats = teacher_collapse_stats(torch.cat(self.teacher_probs))
            record.update({f"teacher_{k}": v for k, v in stats.items()})
        samples = self.steps * batch_size * info.world_size
        record["samples_per_s"] = samples / elapsed if elapsed > 0 else None
        record["steps_per_s"] = self.steps / elapsed if elapsed > 0 else None
        record["data_wait_fraction"] = self.data_time / elapsed if elapsed > 0 else None
        record["memory_mb"] = memory_mb(info.device)
        return record


def memory_mb(device: torch.device) -> float:
    """Peak memory of this process: allocated on the GPU, or the resident set on the CPU (MiB)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux reports KiB


class RunLog:
    """The run's records, files and figures in ``output_dir``; writes only where ``writes`` (rank 0).

    Args:
        output_dir: the run folder.
        writes: whether this process writes (rank 0 of the job).
        tensorboard: also write every ``train`` and ``probe`` record's numbers as TensorBoard scalars into
            ``output_dir/tensorboard``.
    """

    def __init__(self, output_dir: Path, writes: bool = True, tensorboard: bool = False) -> None:
        self.output_dir = Path(output_dir)
        self.writes = writes
        self.log_path = self.output_dir / "log.jsonl"
        self.plot_dir = self.output_dir / "plots"
        self.tensorboard_dir = self.output_dir / "tensorboard"
        self._tensorboard = tensorboard
        self._writer: Optional[Any] = None
        self._tail_checked = False

    def write(self, record: Dict[str, Any]) -> None:
        """Append ``record`` (with the time) to ``log.jsonl``, and a train record's numbers to TensorBoard."""
        if not self.writes:
            return
        record = {"time": round(time.time(), 3), **record}
        with open(self.log_path, "a") as handle:
            if not self._tail_checked:
                self._tail_checked = True
                # A run killed while appending leaves half a line: end it, so that this record starts a line.
                if handle.tell() and self._last_byte() != b"\n":
                    handle.write("\n")
            handle.write(json.dumps(record) + "\n")
        if self._tensorboard and record.get("event") in ("train", "probe"):
            self._write_scalars(record)

    def _last_byte(self) -> bytes:
        with open(self.log_path, "rb") as handle:
            handle.seek(-1, 2)
            return handle.read(1)

    def _write_scalars(self, record: Dict[str, Any]) -> None:
        if self._writer is None:
            check_tensorboard_available()
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(log_dir=str(self.tensorboard_dir))
        event = record["event"]  # train/<key>, and probe/probe_dice with probe/probe_dice_<class> per class
        scalars = dict(record)
        scalars.update({f"probe_dice_{name}": value
                        for name, value in (record.get("probe_dice_per_class") or {}).items()})
        for key, value in scalars.items():
            if key not in _NOT_SCALARS and isinstance(value, (int, float)) and not isinstance(value, bool):
                self._writer.add_scalar(f"{event}/{key}", value, global_step=record["step"], walltime=record["time"])
        self._writer.flush()  # watched live: each record is on disk when the log line is

    def records(self) -> List[Dict[str, Any]]:
        """Every record of ``log.jsonl`` so far (unreadable lines skipped)."""
        from nnunet_smit.pretraining.plots import read_log

        return read_log(self.log_path)

    def write_json(self, name: str, payload: Dict[str, Any]) -> None:
        """``output_dir/name`` with ``payload`` as indented JSON, written atomically."""
        if self.writes:
            text = json.dumps(payload, indent=2, default=str)
            atomic_write(self.output_dir / name, lambda tmp: Path(tmp).write_text(text))

    def epoch_figures(self, epoch: int, preview: Optional[Dict[str, Any]], note: str = "") -> None:
        """The loss curves so far and, when given, the reconstruction preview of 0-based ``epoch`` (``note`` goes
        into its title)."""
        if not self.writes:
            return
        from nnunet_smit.pretraining.plots import plot_reconstruction

        self.loss_curves()
        if preview is None:
            return
        try:
            plot_reconstruction(preview, self.plot_dir / f"reconstruction_epoch{epoch + 1:04d}.png",
                                title=f"epoch {epoch + 1}" + (f", {note}" if note else ""))
        except Exception as error:  # noqa: BLE001 - a figure must never stop training
            logger.warning("could not write plots: %s", error)

    def loss_curves(self) -> None:
        """``plots/loss_curves.png`` from the log so far."""
        if not self.writes:
            return
        from nnunet_smit.pretraining.plots import plot_loss_curves

        try:
            plot_loss_curves(self.log_path, self.plot_dir / "loss_curves.png")
        except Exception as error:  # noqa: BLE001 - a figure must never stop training
            logger.warning("could not write plots: %s", error)

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None
