"""The study's case sets: fixed held-out test set, nested labelled subsets, folds appended after nnU-Net's 0-4 under a
lock, a malformed splits file as one line, and nnU-Net's folds never written over a partly preprocessed dataset."""
from __future__ import annotations

import json
import threading
import time

import pytest
from nnunetv2.utilities.crossval_split import generate_crossval_split

from nnunet_smit.errors import SMITError
from nnunet_smit.files import FolderLock
from nnunet_smit.study.splits import (SPLITS_LOCK, assign_folds, check_fully_preprocessed, held_out_cases,
                                      labelled_sets, read_splits)

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


@pytest.mark.parametrize("content, says", [
    (b'[{"train": ["case_00"], "val": ', "is not valid JSON (Expecting value at line 1, column 32: a truncated or "
                                        "hand-edited file?)"),
    (b"[1, 2, 3, 4, 5]", "holds a number at position 0 where nnU-Net expects"),
    (b"\x1f\x8b\x08\x00binary", "is not text (byte 1 is not UTF-8: a binary or damaged file)"),
    (b'[{"train": ["case_00"]}]', "holds an object at position 0 where nnU-Net expects"),
    (b'{"0": {"train": [], "val": []}}', "holds an object where an array is expected"),
])
def test_a_malformed_splits_file_is_one_line_and_left_as_it_is(tmp_path, content, says):
    splits_file = tmp_path / "splits_final.json"
    splits_file.write_bytes(content)
    with pytest.raises(SMITError) as failed:
        assign_folds(splits_file, CASES, [(("case_03",), ("case_00",))])
    message = str(failed.value)
    assert message.startswith(f"the splits file {splits_file} {says}") and "\n" not in message, message
    assert message.endswith("; fix it, or delete it to have nnU-Net's five folds written again.")
    assert splits_file.read_bytes() == content
    assert read_splits(tmp_path / "absent.json") is None


def test_two_studies_on_one_dataset_take_turns_and_keep_each_others_folds(tmp_path):
    splits_file = tmp_path / "splits_final.json"
    assign_folds(splits_file, CASES, [])  # nnU-Net's five folds
    before = splits_file.read_bytes()
    holder = FolderLock(tmp_path / SPLITS_LOCK, "the splits file")
    holder.acquire()  # a study writing its folds, as far as the file can tell
    folds = {}
    studies = [threading.Thread(target=lambda name=name, train=train: folds.setdefault(
        name, assign_folds(splits_file, CASES, [(train, ("case_00", "case_01"))])))
        for name, train in (("first", ("case_03",)), ("second", ("case_04", "case_05")))]
    for study in studies:
        study.start()
    time.sleep(0.5)
    assert all(study.is_alive() for study in studies) and splits_file.read_bytes() == before
    holder.release()
    for study in studies:
        study.join(30)
    assert sorted(folds["first"] + folds["second"]) == [5, 6]
    splits = json.loads(splits_file.read_text(encoding="utf-8"))
    assert {tuple(s["train"]) for s in splits[5:]} == {("case_03",), ("case_04", "case_05")}


def raw_dataset(root, cases, num_training=None, with_images=True):
    """nnUNet_raw/Dataset905_Part with ``cases`` in imagesTr (empty files: only names are read)."""
    folder = root / "Dataset905_Part"
    (folder / "imagesTr").mkdir(parents=True)
    if with_images:
        for case in cases:
            (folder / "imagesTr" / f"{case}_0000.nii.gz").touch()
    else:
        (folder / "imagesTr").rmdir()
    (folder / "dataset.json").write_text(json.dumps({"channel_names": {"0": "CT"}, "labels": {"background": 0, "x": 1},
                                                     "numTraining": num_training or len(cases),
                                                     "file_ending": ".nii.gz"}))
    return folder


def test_a_partly_preprocessed_dataset_is_refused_naming_the_missing_cases_and_the_command(tmp_path):
    raw = raw_dataset(tmp_path, CASES)
    check_fully_preprocessed(raw, CASES, "905", "3d_fullres")  # all there
    with pytest.raises(SMITError) as failed:
        check_fully_preprocessed(raw, CASES[:4], "905", "3d_fullres")
    assert str(failed.value) == (
        "Dataset905_Part is only partly preprocessed for 3d_fullres: 8 of its 12 training cases are missing (case_04, "
        "case_05, case_06, case_07, case_08 and 3 more); run nnUNetv2_plan_and_preprocess -d 905 -c 3d_fullres to "
        "finish it.")
    counted = raw_dataset(tmp_path / "moved", CASES, num_training=12, with_images=False)
    with pytest.raises(SMITError, match=r"is only partly preprocessed for 3d_fullres: 4 of the 12 training cases its "
                                        r"dataset.json counts \(numTraining\); run nnUNetv2_plan_and_preprocess"):
        check_fully_preprocessed(counted, CASES[:4], "905", "3d_fullres")
    check_fully_preprocessed(tmp_path / "nowhere", CASES[:4], "905", "3d_fullres")  # raw data gone: not checked


def test_nnunets_five_folds_are_never_written_over_a_partial_case_list(tmp_path, monkeypatch):
    monkeypatch.setenv("nnUNet_raw", str(tmp_path / "raw"))
    raw_dataset(tmp_path / "raw", CASES)
    splits_file = tmp_path / "preprocessed" / "Dataset905_Part" / "splits_final.json"
    splits_file.parent.mkdir(parents=True)
    with pytest.raises(SMITError, match=r"8 of its 12 training cases are missing .*; run "
                                        r"nnUNetv2_plan_and_preprocess -d 905 -c 3d_fullres to finish it"):
        assign_folds(splits_file, CASES[:4], [(("case_01",), ("case_00",))], configuration="3d_fullres")
    assert not splits_file.exists()
    assert assign_folds(splits_file, CASES, [(("case_01",), ("case_00",))]) == [5]


def test_a_truncated_plans_file_is_one_line_naming_the_command(tmp_path, monkeypatch):
    from nnunet_smit.errors import SMITError
    from nnunet_smit.study.study import resolve_dataset

    for name in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        (tmp_path / name / "Dataset904_Cut").mkdir(parents=True)
        monkeypatch.setenv(name, str(tmp_path / name))
    (tmp_path / "nnUNet_preprocessed" / "Dataset904_Cut" / "nnUNetPlans.json").write_text('{"dataset_name": "Data')
    with pytest.raises(SMITError) as refused:
        resolve_dataset("904", "3d_fullres", "nnUNetPlans")
    message = str(refused.value)
    assert "\n" not in message and "nnUNetPlans.json" in message and "nnUNetv2_plan_and_preprocess -d 904" in message
