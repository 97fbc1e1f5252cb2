"""Helpers shared by the pretraining training tests: a phantom cache built once per session, tiny settings."""
from __future__ import annotations

from pathlib import Path
from typing import Any, List

import numpy as np

from nnunet_smit.conventions import PretrainPreprocessing
from nnunet_smit.errors import SMITError
from nnunet_smit.pretraining.cache import CacheIndex, build_cache
from nnunet_smit.pretraining.config import PretrainConfig
from nnunet_smit.pretraining.phantoms import generate_phantom_corpus

VIEW = 64  # the smallest legal view: 4^3 mask cubes and 4^3 tap tokens
N_PHANTOMS = 4


def phantom_dirs(tmp_path_factory) -> tuple:
    """(data folder, cache folder) of a small phantom corpus, generated and cached once per test session."""
    root = Path(tmp_path_factory.getbasetemp()) / "smit_training_phantoms"
    data, cache = root / "data", root / "cache"
    try:
        CacheIndex.open(cache)
    except SMITError:
        generate_phantom_corpus(data, n_cases=N_PHANTOMS, seed=0)
        build_cache([data], cache, PretrainPreprocessing(), min_shape=(VIEW,) * 3)
    return data, cache


def phantom_cache(tmp_path_factory) -> CacheIndex:
    return CacheIndex.open(phantom_dirs(tmp_path_factory)[1])


def tiny_config(**overrides: Any) -> PretrainConfig:
    """The tiny preset on 64^3 views with small heads, one scan per step, deterministic, no figures."""
    values = dict(
        preset="tiny",
        view_size=VIEW,
        region_size=80,
        batch_size=1,
        samples_per_epoch=4,
        epochs=20,
        warmup_epochs=0,
        teacher_temp_warmup_epochs=2,
        freeze_last_layer_epochs=0,
        head_hidden_dim=64,
        head_bottleneck_dim=32,
        head_out_dim=128,
        num_workers=0,
        device="cpu",
        deterministic=True,
        progress=False,
        log_every_steps=1,
        checkpoint_every_steps=0,
        checkpoint_every_minutes=1e6,
        preview_every_epochs=0,
    )
    values.update(overrides)
    return PretrainConfig(**values)


class ArraySource:
    """In-memory volumes with the cache's reading interface (for sampler tests)."""

    def __init__(self, volumes: List[np.ndarray], preprocessing: PretrainPreprocessing = PretrainPreprocessing()):
        self.volumes = volumes
        self.case_ids = [f"case_{i}" for i in range(len(volumes))]
        self.preprocessing = preprocessing

    def shape(self, case_id: str):
        return self.volumes[self.case_ids.index(case_id)].shape

    def load(self, case_id: str, region=None) -> np.ndarray:
        volume = self.volumes[self.case_ids.index(case_id)]
        return np.asarray(volume[region] if region is not None else volume, dtype=np.float32)
