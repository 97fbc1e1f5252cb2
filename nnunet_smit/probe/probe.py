"""Linear probes of frozen encoders on an nnU-Net dataset: what their features say about the labels, without training
the encoder.

For every encoder, and the two baselines (``random``: the first encoder's architecture from random init, with random
conv blocks where the checkpoint carries pretrained ones, and one more ``random_<name>`` for every later encoder of
another architecture or other parts; ``intensity``: the mapped input voxel alone), a linear voxel classifier
(:mod:`nnunet_smit.probe.linear_probe`) is trained on the frozen features (:mod:`nnunet_smit.probe.features`) of
nnU-Net patches of k labelled cases (:mod:`nnunet_smit.probe.patches`) and scored with nnU-Net's Dice on the held-out
cases of ``smit_study`` (:mod:`nnunet_smit.probe.scoring`). The held-out and labelled cases come from
:mod:`nnunet_smit.study.splits`, so a probe and a study of one dataset use the same cases.

:func:`probe_encoder` is the in-memory entry point (an encoder module during pretraining); :func:`run_probe` is
``smit_probe``'s.
"""
from __future__ import annotations

import logging
import re
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import torch

from nnunet_smit.architectures import SwinEncoder
from nnunet_smit.checkpoint import DecoderParts, load_encoder_checkpoint
from nnunet_smit.conventions import PretrainPreprocessing
from nnunet_smit.errors import SMITError
from nnunet_smit.probe import report
from nnunet_smit.probe.features import (
    INPUT_SCALE,
    SCALE_SETS,
    FrozenFeatures,
    build_frozen_network,
    pretrained_scales,
    probe_plans,
    random_encoder,
)
from nnunet_smit.probe.linear_probe import ProbeRecipe, VoxelFeatures, train_probe
from nnunet_smit.probe.patches import case_seed, sample_patches, voxel_features
from nnunet_smit.probe.scoring import predict_test_cases, score_predictions
from nnunet_smit.study.splits import LabelledSet, held_out_cases, labelled_sets
from nnunet_smit.study.study import resolve_dataset
from nnunet_smit.trainers.plans_settings import clip_range_warnings, intensity_statistics

logger = logging.getLogger(__name__)

PROBE_FORMAT = "nnunet_smit.probe"
BASELINES = ("random", "intensity")
# An online probe during pretraining: one k, one seed, few patches and steps.
ONLINE_RECIPE = ProbeRecipe(patches_per_case=4, iterations=300)


@dataclass
class ProbeSettings:
    """What ``smit_probe`` measures (written into ``probe.json``).

    Attributes:
        dataset: nnU-Net dataset name or id, planned and preprocessed.
        output: the probe folder.
        encoders: encoder checkpoint files (one table row each; the baselines follow the first).
        labelled: numbers of labelled training cases k.
        seeds: draws of the labelled cases per k (``smit_study``'s draws).
        configuration: nnU-Net configuration.
        plans: nnU-Net plans identifier.
        device: "cuda", "cpu" or "mps".
        test_fraction: share of the cases held out (``smit_study``'s default 0.2).
        recipe: how every probe is trained.
    """

    dataset: str
    output: Path
    encoders: Sequence[str]
    labelled: Sequence[int] = (1, 2, 4)
    seeds: int = 1
    configuration: str = "3d_fullres"
    plans: str = "nnUNetPlans"
    device: str = "cpu"
    test_fraction: float = 0.2
    recipe: ProbeRecipe = field(default_factory=ProbeRecipe)


@dataclass
class ProbedEncoder:
    """One line of the table: a frozen encoder (with the conv blocks its checkpoint carries), the preprocessing it
    was pretrained with, and the scales it gives.

    Attributes:
        decoder: the SMITNet decoder (kind, norm) of its conv blocks; None: SMITNet's default.
        decoder_parts: the pretrained conv blocks loaded into that decoder (None: at the baseline's random init).
        parts: the checkpoint parts beside the encoder it stands for (``("skips",)`` ...), pretrained or random.
    """

    name: str
    encoder: str  # what the rows report: the checkpoint path, "random" or "intensity"
    module: SwinEncoder
    preprocessing: PretrainPreprocessing
    scales: Sequence[str]
    sha256: Optional[str] = None
    decoder: Optional[Tuple[str, str]] = None
    decoder_parts: Optional[DecoderParts] = None
    parts: Tuple[str, ...] = ()


def _case_sets(case_ids: Sequence[str], labelled: Sequence[int], seeds: int,
               test_fraction: float) -> Tuple[List[str], List[LabelledSet]]:
    """smit_study's held-out cases and labelled sets (the same functions, so the same cases)."""
    test_cases = held_out_cases(case_ids, test_fraction)
    pool = [c for c in case_ids if c not in set(test_cases)]
    return test_cases, labelled_sets(pool, labelled, seeds)


def check_plain_labels(dataset: Any) -> None:
    """SMITError for a region-based dataset (overlapping labels, trained with sigmoids): the probe is a softmax."""
    if any(isinstance(value, (list, tuple)) for value in dataset.dataset_json["labels"].values()):
        raise SMITError(f"{dataset.name} is trained on regions (overlapping labels); the probe's softmax classifier "
                        "needs plain labels.")


def probe_one_encoder(probed: ProbedEncoder, dataset: Any, configuration: str, subsets: Sequence[LabelledSet],
                      test_cases: Sequence[str], recipe: ProbeRecipe, device: torch.device,
                      predictions: Path) -> List[Dict[str, Any]]:
    """Train one probe per labelled set on ``probed``'s frozen features and score it on ``test_cases``.

    Returns one result per subset: {"labelled", "seed", "train_cases", "test_cases", "dice", "dice_per_class",
    "seconds"}; the predictions and nnU-Net's ``summary.json`` lie in ``predictions/k{k}_seed{s}``.
    """
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    plans = probe_plans(dataset.plans, configuration, probed.module.config, probed.preprocessing, recipe.patch_size,
                        probed.decoder)
    plans_manager = PlansManager(plans)
    configuration_manager = plans_manager.get_configuration(configuration)
    label_manager = plans_manager.get_label_manager(dataset.dataset_json)
    data_folder = dataset.preprocessed / configuration_manager.data_identifier
    in_channels = len(dataset.dataset_json.get("channel_names", dataset.dataset_json.get("modality", {"0": ""})))
    network = build_frozen_network(plans, configuration, in_channels, probed.module, probed.decoder_parts).to(device)
    features = FrozenFeatures(network, probed.scales)
    patch_size = configuration_manager.patch_size

    cached: Dict[str, VoxelFeatures] = {}
    heads, seconds = {}, {}
    for subset in subsets:
        start = time.time()
        for case in subset.train_cases:
            if case not in cached:
                patches = sample_patches(data_folder, case, patch_size, label_manager, recipe.patches_per_case)
                cached[case] = voxel_features(features, patches, label_manager.ignore_label, recipe.voxels_per_patch,
                                              case_seed(case), device)
        training = VoxelFeatures.concatenate([cached[c] for c in subset.train_cases])
        key = f"k{subset.labelled}_seed{subset.seed}"
        heads[key] = train_probe(training, label_manager.num_segmentation_heads, recipe, subset.seed, device)
        seconds[key] = time.time() - start
        logger.info("%s: probe %s trained on %s in %.0f s", probed.name, key, ", ".join(subset.train_cases),
                    seconds[key])
    del cached
    folders = {key: predictions / key for key in heads}
    predicted = predict_test_cases(features, heads, plans, configuration, dataset.dataset_json, data_folder,
                                   test_cases, folders, recipe.tile_step_size, device)
    results = []
    for subset, key in zip(subsets, heads):
        start = time.time()
        dice = score_predictions(folders[key], dataset.preprocessed / "gt_segmentations", test_cases, plans,
                                 dataset.dataset_json)
        results.append({"labelled": subset.labelled, "seed": subset.seed, "train_cases": list(subset.train_cases),
                        "test_cases": list(test_cases), **dice,
                        "seconds": round(seconds[key] + predicted[key] + time.time() - start, 1)})
    return results


def probe_encoder(encoder: SwinEncoder, preprocessing: PretrainPreprocessing, dataset: Union[str, Any],
                  labelled: int = 1, seed: int = 0, configuration: str = "3d_fullres", plans: str = "nnUNetPlans",
                  recipe: ProbeRecipe = ONLINE_RECIPE, device: Optional[Union[str, torch.device]] = None,
                  test_fraction: float = 0.2) -> Dict[str, Any]:
    """Linear-probe Dice of an encoder in memory (e.g. the teacher during pretraining), on smit_study's held-out cases.

    Args:
        encoder: the encoder; a frozen copy is probed, the module itself is left as it is (mode, device, gradients).
        preprocessing: how its input was preprocessed in pretraining (HU window, scale, pad).
        dataset: nnU-Net dataset name or id (planned and preprocessed, nnU-Net's folder variables set), or what
            :func:`nnunet_smit.study.study.resolve_dataset` returned for it (resolve once, probe often).
        labelled, seed: the labelled set, smit_study's draw ``seed`` of ``labelled`` cases.
        configuration, plans: nnU-Net configuration and plans identifier (used when ``dataset`` is a name).
        recipe: probe training (:data:`ONLINE_RECIPE`: 4 patches per case, 300 steps).
        device: where features and probe run (default: the encoder's device).
        test_fraction: share of the cases held out (smit_study's default).

    Returns:
        {"dice": foreground mean Dice or None, "dice_per_class": {label name: Dice or None}, "labelled", "seed",
        "train_cases", "test_cases", "seconds"}. Predictions go to a temporary folder, removed afterwards.
    """
    resolved = resolve_dataset(str(dataset), configuration, plans) if isinstance(dataset, (str, int)) else dataset
    check_plain_labels(resolved)
    test_cases, subsets = _case_sets(resolved.case_ids, [labelled], seed + 1, test_fraction)
    subset = next(s for s in subsets if s.seed == seed)
    device = torch.device(device) if device is not None else next(encoder.parameters()).device
    probed = ProbedEncoder("online", "online", encoder, preprocessing, SCALE_SETS[recipe.scales])
    with tempfile.TemporaryDirectory(prefix="smit_probe_") as folder:
        (result,) = probe_one_encoder(probed, resolved, configuration, [subset], test_cases, recipe, device,
                                      Path(folder))
    return result


# --------------------------------------------------------------------------------------------------- smit_probe

def _label(path: str, sha256: str, taken: Sequence[str]) -> str:
    label = re.sub(r"[^A-Za-z0-9_.-]+", "_", Path(path).name.split(".")[0]) or "encoder"
    clash = label in taken or label in BASELINES or label.startswith("random_")
    return f"{label}-{sha256[:8]}" if clash else label


def load_encoders(paths: Sequence[str], scales: str) -> List[ProbedEncoder]:
    """The encoders in table order, then the baselines: ``random`` in the first encoder's architecture (its
    encoder and the conv blocks its checkpoint carries at random init, read at the same scales), a
    ``random_<name>`` for every later encoder whose architecture or parts differ, and ``intensity``. SMITError for
    a file that does not load."""
    if not paths:
        raise SMITError("no encoder to probe: pass --encoder FILE (the baselines are built from the first).")
    if scales not in SCALE_SETS or scales == INPUT_SCALE:
        raise SMITError(f"unknown feature set {scales!r}; choose one of "
                        f"{[s for s in SCALE_SETS if s != INPUT_SCALE]}.")
    probed: List[ProbedEncoder] = []
    for path in paths:
        resolved = str(Path(path).expanduser().resolve())
        try:
            checkpoint = load_encoder_checkpoint(resolved)
            module = SwinEncoder(checkpoint.config)
            module.load_state_dict(checkpoint.state_dict)
        except (SMITError, RuntimeError) as error:
            raise SMITError(f"--encoder {path} does not load: {str(error).splitlines()[0]}") from None
        blocks = checkpoint.decoder_parts
        parts = tuple(blocks.parts) if blocks is not None else ()
        probed.append(ProbedEncoder(_label(resolved, checkpoint.sha256, [p.name for p in probed]), resolved, module,
                                    checkpoint.preprocessing, pretrained_scales(scales, parts), checkpoint.sha256,
                                    (blocks.kind, blocks.norm) if blocks is not None else None, blocks, parts))
    baselines: List[ProbedEncoder] = []
    for entry in probed:
        twin = (entry.module.config, entry.decoder, entry.parts)
        if any((b.module.config, b.decoder, b.parts) == twin for b in baselines):
            continue
        name = "random" if not baselines else f"random_{entry.name}"
        baselines.append(ProbedEncoder(name, name, random_encoder(entry.module.config), entry.preprocessing,
                                       entry.scales, decoder=entry.decoder, parts=entry.parts))
    first = probed[0]
    return probed + baselines + [ProbedEncoder("intensity", "intensity", first.module, first.preprocessing,
                                               SCALE_SETS[INPUT_SCALE])]


def run_probe(settings: ProbeSettings) -> Path:
    """Check everything, probe every encoder and the baselines, and write probe.json / probe.md / probe.png into OUT.

    Returns:
        The path of ``probe.md``.
    """
    dataset = resolve_dataset(settings.dataset, settings.configuration, settings.plans)
    check_plain_labels(dataset)
    test_cases, subsets = _case_sets(dataset.case_ids, settings.labelled, settings.seeds, settings.test_fraction)
    probed = load_encoders(settings.encoders, settings.recipe.scales)
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    resolved = PlansManager(dataset.plans).get_configuration(settings.configuration).configuration
    for entry in (p for p in probed if p.sha256 is not None):
        for warning in clip_range_warnings(intensity_statistics(dataset.plans, resolved), entry.preprocessing,
                                           dataset.name, settings.plans, entry.encoder):
            logger.warning("%s: %s", entry.name, warning.removeprefix("WARNING: "))

    out = Path(settings.output)
    out.mkdir(parents=True, exist_ok=True)
    device = torch.device(settings.device)
    header = {
        "format": PROBE_FORMAT, "dataset": dataset.name, "plans": settings.plans,
        "configuration": settings.configuration, "test_fraction": settings.test_fraction,
        "test_cases": test_cases, "labelled": sorted(set(settings.labelled)), "seeds": settings.seeds,
        "device": settings.device, "recipe": asdict(settings.recipe),
        "encoders": [{"name": p.name, "encoder": p.encoder, "sha256": p.sha256, "parts": ["encoder", *p.parts],
                      "pretrained_parts": (["encoder", *p.parts] if p.sha256 else []), "scales": list(p.scales)}
                     for p in probed],
    }
    rows: List[Dict[str, Any]] = []
    for index, entry in enumerate(probed, start=1):
        print(f"[smit_probe] {index} of {len(probed)}: {entry.name} ({', '.join(entry.scales)})", flush=True)
        results = probe_one_encoder(entry, dataset, settings.configuration, subsets, test_cases, settings.recipe,
                                    device, out / "predictions" / entry.name)
        for result in results:
            rows.append({"name": entry.name, "encoder": entry.encoder, "encoder_sha256": entry.sha256, **result})
            print(f"[smit_probe]   k={result['labelled']} seed {result['seed']}: Dice "
                  + (f"{result['dice']:.3f}" if result["dice"] is not None else "none")
                  + f" ({result['seconds']:.0f} s)", flush=True)
        report.write_outputs(out, header, rows, [p.name for p in probed])
    print(report.table(rows, [p.name for p in probed], header["labelled"]), flush=True)
    return out / "probe.md"
