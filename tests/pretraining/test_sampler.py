"""Two-view sampler: shapes, padding, body bias, determinism and sharding over processes."""
import numpy as np
import pytest
import torch

from nnunet_smit.pretraining.sampler import EpochShardSampler, TwoViewDataset, ViewSampling, crop_with_padding
from tests.pretraining.training_support import ArraySource, phantom_cache


def _body_in_air(shape=(96, 160, 160)):
    """A box of 'body' (0.5) in the middle third of every axis, air (0) elsewhere."""
    volume = np.zeros(shape, dtype=np.float32)
    volume[tuple(slice(s // 3, 2 * s // 3) for s in shape)] = 0.5
    return volume


def test_views_and_masks_have_the_configured_shapes():
    sampling = ViewSampling(view_size=(64, 64, 64), region_size=(96, 96, 96))
    item = TwoViewDataset(ArraySource([_body_in_air()]), sampling)[(0, 7)]
    assert item["views"].shape == (2, 1, 64, 64, 64) and item["views"].dtype == torch.float32
    assert item["masks"].shape == (2, 4, 4, 4) and item["masks"].dtype == torch.bool
    assert item["masks"].flatten(1).sum(1).tolist() == [45, 45]  # round(0.7 * 64)


def test_small_scans_are_padded_with_air():
    small = np.full((40, 50, 70), 0.8, dtype=np.float32)
    sampling = ViewSampling(view_size=(64, 64, 64), region_size=(96, 96, 96), body_bias=0.0)
    views = TwoViewDataset(ArraySource([small]), sampling)[(0, 3)]["views"]
    assert views.shape == (2, 1, 64, 64, 64)
    values = views.unique()
    assert len(values) == 2 and values[0] == 0.0 and values[1] == pytest.approx(0.8)
    padded = crop_with_padding(np.ones((2, 2, 2)), (-1, 0, 1), (4, 2, 2), pad_value=-5.0)
    assert padded[:, :, 0].tolist() == [[-5, -5], [1, 1], [1, 1], [-5, -5]]


def test_regions_prefer_the_body():
    volume = _body_in_air((160, 160, 160))
    def body_share(bias):
        ds = TwoViewDataset(ArraySource([volume]), ViewSampling((64,) * 3, (64,) * 3, body_bias=bias))
        return np.mean([(ds[(0, k)]["views"] > 0.1).float().mean().item() for k in range(40)])
    biased, uniform = body_share(1.0), body_share(0.0)
    assert biased > 0.15 and biased > 2 * uniform, (biased, uniform)  # observed 0.20 vs 0.06


def test_samples_depend_only_on_seed_and_key():
    ds = TwoViewDataset(ArraySource([_body_in_air()]), ViewSampling((64,) * 3, (96,) * 3, flips=True,
                                                                    intensity_jitter=0.1), seed=5)
    a, b, c = ds[(0, 11)], ds[(0, 11)], ds[(0, 12)]
    assert torch.equal(a["views"], b["views"]) and torch.equal(a["masks"], b["masks"])
    assert not torch.equal(a["views"], c["views"])
    assert not torch.equal(a["views"][0], a["views"][1])  # two different views of the scan


def test_processes_get_disjoint_shards_and_resume_skips_done_batches():
    shards = [EpochShardSampler(num_cases=5, samples_per_epoch=8, batch_size=2, rank=r, world_size=2, seed=0)
              for r in range(2)]
    for s in shards:
        s.set_epoch(3)
    keys = [[key for _, key in s] for s in shards]
    assert set(keys[0]).isdisjoint(keys[1]) and sorted(keys[0] + keys[1]) == list(range(24, 32))
    cases = [case for s in shards for case, _ in s]
    assert sorted(set(cases)) == [0, 1, 2, 3, 4]  # every scan is used in an epoch
    shards[0].set_epoch(3, skip_batches=1)
    assert [key for _, key in shards[0]] == keys[0][2:]


def test_loader_workers_produce_the_same_samples(tmp_path_factory):
    cache = phantom_cache(tmp_path_factory)
    ds = TwoViewDataset(cache, ViewSampling((64,) * 3, (80,) * 3))
    sampler = EpochShardSampler(len(cache.case_ids), 4, 2)
    batches = []
    for workers in (0, 2):
        loader = torch.utils.data.DataLoader(ds, batch_size=2, sampler=sampler, num_workers=workers)
        batches.append([b["views"] for b in loader])
    for x, y in zip(*batches):
        assert torch.equal(x, y)
    assert 0.0 <= float(batches[0][0].min()) and float(batches[0][0].max()) <= 1.0
