"""The training data loader: a resumable stream of two-view batches, its worker count, and its failures in one line."""
from __future__ import annotations

import logging
import os
from typing import Iterator, Optional, Tuple

import torch
from torch.utils.data import DataLoader, Dataset

from nnunet_smit.errors import SMITError
from nnunet_smit.pretraining.distributed import DistInfo
from nnunet_smit.pretraining.sampler import EpochShardSampler, make_worker_init_fn

logger = logging.getLogger(__name__)

# A loader worker that delivers no batch for this long is taken for hung (a stalled network filesystem, say): the run
# stops with an error instead of waiting for days.
LOADER_TIMEOUT_S = 1800.0

# Loader processes per GPU at most: more only add memory (docs/performance.md has the loader's throughput).
MAX_AUTO_LOADER_WORKERS = 8


def auto_loader_workers(device: torch.device) -> int:
    """Loader processes for this process when ``num_workers`` is not set: on a GPU, the CPU cores this process may
    use (its affinity shared with the other processes of the node) less one for itself, at most 8; on the CPU,
    where training needs the cores, one when there are at least two."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    if device.type != "cuda":
        return 1 if cores >= 2 else 0
    per_process = cores // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    return max(1, min(MAX_AUTO_LOADER_WORKERS, per_process - 1))


class ResumableSampler(torch.utils.data.Sampler):
    """Endless stream of ``(case_index, sample_key)`` from global step ``start_step`` on, epoch after epoch."""

    def __init__(self, shard: EpochShardSampler, start_step: int) -> None:
        self.shard = shard
        self.start_step = int(start_step)

    def __iter__(self) -> Iterator[Tuple[int, int]]:
        epoch, skip = divmod(self.start_step, self.shard.batches_per_epoch)
        while True:
            self.shard.set_epoch(epoch, skip)
            yield from iter(self.shard)
            epoch, skip = epoch + 1, 0


def make_loader(
    dataset: Dataset,
    num_cases: int,
    samples_per_epoch: int,
    batch_size: int,
    info: DistInfo,
    seed: int,
    start_step: int,
    num_workers: Optional[int],
) -> DataLoader:
    """The loader of this process's shard of every epoch, from global step ``start_step`` on.

    Args:
        dataset: maps ``(case_index, sample_key)`` to a sample (:class:`~nnunet_smit.pretraining.sampler.TwoViewDataset`).
        num_cases: scans the dataset holds.
        samples_per_epoch: samples of one epoch over all processes.
        batch_size: samples per process and step.
        info: this process in the job.
        seed: the run's seed (sampling and worker streams).
        start_step: the global step the stream starts at (a resumed run's step).
        num_workers: loader processes; None: :func:`auto_loader_workers`.
    """
    sampler = ResumableSampler(
        EpochShardSampler(num_cases, samples_per_epoch, batch_size, info.rank, info.world_size, seed),
        start_step=start_step,
    )
    workers = auto_loader_workers(info.device) if num_workers is None else max(int(num_workers), 0)
    logger.info("data loader: %d worker processes", workers)
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        num_workers=workers,
        worker_init_fn=make_worker_init_fn(seed, info.rank),
        pin_memory=info.device.type == "cuda",
        drop_last=True,
        persistent_workers=False,
        prefetch_factor=4 if workers > 0 else None,
        timeout=LOADER_TIMEOUT_S if workers > 0 else 0,
    )


def loader_failure(error: BaseException, step: int, kept: str) -> Optional[SMITError]:
    """A data-loader failure as a one-line :class:`SMITError` saying which state is kept (``kept``); None for
    other errors.

    A worker killed (out of memory, say) or silent for ``LOADER_TIMEOUT_S`` makes torch raise in the main process
    wherever it is, possibly inside a step: nothing is saved from that state. A project error raised inside a worker
    comes back wrapped by torch ("Caught SMITError in DataLoader worker ..."): its own line is returned.
    """
    text = str(error).strip()
    if isinstance(error, SMITError) and text.startswith("Caught "):
        last = text.splitlines()[-1]
        return SMITError(last.split(": ", 1)[1] if last.startswith("nnunet_smit.") else last)
    if not isinstance(error, RuntimeError) or not text.startswith(("DataLoader worker", "DataLoader timed out")):
        return None
    return SMITError(
        f"the data loader failed near step {step} ({text.splitlines()[0].rstrip('. ')}; out of memory?); {kept}. "
        "Rerun the same command to resume, with a smaller --num_workers if memory is short."
    )
