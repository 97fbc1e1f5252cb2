"""What ``smit_pretrain`` runs on every process: cache, then training, then the export.

:func:`run_pretraining` joins the process group torchrun describes, has rank 0 build (or update) the preprocessed
cache while the others wait for its outcome, trains with :class:`~nnunet_smit.pretraining.trainer.PretrainTrainer`
(which exports the encoder at the end) and leaves the process group, also after an error.

Output folder: ``checkpoint_latest.pt`` (:mod:`~nnunet_smit.pretraining.state`), ``log.jsonl``,
``pretrain_config.json``, ``run_summary.json``, ``plots/`` and ``tensorboard/``
(:mod:`~nnunet_smit.pretraining.run_log`), ``smit_encoder_teacher.pt`` (:mod:`~nnunet_smit.pretraining.export`) and
``cache/`` unless ``--cache_dir`` puts it elsewhere (:mod:`~nnunet_smit.pretraining.cache`).
"""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import List, Optional, Sequence

from nnunet_smit.conventions import PretrainPreprocessing
from nnunet_smit.errors import SMITError, describe_os_error
from nnunet_smit.files import FolderBusy, FolderLock, describe_holder, remove_temporary_files
from nnunet_smit.pretraining.cache import CacheIndex, build_cache
from nnunet_smit.pretraining.config import DEMO_CASES, PretrainConfig
from nnunet_smit.pretraining.distributed import init_distributed, launch_rank, leave_process_group, share_outcome
from nnunet_smit.pretraining.phantoms import DEMO_PHANTOM, generate_phantom_corpus
from nnunet_smit.pretraining.probing import EncoderProbe
from nnunet_smit.pretraining.run_log import check_tensorboard_available
from nnunet_smit.pretraining.state import CHECKPOINT_NAME, json_plain, load_init_encoder
from nnunet_smit.pretraining.trainer import PretrainTrainer

logger = logging.getLogger(__name__)

# Processes building the cache when not set: the CPU count, at most this many.
MAX_CACHE_WORKERS = 8
# The lock rank 0 holds on the run folder for the whole run (nnunet_smit.files.FolderLock).
RUN_LOCK_NAME = ".smit_pretrain.lock"


def input_folders(data: Sequence[Path], output_dir: Path, demo: bool = False) -> List[Path]:
    """The scan folders of a run: ``data``, and with ``demo`` the phantoms of ``output_dir/demo_data`` (written by
    rank 0 when missing). One line when there is none or one is not a folder; only rank 0, which builds the cache,
    needs to see them."""
    sources = list(data)
    if demo:
        demo_dir = Path(output_dir) / "demo_data"
        if launch_rank() == 0 and not any(demo_dir.glob("*.nii.gz")):
            logger.info("writing %d phantoms to %s", DEMO_CASES, demo_dir)
            generate_phantom_corpus(demo_dir, n_cases=DEMO_CASES, seed=0, **DEMO_PHANTOM)
        sources.append(demo_dir)
    if not sources:
        raise SMITError("no input folder given; pass -d DIR (repeatable) or --demo.")
    for source in sources if launch_rank() == 0 else []:
        if not Path(source).is_dir():
            raise SMITError(f"input folder {source} does not exist or is not a folder; pass an existing folder with -d.")
    return sources


def run_pretraining(
    sources: Sequence[Path],
    output_dir: Path,
    config: PretrainConfig,
    cache_dir: Optional[Path] = None,
    preprocessing: Optional[PretrainPreprocessing] = None,
    cache_workers: Optional[int] = None,
    cache_only: bool = False,
    verify_cache: bool = False,
    probe: Optional[EncoderProbe] = None,
    probe_every_epochs: Optional[int] = None,
) -> Path:
    """Build or open the cache, pretrain, export; what ``smit_pretrain`` runs on every process.

    Args:
        sources: folders with CT scans (searched recursively).
        output_dir: run folder.
        config: run settings.
        cache_dir: preprocessed cache (default ``output_dir/cache``); shared between runs on the same data.
        preprocessing: spacing/HU window of the cache (authors' defaults if None).
        cache_workers: processes building the cache (default: CPU count, at most 8).
        cache_only: build the cache and return its folder without training.
        verify_cache: compare every cached file's checksum with its record (sizes are always compared).
        probe, probe_every_epochs: the online probe and its interval (:mod:`~nnunet_smit.pretraining.probing`).

    Returns:
        the exported encoder checkpoint's path (or the cache folder with ``cache_only``).
    """
    output_dir = Path(output_dir)
    cache_dir = Path(cache_dir) if cache_dir is not None else output_dir / "cache"
    preprocessing = preprocessing or PretrainPreprocessing()
    info = init_distributed(config.device)
    # One run per output folder: rank 0 holds the lock until the run ends (a resubmitted job, a scheduler's retry
    # or a second terminal on the same folder is refused at once).
    run_lock = FolderLock(output_dir / RUN_LOCK_NAME, f"the run folder {output_dir}") if info.is_main else None
    try:
        error = _prepare_on_rank_zero(sources, output_dir, config, cache_dir, preprocessing, cache_workers,
                                      run_lock, verify_cache) if run_lock is not None else None
        error = share_outcome(error)
        if error is not None:
            raise SMITError(error)
        cache = CacheIndex.open(cache_dir)
        if cache_only:
            return cache_dir
        data_summary = {"cache_dir": str(cache_dir), **json_plain(cache.summary())}
        trainer = PretrainTrainer(config, cache, output_dir, info, data_summary=data_summary, manifest=cache.manifest,
                                  probe=probe, probe_every_epochs=probe_every_epochs)
        return trainer.fit()
    finally:
        if run_lock is not None:
            run_lock.release()
        leave_process_group(info)


def _prepare_on_rank_zero(
    sources: Sequence[Path], output_dir: Path, config: PretrainConfig, cache_dir: Path,
    preprocessing: PretrainPreprocessing, cache_workers: Optional[int], run_lock: FolderLock, verify_cache: bool,
) -> Optional[str]:
    """Check what can be checked before hours of cache building, take the run folder's lock, then build the cache;
    the error's line, if any."""
    workers = cache_workers if cache_workers is not None else min(os.cpu_count() or 1, MAX_CACHE_WORKERS)
    try:
        if config.tensorboard:
            check_tensorboard_available()
        if config.init_encoder and not (output_dir / CHECKPOINT_NAME).exists():
            load_init_encoder(config)
        output_dir.mkdir(parents=True, exist_ok=True)
        _lock_run_folder(run_lock)
        build_cache([Path(s) for s in sources], cache_dir, preprocessing, min_shape=(config.view_size,) * 3,
                    num_workers=workers, progress=config.progress, verify=verify_cache)
    except SMITError as failure:
        return str(failure)
    except OSError as failure:  # a folder that cannot be made or written (a file in the path, a full disk)
        return describe_os_error(failure)
    return None


def _lock_run_folder(run_lock: FolderLock) -> None:
    """Take the run folder's lock, or one line naming the process that holds it."""
    try:
        run_lock.acquire()
    except FolderBusy as busy:
        raise SMITError(f"{busy}; wait for that run to end (a resubmitted or retried job of the same run waits for "
                        "its first instance), or choose another output folder (-o).") from None
    if run_lock.previous:
        logger.warning("%s was last held by %s, which ended without releasing it (killed?); this run takes over.",
                       run_lock.what, describe_holder(run_lock.previous))
    # What a killed run was writing (a checkpoint, the export, a figure): its previous file is whole.
    removed = remove_temporary_files(run_lock.path.parent, run_lock.path.parent / "plots")
    if removed:
        logger.info("removed %d temporary files a killed run left in %s", len(removed), run_lock.path.parent)
