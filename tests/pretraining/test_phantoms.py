"""CT-like phantoms: deterministic, CT-like intensities and geometry, usable by the default cache."""
from __future__ import annotations

import numpy as np
import SimpleITK as sitk

from nnunet_smit.conventions import PretrainPreprocessing
from nnunet_smit.pretraining.cache import build_cache
from nnunet_smit.pretraining.phantoms import generate_phantom_corpus, generate_phantom_volume


def test_phantom_is_deterministic_per_seed():
    a, spacing_a = generate_phantom_volume(np.random.default_rng(3))
    b, spacing_b = generate_phantom_volume(np.random.default_rng(3))
    c, _ = generate_phantom_volume(np.random.default_rng(4))
    np.testing.assert_array_equal(a, b)
    assert spacing_a == spacing_b
    assert a.shape != c.shape or not np.array_equal(a, c)


def test_phantom_has_ct_tissues_in_plausible_amounts():
    hu, spacing = generate_phantom_volume(np.random.default_rng(0))
    assert hu.dtype == np.int16 and hu.ndim == 3
    assert 1.5 <= spacing[0] <= 5.0 and spacing[1] == spacing[2] and 2.0 <= spacing[1] <= 3.5
    total = hu.size

    def fraction(lo, hi):
        return np.count_nonzero((hu >= lo) & (hu < hi)) / total

    # Loose bounds (fractions of the volume) that a torso scan meets whatever the random draw.
    assert fraction(-1100, -950) > 0.15  # air around the body
    assert fraction(-950, -700) > 0.02  # lungs
    assert fraction(-150, -50) > 0.02  # fat
    assert fraction(0, 100) > 0.15  # soft tissue and organs
    assert fraction(300, 2000) > 0.002  # bone
    # Air in the corners, noise of 10-20 HU on it.
    corner = hu[:, :8, :8].astype(np.float32)
    assert abs(np.median(corner) + 1000) < 15 and 5 < corner[corner > -1020].std() < 25


def test_corpus_files_are_reproducible_and_cache_at_the_default_settings(tmp_path):
    paths = generate_phantom_corpus(tmp_path / "a", n_cases=2, seed=1)
    again = generate_phantom_corpus(tmp_path / "b", n_cases=3, seed=1)
    assert [p.name for p in paths] == ["phantom_000.nii.gz", "phantom_001.nii.gz"]
    for p, q in zip(paths, again):
        np.testing.assert_array_equal(sitk.GetArrayFromImage(sitk.ReadImage(str(p))),
                                      sitk.GetArrayFromImage(sitk.ReadImage(str(q))))
    spacings = {sitk.ReadImage(str(p)).GetSpacing() for p in again}
    assert len(spacings) == 3  # varied spacings
    index = build_cache([tmp_path / "a"], tmp_path / "cache", PretrainPreprocessing(), min_shape=(96, 96, 96))
    assert len(index.case_ids) == 2 and index.skipped == []
    # The table lies below the back with air in between: the body crop leaves it out.
    tables_left_out = 0
    for case_id in index.case_ids:
        record = index.case(case_id)
        hu = sitk.GetArrayFromImage(sitk.ReadImage(record["source"]))
        tables_left_out += int((hu[:, record["crop_bbox"][1][1]:, :] > -500).any())
    assert tables_left_out >= 1
