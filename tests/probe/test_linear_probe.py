"""The linear probe: the head's arithmetic, and its training on features that do or do not encode the label.

No nnU-Net here: features are planted (the one-hot label, pooled to the encoder's resolutions) or random, and the head
is trained by the same voxel sampling and optimiser as smit_probe's.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from nnunet_smit.probe.linear_probe import (
    IGNORE_INDEX,
    LinearProbe,
    ProbeRecipe,
    VoxelFeatures,
    sample_at_voxels,
    train_probe,
)
from nnunet_smit.probe.patches import voxel_features

PATCH = (16, 24, 20)
NUM_CLASSES = 3
RECIPE = ProbeRecipe(voxels_per_patch=1024, iterations=100, batch_voxels=1024)


def test_features_read_at_voxels_are_the_trilinear_upsampling_there():
    scale = torch.randn(1, 5, 4, 6, 5)
    voxels = torch.stack([torch.randint(0, s, (500,)) for s in PATCH], dim=1)
    upsampled = F.interpolate(scale, size=PATCH, mode="trilinear", align_corners=False)[0]
    expected = upsampled[:, voxels[:, 0], voxels[:, 1], voxels[:, 2]].t()
    # float32 interpolation weights computed two ways: a few ulp apart
    torch.testing.assert_close(sample_at_voxels(scale, voxels, PATCH), expected, atol=1e-5, rtol=0)


def test_the_head_on_feature_maps_is_the_head_on_upsampled_voxel_features():
    """Standardise and convolve each scale, upsample the logits = upsample the features, then one linear map."""
    scales = [torch.randn(2, 4, 8, 12, 10), torch.randn(2, 6, 4, 6, 5), torch.randn(2, 3, *PATCH)]
    probe = LinearProbe([4, 6, 3], NUM_CLASSES)
    probe.fit_statistics([s.transpose(0, 1).flatten(1).t() for s in scales])
    probe.set_weights(torch.randn(NUM_CLASSES, 13), torch.randn(NUM_CLASSES))
    logits = probe(scales, PATCH)
    voxels = torch.stack([torch.randint(0, s, (300,)) for s in PATCH], dim=1)
    at_voxels = probe.classify([sample_at_voxels(s[1:2], voxels, PATCH) for s in scales])
    torch.testing.assert_close(at_voxels, logits[1][:, voxels[:, 0], voxels[:, 1], voxels[:, 2]].t(), atol=1e-4,
                               rtol=1e-4)


def _labels(seed: int) -> torch.Tensor:
    """(1, 1, *PATCH) labels: two blocks of classes 1 and 2 in background 0, on the 4-voxel grid of the coarsest
    planted scale (so pooling loses nothing), a padded border of -1."""
    generator = torch.Generator().manual_seed(seed)
    labels = torch.zeros(PATCH, dtype=torch.long)
    z, y = (4 * int(torch.randint(0, 2, (1,), generator=generator)) for _ in range(2))
    labels[z:z + 8, y:y + 8, 0:8] = 1
    labels[z:z + 4, y + 8:y + 16, 8:16] = 2
    labels[:, :, -1] = -1  # nnU-Net's padding of segmentations
    return labels[None, None]


class _PlantedFeatures:
    """Stands in for FrozenFeatures: the one-hot label pooled to 1/2 and 1/4 (or noise of the same shapes)."""

    scales = ("stage0", "stage1")

    class network:  # noqa: N801 - the attribute FrozenFeatures has
        @staticmethod
        def to_encoder_axes(x):
            return x

    def __init__(self, informative: bool) -> None:
        self.informative = informative

    def __call__(self, labels: torch.Tensor):
        one_hot = F.one_hot(labels[:, 0].long().clamp_min(0), NUM_CLASSES).permute(0, 4, 1, 2, 3).float()
        pooled = [F.avg_pool3d(one_hot, 2), F.avg_pool3d(one_hot, 4)]
        return pooled if self.informative else [torch.randn_like(p) for p in pooled]


def _dice(probe: LinearProbe, features: _PlantedFeatures, labels: torch.Tensor) -> float:
    with torch.no_grad():
        predicted = probe(features(labels), PATCH).argmax(1)
    target = labels[:, 0]
    dice = []
    for c in range(1, NUM_CLASSES):
        p, r = predicted[target >= 0] == c, target[target >= 0] == c
        dice.append(float(2 * (p & r).sum() / (p.sum() + r.sum())))
    return sum(dice) / len(dice)


def _train(features: _PlantedFeatures, recipe: ProbeRecipe = RECIPE) -> LinearProbe:
    parts = []
    for seed in range(3):
        labels = _labels(seed)
        # the "image" is the label itself; the planted features read it
        parts.append(voxel_features(features, {"data": labels.float(), "target": labels}, None,
                                    recipe.voxels_per_patch, seed, torch.device("cpu")))
    voxels = VoxelFeatures.concatenate(parts)
    assert int((voxels.targets == IGNORE_INDEX).sum()) == 0  # padding is never trained on
    return train_probe(voxels, NUM_CLASSES, recipe, seed=0, device=torch.device("cpu"))


def test_features_that_encode_the_label_give_dice_near_one_and_noise_does_not():
    informative, noise = _PlantedFeatures(True), _PlantedFeatures(False)
    held_out = _labels(7)
    # upsampled, the pooled one-hot ramps across a block's edge: the head's argmax cuts the ramp at the edge
    assert _dice(_train(informative), informative, held_out) > 0.95
    assert _dice(_train(noise), noise, held_out) < 0.6


def test_training_is_deterministic_for_a_seed():
    informative, recipe = _PlantedFeatures(True), ProbeRecipe(voxels_per_patch=256, iterations=10, batch_voxels=256)
    first, second = _train(informative, recipe), _train(informative, recipe)
    for a, b in zip(first.state_dict().values(), second.state_dict().values()):
        assert torch.equal(a, b)
