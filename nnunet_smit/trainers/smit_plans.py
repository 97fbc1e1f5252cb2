"""``smit_plan``: an nnU-Net plans variant whose preprocessing keeps the encoder's whole HU window.

nnU-Net's ``CTNormalization`` clips every CT channel to the dataset's foreground 0.5 and 99.5 percentiles before it
stores the preprocessed data. A dataset whose labels cover soft tissue only (a tumour, a small organ) has a narrow
range (e.g. [-449, 94] HU), so bone and contrast, which the encoder learned at the top of its window, are gone before
the trainer maps the values back to HU. ``CTNormalization`` reads that clip range from the plans
(``foreground_intensity_properties_per_channel``), so this module writes a copy of the plans whose CT percentiles are
the checkpoint's HU window, and preprocesses it once with nnU-Net's own preprocessing:

    smit_plan -d DATASET --encoder enc.pt [-pl nnUNetPlans] [-c 3d_fullres]    # writes nnUNetPlans_SMIT
    nnUNetv2_train DATASET 3d_fullres 0 -tr nnUNetTrainerSMIT -p nnUNetPlans_SMIT

The variant also carries the Swin-fitted patch and batch and the encoder's path (``smit_weights``), so training
needs no environment variable. The mean and standard deviation stay the dataset's (the trainer inverts them to HU).
The default plans, their preprocessed data and the dataset's ``splits_final.json`` are left as they are and shared.
Channels with other normalisations (MRI z-score) are not changed: they reach the encoder as nnU-Net normalised them.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import json
import logging
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

from nnunet_smit.checkpoint import load_encoder_checkpoint
from nnunet_smit.errors import SMITError, run_cli
from nnunet_smit.files import atomic_write
from nnunet_smit.trainers.patch_fitting import fit_patch_size
from nnunet_smit.trainers.plans_settings import CT_NORMALIZATION, WEIGHTS_PLANS_KEY

logger = logging.getLogger(__name__)

SUFFIX = "_SMIT"
# What the variant records of how it was made, at the top level of its plans.
RECORD_KEY = "smit_plan"


def smit_plans(plans: Dict[str, Any], encoder: Path, hu_window: Sequence[float], configurations: Sequence[str],
               source_plans: str, plans_name: str) -> Dict[str, Any]:
    """The plans variant: CT percentiles set to ``hu_window``, its own data identifiers, the fitted patch and batch
    and the encoder's path in ``configurations``; SMITError when there is nothing to make."""
    variant = copy.deepcopy(plans)
    variant["plans_name"] = plans_name
    properties = variant.get("foreground_intensity_properties_per_channel") or {}
    ct_channels: set = set()
    for name in configurations:
        configuration = variant["configurations"].get(name)
        if configuration is None:
            raise SMITError(f"configuration {name!r} is not in {source_plans} (it has "
                            f"{', '.join(plans['configurations'])}).")
        if "patch_size" not in configuration or len(configuration["patch_size"]) != 3:
            raise SMITError(f"configuration {name!r} is not a 3D configuration with its own patch; SMIT trainers need "
                            "3d_fullres, 3d_lowres or 3d_cascade_fullres.")
        ct_channels.update(i for i, s in enumerate(configuration["normalization_schemes"]) if s == CT_NORMALIZATION)
        fit = fit_patch_size(configuration["patch_size"], configuration["batch_size"])
        configuration.update(data_identifier=f"{plans_name}_{name}", patch_size=list(fit.patch_size),
                             batch_size=int(fit.batch_size), **{WEIGHTS_PLANS_KEY: str(encoder)})
    if not ct_channels:
        raise SMITError(f"no channel of {', '.join(configurations)} uses {CT_NORMALIZATION}: the SMIT plans change "
                        "only how CT is clipped; train with the default plans.")
    original = {}
    for channel in sorted(ct_channels):
        props = properties[str(channel)]
        original[str(channel)] = [props["percentile_00_5"], props["percentile_99_5"]]
        props["percentile_00_5"], props["percentile_99_5"] = float(hu_window[0]), float(hu_window[1])
    variant[RECORD_KEY] = {"source_plans": source_plans, "encoder": str(encoder), "hu_window": list(hu_window),
                           "configurations": list(configurations), "dataset_percentiles": original}
    return variant


def write_smit_plans(dataset: str, encoder: Path, source_plans: str = "nnUNetPlans",
                     configurations: Sequence[str] = ("3d_fullres",), plans_name: Optional[str] = None,
                     num_processes: int = 4, preprocess: bool = True) -> Path:
    """Write ``<source_plans>_SMIT.json`` beside the dataset's plans and preprocess its configurations; returns the
    plans file. SMITError for a dataset that is not planned, an unreadable encoder or nothing to change."""
    from nnunetv2.paths import nnUNet_preprocessed
    from nnunetv2.utilities.dataset_name_id_conversion import convert_dataset_name_to_id, maybe_convert_to_dataset_name

    if not nnUNet_preprocessed.is_set():
        raise SMITError("nnUNet_preprocessed is not set; export nnU-Net's folder variables and plan the dataset "
                        "first (nnUNetv2_plan_and_preprocess).")
    try:
        dataset_name = maybe_convert_to_dataset_name(dataset)
    except (RuntimeError, ValueError) as error:
        raise SMITError(f"dataset {dataset!r} is not known to nnU-Net ({str(error).splitlines()[0]}).") from None
    folder = Path(nnUNet_preprocessed.get()) / dataset_name
    source = folder / f"{source_plans}.json"
    if not source.is_file():
        raise SMITError(f"{dataset_name} has no {source_plans} plans ({source} does not exist); run "
                        f"nnUNetv2_plan_and_preprocess -d {dataset} first.")
    encoder = Path(encoder).expanduser().resolve()
    checkpoint = load_encoder_checkpoint(encoder)
    plans_name = plans_name or f"{source_plans}{SUFFIX}"
    plans = json.loads(source.read_text(encoding="utf-8"))
    variant = smit_plans(plans, encoder, checkpoint.preprocessing.hu_window, configurations, source_plans, plans_name)
    target = folder / f"{plans_name}.json"
    atomic_write(target, lambda tmp: Path(tmp).write_text(json.dumps(variant, indent=4), encoding="utf-8"))
    for channel, (low, high) in variant[RECORD_KEY]["dataset_percentiles"].items():
        logger.info("channel %s: the dataset's clip range [%g, %g] HU becomes the encoder's window %s HU", channel,
                    low, high, list(checkpoint.preprocessing.hu_window))
    if preprocess:
        from nnunetv2.experiment_planning.plan_and_preprocess_api import preprocess_dataset

        with contextlib.redirect_stdout(sys.stderr):  # nnU-Net's progress prints: stdout holds only the plans' path
            preprocess_dataset(convert_dataset_name_to_id(dataset_name), plans_name, list(configurations),
                               [num_processes], show_progress_bar=False)
    return target


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        prog="smit_plan",
        description="Write an nnU-Net plans variant (nnUNetPlans_SMIT) whose CT clipping is the encoder's HU window, "
        "with the Swin-fitted patch and the encoder's path, and preprocess it with nnU-Net's preprocessing. Then: "
        "nnUNetv2_train DATASET 3d_fullres FOLD -tr nnUNetTrainerSMIT -p nnUNetPlans_SMIT.",
    )
    parser.add_argument("-d", "--dataset", required=True, help="nnU-Net dataset name or id, already planned")
    parser.add_argument("--encoder", required=True, metavar="FILE",
                        help="encoder checkpoint (or smit_pretrain output folder) whose HU window the plans take")
    parser.add_argument("-pl", "--plans", default="nnUNetPlans", help="plans to start from (nnUNetPlans)")
    parser.add_argument("-c", "--configurations", nargs="+", default=["3d_fullres"],
                        help="3D configurations to write and preprocess (3d_fullres)")
    parser.add_argument("-o", "--plans_name", help="name of the variant (default: the plans' name + _SMIT)")
    parser.add_argument("-np", "--num_processes", type=int, default=4, help="preprocessing processes (4)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)

    def run() -> None:
        target = write_smit_plans(args.dataset, Path(args.encoder), args.plans, args.configurations,
                                  args.plans_name, args.num_processes)
        print(target, flush=True)

    return run_cli(run, str(args.dataset), "interrupted; rerun the same command.")


if __name__ == "__main__":
    sys.exit(main())
