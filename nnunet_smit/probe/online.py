"""The online probe: a linear probe of the encoder being pretrained, on a labelled nnU-Net dataset, every few epochs.

``smit_pretrain --probe DATASET`` builds an :class:`OnlineProbe` once (the dataset resolved and checked, the cases
drawn as ``smit_study`` draws them, the leakage guard run against the run's scans) and hands it to the pretraining
loop as a callable, so the loop knows nothing of nnU-Net or of this package: it calls ``probe(encoder,
preprocessing)`` on rank 0 and logs what comes back (:mod:`nnunet_smit.pretraining.probing`).
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional

import torch

from nnunet_smit.architectures import SwinEncoder
from nnunet_smit.conventions import PretrainPreprocessing
from nnunet_smit.errors import SMITError
from nnunet_smit.probe.linear_probe import ProbeRecipe
from nnunet_smit.probe.probe import ONLINE_RECIPE, _case_sets, check_plain_labels, probe_encoder
from nnunet_smit.study.study import resolve_dataset

logger = logging.getLogger(__name__)


class OnlineProbe:
    """Linear-probe Dice of an encoder in memory on ``dataset``: ``labelled`` cases of ``smit_study``'s draw ``seed``
    for training, its held-out cases for scoring, :data:`~nnunet_smit.probe.probe.ONLINE_RECIPE` by default.

    Args:
        dataset: nnU-Net dataset name or id, planned and preprocessed with ``plans`` (nnU-Net's folder variables set).
        labelled, seed: the labelled set (k cases, smit_study's draw ``seed``).
        configuration, plans: nnU-Net configuration and plans identifier.
        device: where the probe runs (default: the encoder's device).

    Raises:
        SMITError: a dataset that is not planned or preprocessed, region labels, or fewer than ``labelled`` cases
            outside the held-out set (one line, before any pretraining).
    """

    def __init__(self, dataset: str, labelled: int = 1, seed: int = 0, configuration: str = "3d_fullres",
                 plans: str = "nnUNetPlans", recipe: ProbeRecipe = ONLINE_RECIPE,
                 device: Optional[str] = None) -> None:
        try:
            self.dataset = resolve_dataset(str(dataset), configuration, plans)
            check_plain_labels(self.dataset)
            self.test_cases, subsets = _case_sets(self.dataset.case_ids, [labelled], seed + 1, 0.2)
        except SMITError as error:
            raise SMITError(f"--probe {dataset}: {str(error).replace('--labelled', '--probe_labelled')}") from None
        self.train_cases = list(next(s for s in subsets if s.seed == seed).train_cases)
        self.labelled, self.seed = labelled, seed
        self.configuration, self.plans, self.recipe, self.device = configuration, plans, recipe, device

    def describe(self) -> Dict[str, Any]:
        """What the log's start record says of the probe."""
        return {"dataset": self.dataset.name, "plans": self.plans, "configuration": self.configuration,
                "labelled": self.labelled, "seed": self.seed, "train_cases": self.train_cases,
                "test_cases": list(self.test_cases)}

    def leakage(self, scan_fingerprints: Mapping[str, str]) -> List[str]:
        """Lines naming every probe case (labelled or held out) whose raw images are among the run's pretraining
        scans ({fingerprint: scan name}), or saying why that could not be checked."""
        from nnunetv2.paths import nnUNet_raw

        from nnunet_smit.files import read_json
        from nnunet_smit.fingerprints import check_raw_cases

        raw = Path(nnUNet_raw.get()) / self.dataset.name if nnUNet_raw.is_set() else None
        if raw is None or not (raw / "dataset.json").is_file():
            return [f"probe leakage check skipped: the raw images of {self.dataset.name} are not found (nnUNet_raw)."]
        raw_json = read_json(raw / "dataset.json", "the raw dataset.json", dict, "fix it as nnU-Net requires")
        cases = [*self.train_cases, *self.test_cases]
        result = check_raw_cases(raw, raw_json, cases, scan_fingerprints)
        lines = []
        for case, scans in sorted(result.leaked.items()):
            role = "labelled" if case in self.train_cases else "held-out"
            lines.append(f"probe leakage: {role} case {case} of {self.dataset.name} is also a pretraining scan "
                         f"({', '.join(sorted(scans)[:3])}); its probe Dice is not a held-out measure.")
        if result.missing:
            lines.append(f"probe leakage check: {len(result.missing)} case(s) without raw images under {raw} not "
                         f"checked, first {sorted(result.missing)[0]}.")
        return lines

    def __call__(self, encoder: SwinEncoder, preprocessing: PretrainPreprocessing) -> Dict[str, Any]:
        """Probe a frozen copy of ``encoder`` (left as it is); {"dice", "dice_per_class", "seconds", ...}."""
        device = torch.device(self.device) if self.device else next(encoder.parameters()).device
        return probe_encoder(encoder, preprocessing, self.dataset, self.labelled, self.seed, self.configuration,
                             self.plans, self.recipe, device)
