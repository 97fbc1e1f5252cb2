"""Training patches of the labelled cases, sampled by nnU-Net's own loader, and their frozen features.

Patches come from :class:`nnunetv2.training.dataloading.data_loader.nnUNetDataLoader` on the preprocessed arrays, with
nnU-Net's padding semantic: a patch reaching beyond a case is padded with 0 in the image (which the intensity mapping
turns into the pretraining's pad) and with -1 in the segmentation (here: no label, ignored by the loss), and a third of
the patches is centred on a foreground voxel. No augmentation: the probe measures the encoder, not the augmentation.
Which patches and voxels a case gives depends on the case alone (not on the seed of the labelled set), so the features
of a case are computed once per encoder and shared by every labelled set that holds it.
"""
from __future__ import annotations

import contextlib
import zlib
from pathlib import Path
from typing import Any, Dict, Iterator, List, Sequence

import numpy as np
import torch

from nnunet_smit.probe.features import FrozenFeatures
from nnunet_smit.probe.linear_probe import IGNORE_INDEX, VoxelFeatures, sample_at_voxels

# nnU-Net's share of foreground-centred patches (nnUNetTrainer.oversample_foreground_percent).
OVERSAMPLE_FOREGROUND = 0.33
PATCH_SEED = 1234


def case_seed(case: str) -> int:
    """The seed of a case's patches and voxels: its name's, so that it is the same in every labelled set and run."""
    return zlib.crc32(f"{PATCH_SEED}:{case}".encode())


@contextlib.contextmanager
def numpy_seed(seed: int) -> Iterator[None]:
    """numpy's global generator seeded inside the block (nnU-Net's loader draws from it), restored afterwards."""
    state = np.random.get_state()
    np.random.seed(seed)
    try:
        yield
    finally:
        np.random.set_state(state)


def sample_patches(data_folder: Path, case: str, patch_size: Sequence[int], label_manager: Any,
                   count: int) -> Dict[str, torch.Tensor]:
    """``count`` patches of ``case`` as nnU-Net's training loader cuts them: {"data": (N, C, *patch) float32,
    "target": (N, 1, *patch) int16}, nnU-Net's axes; the same patches every time for the same case."""
    from nnunetv2.training.dataloading.data_loader import nnUNetDataLoader
    from nnunetv2.training.dataloading.nnunet_dataset import infer_dataset_class

    dataset = infer_dataset_class(str(data_folder))(str(data_folder), identifiers=[case])
    loader = nnUNetDataLoader(dataset, count, list(patch_size), list(patch_size), label_manager,
                              oversample_foreground_percent=OVERSAMPLE_FOREGROUND)
    with numpy_seed(case_seed(case)):
        batch = loader.generate_train_batch()
    return {"data": torch.as_tensor(batch["data"]).float(), "target": torch.as_tensor(batch["target"])}


def voxel_features(features: FrozenFeatures, patches: Dict[str, torch.Tensor], ignore_label: Any,
                   voxels_per_patch: int, seed: int, device: torch.device) -> VoxelFeatures:
    """The frozen features at ``voxels_per_patch`` labelled voxels drawn uniformly from every patch (all of them when
    a patch has fewer), and their labels; nnU-Net's -1 padding and ``ignore_label`` are no label."""
    generator = torch.Generator().manual_seed(seed)
    scales: List[List[torch.Tensor]] = [[] for _ in features.scales]
    targets = []
    for index in range(patches["data"].shape[0]):
        target = patches["target"][index:index + 1].long()  # (1, 1, *patch), nnU-Net's axes
        if ignore_label is not None:
            target[target == int(ignore_label)] = IGNORE_INDEX
        target = features.network.to_encoder_axes(target)[0, 0]
        labelled = torch.nonzero(target >= 0)
        if len(labelled) == 0:
            continue
        labelled = labelled[torch.randperm(len(labelled), generator=generator)[:voxels_per_patch]]
        maps = features(patches["data"][index:index + 1].to(device))
        for i, scale in enumerate(maps):
            scales[i].append(sample_at_voxels(scale, labelled, target.shape).to("cpu", torch.float16))
        targets.append(target[tuple(labelled.t())])
    return VoxelFeatures([torch.cat(s) for s in scales], torch.cat(targets))
