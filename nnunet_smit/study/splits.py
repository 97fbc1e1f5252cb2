"""The study's case sets: a fixed held-out test set, nested labelled subsets, and their nnU-Net folds.

Rules (each tested):

- The held-out test set is a fixed fraction of the training cases (at least one), drawn by ``TEST_SET_SEED``
  from the sorted case identifiers: the same dataset always gives the same test set. It is never trained on.
- For each seed, the remaining cases (the pool) are permuted by that seed, and the ``k`` labelled cases are the
  first ``k`` of the permutation: for one seed the sets are nested (the k=2 set holds the k=1 set).
- Every arm trains on a subset through one nnU-Net fold: an entry ``{"train": subset, "val": test set}`` in the
  dataset's ``splits_final.json``. Entries are appended after nnU-Net's five cross-validation folds, which are
  written first when the file does not exist yet (as nnU-Net itself would write them) and are never changed. An
  entry identical to an existing one is reused, so reruns and other studies on the same cases share folds.
- The file is read, completed and written under an OS file lock beside it (``.splits_final.json.lock``,
  :class:`nnunet_smit.files.FolderLock`): two studies on one dataset take turns, neither loses the other's folds.
- A file that is not a JSON array of ``{"train": [case ids], "val": [case ids]}`` is one line (:func:`read_splits`).
- nnU-Net's five folds are never written over a partly preprocessed dataset (:func:`check_fully_preprocessed`):
  they would hold only the cases preprocessed so far, for good.
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

from nnunet_smit.files import FolderLock, atomic_write, describe_holder, json_type_name, read_json
from nnunet_smit.errors import SMITError

logger = logging.getLogger(__name__)

TEST_SET_SEED = 2022
NNUNET_FOLDS = 5  # nnU-Net's cross-validation folds 0-4, which the study never changes
NNUNET_SPLIT_SEED = 12345  # nnU-Net's seed for generate_crossval_split
SPLITS_LOCK = ".splits_final.json.lock"
_SPLITS_REMEDY = "fix it, or delete it to have nnU-Net's five folds written again"
# Missing cases named in a message; the others are counted.
_NAMED_CASES = 5


@dataclass(frozen=True)
class LabelledSet:
    """The ``k`` training cases of one seed."""

    labelled: int
    seed: int
    train_cases: Tuple[str, ...]


def held_out_cases(case_ids: Sequence[str], test_fraction: float = 0.2) -> List[str]:
    """The fixed test set: ``max(1, round(n * test_fraction))`` cases drawn by ``TEST_SET_SEED``, sorted.

    Raises:
        SMITError: fewer than two cases, or a fraction outside (0, 1) or that leaves no case to train on.
    """
    ids = sorted(case_ids)
    if len(ids) < 2:
        raise SMITError(f"the dataset has {len(ids)} training case(s); a study needs at least 2 (one held out for "
                        "testing, one to train on).")
    if not 0.0 < test_fraction < 1.0:
        raise SMITError(f"--test_fraction must lie between 0 and 1, got {test_fraction}.")
    n_test = max(1, int(round(len(ids) * test_fraction)))
    if n_test >= len(ids):
        raise SMITError(f"--test_fraction {test_fraction} holds out all {len(ids)} cases; lower it.")
    chosen = np.random.default_rng(TEST_SET_SEED).permutation(len(ids))[:n_test]
    return sorted(ids[i] for i in chosen)


def labelled_sets(pool: Sequence[str], labelled: Sequence[int], seeds: int) -> List[LabelledSet]:
    """Nested subsets of ``pool``: for seed s, the first k cases of the pool permuted by s, for every k.

    Raises:
        SMITError: a k below 1 or larger than the pool, or fewer than one seed.
    """
    pool = sorted(pool)
    if seeds < 1:
        raise SMITError(f"--seeds must be at least 1, got {seeds}.")
    for k in labelled:
        if k < 1:
            raise SMITError(f"--labelled values must be at least 1, got {k}.")
        if k > len(pool):
            raise SMITError(f"--labelled {k} is larger than the {len(pool)} cases left after the held-out test set; "
                            f"use at most {len(pool)}.")
    sets = []
    for seed in range(seeds):
        order = np.random.default_rng(seed).permutation(len(pool))
        for k in sorted(set(labelled)):
            sets.append(LabelledSet(k, seed, tuple(pool[i] for i in order[:k])))
    return sets


def nnunet_crossval_splits(case_ids: Sequence[str]) -> List[Dict[str, List[str]]]:
    """nnU-Net's own five folds for these cases (what ``nnUNetTrainer.do_split`` writes when there is no file)."""
    from nnunetv2.utilities.crossval_split import generate_crossval_split

    if len(case_ids) < NNUNET_FOLDS:
        raise SMITError(f"the dataset has {len(case_ids)} training cases and no splits_final.json; nnU-Net's "
                        f"{NNUNET_FOLDS}-fold split (kept by the study as folds 0-4) needs at least {NNUNET_FOLDS}.")
    return generate_crossval_split(sorted(case_ids), seed=NNUNET_SPLIT_SEED, n_splits=NNUNET_FOLDS)


def plan_command(dataset: str, configuration: Optional[str] = None) -> str:
    """The nnU-Net command that plans and preprocesses ``dataset`` (for ``configuration`` when given)."""
    return f"nnUNetv2_plan_and_preprocess -d {dataset}" + (f" -c {configuration}" if configuration else "")


def read_splits(splits_file: Path) -> Optional[List[Dict[str, List[str]]]]:
    """The splits in ``splits_file``, None when there is no such file.

    Raises:
        SMITError: one line, for a file that is not a JSON array of ``{"train": [case ids], "val": [case ids]}``
            (invalid or truncated JSON, binary bytes, an array of numbers, a split without its lists).
    """
    splits_file = Path(splits_file)
    if not splits_file.is_file():
        return None
    splits = read_json(splits_file, "the splits file", list, _SPLITS_REMEDY)
    for position, split in enumerate(splits):
        if not (isinstance(split, dict) and all(isinstance(split.get(key), list)
                                                and all(isinstance(case, str) for case in split[key])
                                                for key in ("train", "val"))):
            raise SMITError(f"the splits file {splits_file} holds {json_type_name(split)} at position {position} "
                            f"where nnU-Net expects {{\"train\": [case ids], \"val\": [case ids]}}; {_SPLITS_REMEDY}.")
    return splits


def check_fully_preprocessed(raw_dataset: Path, preprocessed_case_ids: Sequence[str], dataset: str,
                             configuration: Optional[str] = None) -> None:
    """Refuse a dataset whose preprocessing stopped part way (a killed ``nnUNetv2_plan_and_preprocess``).

    The raw dataset's training cases are those nnU-Net finds (the ``dataset`` entry of its ``dataset.json``, else
    the case ids in ``imagesTr``), or only their number (``numTraining``) when ``imagesTr`` is gone. Nothing is
    checked when ``raw_dataset`` has no ``dataset.json`` (the raw data moved away after preprocessing).

    Args:
        raw_dataset: ``nnUNet_raw/DatasetXXX_Name``.
        preprocessed_case_ids: the case ids of the preprocessed configuration.
        dataset, configuration: as given to the study, for the command in the message.

    Raises:
        SMITError: one line naming the missing cases (the first five, and how many more) and the command to run.
    """
    raw_dataset = Path(raw_dataset)
    if not (raw_dataset / "dataset.json").is_file():
        return
    dataset_json = read_json(raw_dataset / "dataset.json", "the raw dataset's dataset.json", dict,
                             "fix it as nnU-Net requires")
    raw_cases = _raw_training_cases(raw_dataset, dataset_json)
    preprocessed = set(preprocessed_case_ids)
    command = plan_command(dataset, configuration)
    where = f" for {configuration}" if configuration else ""
    if raw_cases is not None:
        missing = [case for case in raw_cases if case not in preprocessed]
        if missing:
            named = ", ".join(missing[:_NAMED_CASES]) + (f" and {len(missing) - _NAMED_CASES} more"
                                                         if len(missing) > _NAMED_CASES else "")
            raise SMITError(f"{raw_dataset.name} is only partly preprocessed{where}: {len(missing)} of its "
                            f"{len(raw_cases)} training cases are missing ({named}); run {command} to finish it.")
        return
    expected = dataset_json.get("numTraining")
    if isinstance(expected, int) and len(preprocessed) < expected:
        raise SMITError(f"{raw_dataset.name} is only partly preprocessed{where}: {len(preprocessed)} of the {expected} "
                        f"training cases its dataset.json counts (numTraining); run {command} to finish it.")


def _raw_training_cases(raw_dataset: Path, dataset_json: Dict[str, Any]) -> Optional[List[str]]:
    """The training case ids of a raw dataset as nnU-Net lists them, None when its ``imagesTr`` is gone."""
    if isinstance(dataset_json.get("dataset"), dict):
        return sorted(dataset_json["dataset"])
    if not (raw_dataset / "imagesTr").is_dir():
        return None
    from nnunetv2.utilities.utils import get_identifiers_from_splitted_dataset_folder

    return sorted(get_identifiers_from_splitted_dataset_folder(str(raw_dataset / "imagesTr"),
                                                               dataset_json.get("file_ending", ".nii.gz")))


def _raw_dataset_of(splits_file: Path) -> Optional[Path]:
    """``nnUNet_raw/<dataset>`` for a dataset's ``nnUNet_preprocessed/<dataset>/splits_final.json``, if set."""
    from nnunetv2.paths import nnUNet_raw

    return Path(nnUNet_raw.get()) / splits_file.parent.name if nnUNet_raw.is_set() else None


def assign_folds(splits_file: Path, case_ids: Sequence[str],
                 wanted: Sequence[Tuple[Sequence[str], Sequence[str]]],
                 configuration: Optional[str] = None) -> List[int]:
    """The fold index in ``splits_file`` of every (train, val) pair in ``wanted``, appending the missing ones.

    Folds 0-4 are left exactly as they are; when the file does not exist, nnU-Net's five folds are written first,
    once :func:`check_fully_preprocessed` has found every raw training case among ``case_ids`` (``configuration``
    goes into its command). The file is read and written under its lock (:data:`SPLITS_LOCK`), waited for.

    Raises:
        SMITError: a malformed file (:func:`read_splits`), fewer than nnU-Net's five folds in it, or no file and a
            partly preprocessed dataset.
    """
    splits_file = Path(splits_file)
    lock = FolderLock(splits_file.parent / SPLITS_LOCK, f"the splits file {splits_file}")
    lock.acquire(wait=True, on_wait=lambda holder: logger.info(
        "waiting for %s, which is writing %s (another study on this dataset?)", describe_holder(holder), splits_file))
    try:
        return _assign_folds_locked(splits_file, case_ids, wanted, configuration)
    finally:
        lock.release()


def _assign_folds_locked(splits_file: Path, case_ids: Sequence[str],
                         wanted: Sequence[Tuple[Sequence[str], Sequence[str]]],
                         configuration: Optional[str]) -> List[int]:
    splits = read_splits(splits_file)
    changed = splits is None
    if splits is None:
        raw_dataset = _raw_dataset_of(splits_file)
        if raw_dataset is not None:
            dataset = splits_file.parent.name
            check_fully_preprocessed(raw_dataset, case_ids, dataset[7:10] if dataset[7:10].isdigit() else dataset,
                                     configuration)
        splits = nnunet_crossval_splits(case_ids)
    if len(splits) < NNUNET_FOLDS:
        raise SMITError(f"{splits_file} holds {len(splits)} splits; the study appends after nnU-Net's "
                        f"{NNUNET_FOLDS} folds, so it needs them there (delete the file to let nnU-Net's be written).")
    index = {(tuple(sorted(s["train"])), tuple(sorted(s["val"]))): i for i, s in enumerate(splits)
             if i >= NNUNET_FOLDS}
    folds = []
    for train, val in wanted:
        key = (tuple(sorted(train)), tuple(sorted(val)))
        if key not in index:
            splits.append({"train": list(key[0]), "val": list(key[1])})
            index[key] = len(splits) - 1
            changed = True
        folds.append(index[key])
    if changed:
        atomic_write(splits_file, lambda tmp: Path(tmp).write_text(json.dumps(splits, indent=4), encoding="utf-8"))
    return folds
