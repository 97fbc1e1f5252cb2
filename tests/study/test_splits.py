"""The study's case sets: fixed held-out test set, nested labelled subsets, folds appended after nnU-Net's 0-4."""
from __future__ import annotations

import json

import pytest
from nnunetv2.utilities.crossval_split import generate_crossval_split

from nnunet_smit.errors import SMITError
from nnunet_smit.study.splits import assign_folds, held_out_cases, labelled_sets

CASES = [f"case_{i:02d}" for i in range(12)]


def test_held_out_set_is_fixed_a_fifth_and_at_least_one():
    test = held_out_cases(CASES)
    assert len(test) == 2 and test == sorted(test) and set(test) <= set(CASES)
    assert held_out_cases(list(reversed(CASES))) == test  # depends on the cases, not their order
    assert len(held_out_cases(CASES[:3])) == 1  # a fifth of 3 rounds to 1
    assert len(held_out_cases(CASES, test_fraction=0.5)) == 6
    with pytest.raises(SMITError, match="at least 2"):
        held_out_cases(CASES[:1])


def test_labelled_sets_are_nested_per_seed_and_differ_between_seeds():
    pool = CASES[2:]
    sets = labelled_sets(pool, [4, 1, 2, 8], seeds=3)
    assert [(s.labelled, s.seed) for s in sets[:4]] == [(1, 0), (2, 0), (4, 0), (8, 0)]
    for seed in range(3):
        mine = [s for s in sets if s.seed == seed]
        for small, large in zip(mine, mine[1:]):
            assert set(small.train_cases) < set(large.train_cases)
        assert all(len(s.train_cases) == s.labelled and set(s.train_cases) <= set(pool) for s in mine)
    firsts = {s.train_cases for s in sets if s.labelled == 4}
    assert len(firsts) == 3  # three seeds, three different draws
    assert labelled_sets(pool, [4], seeds=3) == [s for s in sets if s.labelled == 4]  # k values do not interact
    with pytest.raises(SMITError, match="larger than the 10 cases left"):
        labelled_sets(pool, [11], seeds=1)


def test_folds_are_appended_after_nnunets_five_which_stay_as_they_are(tmp_path):
    splits_file = tmp_path / "splits_final.json"
    wanted = [(("case_03",), ("case_00", "case_01")), (("case_03", "case_05"), ("case_00", "case_01"))]
    assert assign_folds(splits_file, CASES, wanted) == [5, 6]
    splits = json.loads(splits_file.read_text(encoding="utf-8"))
    assert splits[:5] == generate_crossval_split(sorted(CASES), seed=12345, n_splits=5)  # what nnU-Net would write
    assert splits[5] == {"train": ["case_03"], "val": ["case_00", "case_01"]}

    # a user's own folds 0-4 are kept; identical entries are reused, new ones appended
    custom = [{"train": CASES[:6], "val": CASES[6:]}] * 5 + splits[5:]
    splits_file.write_text(json.dumps(custom))
    again = wanted[::-1] + [(("case_07",), ("case_00", "case_01"))]
    assert assign_folds(splits_file, CASES, again) == [6, 5, 7]
    written = json.loads(splits_file.read_text(encoding="utf-8"))
    assert written[:7] == custom and written[7]["train"] == ["case_07"]


def test_a_split_file_without_nnunets_five_folds_is_refused(tmp_path):
    splits_file = tmp_path / "splits_final.json"
    splits_file.write_text(json.dumps([{"train": CASES[:6], "val": CASES[6:]}]))
    with pytest.raises(SMITError, match="holds 1 splits"):
        assign_folds(splits_file, CASES, [(("case_03",), ("case_00",))])
    assert json.loads(splits_file.read_text(encoding="utf-8")) == [{"train": CASES[:6], "val": CASES[6:]}]
