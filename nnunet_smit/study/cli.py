"""``smit_study``: does this encoder help on my task? Label efficiency through nnU-Net's own training.

    smit_study -d DATASET -o OUT --encoder A.pt [--encoder B.pt ...] --labelled 1 2 4 8 --seeds 3 \\
               [--baselines scratch nnunet] [--trainer nnUNetTrainerSMIT] [--epochs E] [--iterations_per_epoch I] \\
               [-c 3d_fullres] [-p nnUNetPlans_SMIT] [--allow_clipped_window] [-device cuda]

Rerunning the same command resumes: finished arms whose record (trainer, plans, budget, cases, encoder weights) still
holds are reused, the others are trained again. nnU-Net's default arm trains on nnU-Net's default plans.
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import List, Optional

from nnunet_smit.errors import SMITError, run_cli


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="smit_study",
        description="Fine-tune each encoder, the same network from random init and nnU-Net's default on nested sets "
        "of k labelled cases, and score all of them on one fixed held-out test set with nnU-Net's validation. "
        "Rerun the same command to resume.",
    )
    parser.add_argument("-d", "--dataset", required=True, help="nnU-Net dataset name or id, planned and preprocessed")
    parser.add_argument("-o", "--output", required=True, metavar="OUT", help="study folder")
    parser.add_argument("--encoder", action="append", default=[], metavar="FILE",
                        help="encoder checkpoint (smit_pretrain export, smit_convert output, the authors' or MONAI's "
                             "weights); repeatable, one arm each")
    parser.add_argument("--labelled", type=int, nargs="+", default=[1, 2, 4, 8], metavar="K",
                        help="numbers of labelled training cases")
    parser.add_argument("--seeds", type=int, default=3, help="draws of the labelled cases per K")
    parser.add_argument("--baselines", nargs="*", default=["scratch", "nnunet"], choices=["scratch", "nnunet"],
                        help="scratch: the SMIT network from random init; nnunet: nnU-Net's default nnUNetTrainer")
    parser.add_argument("--trainer", default="nnUNetTrainerSMIT",
                        help="SMIT trainer that fine-tunes the encoders (e.g. nnUNetTrainerSMIT_96)")
    parser.add_argument("--epochs", type=int, help="epochs of every arm (nnU-Net's 1000 when not given)")
    parser.add_argument("--iterations_per_epoch", type=int, help="iterations per epoch (nnU-Net's 250)")
    parser.add_argument("--test_fraction", type=float, default=0.2, help="share of the cases held out for testing")
    parser.add_argument("--disable_tta", action="store_true",
                        help="score without mirroring test-time augmentation (8x faster validation)")
    parser.add_argument("-c", "--configuration", default="3d_fullres", help="nnU-Net configuration")
    parser.add_argument("-p", "--plans", default="nnUNetPlans",
                        help="nnU-Net plans of the SMIT arms, e.g. nnUNetPlans_SMIT from smit_plan (nnU-Net's default "
                             "arm always trains on nnUNetPlans)")
    parser.add_argument("--allow_clipped_window", action="store_true",
                        help="train encoder arms whose plans clip CT inside the encoder's HU window (refused "
                             "otherwise; flagged in the table)")
    parser.add_argument("-device", "--device", choices=["cuda", "cpu", "mps"],
                        help="training device (default cuda when available, else cpu)")
    return parser


def settings_from_args(args: argparse.Namespace):
    import torch

    from nnunet_smit.study.arms import Budget
    from nnunet_smit.study.study import StudySettings

    for name in ("epochs", "iterations_per_epoch"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise SMITError(f"--{name} must be at least 1, got {value}.")
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise SMITError("-device cuda was asked for but no CUDA GPU is visible; pass -device cpu.")
    return StudySettings(
        dataset=args.dataset, output=Path(args.output), encoders=list(args.encoder), labelled=args.labelled,
        seeds=args.seeds, baselines=list(dict.fromkeys(args.baselines)), trainer=args.trainer,
        configuration=args.configuration, plans=args.plans,
        budget=Budget(args.epochs, args.iterations_per_epoch, args.disable_tta), device=device,
        test_fraction=args.test_fraction, allow_clipped_window=args.allow_clipped_window,
    )


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    import signal

    from nnunet_smit.study.study import run_study

    def terminate(signum, frame):  # noqa: ARG001 - SIGTERM (a scheduler's stop) ends like Ctrl-C, with its line
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, terminate)
    return run_cli(lambda: print(str(run_study(settings_from_args(args))), flush=True), args.output,
                   "interrupted; rerun the same command to resume (finished arms are kept).")

if __name__ == "__main__":
    sys.exit(main())
