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

Every argument is checked before anything is written: the variant never takes the name of its source plans, of
nnU-Net's default ``nnUNetPlans`` or of any plans file smit_plan did not write (it would replace them and their
preprocessed data), it is never made from a variant (whose percentiles are a window already), and a plans file that
is not JSON is one line. nnU-Net's preprocessing runs in a process of its own session, so that Ctrl-C stops it and
its workers with one line instead of a traceback per worker.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import json
import logging
import multiprocessing
import multiprocessing.pool
import os
import signal
import sys
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence
from unittest import mock

from nnunet_smit.checkpoint import load_encoder_checkpoint
from nnunet_smit.errors import SMITError, run_cli
from nnunet_smit.files import atomic_write, read_json
from nnunet_smit.trainers.patch_fitting import fit_patch_size
from nnunet_smit.trainers.plans_settings import CT_NORMALIZATION, WEIGHTS_PLANS_KEY

logger = logging.getLogger(__name__)

SUFFIX = "_SMIT"
NNUNET_DEFAULT_PLANS = "nnUNetPlans"
# What the variant records of how it was made, at the top level of its plans.
RECORD_KEY = "smit_plan"


def smit_plans(plans: Dict[str, Any], encoder: Optional[Path], hu_window: Sequence[float],
               configurations: Sequence[str], source_plans: str, plans_name: str) -> Dict[str, Any]:
    """The plans variant: CT percentiles set to ``hu_window``, its own data identifiers, the fitted patch and batch
    and the encoder's path (when given) in ``configurations``; SMITError when there is nothing to make."""
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
                             batch_size=int(fit.batch_size))
        if encoder is not None:
            configuration[WEIGHTS_PLANS_KEY] = str(encoder)
    if not ct_channels:
        raise SMITError(f"no channel of {', '.join(configurations)} uses {CT_NORMALIZATION}: the SMIT plans change "
                        "only how CT is clipped; train with the default plans.")
    original = {}
    for channel in sorted(ct_channels):
        props = properties.get(str(channel))
        if not isinstance(props, dict) or not {"percentile_00_5", "percentile_99_5"} <= set(props):
            raise SMITError(f"{source_plans} hold no foreground percentiles of channel {channel} "
                            "(foreground_intensity_properties_per_channel), which nnU-Net's planning writes; plan "
                            "the dataset again.")
        original[str(channel)] = [props["percentile_00_5"], props["percentile_99_5"]]
        props["percentile_00_5"], props["percentile_99_5"] = float(hu_window[0]), float(hu_window[1])
    variant[RECORD_KEY] = {"source_plans": source_plans, "encoder": str(encoder) if encoder is not None else None,
                           "hu_window": list(hu_window),
                           "configurations": list(configurations), "dataset_percentiles": original}
    return variant


def write_smit_plans(dataset: str, encoder: Optional[Path], source_plans: str = NNUNET_DEFAULT_PLANS,
                     configurations: Sequence[str] = ("3d_fullres",), plans_name: Optional[str] = None,
                     num_processes: int = 4, preprocess: bool = True,
                     hu_window: Optional[Sequence[float]] = None) -> Path:
    """Write ``<source_plans>_SMIT.json`` beside the dataset's plans and preprocess its configurations; returns the
    plans file. The window is ``encoder``'s, or ``hu_window`` for an encoder still to be pretrained (its cache's
    window; the plans then name no weights). SMITError, before anything is written, for a wrong argument, a dataset
    that is not planned, plans that cannot be read, an unreadable encoder or nothing to change."""
    from nnunetv2.paths import nnUNet_preprocessed
    from nnunetv2.utilities.dataset_name_id_conversion import convert_dataset_name_to_id, maybe_convert_to_dataset_name

    plans_name = plans_name or f"{source_plans}{SUFFIX}"
    _check_arguments(source_plans, plans_name, configurations, num_processes)
    if (encoder is None) == (hu_window is None):
        raise SMITError("give either --encoder FILE (its HU window and weights) or --hu_window LOW HIGH.")
    if hu_window is not None and not (len(hu_window) == 2 and float(hu_window[0]) < float(hu_window[1])):
        raise SMITError(f"--hu_window needs LOW < HIGH in HU, got {list(hu_window)}.")
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
    plans = _read_plans(source, f"the {source_plans} plans of {dataset_name}",
                        f"restore them, or plan the dataset again (nnUNetv2_plan_and_preprocess -d {dataset})")
    if RECORD_KEY in plans:
        made_from = plans[RECORD_KEY].get("source_plans", "?") if isinstance(plans[RECORD_KEY], dict) else "?"
        raise SMITError(f"the plans {source_plans} are a smit_plan variant already (of {made_from}), whose CT "
                        f"percentiles are an encoder's window; pass -pl {made_from}.")
    target = folder / f"{plans_name}.json"
    if target.is_file() and RECORD_KEY not in _read_plans(target, f"the plans {plans_name} of {dataset_name}",
                                                          "choose another name with -o"):
        raise SMITError(f"{target} holds plans smit_plan did not write (nnU-Net's or another tool's); replacing them "
                        "would replace their preprocessed data too: choose another name with -o.")
    if encoder is not None:
        encoder = Path(encoder).expanduser().resolve()
        hu_window = load_encoder_checkpoint(encoder).preprocessing.hu_window
    window = [float(v) for v in hu_window]
    variant = smit_plans(plans, encoder, window, configurations, source_plans, plans_name)
    atomic_write(target, lambda tmp: Path(tmp).write_text(json.dumps(variant, indent=4), encoding="utf-8"))
    for channel, (low, high) in variant[RECORD_KEY]["dataset_percentiles"].items():
        logger.info("channel %s: the dataset's clip range [%g, %g] HU becomes the encoder's window %s HU", channel,
                    low, high, window)
    if preprocess:
        run_in_own_session(_preprocess, convert_dataset_name_to_id(dataset_name), plans_name, list(configurations),
                           num_processes)
    return target


def _check_arguments(source_plans: str, plans_name: str, configurations: Sequence[str], num_processes: int) -> None:
    """SMITError for arguments that are wrong whatever the dataset (checked before anything is read or written)."""
    if num_processes < 1:
        raise SMITError(f"-np must be at least 1 (preprocessing processes), got {num_processes}.")
    if not configurations:
        raise SMITError("-c names no configuration; pass 3d_fullres (or another 3D configuration).")
    if not plans_name or plans_name.startswith(".") or os.sep in plans_name or plans_name != plans_name.strip():
        raise SMITError(f"-o {plans_name!r} is not a plans name (a file name without folder, e.g. nnUNetPlans_SMIT).")
    if plans_name in (source_plans, NNUNET_DEFAULT_PLANS):
        which = "the plans it starts from" if plans_name == source_plans else "nnU-Net's default plans"
        raise SMITError(f"-o {plans_name} would overwrite {which} and re-preprocess their data in place; choose "
                        f"another name (the default is {source_plans}{SUFFIX}).")


def _read_plans(path: Path, what: str, remedy: str) -> Dict[str, Any]:
    """The plans in ``path``, or one line saying what is wrong with the file or its layout."""
    plans = read_json(path, what, dict, remedy)
    for key in ("configurations", "foreground_intensity_properties_per_channel"):
        if not isinstance(plans.get(key), dict):
            raise SMITError(f"{what} {path} have no {key} mapping, which nnU-Net plans hold; {remedy}.")
    return plans


def _preprocess(dataset_id: int, plans_name: str, configurations: List[str], num_processes: int) -> None:
    """nnU-Net's preprocessing of the variant (in the process :func:`run_in_own_session` starts)."""
    import nnunetv2.utilities.utils as nnunet_utils
    from nnunetv2.experiment_planning.plan_and_preprocess_api import preprocess_dataset

    # nnU-Net lists the raw folder's files through a pool of 12 processes (a fixed number, whatever -np says), twice.
    # Started from this spawned process, each of them would import torch and nnU-Net again (seconds of CPU and about
    # 0.9 GB each; 100 s instead of 26 s for the demo's 10 cases): threads do the same file-name matching here, and
    # -np alone decides the worker processes.
    with contextlib.redirect_stdout(sys.stderr), \
            mock.patch.object(nnunet_utils, "Pool", multiprocessing.pool.ThreadPool):
        preprocess_dataset(dataset_id, plans_name, configurations, [num_processes], show_progress_bar=False)


def _lead_a_session(function: Callable[..., None], args: tuple) -> None:
    os.setsid()
    # The pools this process starts are spawned, as it was: forking them from a process that has imported torch
    # hung a CI run (a forked worker died, and its pool waited for it forever). Spawned workers import this
    # console script again, which costs time, not correctness; _preprocess keeps their number at -np.
    # SIGTERM from run_in_own_session ends this process through SystemExit (no traceback), so that the pools of
    # ``function`` are shut down and their semaphores released: no "leaked semaphore" warning at exit.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    function(*args)


def run_in_own_session(function: Callable[..., None], *args: Any) -> None:
    """Run ``function(*args)`` in a child process leading a session of its own, and wait for it.

    Ctrl-C in a terminal goes to every process of the foreground group, and nnU-Net's preprocessing workers would
    each print a KeyboardInterrupt traceback. In a session of its own the child and its workers do not get it; this
    process does, stops them all (SIGTERM to the child's group) and raises KeyboardInterrupt, which the CLI turns into
    one line. ``function`` must be importable by name (the child is spawned).

    Raises:
        SMITError: the child failed (its own messages are above it on stderr).
    """
    child = multiprocessing.get_context("spawn").Process(target=_lead_a_session, args=(function, args))
    child.start()
    try:
        child.join()
    except BaseException:
        try:
            os.killpg(child.pid, signal.SIGTERM)
        except ProcessLookupError:  # interrupted before the child led its session
            child.terminate()
        child.join()
        raise
    if child.exitcode != 0:
        raise SMITError(f"nnU-Net's preprocessing stopped (exit code {child.exitcode}; its messages are above); fix "
                        "what they name and rerun the same command.")


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        prog="smit_plan",
        description="Write an nnU-Net plans variant (nnUNetPlans_SMIT) whose CT clipping is the encoder's HU window, "
        "with the Swin-fitted patch and the encoder's path, and preprocess it with nnU-Net's preprocessing. Then: "
        "nnUNetv2_train DATASET 3d_fullres FOLD -tr nnUNetTrainerSMIT -p nnUNetPlans_SMIT.",
    )
    parser.add_argument("-d", "--dataset", required=True, help="nnU-Net dataset name or id, already planned")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--encoder", metavar="FILE",
                        help="encoder checkpoint (or smit_pretrain output folder) whose HU window the plans take")
    source.add_argument("--hu_window", type=float, nargs=2, metavar=("LOW", "HIGH"),
                        help="the HU window of an encoder still to be pretrained (its smit_pretrain --hu_window, "
                             "-175 250 by default), e.g. for smit_pretrain --probe; the plans name no weights")
    parser.add_argument("-pl", "--plans", default="nnUNetPlans", help="plans to start from (nnUNetPlans)")
    parser.add_argument("-c", "--configurations", nargs="+", default=["3d_fullres"],
                        help="3D configurations to write and preprocess (3d_fullres)")
    parser.add_argument("-o", "--plans_name", help="name of the variant (default: the plans' name + _SMIT)")
    parser.add_argument("-np", "--num_processes", type=int, default=4, help="preprocessing processes (4)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)

    def run() -> None:
        target = write_smit_plans(args.dataset, Path(args.encoder) if args.encoder else None, args.plans,
                                  args.configurations, args.plans_name, args.num_processes,
                                  hu_window=args.hu_window)
        print(target, flush=True)

    return run_cli(run, str(args.dataset), "smit_plan interrupted; rerun the same command to write the plans and "
                                           "preprocess them again.")


if __name__ == "__main__":
    sys.exit(main())
