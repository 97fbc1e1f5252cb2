"""``smit_pretrain``: self-supervised SMIT pretraining on folders of CT scans.

    smit_pretrain -d RAW_CT_DIR [-d MORE ...] -o OUT [--preset smit_small] [--max_steps N] ...
    smit_pretrain --demo -o OUT                   # phantoms + tiny preset, a few minutes on CPU
    torchrun --nproc_per_node 8 -m nnunet_smit.pretraining.cli -d DIR -o OUT   # data parallel

Rerunning the same command resumes from ``OUT/checkpoint_latest.pt``. The last line printed is the path of the
exported encoder checkpoint.
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional

from nnunet_smit.conventions import PretrainPreprocessing
from nnunet_smit.errors import SMITError, TrainingInterrupted, describe_os_error
from nnunet_smit.pretraining.config import (
    CENTERING_MODES, COMPILE_MODES, DECODERS, DEMO_CASES, DEMO_SETTINGS, DEMO_SPACING_MM, EXPORTS, PRECISIONS,
    RECONSTRUCT_THROUGH, PretrainConfig, default_of,
)
from nnunet_smit.pretraining.distributed import launch_rank

# argparse destination -> PretrainConfig field, for options that map one to one.
CONFIG_OPTIONS = (
    "preset", "view_size", "region_size", "batch_size", "epochs", "samples_per_epoch", "base_lr", "min_lr",
    "warmup_epochs", "weight_decay", "weight_decay_end", "clip_grad", "freeze_last_layer_epochs",
    "momentum_teacher", "teacher_temp_start", "teacher_temp_end", "teacher_temp_warmup_epochs", "student_temp",
    "mask_ratio", "mask_cube_size", "weight_dino", "weight_ibot", "weight_reconstruction", "weight_koleo",
    "head_hidden_dim", "head_bottleneck_dim", "head_out_dim", "head_layers", "intensity_jitter", "body_bias",
    "precision", "device", "num_workers", "seed", "max_steps", "checkpoint_every_steps", "checkpoint_every_minutes",
    "log_every_steps", "preview_every_epochs", "export", "centering", "compile_mode", "reconstruct_through", "decoder",
)


def _d(name: str) -> str:
    """A field's default as the help shows it, read from PretrainConfig (the one place defaults are written)."""
    value = default_of(name)
    return f"{value:g}" if isinstance(value, float) else str(value)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="smit_pretrain",
        description="Self-supervised SMIT pretraining (masked reconstruction + iBOT + DINO) of a Swin-3D encoder "
        "on folders of CT scans. Rerun the same command to resume.",
    )
    parser.add_argument("-d", "--data", action="append", default=[], metavar="DIR",
                        help="folder with CT scans (NIfTI, NRRD, MetaImage, DICOM, nnU-Net raw); repeatable")
    parser.add_argument("-o", "--output", required=True, metavar="OUT", help="run folder (checkpoints, logs, export)")
    parser.add_argument("--demo", action="store_true",
                        help=f"generate {DEMO_CASES} phantoms into OUT/demo_data, pretrain the tiny preset at 3 mm")
    parser.add_argument("--preset", help=f"encoder preset (default {_d('preset')}; tiny for CPU tests)")
    parser.add_argument("--init_encoder", metavar="FILE",
                        help="start student and teacher encoders from these weights instead of random ones (an "
                             "smit_pretrain export, the authors' pre_train_weight.pt, MONAI's SwinViT weights); "
                             "their architecture must be the preset's")
    parser.add_argument("--drop_path_rate", type=float, metavar="RATE",
                        help="the student encoder's stochastic depth, linear over its blocks (default: the preset's, "
                             "0.3 for smit_small as the authors', 0 for tiny); the teacher and the export have none")
    parser.add_argument("--max_steps", type=int, help="stop after N optimisation steps and export")
    parser.add_argument("--epochs", type=int, help=f"epochs of the full schedule (default {_d('epochs')})")
    parser.add_argument("--samples_per_epoch", type=int, help="samples per epoch (default: number of scans)")
    parser.add_argument("--batch_size", type=int, help=f"scans per process and step (default {_d('batch_size')})")
    parser.add_argument("--view_size", type=int, help=f"view edge in voxels, multiple of 32 (default {_d('view_size')})")
    parser.add_argument("--region_size", type=int, help=f"edge of the region both views come from (default {_d('region_size')})")
    parser.add_argument("--base_lr", type=float, help=f"learning rate per sample of the global batch ({_d('base_lr')})")
    parser.add_argument("--min_lr", type=float, help=f"final learning rate ({_d('min_lr')})")
    parser.add_argument("--warmup_epochs", type=float, help=f"learning-rate warm-up epochs ({_d('warmup_epochs')})")
    parser.add_argument("--weight_decay", type=float, help=f"AdamW weight decay ({_d('weight_decay')})")
    parser.add_argument("--weight_decay_end", type=float, help="final weight decay of a cosine schedule")
    parser.add_argument("--clip_grad", type=float, help=f"gradient-norm clipping, 0 turns it off ({_d('clip_grad')})")
    parser.add_argument("--freeze_last_layer_epochs", type=int, help=f"epochs with frozen prototypes ({_d('freeze_last_layer_epochs')})")
    parser.add_argument("--momentum_teacher", type=float, help=f"initial teacher EMA momentum ({_d('momentum_teacher')})")
    parser.add_argument("--teacher_temp_start", type=float, help=f"teacher temperature at start ({_d('teacher_temp_start')})")
    parser.add_argument("--teacher_temp_end", type=float,
                        help=f"teacher temperature after warm-up ({_d('teacher_temp_end')}; the authors' 0.07 lets the teacher go "
                             "uniform)")
    parser.add_argument("--teacher_temp_warmup_epochs", type=float, help=f"teacher temperature warm-up ({_d('teacher_temp_warmup_epochs')})")
    parser.add_argument("--student_temp", type=float, help=f"student temperature ({_d('student_temp')})")
    parser.add_argument("--centering", choices=CENTERING_MODES,
                        help=f"teacher centering of DINO and iBOT: center (running mean) or sinkhorn_knopp "
                             f"(default {_d('centering')})")
    parser.add_argument("--mask_ratio", type=float, help=f"share of masked cubes per view ({_d('mask_ratio')})")
    parser.add_argument("--mask_cube_size", type=int, help=f"masking cube edge in voxels ({_d('mask_cube_size')})")
    parser.add_argument("--weight_dino", type=float, help=f"weight of the global DINO loss ({_d('weight_dino')})")
    parser.add_argument("--weight_ibot", type=float, help=f"weight of the patch iBOT loss ({_d('weight_ibot')})")
    parser.add_argument("--weight_koleo", type=float,
                        help=f"weight of the KoLeo regulariser of the global embeddings ({_d('weight_koleo')}; needs 2+ "
                             "scans per step)")
    parser.add_argument("--weight_reconstruction", type=float, help=f"weight of the reconstruction loss ({_d('weight_reconstruction')})")
    parser.add_argument("--reconstruct_through", choices=RECONSTRUCT_THROUGH,
                        help="what the reconstruction reads: bottleneck (the authors' 1x1x1 conv on the 1/32 "
                             "bottleneck), skips (SMITNet's conv blocks on the raw image and the skips, then a light "
                             "upsampling path) or decoder (SMITNet's whole decoder); the export carries the blocks "
                             f"trained (default {_d('reconstruct_through')})")
    parser.add_argument("--decoder", choices=tuple(DECODERS),
                        help="SMITNet's decoder whose blocks skips and decoder train: smit (the authors', "
                             f"nnUNetTrainerSMIT) or light (nnUNetTrainerSMITLight) (default {_d('decoder')})")
    parser.add_argument("--no_dino", action="store_true", help="switch the DINO objective off")
    parser.add_argument("--no_ibot", action="store_true", help="switch the iBOT objective off")
    parser.add_argument("--no_reconstruction", action="store_true", help="switch the reconstruction objective off")
    parser.add_argument("--head_hidden_dim", type=int, help=f"DINO/iBOT head hidden width ({_d('head_hidden_dim')})")
    parser.add_argument("--head_bottleneck_dim", type=int, help=f"DINO/iBOT head bottleneck ({_d('head_bottleneck_dim')})")
    parser.add_argument("--head_out_dim", type=int, help=f"number of prototypes ({_d('head_out_dim')})")
    parser.add_argument("--head_layers", type=int, help=f"MLP layers of the heads ({_d('head_layers')})")
    parser.add_argument("--shared_patch_head", action="store_true", help="one head for global and patch tokens")
    parser.add_argument("--flips", action="store_true", help="random flips of the views")
    parser.add_argument("--intensity_jitter", type=float, help=f"random scale/shift of view intensities ({_d('intensity_jitter')})")
    parser.add_argument("--body_bias", type=float, help=f"probability of a body-centred region ({_d('body_bias')})")
    parser.add_argument("--spacing", type=float, nargs=3, metavar=("Z", "Y", "X"),
                        help="target spacing of the cache in mm (2 2 2; 3 3 3 with --demo)")
    parser.add_argument("--hu_window", type=float, nargs=2, metavar=("LOW", "HIGH"),
                        help="HU window mapped to [0, 1] (-175 250)")
    parser.add_argument("--cache_dir", help="preprocessed cache folder (default OUT/cache); reusable across runs")
    parser.add_argument("--cache_workers", type=int, help="processes building the cache")
    parser.add_argument("--cache_only", action="store_true", help="build the cache and stop (before a multi-node job)")
    parser.add_argument("--verify_cache", action="store_true",
                        help="compare every cached file's sha256 with the one recorded when it was written and "
                             "preprocess again those that differ (reads the whole cache; sizes are always compared)")
    parser.add_argument("--precision", choices=PRECISIONS,
                        help=f"autocast: auto = bf16 on GPUs that support it, fp32 on CPU (default {_d('precision')})")
    parser.add_argument("--gradient_checkpointing", action="store_true", help="recompute blocks to save memory")
    parser.add_argument("--compile", action="store_true",
                        help="torch.compile the step's student, teacher and losses (the student alone under DDP)")
    parser.add_argument("--compile_mode", choices=COMPILE_MODES,
                        help=f"torch.compile mode ({_d('compile_mode')}); implies --compile")
    parser.add_argument("--device", help=f"auto, cpu, cuda (default {_d('device')})")
    parser.add_argument("--num_workers", type=int,
                        help="data-loader processes per GPU (default: this process's share of the CPU cores less one, "
                             "at most 8; 1 on CPU)")
    parser.add_argument("--seed", type=int, help=f"random seed ({_d('seed')})")
    parser.add_argument("--deterministic", action="store_true",
                        help="deterministic algorithms (on CPU an interrupted and resumed run matches an uninterrupted one)")
    parser.add_argument("--checkpoint_every_steps", type=int,
                        help=f"write checkpoint_latest every N steps ({_d('checkpoint_every_steps')}; 0: not by step count)")
    parser.add_argument("--checkpoint_every_minutes", type=float,
                        help=f"... and at least every M minutes ({_d('checkpoint_every_minutes')}; 0: not by the clock)")
    parser.add_argument("--log_every_steps", type=int, help=f"log interval in steps ({_d('log_every_steps')})")
    parser.add_argument("--preview_every_epochs", type=int, help=f"reconstruction preview interval in epochs ({_d('preview_every_epochs')})")
    parser.add_argument("--export", choices=EXPORTS, help=f"which encoder to export, whatever the objectives ({_d('export')})")
    parser.add_argument("--probe", metavar="DATASET",
                        help="online probe: every few epochs (and at the end), a linear probe of the exported side's "
                             "frozen encoder on this planned and preprocessed nnU-Net dataset, scored with nnU-Net's "
                             "Dice on smit_study's held-out cases; logged as probe records, drawn in loss_curves.png "
                             "and kept in run_summary.json and the export")
    parser.add_argument("--probe_every", type=int, metavar="EPOCHS",
                        help="probe at the end of every EPOCHS epochs (default: after the first epoch, then as often "
                             "as keeps the probes within 5%% of the run's time)")
    parser.add_argument("--probe_plans",
                        help="plans of the probe dataset (nnUNetPlans; smit_plan's variant keeps the whole HU window)")
    parser.add_argument("--probe_labelled", type=int, metavar="K",
                        help="labelled cases the probe trains on (1; smit_study's draw of seed 0)")
    parser.add_argument("--tensorboard", action="store_true",
                        help="also write the scalars of log.jsonl as TensorBoard event files into OUT/tensorboard "
                             "(needs the tensorboard package)")
    parser.add_argument("--no_progress", action="store_true", help="no progress bars")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    return parser


def config_from_args(args: argparse.Namespace) -> PretrainConfig:
    """PretrainConfig from parsed arguments (demo settings first, then explicit options)."""
    values: Dict[str, Any] = dict(DEMO_SETTINGS) if args.demo else {}
    for name in CONFIG_OPTIONS:
        value = getattr(args, name, None)
        if value is not None:
            values[name] = value
    for flag, weight in (("no_dino", "weight_dino"), ("no_ibot", "weight_ibot"),
                         ("no_reconstruction", "weight_reconstruction")):
        if getattr(args, flag):
            values[weight] = 0.0
    for flag in ("flips", "gradient_checkpointing", "compile", "deterministic", "tensorboard"):
        if getattr(args, flag):
            values[flag] = True
    if args.compile_mode is not None:
        values["compile"] = True
    if args.shared_patch_head:
        values["separate_patch_head"] = False
    if args.init_encoder:
        values["init_encoder"] = str(Path(args.init_encoder).expanduser().resolve())
    if args.no_progress:
        values["progress"] = False
    if args.drop_path_rate is not None:
        values["encoder_overrides"] = {**values.get("encoder_overrides", {}), "drop_path_rate": args.drop_path_rate}
    return PretrainConfig(**values)


def preprocessing_from_args(args: argparse.Namespace) -> PretrainPreprocessing:
    """PretrainPreprocessing from parsed arguments (the demo's spacing first, then explicit options)."""
    preprocessing_kwargs: Dict[str, Any] = {}
    if args.spacing:
        preprocessing_kwargs["target_spacing_mm"] = tuple(args.spacing)
    elif args.demo:
        preprocessing_kwargs["target_spacing_mm"] = DEMO_SPACING_MM
    if args.hu_window:
        preprocessing_kwargs["hu_window"] = tuple(args.hu_window)
    return PretrainPreprocessing(**preprocessing_kwargs)


def online_probe(args: argparse.Namespace) -> Optional[Any]:
    """The online probe of ``--probe`` on rank 0 (None without it, and on the other ranks); SMITError for a dataset
    that is not planned and preprocessed or too small, before any cache is built.

    The CLI is where pretraining meets the probe: the loop gets a callable and never imports the probe package."""
    if args.probe_every is not None and args.probe_every < 1:
        raise SMITError(f"--probe_every must be at least 1 epoch, got {args.probe_every}.")
    if args.probe is None:
        given = [f"--{name}" for name in ("probe_every", "probe_plans", "probe_labelled")
                 if getattr(args, name) is not None]
        if given:
            raise SMITError(f"{given[0]} needs --probe DATASET (the labelled dataset the probe is scored on).")
        return None
    if launch_rank() != 0:
        return None
    from nnunet_smit.probe.online import OnlineProbe

    return OnlineProbe(args.probe, labelled=1 if args.probe_labelled is None else args.probe_labelled,
                       plans=args.probe_plans or "nnUNetPlans")


def run(args: argparse.Namespace) -> Path:
    """Everything ``smit_pretrain`` does after parsing; returns the exported checkpoint (or cache folder)."""
    from nnunet_smit.pretraining.engine import input_folders, run_pretraining

    output = Path(args.output)
    config = config_from_args(args)
    probe = online_probe(args)
    return run_pretraining(
        input_folders([Path(d) for d in args.data], output, demo=args.demo), output, config,
        cache_dir=Path(args.cache_dir) if args.cache_dir else None,
        preprocessing=preprocessing_from_args(args),
        cache_workers=args.cache_workers,
        cache_only=args.cache_only,
        verify_cache=args.verify_cache,
        probe=probe,
        probe_every_epochs=args.probe_every,
    )


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    if launch_rank() != 0:
        logging.getLogger().setLevel(logging.WARNING)
    from nnunet_smit.pretraining.cache import CacheBuildInterrupted

    try:
        path = run(args)
    except SMITError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except TrainingInterrupted as interrupted:
        print(interrupted.message, file=sys.stderr)
        return 130
    except CacheBuildInterrupted as interrupted:
        print(interrupted, file=sys.stderr)
        return 130
    except OSError as error:  # the file system refused (a file in the path, a full disk, permissions)
        print(f"error: {describe_os_error(error)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; rerun the same command to resume from the last saved checkpoint, if one was written.",
              file=sys.stderr)
        return 130
    sys.stderr.flush()
    if launch_rank() == 0:
        print(str(path), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
