"""Two-view sampling for SMIT pretraining from the preprocessed cache.

Every sample is one scan: a larger region (128^3 in SMIT) is cropped at random, preferring regions that hold
enough body rather than air (padded with air where the scan is smaller), two views (96^3) are cropped at random inside it, optionally flipped and intensity-
jittered, and each view gets its own random cube mask.

All randomness of a sample is drawn from a generator seeded by ``(seed, sample key)``, where the key is the
sample's global position in the run (epoch x samples per epoch + position). Samples are therefore identical
whatever the number of workers or processes, and a resumed run draws exactly the samples the interrupted one would
have drawn. :class:`EpochShardSampler` shards positions over processes like ``DistributedSampler``.

A cached scan that cannot be read any more (a damaged file, a lost disk block) does not stop a run of days: its
samples come from the next readable scan, with the same random draws, and a warning names it once per process.
"""
from __future__ import annotations

import logging
import os
import random
import signal
from dataclasses import dataclass
from typing import Any, Dict, Iterator, List, Optional, Protocol, Sequence, Tuple

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from nnunet_smit.conventions import PretrainPreprocessing
from nnunet_smit.errors import SMITError
from nnunet_smit.pretraining.masking import CubeMaskGenerator

logger = logging.getLogger(__name__)

Size3 = Tuple[int, int, int]


class VolumeSource(Protocol):
    """What the sampler needs from the cache (``CacheIndex`` satisfies it)."""

    case_ids: List[str]
    preprocessing: PretrainPreprocessing

    def load(self, case_id: str) -> np.ndarray: ...


@dataclass
class ViewSampling:
    """How views are cut from a scan.

    Attributes:
        view_size: edge of each view in voxels (D, H, W); multiples of 32.
        region_size: the region both views are cut from (SMIT: 128^3 around 96^3 views).
        num_views: views per scan (2).
        body_bias: probability that the region is centred on a body voxel rather than anywhere.
        body_threshold: scaled intensity above which a voxel counts as body; None: 5% above the window floor
            (about -154 HU with the default window, excluding air and lung).
        min_body_fraction: share of body voxels a body-biased region needs.
        body_tries: regions drawn at most to find one with enough body (the best one is used otherwise).
        flips: flip each view along each axis with probability 0.5.
        intensity_jitter: if > 0, scale each view by 1 + U(-j, j) and shift it by U(-j, j) x range, then clip.
        mask_cube_size: masking cube edge in voxels (16).
        mask_ratio: share of cubes masked per view (0.7).
    """

    view_size: Size3 = (96, 96, 96)
    region_size: Size3 = (128, 128, 128)
    num_views: int = 2
    body_bias: float = 0.9
    body_threshold: Optional[float] = None
    min_body_fraction: float = 0.3
    body_tries: int = 8
    flips: bool = False
    intensity_jitter: float = 0.0
    mask_cube_size: int = 16
    mask_ratio: float = 0.7

    def __post_init__(self) -> None:
        self.view_size = tuple(int(v) for v in self.view_size)  # type: ignore[assignment]
        self.region_size = tuple(int(r) for r in self.region_size)  # type: ignore[assignment]
        if len(self.view_size) != 3 or any(v <= 0 or v % 32 for v in self.view_size):
            raise SMITError(f"view size must be three multiples of 32 voxels, got {self.view_size}.")
        if len(self.region_size) != 3 or any(r < v for r, v in zip(self.region_size, self.view_size)):
            raise SMITError(f"region size {self.region_size} must be at least the view size {self.view_size} on "
                            "every axis (both views are cut from the region).")
        if self.num_views < 1:
            raise SMITError("at least one view per scan is needed.")


def crop_with_padding(array: np.ndarray, start: Sequence[int], size: Sequence[int], pad_value: float) -> np.ndarray:
    """Crop ``size`` voxels from ``start`` (may be negative or run past the end); outside voxels get ``pad_value``.

    Args:
        array: (D, H, W).
    Returns:
        float32 (size[0], size[1], size[2]); a view of ``array`` when the box lies inside a float32 array (never
        write into it).
    """
    if all(0 <= s_ and s_ + n <= e for s_, n, e in zip(start, size, array.shape)) and array.dtype == np.float32:
        return array[tuple(slice(s_, s_ + n) for s_, n in zip(start, size))]  # inside: no padding, no copy
    out = np.full(tuple(size), pad_value, dtype=np.float32)
    src, dst = [], []
    for axis in range(3):
        lo = max(start[axis], 0)
        hi = min(start[axis] + size[axis], array.shape[axis])
        if hi <= lo:
            return out
        src.append(slice(lo, hi))
        dst.append(slice(lo - start[axis], hi - start[axis]))
    out[tuple(dst)] = array[tuple(src)]
    return out


class TwoViewDataset(Dataset):
    """Torch dataset of multi-view samples; indexed by ``(case_index, sample_key)`` from :class:`EpochShardSampler`.

    Item: dict with
        ``views``: float32 (V, 1, D, H, W) in the cache's scaled range,
        ``masks``: bool (V, D/cube, H/cube, W/cube),
        ``case_index``: int.
    """

    def __init__(self, source: VolumeSource, sampling: ViewSampling, seed: int = 0) -> None:
        if not source.case_ids:
            raise SMITError("the pretraining cache holds no usable scans; add folders with CT scans.")
        self.source = source
        self.sampling = sampling
        self.seed = int(seed)
        lo, hi = source.preprocessing.scaled_range
        self.pad_value = float(lo)
        self.value_range = (float(lo), float(hi))
        self.body_threshold = (
            sampling.body_threshold if sampling.body_threshold is not None else lo + 0.05 * (hi - lo)
        )
        self.masking = CubeMaskGenerator(sampling.mask_cube_size, sampling.mask_ratio)
        self.masking.grid_shape(sampling.view_size)  # fail early on a view the cube does not divide
        # CacheIndex reads a box without decompressing the whole scan.
        self._region_reads = hasattr(source, "shape") and _accepts_region(source)
        self._unreadable: set = set()  # scans this process found unreadable (reported once each)

    def __len__(self) -> int:
        return len(self.source.case_ids)

    def _random_start(self, shape: Sequence[int], rng: np.random.Generator) -> List[int]:
        """Start of a region around a uniformly drawn centre; scans smaller than the region get a random offset
        inside the padded region."""
        start = []
        for size, extent in zip(self.sampling.region_size, shape):
            if extent >= size:
                centre = int(rng.integers(0, extent))
                start.append(int(np.clip(centre - size // 2, 0, extent - size)))
            else:
                start.append(int(rng.integers(extent - size, 1)))
        return start

    def _read_region(self, case_id: str, shape: Sequence[int], start: Sequence[int]) -> np.ndarray:
        """Read ``region_size`` voxels from ``start`` (only the box, when the source can), padding with air."""
        size = self.sampling.region_size
        inside = tuple(slice(max(s, 0), min(s + n, e)) for s, n, e in zip(start, size, shape))
        if self._region_reads:
            block = self.source.load(case_id, region=inside)  # type: ignore[call-arg]
            local_start = [s - i.start for s, i in zip(start, inside)]
            return crop_with_padding(block, local_start, size, self.pad_value)
        return crop_with_padding(self._volume(case_id), start, size, self.pad_value)

    def _volume(self, case_id: str) -> np.ndarray:
        volume = self.source.load(case_id)
        return volume[0] if volume.ndim == 4 else volume

    def sample_region(self, case_id: str, rng: np.random.Generator) -> np.ndarray:
        """A region of ``region_size`` voxels; with probability ``body_bias`` one whose body fraction reaches
        ``min_body_fraction`` (best of a few tries)."""
        shape = self.source.shape(case_id) if self._region_reads else self._volume(case_id).shape
        check_body = rng.random() < self.sampling.body_bias
        best, best_fraction = None, -1.0
        for _ in range(self.sampling.body_tries if check_body else 1):
            region = self._read_region(case_id, shape, self._random_start(shape, rng))
            if not check_body:
                return region
            fraction = np.count_nonzero(region > self.body_threshold) / region.size  # = the mean, 2x faster
            if fraction > best_fraction:
                best, best_fraction = region, fraction
            if fraction >= self.sampling.min_body_fraction:
                break
        return best

    def _readable_region(self, case_index: int, sample_key: int) -> Tuple[np.ndarray, np.random.Generator]:
        """The sample's region and its generator, from the scan ``case_index`` or, if that one cannot be read,
        the next one that can (the generator restarted, so the draws do not depend on the failure)."""
        cases = self.source.case_ids
        for shift in range(len(cases)):
            case_id = cases[(case_index + shift) % len(cases)]
            rng = np.random.default_rng([self.seed, int(sample_key)])
            try:
                return self.sample_region(case_id, rng), rng
            except Exception as error:  # noqa: BLE001 - any read failure of one scan: report it, use another
                if case_id not in self._unreadable:
                    self._unreadable.add(case_id)
                    reason = (str(error).strip().splitlines() or [type(error).__name__])[0][:200]
                    logger.warning("cached scan %s cannot be read (%s: %s); its samples come from the next scan.",
                                   case_id, type(error).__name__, reason)
        raise SMITError("no cached scan can be read any more; rebuild the cache.")

    def sample(self, case_index: int, sample_key: int) -> Dict[str, Any]:
        """Draw the views and masks of one sample, deterministically from ``(seed, sample_key)``."""
        region, rng = self._readable_region(case_index, sample_key)
        # The views are written straight into the batch item's memory (one copy per view).
        views = torch.empty((self.sampling.num_views, 1, *self.sampling.view_size), dtype=torch.float32)
        lo, hi = self.value_range
        for index in range(self.sampling.num_views):
            offset = [int(rng.integers(0, r - v + 1)) for r, v in zip(self.sampling.region_size, self.sampling.view_size)]
            view = region[tuple(slice(o, o + v) for o, v in zip(offset, self.sampling.view_size))]
            if self.sampling.flips:
                axes = tuple(a for a in range(3) if rng.random() < 0.5)
                if axes:
                    view = np.flip(view, axes)
            if self.sampling.intensity_jitter > 0:
                j = self.sampling.intensity_jitter
                view = view * (1.0 + rng.uniform(-j, j)) + rng.uniform(-j, j) * (hi - lo)
                view = np.clip(view, lo, hi)
            views[index, 0].numpy()[...] = view
        mask_generator = torch.Generator().manual_seed(int(rng.integers(0, 2**62)))
        masks = self.masking(self.sampling.num_views, self.sampling.view_size, generator=mask_generator)
        return {
            "views": views,
            "masks": masks,
            "case_index": int(case_index),
        }

    def __getitem__(self, index: Tuple[int, int]) -> Dict[str, Any]:
        case_index, sample_key = index
        return self.sample(case_index, sample_key)


def _accepts_region(source: Any) -> bool:
    import inspect

    try:
        return "region" in inspect.signature(source.load).parameters
    except (TypeError, ValueError):
        return False


class EpochShardSampler(Sampler):
    """Yields ``(case_index, sample_key)`` for this process, epoch by epoch.

    Every epoch is ``samples_per_epoch`` samples: shuffled passes over the cases (seeded by ``(seed, epoch)``),
    position p going to process ``p % world_size``. ``set_epoch(epoch, skip_batches)`` positions the sampler,
    skipping batches already trained when resuming mid-epoch.

    Args:
        num_cases: scans in the cache.
        samples_per_epoch: samples of all processes together per epoch; a multiple of batch_size x world_size.
        batch_size: samples per process and step.
        rank, world_size: this process and the number of processes.
        seed: base seed.
    """

    def __init__(
        self, num_cases: int, samples_per_epoch: int, batch_size: int, rank: int = 0, world_size: int = 1, seed: int = 0
    ) -> None:
        if samples_per_epoch % (batch_size * world_size):
            raise SMITError("samples per epoch must be a multiple of batch size x number of processes.")
        self.num_cases = int(num_cases)
        self.samples_per_epoch = int(samples_per_epoch)
        self.batch_size = int(batch_size)
        self.rank = int(rank)
        self.world_size = int(world_size)
        self.seed = int(seed)
        self.epoch = 0
        self.skip_batches = 0

    @property
    def batches_per_epoch(self) -> int:
        return self.samples_per_epoch // (self.batch_size * self.world_size)

    def set_epoch(self, epoch: int, skip_batches: int = 0) -> None:
        self.epoch = int(epoch)
        self.skip_batches = int(skip_batches)

    def epoch_cases(self, epoch: int) -> np.ndarray:
        """Case index of every position of ``epoch`` (all processes)."""
        rng = np.random.default_rng([self.seed, 7919, int(epoch)])
        passes = -(-self.samples_per_epoch // self.num_cases)
        order = np.concatenate([rng.permutation(self.num_cases) for _ in range(passes)])
        return order[: self.samples_per_epoch]

    def __len__(self) -> int:
        return (self.batches_per_epoch - self.skip_batches) * self.batch_size

    def __iter__(self) -> Iterator[Tuple[int, int]]:
        cases = self.epoch_cases(self.epoch)
        positions = range(self.rank, self.samples_per_epoch, self.world_size)
        first = self.skip_batches * self.batch_size
        for position in list(positions)[first:]:
            yield int(cases[position]), self.epoch * self.samples_per_epoch + position


def make_worker_init_fn(seed: int, rank: int):
    """Seed python, numpy and torch in every loader worker from (seed, rank, worker id).

    Sample content does not depend on these generators (see the module docstring); seeding them keeps any other
    library randomness in workers distinct across workers and processes and reproducible.
    """

    def init(worker_id: int) -> None:
        # Ctrl-C, and the SIGTERM of a scheduler's pre-emption, reach the whole process group: the main process
        # finishes its step, saves and stops, so workers must not die first (a dead worker makes the main process
        # raise wherever it is). torch's own SIGTERM handler in workers exits on any SIGTERM; this one ignores the
        # first, and exits at a second (torch terminating a worker that did not stop) or once the parent is gone.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        parent, received = os.getppid(), []

        def on_sigterm(signum, frame):  # noqa: ARG001 - signal handler signature
            received.append(signum)
            if len(received) > 1 or os.getppid() != parent:
                os._exit(0)

        signal.signal(signal.SIGTERM, on_sigterm)
        worker_seed = int(np.random.SeedSequence([seed, rank, worker_id]).generate_state(1)[0])
        random.seed(worker_seed)
        np.random.seed(worker_seed)
        torch.manual_seed(worker_seed)

    return init
