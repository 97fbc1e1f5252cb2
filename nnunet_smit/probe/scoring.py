"""Probe heads predict the held-out cases as nnU-Net does, and nnU-Net's evaluation scores them.

Each head runs inside nnU-Net's own sliding window (:class:`nnunetv2.inference.predict_from_raw_data.nnUNetPredictor`,
Gaussian weighting, step 0.5, no mirroring) over the preprocessed test case, and its logits are written by nnU-Net's
``export_prediction_from_logits`` (resampled to the original spacing, cropping undone, original axes), exactly as
nnU-Net's final validation writes a fold's predictions. Every prediction is then scored against nnU-Net's
``gt_segmentations`` by nnU-Net's per-case ``compute_metrics``, averaged as ``compute_metrics_on_folder`` does (per
class over cases ignoring NaN, then over the foreground classes), into a ``summary.json`` of nnU-Net's format, from
which the study's own reader takes the Dice.
"""
from __future__ import annotations

import contextlib
import io
import time
from pathlib import Path
from typing import Any, Dict, List, Mapping, Sequence

import numpy as np
import torch
from torch import nn

from nnunet_smit.errors import SMITError
from nnunet_smit.probe.features import FrozenFeatures
from nnunet_smit.probe.linear_probe import LinearProbe
from nnunet_smit.study.arms import read_dice

SUMMARY = "summary.json"


class ProbeNetwork(nn.Module):
    """Frozen features and one probe head as nnU-Net's predictor calls a network: (B, C_in, *patch) in nnU-Net's axes
    -> logits (B, K, *patch) in nnU-Net's axes."""

    def __init__(self, features: FrozenFeatures, head: LinearProbe) -> None:
        super().__init__()
        self.features = features
        self.head = head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        network = self.features.network
        size = network.to_encoder_axes(x[:, :1]).shape[2:]
        return network.from_encoder_axes(self.head(self.features(x), size))


def predict_test_cases(features: FrozenFeatures, heads: Mapping[str, LinearProbe], plans: Dict[str, Any],
                       configuration: str, dataset_json: Dict[str, Any], data_folder: Path,
                       test_cases: Sequence[str], output: Mapping[str, Path], tile_step_size: float,
                       device: torch.device) -> Dict[str, float]:
    """Write every head's prediction of every test case into ``output[head]`` as nnU-Net writes them; returns the
    seconds each head took (the encoder's pass over a case is paid by the first head and reused by the others)."""
    from nnunetv2.inference.export_prediction import export_prediction_from_logits
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
    from nnunetv2.training.dataloading.nnunet_dataset import infer_dataset_class
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    plans_manager = PlansManager(plans)
    configuration_manager = plans_manager.get_configuration(configuration)
    with contextlib.redirect_stdout(io.StringIO()):  # off CUDA it prints that it works on the CPU, every time
        predictor = nnUNetPredictor(tile_step_size=tile_step_size, use_gaussian=True, use_mirroring=False,
                                    perform_everything_on_device=device.type == "cuda", device=device, verbose=False,
                                    verbose_preprocessing=False, allow_tqdm=False)
    dataset = infer_dataset_class(str(data_folder))(str(data_folder), identifiers=list(test_cases))
    seconds = {name: 0.0 for name in heads}
    for folder in output.values():
        Path(folder).mkdir(parents=True, exist_ok=True)
    features.to(device)
    for case in test_cases:
        data, _, _, properties = dataset.load_case(case)
        image = torch.from_numpy(np.asarray(data)).float()
        with features.memoised():
            for name, head in heads.items():
                start = time.time()
                predictor.manual_initialization(ProbeNetwork(features, head.to(device)), plans_manager,
                                                configuration_manager, None, dataset_json, "smit_probe", None)
                logits = predictor.predict_sliding_window_return_logits(image).float().cpu()
                export_prediction_from_logits(logits, properties, configuration_manager, plans_manager, dataset_json,
                                              str(Path(output[name]) / case), False,
                                              num_threads_torch=torch.get_num_threads())
                seconds[name] += time.time() - start
    return seconds


def label_names(dataset_json: Dict[str, Any]) -> Dict[str, str]:
    """nnU-Net's label value (as its summary writes it) -> label name, for plain (non-region) labels."""
    return {str(value): name for name, value in dataset_json["labels"].items() if not isinstance(value, (list, tuple))}


def score_predictions(prediction_folder: Path, reference_folder: Path, test_cases: Sequence[str],
                      plans: Dict[str, Any], dataset_json: Dict[str, Any]) -> Dict[str, Any]:
    """nnU-Net's metrics of every predicted test case, its ``summary.json`` written into ``prediction_folder``;
    returns {"dice": foreground mean, "dice_per_class": {name: Dice or None}} (:func:`read_dice`)."""
    from nnunetv2.evaluation.evaluate_predictions import compute_metrics, save_summary_json
    from nnunetv2.utilities.json_export import recursive_fix_for_json_export
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    plans_manager = PlansManager(plans)
    label_manager = plans_manager.get_label_manager(dataset_json)
    reader = plans_manager.image_reader_writer_class()
    ending = dataset_json["file_ending"]
    missing = [c for c in test_cases if not (Path(reference_folder) / f"{c}{ending}").is_file()]
    if missing:
        raise SMITError(f"{reference_folder} lacks the reference segmentation of {missing[0]}; run "
                        "nnUNetv2_plan_and_preprocess again, which copies them there.")
    labels = label_manager.foreground_labels
    per_case = [compute_metrics(str(Path(reference_folder) / f"{c}{ending}"),
                                str(Path(prediction_folder) / f"{c}{ending}"), reader, labels,
                                label_manager.ignore_label) for c in test_cases]
    summary = {"metric_per_case": per_case, **_means(per_case, labels)}
    for part in (*per_case, summary["mean"], summary["foreground_mean"]):  # numpy numbers, as nnU-Net fixes them
        recursive_fix_for_json_export(part)
    save_summary_json(summary, str(Path(prediction_folder) / SUMMARY))
    return read_dice(Path(prediction_folder) / SUMMARY, label_names(dataset_json))


def _means(per_case: List[Dict[str, Any]], labels: Sequence[Any]) -> Dict[str, Any]:
    """``compute_metrics_on_folder``'s averages: per label over cases (NaN ignored), then over the foreground."""
    metrics = list(per_case[0]["metrics"][labels[0]])
    means = {label: {m: np.nanmean([case["metrics"][label][m] for case in per_case]) for m in metrics}
             for label in labels}
    foreground = {m: np.mean([means[label][m] for label in labels if label not in (0, "0")]) for m in metrics}
    return {"mean": means, "foreground_mean": foreground}
