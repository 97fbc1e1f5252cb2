"""The loader's worker count and its resumable stream (a killed worker's one-line error is in test_trainer.py)."""
import os

import torch

from nnunet_smit.pretraining.config import PretrainConfig
from nnunet_smit.pretraining.loader import ResumableSampler, auto_loader_workers
from nnunet_smit.pretraining.sampler import EpochShardSampler


def test_automatic_loader_workers_follow_the_cores_of_each_process(monkeypatch):
    cuda, cpu = torch.device("cuda", 0), torch.device("cpu")
    for cores, local_world, expected in ((16, 1, 8), (96, 8, 8), (32, 8, 3), (4, 4, 1), (1, 1, 1)):
        monkeypatch.setattr(os, "sched_getaffinity", lambda pid, n=cores: set(range(n)), raising=False)
        monkeypatch.setenv("LOCAL_WORLD_SIZE", str(local_world))
        assert auto_loader_workers(cuda) == expected, (cores, local_world)
    assert auto_loader_workers(cpu) == 0  # one core left: the training uses it
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(2)), raising=False)
    assert auto_loader_workers(cpu) == 1
    assert PretrainConfig().num_workers is None


def test_the_stream_resumed_at_a_step_goes_on_as_the_uninterrupted_one():
    def stream(start_step, batches):
        shard = EpochShardSampler(5, 6, 2, 0, 1, seed=3)
        items = iter(ResumableSampler(shard, start_step))
        return [next(items) for _ in range(2 * batches)]

    whole = stream(0, 7)  # 3 batches per epoch: over two epoch boundaries
    assert stream(4, 3) == whole[8:]
    assert stream(3, 4) == whole[6:]
