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
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Sequence, Tuple

import numpy as np

from nnunet_smit.files import atomic_write
from nnunet_smit.errors import SMITError

TEST_SET_SEED = 2022
NNUNET_FOLDS = 5  # nnU-Net's cross-validation folds 0-4, which the study never changes
NNUNET_SPLIT_SEED = 12345  # nnU-Net's seed for generate_crossval_split


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


def assign_folds(splits_file: Path, case_ids: Sequence[str],
                 wanted: Sequence[Tuple[Sequence[str], Sequence[str]]]) -> List[int]:
    """The fold index in ``splits_file`` of every (train, val) pair in ``wanted``, appending the missing ones.

    Folds 0-4 are left exactly as they are; when the file does not exist, nnU-Net's five folds are written first.
    """
    splits_file = Path(splits_file)
    if splits_file.is_file():
        splits = json.loads(splits_file.read_text(encoding="utf-8"))
        if not isinstance(splits, list):
            raise SMITError(f"{splits_file} is not a list of splits; fix or delete it.")
    else:
        splits = nnunet_crossval_splits(case_ids)
    if len(splits) < NNUNET_FOLDS:
        raise SMITError(f"{splits_file} holds {len(splits)} splits; the study appends after nnU-Net's "
                        f"{NNUNET_FOLDS} folds, so it needs them there (delete the file to let nnU-Net's be written).")
    index = {(tuple(sorted(s["train"])), tuple(sorted(s["val"]))): i for i, s in enumerate(splits)
             if i >= NNUNET_FOLDS}
    folds = []
    changed = not splits_file.is_file()
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
