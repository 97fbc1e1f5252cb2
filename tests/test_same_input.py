"""The encoder sees in fine-tuning what it saw in pretraining: axes, HU, padding, across the checkpoint.

One generated CT scan with a different pattern along each axis and slices thinner than its in-plane spacing (so that
nnU-Net's plans transpose the axes) goes two ways:

- through ``smit_pretrain``'s own cache code (:func:`nnunet_smit.pretraining.cache.build_cache`), which gives the
  array the encoder was pretrained on: (z, y, x), HU clipped to the window and scaled, padded with the window's bottom;
- through the real ``nnUNetv2_plan_and_preprocess`` (default plans) and ``smit_plan`` (``nnUNetPlans_SMIT``), then
  nnU-Net's own training loader and sliding-window prediction into the fine-tuning network.

A forward pre-hook on the ``SwinEncoder`` captures what reaches it. The cache is built at the dataset's spacing, so
no resampling stands between the two (nnU-Net resamples nothing either) and the comparison is voxel for voxel.
"""
from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from typing import List

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from nnunet_smit.architectures import SMITConfig, SwinEncoder
from nnunet_smit.checkpoint import save_encoder_checkpoint
from nnunet_smit.conventions import PretrainPreprocessing

DATASET_ID = 907
DATASET = f"Dataset{DATASET_ID}_SMITSameInput"
SHAPE_ZYX = (44, 22, 30)
SPACING_ZYX = (1.0, 2.0, 2.0)  # thinner slices than in-plane: nnU-Net puts the largest spacing (y) first
PATCH = 64  # nnUNetTrainerSMIT_64: larger than the case on every axis, so every patch is padded
PREPROCESSING = PretrainPreprocessing(target_spacing_mm=SPACING_ZYX, foreground_crop=False)


def _scan(shift: float) -> np.ndarray:
    """HU (z, y, x): a ramp along z, a steeper one along y, a wave along x; inside (-175, 250), never 0."""
    z, y, x = np.meshgrid(*(np.arange(n, dtype=np.float32) for n in SHAPE_ZYX), indexing="ij")
    return (-140.5 + shift + 4.0 * z + 3.0 * y + 20.0 * np.sin(x / 3.0)).astype(np.float32)


def _write(array: np.ndarray, path: Path) -> None:
    image = sitk.GetImageFromArray(array)
    image.SetSpacing(SPACING_ZYX[::-1])
    sitk.WriteImage(image, str(path))


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    root = tmp_path_factory.mktemp("same_input")
    dirs = {name: root / name for name in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results")}
    raw = dirs["nnUNet_raw"] / DATASET
    for sub in ("imagesTr", "labelsTr"):
        (raw / sub).mkdir(parents=True)
    for i, shift in enumerate((0.0, 7.0)):
        hu = _scan(shift)
        _write(hu, raw / "imagesTr" / f"case_{i:03d}_0000.nii.gz")
        _write((hu > -40).astype(np.uint8), raw / "labelsTr" / f"case_{i:03d}.nii.gz")  # soft tissue: a narrow clip
    (raw / "dataset.json").write_text(json.dumps({"channel_names": {"0": "CT"}, "labels": {"background": 0, "organ": 1},
                                                  "numTraining": 2, "file_ending": ".nii.gz"}))
    config = SMITConfig.preset("tiny")
    encoder = root / "encoder.pt"
    save_encoder_checkpoint(encoder, SwinEncoder(config).state_dict(), config, PREPROCESSING)
    saved = {k: os.environ.get(k) for k in (*dirs, "nnUNet_SMIT_weights", "nnUNet_compile")}
    os.environ.update({k: str(v) for k, v in dirs.items()})
    os.environ.update(nnUNet_SMIT_weights=str(encoder), nnUNet_compile="f")
    env = {**os.environ, "nnUNet_n_proc_DA": "1", "nnUNet_def_n_proc": "1"}
    subprocess.run(["nnUNetv2_plan_and_preprocess", "-d", str(DATASET_ID), "-c", "3d_fullres", "-np", "1", "-npfp", "1"],
                   env=env, check=True, capture_output=True)
    subprocess.run(["smit_plan", "-d", str(DATASET_ID), "--encoder", str(encoder), "-np", "1"], env=env, check=True,
                   capture_output=True)

    from nnunet_smit.pretraining.cache import build_cache

    cache = build_cache([raw / "imagesTr"], root / "cache", PREPROCESSING, min_shape=(8, 8, 8))
    yield dirs, cache
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


def _trainer(dirs, plans_name: str):
    from nnunet_smit.trainers import nnUNetTrainerSMIT_64

    folder = dirs["nnUNet_preprocessed"] / DATASET
    plans = json.loads((folder / f"{plans_name}.json").read_text())
    plans["continue_training"] = False  # what nnUNetv2_train adds (2.8.1 pops it)
    dataset_json = json.loads((folder / "dataset.json").read_text())
    trainer = nnUNetTrainerSMIT_64(plans=plans, configuration="3d_fullres", fold=0, dataset_json=dataset_json,
                                   device=torch.device("cpu"))
    trainer.initialize()
    trainer.set_deep_supervision_enabled(False)  # as nnU-Net's validation and nnUNetv2_predict run it
    trainer.network.eval()
    return trainer, plans


def _capture(network) -> List[torch.Tensor]:
    seen: List[torch.Tensor] = []
    network.encoder.register_forward_pre_hook(lambda module, args: seen.append(args[0].detach().clone()))
    return seen


def _expected(cache, plans: dict, case: str) -> np.ndarray:
    """The cache's array with the HU that nnU-Net's clip range of ``plans`` lets through (all of it under SMIT
    plans)."""
    properties = plans["foreground_intensity_properties_per_channel"]["0"]
    low, high = (PREPROCESSING.scale_hu(np.float64(properties[k])) for k in ("percentile_00_5", "percentile_99_5"))
    return np.clip(cache.load(case), low, high)


def _assert_same_input(encoder_input: torch.Tensor, expected: np.ndarray) -> None:
    """One (1, 1, D, H, W) encoder input: the case in (z, y, x) inside, the pretraining's pad value (0.0) around."""
    seen = encoder_input[0, 0].numpy()
    pad = PREPROCESSING.scaled_range[0]
    inside = np.argwhere(seen != pad)
    start, stop = inside.min(axis=0), inside.max(axis=0) + 1
    assert tuple(stop - start) == expected.shape, f"encoder got axes {tuple(stop - start)}, pretraining {expected.shape}"
    box = tuple(slice(a, b) for a, b in zip(start, stop))
    # the cache stores float16: half a step of its 11-bit mantissa at values up to 1, about 0.2 HU
    np.testing.assert_allclose(seen[box], expected, atol=2.5e-4, rtol=0)
    outside = np.ones(seen.shape, dtype=bool)
    outside[box] = False
    assert outside.any() and np.all(seen[outside] == pad)  # nnU-Net's zero padding arrives as pretraining's air


@pytest.mark.parametrize("plans_name", ["nnUNetPlans", "nnUNetPlans_SMIT"])
def test_the_encoder_gets_the_cache_array_through_nnunet_prediction(chain, plans_name):
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
    from nnunetv2.training.dataloading.nnunet_dataset import infer_dataset_class

    dirs, cache = chain
    trainer, plans = _trainer(dirs, plans_name)
    assert plans["transpose_forward"] == [1, 0, 2]  # nnU-Net transposed this scan: otherwise the test says nothing
    window = list(PREPROCESSING.hu_window)
    clip = [plans["foreground_intensity_properties_per_channel"]["0"][k] for k in ("percentile_00_5", "percentile_99_5")]
    assert (clip == window) == (plans_name == "nnUNetPlans_SMIT")  # default plans cut into the window, SMIT's do not
    seen = _capture(trainer.network)
    predictor = nnUNetPredictor(tile_step_size=0.5, use_mirroring=False, perform_everything_on_device=False,
                                device=torch.device("cpu"), verbose=False, allow_tqdm=False)
    predictor.manual_initialization(trainer.network, trainer.plans_manager, trainer.configuration_manager, None,
                                    trainer.dataset_json, type(trainer).__name__, None)
    folder = str(dirs["nnUNet_preprocessed"] / DATASET / trainer.configuration_manager.data_identifier)
    data, _, _, _ = infer_dataset_class(folder)(folder).load_case("case_000")
    data = torch.from_numpy(np.asarray(data)).float()
    assert tuple(data.shape[1:]) == tuple(SHAPE_ZYX[a] for a in plans["transpose_forward"])
    logits = predictor.predict_sliding_window_return_logits(data)
    assert tuple(logits.shape[1:]) == tuple(data.shape[1:])  # masks come back in nnU-Net's orientation
    assert len(seen) == 1
    _assert_same_input(seen[0], _expected(cache, plans, cache_id(cache, "case_000")))


@pytest.mark.parametrize("plans_name", ["nnUNetPlans", "nnUNetPlans_SMIT"])
def test_the_encoder_gets_the_cache_array_through_nnunets_training_loader(chain, plans_name):
    from nnunetv2.training.dataloading.data_loader import nnUNetDataLoader
    from nnunetv2.training.dataloading.nnunet_dataset import infer_dataset_class

    dirs, cache = chain
    trainer, plans = _trainer(dirs, plans_name)
    folder = str(dirs["nnUNet_preprocessed"] / DATASET / trainer.configuration_manager.data_identifier)
    dataset = infer_dataset_class(folder)(folder, identifiers=["case_001"])
    patch = trainer.configuration_manager.patch_size
    loader = nnUNetDataLoader(dataset, 1, patch, patch, trainer.label_manager, oversample_foreground_percent=0.0)
    batch = next(loader)
    seen = _capture(trainer.network)
    with torch.no_grad():
        trainer.network(torch.as_tensor(batch["data"]).float())
    _assert_same_input(seen[0], _expected(cache, plans, cache_id(cache, "case_001")))


def cache_id(cache, case: str) -> str:
    """The cache's id of the scan of nnU-Net case ``case``."""
    (found,) = [i for i in cache.case_ids if case in i]
    return found
