"""``smit_probe``: what do an encoder's frozen features say about the labels? A linear probe on nnU-Net's data.

    smit_probe -d DATASET -o OUT --encoder A.pt [--encoder B.pt ...] [--labelled 1 2 4] [--seeds N] \\
               [-c 3d_fullres] [-p nnUNetPlans] [--scales all] [-device cuda]
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import List, Optional

from nnunet_smit.errors import SMITError, run_cli


def build_parser() -> argparse.ArgumentParser:
    from nnunet_smit.probe.features import INPUT_SCALE, SCALE_SETS
    from nnunet_smit.probe.linear_probe import ProbeRecipe

    defaults = ProbeRecipe()
    parser = argparse.ArgumentParser(
        prog="smit_probe",
        description="Train a linear voxel classifier on each frozen encoder's multi-scale features (and on a random-init "
        "encoder and the input intensity, the baselines) with k labelled cases of an nnU-Net dataset, and score it with "
        "nnU-Net's Dice on smit_study's held-out cases.",
    )
    parser.add_argument("-d", "--dataset", required=True, help="nnU-Net dataset name or id, planned and preprocessed")
    parser.add_argument("-o", "--output", required=True, metavar="OUT", help="probe folder")
    parser.add_argument("--encoder", action="append", default=[], metavar="FILE",
                        help="encoder checkpoint (smit_pretrain export or run folder, smit_convert output, the authors' "
                             "or MONAI's weights); repeatable, one row each")
    parser.add_argument("--labelled", type=int, nargs="+", default=[1, 2, 4], metavar="K",
                        help="numbers of labelled training cases")
    parser.add_argument("--seeds", type=int, default=1, help="draws of the labelled cases per K (smit_study's draws)")
    parser.add_argument("--test_fraction", type=float, default=0.2, help="share of the cases held out (as smit_study)")
    parser.add_argument("-c", "--configuration", default="3d_fullres", help="nnU-Net configuration")
    parser.add_argument("-p", "--plans", default="nnUNetPlans",
                        help="nnU-Net plans (e.g. nnUNetPlans_SMIT from smit_plan, which keeps the encoder's HU window)")
    parser.add_argument("--scales", default=defaults.scales, choices=[s for s in SCALE_SETS if s != INPUT_SCALE],
                        help="encoder features the probe reads")
    parser.add_argument("--patches_per_case", type=int, default=defaults.patches_per_case,
                        help="training patches sampled from each labelled case")
    parser.add_argument("--iterations", type=int, default=defaults.iterations, help="probe training steps")
    parser.add_argument("-device", "--device", choices=["cuda", "cpu", "mps"],
                        help="default cuda when available, else cpu")
    return parser


def settings_from_args(args: argparse.Namespace):
    import torch

    from nnunet_smit.probe.linear_probe import ProbeRecipe
    from nnunet_smit.probe.probe import ProbeSettings

    for name in ("patches_per_case", "iterations"):
        if getattr(args, name) < 1:
            raise SMITError(f"--{name} must be at least 1, got {getattr(args, name)}.")
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise SMITError("-device cuda was asked for but no CUDA GPU is visible; pass -device cpu.")
    recipe = ProbeRecipe(scales=args.scales, patches_per_case=args.patches_per_case, iterations=args.iterations)
    return ProbeSettings(dataset=args.dataset, output=Path(args.output), encoders=list(args.encoder),
                         labelled=args.labelled, seeds=args.seeds, configuration=args.configuration, plans=args.plans,
                         device=device, test_fraction=args.test_fraction, recipe=recipe)


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    from nnunet_smit.probe.probe import run_probe

    return run_cli(lambda: print(str(run_probe(settings_from_args(args))), flush=True), args.output,
                   "interrupted; rerun the same command (the probe starts again).")


if __name__ == "__main__":
    sys.exit(main())
