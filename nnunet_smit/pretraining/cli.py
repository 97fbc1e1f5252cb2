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
import os
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional

from nnunet_smit.errors import SMITError

# torch.compile's modes (PretrainConfig.compile_mode checks against the same tuple).
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")

# Settings of --demo: the tiny preset on 64^3 views of 3 mm phantoms, 288 steps (6.5 min on a shared 2-core CPU,
# one thread), chosen so that a short run shows every objective learning (docs/pretraining-demo.md).
DEMO_SETTINGS: Dict[str, Any] = {
    "preset": "tiny",
    "view_size": 64,
    "region_size": 96,
    "batch_size": 2,  # the least KoLeo works with
    "samples_per_epoch": 16,
    "epochs": 36,
    "warmup_epochs": 2,
    # 20x the default: the reconstruction head's 6M weights must move from their random start within 288 steps.
    "base_lr": 2e-3,
    "min_lr": 1e-3,  # keeps learning to the end: a short run has no plateau to anneal into
    "momentum_teacher": 0.99,  # at 0.996 the teacher keeps half of its random start after 200 steps
    # Less than the authors' 0.7 of 16^3 cubes: each 32^3 block (one bottleneck token) keeps half its voxels visible.
    "mask_ratio": 0.5,
    "mask_cube_size": 8,
    # Sharper than 0.04: the views' embeddings differ little early on, and 0.04 leaves the teacher near uniform.
    "teacher_temp_start": 0.025,
    "teacher_temp_end": 0.025,
    "weight_koleo": 0.2,  # spreads the 2 scans of a step further apart (the teacher's only source of contrast)
    # Small heads: in 32 dimensions embeddings meet 256 prototypes at larger angles than in 128 with 1024.
    "head_hidden_dim": 256,
    "head_bottleneck_dim": 32,
    "head_out_dim": 256,
    "num_workers": 1,
    "log_every_steps": 4,
    "preview_every_epochs": 6,
}
DEMO_CASES = 8
# --demo's cache spacing (mm, z y x): DEMO_PHANTOM's voxels, and what nnU-Net plans for the fine-tuning demo.
DEMO_SPACING_MM = (3.0, 3.0, 3.0)

# argparse destination -> PretrainConfig field, for options that map one to one.
CONFIG_OPTIONS = (
    "preset", "view_size", "region_size", "batch_size", "epochs", "samples_per_epoch", "base_lr", "min_lr",
    "warmup_epochs", "weight_decay", "weight_decay_end", "clip_grad", "freeze_last_layer_epochs",
    "momentum_teacher", "teacher_temp_start", "teacher_temp_end", "teacher_temp_warmup_epochs", "student_temp",
    "mask_ratio", "mask_cube_size", "weight_dino", "weight_ibot", "weight_reconstruction", "weight_koleo",
    "head_hidden_dim", "head_bottleneck_dim", "head_out_dim", "head_layers", "intensity_jitter", "body_bias",
    "precision", "device", "num_workers", "seed", "max_steps", "checkpoint_every_steps", "checkpoint_every_minutes",
    "log_every_steps", "preview_every_epochs", "export", "centering", "compile_mode",
)


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
    parser.add_argument("--preset", help="encoder preset (default smit_small; tiny for CPU tests)")
    parser.add_argument("--init_encoder", metavar="FILE",
                        help="start student and teacher encoders from these weights instead of random ones (an "
                             "smit_pretrain export, the authors' pre_train_weight.pt, MONAI's SwinViT weights); "
                             "their architecture must be the preset's")
    parser.add_argument("--max_steps", type=int, help="stop after N optimisation steps and export")
    parser.add_argument("--epochs", type=int, help="epochs of the full schedule (default 500)")
    parser.add_argument("--samples_per_epoch", type=int, help="samples per epoch (default: number of scans)")
    parser.add_argument("--batch_size", type=int, help="scans per process and step (default 6)")
    parser.add_argument("--view_size", type=int, help="view edge in voxels, multiple of 32 (default 96)")
    parser.add_argument("--region_size", type=int, help="edge of the region both views come from (default 128)")
    parser.add_argument("--base_lr", type=float, help="learning rate per sample of the global batch (1e-4)")
    parser.add_argument("--min_lr", type=float, help="final learning rate (1e-6)")
    parser.add_argument("--warmup_epochs", type=float, help="learning-rate warm-up epochs (20)")
    parser.add_argument("--weight_decay", type=float, help="AdamW weight decay (0.01)")
    parser.add_argument("--weight_decay_end", type=float, help="final weight decay of a cosine schedule")
    parser.add_argument("--clip_grad", type=float, help="gradient-norm clipping, 0 turns it off (3.0)")
    parser.add_argument("--freeze_last_layer_epochs", type=int, help="epochs with frozen prototypes (1)")
    parser.add_argument("--momentum_teacher", type=float, help="initial teacher EMA momentum (0.996)")
    parser.add_argument("--teacher_temp_start", type=float, help="teacher temperature at start (0.04)")
    parser.add_argument("--teacher_temp_end", type=float,
                        help="teacher temperature after warm-up (0.04; the authors' 0.07 lets the teacher go uniform)")
    parser.add_argument("--teacher_temp_warmup_epochs", type=float, help="teacher temperature warm-up (30)")
    parser.add_argument("--student_temp", type=float, help="student temperature (0.1)")
    parser.add_argument("--centering", choices=("sinkhorn_knopp", "center"),
                        help="teacher centering of DINO and iBOT: center (running mean, default) or sinkhorn_knopp")
    parser.add_argument("--mask_ratio", type=float, help="share of masked cubes per view (0.7)")
    parser.add_argument("--mask_cube_size", type=int, help="masking cube edge in voxels (16)")
    parser.add_argument("--weight_dino", type=float, help="weight of the global DINO loss (0.1)")
    parser.add_argument("--weight_ibot", type=float, help="weight of the patch iBOT loss (0.1)")
    parser.add_argument("--weight_koleo", type=float,
                        help="weight of the KoLeo regulariser of the global embeddings (0.1; needs 2+ scans per step)")
    parser.add_argument("--weight_reconstruction", type=float, help="weight of the reconstruction loss (1.0)")
    parser.add_argument("--no_dino", action="store_true", help="switch the DINO objective off")
    parser.add_argument("--no_ibot", action="store_true", help="switch the iBOT objective off")
    parser.add_argument("--no_reconstruction", action="store_true", help="switch the reconstruction objective off")
    parser.add_argument("--head_hidden_dim", type=int, help="DINO/iBOT head hidden width (2048)")
    parser.add_argument("--head_bottleneck_dim", type=int, help="DINO/iBOT head bottleneck (256)")
    parser.add_argument("--head_out_dim", type=int, help="number of prototypes (8192)")
    parser.add_argument("--head_layers", type=int, help="MLP layers of the heads (3)")
    parser.add_argument("--shared_patch_head", action="store_true", help="one head for global and patch tokens")
    parser.add_argument("--flips", action="store_true", help="random flips of the views")
    parser.add_argument("--intensity_jitter", type=float, help="random scale/shift of view intensities (0)")
    parser.add_argument("--body_bias", type=float, help="probability of a body-centred region (0.9)")
    parser.add_argument("--spacing", type=float, nargs=3, metavar=("Z", "Y", "X"),
                        help="target spacing of the cache in mm (2 2 2; 3 3 3 with --demo)")
    parser.add_argument("--hu_window", type=float, nargs=2, metavar=("LOW", "HIGH"),
                        help="HU window mapped to [0, 1] (-175 250)")
    parser.add_argument("--cache_dir", help="preprocessed cache folder (default OUT/cache); reusable across runs")
    parser.add_argument("--cache_workers", type=int, help="processes building the cache")
    parser.add_argument("--cache_only", action="store_true", help="build the cache and stop (before a multi-node job)")
    parser.add_argument("--precision", choices=("auto", "bf16", "fp16", "fp32"),
                        help="autocast: auto = bf16 on GPUs that support it, fp32 on CPU")
    parser.add_argument("--gradient_checkpointing", action="store_true", help="recompute blocks to save memory")
    parser.add_argument("--compile", action="store_true",
                        help="torch.compile the step's student, teacher and losses (the student alone under DDP)")
    parser.add_argument("--compile_mode", choices=COMPILE_MODES,
                        help="torch.compile mode (default); implies --compile")
    parser.add_argument("--device", help="auto (default), cpu, cuda")
    parser.add_argument("--num_workers", type=int,
                        help="data-loader processes per GPU (default: this process's share of the CPU cores less one, "
                             "at most 8; 1 on CPU)")
    parser.add_argument("--seed", type=int, help="random seed (0)")
    parser.add_argument("--deterministic", action="store_true",
                        help="deterministic algorithms (on CPU an interrupted and resumed run matches an uninterrupted one)")
    parser.add_argument("--checkpoint_every_steps", type=int,
                        help="write checkpoint_latest every N steps (500; 0: not by step count)")
    parser.add_argument("--checkpoint_every_minutes", type=float,
                        help="... and at least every M minutes (15; 0: not by the clock)")
    parser.add_argument("--log_every_steps", type=int, help="log interval in steps (10)")
    parser.add_argument("--preview_every_epochs", type=int, help="reconstruction preview interval (1)")
    parser.add_argument("--export", choices=("teacher", "student"), help="which encoder to export (teacher)")
    parser.add_argument("--no_progress", action="store_true", help="no progress bars")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    return parser


def config_from_args(args: argparse.Namespace):
    """PretrainConfig from parsed arguments (demo settings first, then explicit options)."""
    from nnunet_smit.pretraining.engine import PretrainConfig

    values: Dict[str, Any] = dict(DEMO_SETTINGS) if args.demo else {}
    for name in CONFIG_OPTIONS:
        value = getattr(args, name, None)
        if value is not None:
            values[name] = value
    for flag, weight in (("no_dino", "weight_dino"), ("no_ibot", "weight_ibot"),
                         ("no_reconstruction", "weight_reconstruction")):
        if getattr(args, flag):
            values[weight] = 0.0
    for flag in ("flips", "gradient_checkpointing", "compile", "deterministic"):
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
    return PretrainConfig(**values)


def preprocessing_from_args(args: argparse.Namespace):
    """PretrainPreprocessing from parsed arguments (the demo's spacing first, then explicit options)."""
    from nnunet_smit.conventions import PretrainPreprocessing

    preprocessing_kwargs: Dict[str, Any] = {}
    if args.spacing:
        preprocessing_kwargs["target_spacing_mm"] = tuple(args.spacing)
    elif args.demo:
        preprocessing_kwargs["target_spacing_mm"] = DEMO_SPACING_MM
    if args.hu_window:
        preprocessing_kwargs["hu_window"] = tuple(args.hu_window)
    return PretrainPreprocessing(**preprocessing_kwargs)


def run(args: argparse.Namespace) -> Path:
    """Everything ``smit_pretrain`` does after parsing; returns the exported checkpoint (or cache folder)."""
    from nnunet_smit.pretraining.engine import run_pretraining

    output = Path(args.output)
    sources: List[Path] = [Path(d) for d in args.data]
    if args.demo:
        demo_dir = output / "demo_data"
        if int(os.environ.get("RANK", "0")) == 0 and not any(demo_dir.glob("*.nii.gz")):
            from nnunet_smit.pretraining.phantoms import DEMO_PHANTOM, generate_phantom_corpus

            logging.getLogger(__name__).info("writing %d phantoms to %s", DEMO_CASES, demo_dir)
            generate_phantom_corpus(demo_dir, n_cases=DEMO_CASES, seed=0, **DEMO_PHANTOM)
        sources.append(demo_dir)
    if not sources:
        raise SMITError("no input folder given; pass -d DIR (repeatable) or --demo.")
    # Only rank 0 reads the scans (it builds the cache), so only it needs the folders.
    for source in sources if int(os.environ.get("RANK", "0")) == 0 else []:
        if not source.is_dir():
            raise SMITError(f"input folder {source} does not exist or is not a folder; pass an existing folder with -d.")
    config = config_from_args(args)
    return run_pretraining(
        sources, output, config,
        cache_dir=Path(args.cache_dir) if args.cache_dir else None,
        preprocessing=preprocessing_from_args(args),
        cache_workers=args.cache_workers,
        cache_only=args.cache_only,
    )


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    if int(os.environ.get("RANK", "0")) != 0:
        logging.getLogger().setLevel(logging.WARNING)
    from nnunet_smit.pretraining.cache import CacheBuildInterrupted
    from nnunet_smit.pretraining.engine import TrainingInterrupted, describe_os_error

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
    if int(os.environ.get("RANK", "0")) == 0:
        print(str(path), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
