"""``smit_study``: does an encoder help on this nnU-Net dataset, and with how few labels?

Every arm (each encoder fine-tuned by the SMIT trainer, the same network from random init, nnU-Net's default
``nnUNetTrainer``) trains through nnU-Net on exactly the same labelled cases with the same budget, and is scored by
nnU-Net's own validation on a fixed held-out test set (see :mod:`nnunet_smit.study.splits`). Everything is checked
before the first arm trains; arms already finished are skipped, so rerunning the command resumes a study.
"""
from __future__ import annotations

import json
import logging
import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch

from nnunet_smit.checkpoint import EncoderCheckpoint, load_encoder_checkpoint
from nnunet_smit.errors import SMITError
from nnunet_smit.study import report
from nnunet_smit.files import FolderBusy, FolderLock, read_json
from nnunet_smit.study.arms import (
    Arm,
    Budget,
    arm_identity,
    fold_folder,
    identity_differences,
    read_arm_record,
    read_dice,
    train_arm,
    write_arm_record,
)
from nnunet_smit.study.splits import (
    assign_folds,
    check_fully_preprocessed,
    held_out_cases,
    labelled_sets,
    read_splits,
)

logger = logging.getLogger(__name__)

BASELINES = ("scratch", "nnunet")
NNUNET_DEFAULT_TRAINER = "nnUNetTrainer"
# nnU-Net's default arm trains on nnU-Net's own plans and patch, whatever -p the SMIT arms use.
NNUNET_DEFAULT_PLANS = "nnUNetPlans"
STUDY_FORMAT = "nnunet_smit.study"


@dataclass
class StudySettings:
    """What a study measures; kept in ``study.json`` so that a rerun resumes the same study.

    Attributes:
        dataset: nnU-Net dataset name or id.
        output: the study folder.
        encoders: encoder checkpoint files (each one arm).
        labelled: numbers of labelled training cases k.
        seeds: draws of the labelled cases per k.
        baselines: "scratch" (the SMIT network from random init) and/or "nnunet" (nnU-Net's default trainer).
        trainer: the SMIT trainer that fine-tunes the encoders (its Scratch variant trains the scratch arm).
        configuration: nnU-Net configuration.
        plans: nnU-Net plans identifier.
        budget: epochs and iterations of every arm.
        device: "cuda", "cpu" or "mps".
        test_fraction: share of the training cases held out for testing.
        allow_clipped_window: train an encoder arm although the plans' CT clip range cuts into the encoder's HU
            window (flagged in the log and the table); refused otherwise.
    """

    dataset: str
    output: Path
    encoders: Sequence[str] = ()
    labelled: Sequence[int] = (1, 2, 4, 8)
    seeds: int = 3
    baselines: Sequence[str] = BASELINES
    trainer: str = "nnUNetTrainerSMIT"
    configuration: str = "3d_fullres"
    plans: str = "nnUNetPlans"
    budget: Budget = field(default_factory=Budget)
    device: str = "cuda"
    test_fraction: float = 0.2
    allow_clipped_window: bool = False


@dataclass
class _Dataset:
    name: str
    preprocessed: Path
    plans: Dict[str, Any]
    dataset_json: Dict[str, Any]
    case_ids: List[str]


# ----------------------------------------------------------------------------------------------- checks

def _plan_command(dataset: str, configuration: str) -> str:
    return f"nnUNetv2_plan_and_preprocess -d {dataset} -c {configuration}"


def resolve_dataset(dataset: str, configuration: str, plans_identifier: str) -> _Dataset:
    """The planned and preprocessed dataset, or a one-line SMITError that names the command to run."""
    from nnunetv2.paths import nnUNet_preprocessed
    from nnunetv2.training.dataloading.nnunet_dataset import infer_dataset_class
    from nnunetv2.utilities.dataset_name_id_conversion import maybe_convert_to_dataset_name

    if not nnUNet_preprocessed.is_set():
        raise SMITError("nnUNet_preprocessed is not set; export nnU-Net's three folder variables (nnUNet_raw, "
                        "nnUNet_preprocessed, nnUNet_results) and plan the dataset first.")
    try:
        name = maybe_convert_to_dataset_name(dataset)
    except (RuntimeError, ValueError) as error:
        raise SMITError(f"dataset {dataset!r} is not known to nnU-Net ({str(error).splitlines()[0]}); convert it to "
                        f"an nnU-Net raw dataset and run {_plan_command(dataset, configuration)}.") from None
    preprocessed = Path(nnUNet_preprocessed.get()) / name
    plans_file = preprocessed / f"{plans_identifier}.json"
    if not plans_file.is_file():
        raise SMITError(f"{name} is not planned with {plans_identifier} yet ({plans_file} does not exist); run "
                        f"{_plan_command(dataset, configuration)}.")
    plans = read_json(plans_file, "the nnU-Net plans", dict, f"run {_plan_command(dataset, configuration)} again")
    if configuration not in plans.get("configurations", {}):
        raise SMITError(f"the plans {plans_file} have no configuration {configuration!r}; choose one of "
                        f"{sorted(plans.get('configurations', {}))}.")
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    data_folder = preprocessed / PlansManager(plans).get_configuration(configuration).data_identifier
    if not data_folder.is_dir() or not any(data_folder.iterdir()):
        raise SMITError(f"{name} is planned but not preprocessed for {configuration} ({data_folder} is missing or "
                        f"empty); run {_plan_command(dataset, configuration)}.")
    case_ids = sorted(infer_dataset_class(str(data_folder)).get_identifiers(str(data_folder)))
    dataset_json = read_json(preprocessed / "dataset.json", "the preprocessed dataset.json", dict,
                             f"run {_plan_command(dataset, configuration)} again")
    return _Dataset(name, preprocessed, plans, dataset_json, case_ids)


def find_trainer(name: str) -> type:
    """A trainer class by name: this package's, nnU-Net's default, or anything nnU-Net's own lookup finds."""
    import nnunet_smit.trainers as smit_trainers

    if hasattr(smit_trainers, name):
        return getattr(smit_trainers, name)
    if name == NNUNET_DEFAULT_TRAINER:
        from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

        return nnUNetTrainer
    from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name

    try:
        found = recursive_find_trainer_class_by_name(name)
    except RuntimeError:  # 2.8.1 raises for a name it cannot find (older versions returned None)
        found = None
    if found is None:
        raise SMITError(f"unknown trainer {name!r}: nnU-Net finds no trainer class of that name; check the spelling "
                        f"(e.g. nnUNetTrainerSMIT, nnUNetTrainerSMIT_96).")
    return found


def scratch_trainer_name(trainer: str) -> str:
    """The random-init twin of a SMIT trainer: ``nnUNetTrainerSMIT_96`` -> ``nnUNetTrainerSMITScratch_96``, and for a
    named variant the one of the two spellings nnU-Net finds: ``nnUNetTrainerSMITLight_64`` ->
    ``nnUNetTrainerSMITLightScratch_64`` (or ``nnUNetTrainerSMITScratchLight_64``)."""
    prefix = "nnUNetTrainerSMIT"
    if not trainer.startswith(prefix) or "Scratch" in trainer:
        raise SMITError(f"--trainer {trainer} has no Scratch twin; the scratch baseline needs a trainer named "
                        f"nnUNetTrainerSMIT<variant> with an nnUNetTrainerSMITScratch<variant> beside it.")
    rest = trainer[len(prefix):]
    variant, _, size = rest.partition("_")
    candidates = [prefix + "Scratch" + rest]
    if variant:  # nnUNetTrainerSMIT<Variant>[_<size>]: the variant's own Scratch class
        candidates.insert(0, prefix + variant + "Scratch" + (f"_{size}" if size else ""))
    for candidate in candidates:
        if _trainer_class(candidate) is not None:
            return candidate
    return candidates[-1]


def _trainer_class(name: str) -> Optional[type]:
    from nnunet_smit import trainers

    return getattr(trainers, name, None)


def _arm_label(path: str, checkpoint: EncoderCheckpoint, taken: Sequence[str]) -> str:
    label = re.sub(r"[^A-Za-z0-9_.-]+", "_", Path(path).name.split(".")[0]) or "encoder"
    if label in taken or label in BASELINES:
        label = f"{label}-{checkpoint.sha256[:8]}"
    return label


def build_arms(settings: StudySettings) -> Tuple[List[Arm], Dict[str, EncoderCheckpoint]]:
    """The arms in table order (encoders, then the baselines) and the loaded encoder checkpoints by path."""
    from nnunet_smit.trainers import nnUNetTrainerSMIT

    if not settings.encoders and not settings.baselines:
        raise SMITError("nothing to train: pass --encoder FILE and/or --baselines.")
    unknown = sorted(set(settings.baselines) - set(BASELINES))
    if unknown:
        raise SMITError(f"unknown baseline(s) {unknown}; choose from {list(BASELINES)}.")
    trainer = find_trainer(settings.trainer)
    if not (isinstance(trainer, type) and issubclass(trainer, nnUNetTrainerSMIT)):
        raise SMITError(f"--trainer {settings.trainer} is not a SMIT trainer (a subclass of nnUNetTrainerSMIT); the "
                        "encoders are fine-tuned by one, e.g. nnUNetTrainerSMIT or nnUNetTrainerSMIT_96.")
    if not trainer.require_pretrained_weights:
        raise SMITError(f"--trainer {settings.trainer} trains from random init; pass the pretrained trainer (the "
                        "scratch baseline uses its Scratch twin).")
    checkpoints: Dict[str, EncoderCheckpoint] = {}
    arms: List[Arm] = []
    for path in settings.encoders:
        resolved = str(Path(path).expanduser().resolve())
        try:
            checkpoint = load_encoder_checkpoint(resolved)
        except SMITError as error:
            raise SMITError(f"--encoder {path} does not load: {error}") from None
        checkpoints[resolved] = checkpoint
        arms.append(Arm(_arm_label(resolved, checkpoint, [a.name for a in arms]), resolved, settings.trainer,
                        resolved))
    if "scratch" in settings.baselines:
        scratch = scratch_trainer_name(settings.trainer)
        find_trainer(scratch)
        # the first encoder's architecture, so that pretrained and scratch differ only in the initial weights
        arms.append(Arm("scratch", "scratch", scratch, arms[0].weights if arms else None))
    if "nnunet" in settings.baselines:
        arms.append(Arm("nnunet", "nnunet", NNUNET_DEFAULT_TRAINER, plans=NNUNET_DEFAULT_PLANS))
    return arms, checkpoints


def clipped_windows(dataset: "_Dataset", configuration: str, plans: str, arms: Sequence[Arm],
                    checkpoints: Dict[str, EncoderCheckpoint]) -> Dict[str, List[str]]:
    """{arm name: warnings} for SMIT arms whose plans clip CT inside their encoder's HU window."""
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    from nnunet_smit.trainers.plans_settings import clip_range_warnings, intensity_statistics

    resolved = PlansManager(dataset.plans).get_configuration(configuration).configuration
    stats = intensity_statistics(dataset.plans, resolved)
    clipped: Dict[str, List[str]] = {}
    for arm in arms:
        checkpoint = checkpoints.get(arm.weights or "")
        if checkpoint is None or arm.plans is not None:
            continue
        warnings = clip_range_warnings(stats, checkpoint.preprocessing, dataset.name, plans, arm.weights)
        if warnings:
            clipped[arm.name] = warnings
    return clipped


def check_leakage(dataset: _Dataset, test_cases: Sequence[str],
                  checkpoints: Dict[str, EncoderCheckpoint]) -> Tuple[Dict[str, Dict[str, List[str]]], List[str]]:
    """Held-out cases that an encoder was pretrained on ({encoder: {case: [pretraining scans]}}) and notes on
    encoders that could not be checked."""
    from nnunetv2.paths import nnUNet_raw

    from nnunet_smit.fingerprints import check_raw_cases

    leakage: Dict[str, Dict[str, List[str]]] = {}
    notes: List[str] = []
    if not checkpoints:
        return leakage, notes
    raw = Path(nnUNet_raw.get()) / dataset.name if nnUNet_raw.is_set() else None
    if raw is None or not (raw / "dataset.json").is_file():
        notes.append(f"leakage check skipped: the raw images of {dataset.name} are not found (nnUNet_raw).")
        return leakage, notes
    raw_json = read_json(raw / "dataset.json", "the raw dataset.json", dict, "fix it as nnU-Net requires")
    for path, checkpoint in checkpoints.items():
        if not checkpoint.pretraining_scans:
            notes.append(f"leakage check not possible for {path}: it records no pretraining scan fingerprints "
                         f"(source {checkpoint.source}).")
            continue
        result = check_raw_cases(raw, raw_json, test_cases, checkpoint.pretraining_scans)
        if result.missing:
            notes.append(f"leakage check of {path}: {len(result.missing)} held-out case(s) without raw images under "
                         f"{raw} not checked, first {sorted(result.missing)[0]}.")
        if result.leaked:
            leakage[path] = result.leaked
    return leakage, notes


# ----------------------------------------------------------------------------------------------- the study

def _header(settings: StudySettings, dataset: _Dataset, arms: List[Arm], test_cases: List[str],
            leakage: Dict[str, Any]) -> Dict[str, Any]:
    return {
        "format": STUDY_FORMAT,
        "dataset": dataset.name,
        "configuration": settings.configuration,
        "plans": settings.plans,
        "trainer": settings.trainer,
        "budget": asdict(settings.budget),
        "device": settings.device,
        "test_fraction": settings.test_fraction,
        "test_cases": test_cases,
        "labelled": sorted(set(settings.labelled)),
        "seeds": settings.seeds,
        "arms": [asdict(arm) for arm in arms],
        "leakage": leakage,
    }


# What must match for a rerun to resume rather than start another study in the same folder.
_RESUME_KEYS = ("dataset", "configuration", "plans", "budget", "test_fraction", "test_cases")


def _previous_study(study_json: Path, header: Dict[str, Any]) -> Dict[str, Any]:
    """The folder's earlier ``study.json`` ({} when there is none); SMITError when it is another study's."""
    if not study_json.is_file():
        return {}
    previous = read_json(study_json, "the study's study.json", dict, "move it away to start a new study there")
    changed = [key for key in _RESUME_KEYS if previous.get(key) != header[key]]
    if changed:
        raise SMITError(f"{study_json.parent} holds a study with other settings ({', '.join(changed)}); use a new "
                        "-o folder, or the same settings to resume it.")
    return previous


def _format_seconds(seconds: float) -> str:
    if seconds < 90:
        return f"{int(round(seconds))} s"
    minutes = int(round(seconds / 60))
    return f"{minutes // 60} h {minutes % 60:02d} min" if minutes >= 60 else f"{minutes} min"


def _datasets(settings: StudySettings, arms: Sequence[Arm]) -> Dict[str, _Dataset]:
    """The planned and preprocessed dataset of every plans the arms train on (the study's -p, and nnU-Net's default
    plans for its default arm), each holding the same cases."""
    names = [settings.plans] + [a.plans for a in arms if a.plans is not None and a.plans != settings.plans]
    datasets = {name: resolve_dataset(settings.dataset, settings.configuration, name) for name in dict.fromkeys(names)}
    study = datasets[settings.plans]
    from nnunetv2.paths import nnUNet_raw

    for name, other in datasets.items():  # a killed preprocessing must not pass for a smaller dataset
        if nnUNet_raw.is_set():
            check_fully_preprocessed(Path(nnUNet_raw.get()) / other.name, other.case_ids, settings.dataset,
                                     settings.configuration)
    read_splits(study.preprocessed / "splits_final.json")  # a malformed file is one line before any work
    for name, other in datasets.items():
        if other.case_ids != study.case_ids:
            missing = sorted(set(study.case_ids) ^ set(other.case_ids))
            raise SMITError(f"{other.name} holds other cases preprocessed with {name} than with {settings.plans} "
                            f"({len(missing)} differ, first {missing[0]}); run "
                            f"{_plan_command(settings.dataset, settings.configuration)} (and smit_plan) again.")
    return datasets


def _arm_inputs(arm: Arm, checkpoints: Dict[str, EncoderCheckpoint]) -> Tuple[Optional[str], Optional[Dict[str, Any]]]:
    """(sha256 of the weights an arm starts from, architecture a scratch arm builds) for its identity record.

    The weights are the encoder's and, for a checkpoint that carries SMITNet decoder blocks, theirs too
    (``<encoder sha256>+<decoder parts sha256>``): the trainer loads both, so either changing retrains the arm."""
    checkpoint = checkpoints.get(arm.weights or "")
    if checkpoint is None:
        return None, None
    if arm.encoder == "scratch":
        return None, checkpoint.config.to_dict()
    if checkpoint.decoder_parts is not None:
        return f"{checkpoint.sha256}+{checkpoint.decoder_parts.sha256}", None
    return checkpoint.sha256, None


def _move_aside(folder: Path) -> Path:
    """Rename a fold folder that another arm setting trained, keeping its files: ``fold_N.replaced-<time>``."""
    target = folder.with_name(f"{folder.name}.replaced-{time.strftime('%Y%m%d-%H%M%S')}")
    folder.rename(target)
    return target


def run_study(settings: StudySettings) -> Path:
    """Check everything, train every unfinished arm, and write study.json / study.md / study.png into OUT.

    A fold already trained is reused only when the record it carries (trainer, plans, budget, cases, the sha256 of the
    encoder's weights) is the one this study would write; otherwise it is moved aside (kept, renamed) and trained
    again, and the log says why.

    Returns:
        The path of ``study.md``.
    """
    arms, checkpoints = build_arms(settings)
    datasets = _datasets(settings, arms)
    dataset = datasets[settings.plans]
    test_cases = held_out_cases(dataset.case_ids, settings.test_fraction)
    pool = [c for c in dataset.case_ids if c not in set(test_cases)]
    subsets = labelled_sets(pool, settings.labelled, settings.seeds)
    trainers = {arm.trainer: find_trainer(arm.trainer) for arm in arms}
    clipped = clipped_windows(dataset, settings.configuration, settings.plans, arms, checkpoints)
    for name, warnings in clipped.items():
        for warning in warnings:
            logger.warning("arm %s: %s", name, warning.removeprefix("WARNING: "))
    if clipped and not settings.allow_clipped_window:
        raise SMITError(f"the plans {settings.plans} clip CT inside the HU window of the encoder of arm(s) "
                        f"{', '.join(clipped)}, which would fine-tune on other intensities than it was pretrained on; "
                        f"run smit_plan -d {settings.dataset} --encoder FILE and pass -p {settings.plans}_SMIT, or "
                        "pass --allow_clipped_window to train them anyway (flagged in the table).")
    leakage, notes = check_leakage(dataset, test_cases, checkpoints)
    for note in notes:
        logger.warning(note)
    for path, cases in leakage.items():
        logger.warning("LEAKAGE: held-out case(s) %s were in the pretraining data of %s (matching scans: %s); their "
                       "Dice overstates what the encoder does on unseen scans.", ", ".join(sorted(cases)), path,
                       ", ".join(sorted({s for scans in cases.values() for s in scans})))

    out = Path(settings.output)
    out.mkdir(parents=True, exist_ok=True)
    lock = FolderLock(out / ".smit_study.lock", f"the study folder {out}")
    try:
        lock.acquire()
    except FolderBusy as busy:
        raise SMITError(f"{busy}; wait for that study to finish, or use another -o folder.") from None
    try:
        return _run_locked(settings, out, datasets, arms, checkpoints, subsets, test_cases, trainers, clipped,
                           leakage)
    finally:
        lock.release()


def _run_locked(settings: StudySettings, out: Path, datasets: Dict[str, _Dataset], arms: List[Arm],
                checkpoints: Dict[str, EncoderCheckpoint], subsets: list, test_cases: List[str],
                trainers: Dict[str, type], clipped: Dict[str, List[str]], leakage: Dict[str, Any]) -> Path:
    dataset = datasets[settings.plans]
    header = _header(settings, dataset, arms, test_cases, leakage)
    header["clipped_window"] = {name: warnings for name, warnings in clipped.items()}
    study_json = out / "study.json"
    previous_rows = _previous_study(study_json, header).get("rows", [])
    (out / "test_cases.json").write_text(json.dumps({"dataset": dataset.name, "test_cases": test_cases}, indent=2),
                                         encoding="utf-8")
    folds = assign_folds(dataset.preprocessed / "splits_final.json", dataset.case_ids,
                         [(s.train_cases, test_cases) for s in subsets], configuration=settings.configuration)
    label_names = {str(value): name for name, value in dataset.dataset_json["labels"].items()
                   if not isinstance(value, (list, tuple))}

    jobs = [(subset, fold, arm) for subset, fold in zip(subsets, folds) for arm in arms]
    device = torch.device(settings.device)
    if device.type == "cpu":
        import multiprocessing

        torch.set_num_threads(multiprocessing.cpu_count())  # as nnUNetv2_train does on the CPU
    rows: List[Dict[str, Any]] = []
    durations: Dict[str, List[float]] = {}

    def plans_of(arm: Arm) -> str:
        return arm.plans or settings.plans

    def fold_of(fold: int, arm: Arm) -> Path:
        return fold_folder(out / "arms" / arm.name, dataset.name, arm.trainer, plans_of(arm),
                           settings.configuration, fold)

    def identity_of(subset, arm: Arm) -> Dict[str, Any]:
        sha, architecture = _arm_inputs(arm, checkpoints)
        return arm_identity(arm, plans_of(arm), settings.configuration, settings.budget, subset.train_cases,
                            test_cases, sha, architecture)

    def finished(folder: Path) -> bool:
        return (folder / "validation" / "summary.json").is_file() and (folder / "checkpoint_final.pth").is_file()

    def stale_reasons(folder: Path, subset, arm: Arm) -> List[str]:
        """Why the fold folder on disk is not this arm's ([] when it is, or when nothing is there yet)."""
        if not folder.is_dir() or not any(folder.iterdir()):
            return []
        return identity_differences(read_arm_record(folder), identity_of(subset, arm))

    # Rows of earlier runs of this folder whose arms this command line does not name are kept in the report.
    current = {(arm.name, subset.labelled, subset.seed) for subset, _, arm in jobs}
    kept_rows = [r for r in previous_rows if (r["arm"], r["labelled"], r["seed"]) not in current
                 and finished(Path(r["results_folder"]))]
    earlier = {(r["arm"], r["labelled"], r["seed"]): r.get("seconds") for r in previous_rows}
    arm_names = [arm.name for arm in arms] + list(dict.fromkeys(r["arm"] for r in kept_rows
                                                                 if r["arm"] not in {a.name for a in arms}))
    labelled = sorted(set(settings.labelled) | {int(r["labelled"]) for r in kept_rows})
    added: List[Tuple[str, int, int]] = []

    def write_outputs() -> None:
        # Rows of this command line's arms that earlier runs finished and this run has not reached yet stay in the
        # report while it runs, so that a run stopped part way (Ctrl-C, SIGTERM, a failure) leaves every finished arm
        # in it; a fold moved aside as stale is no longer finished and drops out.
        reached = {(r["arm"], r["labelled"], r["seed"]) for r in rows}
        waiting = [r for r in previous_rows if (r["arm"], r["labelled"], r["seed"]) in current - reached
                   and finished(Path(r["results_folder"]))]
        all_rows = [r for r in kept_rows if finished(Path(r["results_folder"]))] + waiting + rows
        report.write_study_json(study_json, header, all_rows)
        report.write_study_md(out / "study.md", header, all_rows, arm_names, labelled, added=added)
        report.plot_study(out / "study.png", all_rows, arm_names,
                          f"{dataset.name}: held-out Dice ({len(test_cases)} cases), {settings.seeds} seed(s)")

    # Every stale fold goes aside before any arm trains: an arm's folds share one results folder, whose plans.json the
    # SMIT trainer will not give another network while a fold of the old one is there (an encoder file re-pretrained
    # with another architecture makes all of them stale).
    stale: Dict[Tuple[int, str], Tuple[List[str], Path]] = {}
    for subset, fold, arm in jobs:
        reasons = stale_reasons(fold_of(fold, arm), subset, arm)
        if reasons:
            stale[(fold, arm.name)] = (reasons, _move_aside(fold_of(fold, arm)))
    if stale:  # the report says at once that those arms are gone (a run stopped in the first arm leaves it so)
        write_outputs()

    for index, (subset, fold, arm) in enumerate(jobs, start=1):
        arm_results = out / "arms" / arm.name
        folder = fold_of(fold, arm)
        summary = folder / "validation" / "summary.json"
        what = f"arm {index} of {len(jobs)}: {arm.name}, k={subset.labelled}, seed {subset.seed} (fold {fold})"
        if (fold, arm.name) in stale:
            reasons, moved = stale[(fold, arm.name)]
            print(f"[smit_study] {what}: the fold on disk is not this arm ({'; '.join(reasons)}): moved to "
                  f"{moved.name} and trained again", flush=True)
        trained_now = not finished(folder)
        if not trained_now:
            print(f"[smit_study] {what}: finished earlier, skipped", flush=True)
            seconds = earlier.get((arm.name, subset.labelled, subset.seed))
        else:
            eta = ""
            if durations:  # the mean time of each arm so far (of all arms for one not yet timed)
                mean_all = sum(sum(v) for v in durations.values()) / sum(len(v) for v in durations.values())
                estimate = sum(sum(durations[a.name]) / len(durations[a.name]) if a.name in durations else mean_all
                               for _, f, a in jobs[index - 1:] if not finished(fold_of(f, a)))
                eta = f"; about {_format_seconds(estimate)} left"
            print(f"[smit_study] {what}: training on {', '.join(subset.train_cases)}{eta}", flush=True)
            write_arm_record(folder, identity_of(subset, arm))
            seconds = train_arm(trainers[arm.trainer], datasets[plans_of(arm)].plans, dataset.dataset_json,
                                settings.configuration, fold, arm, arm_results, settings.budget, device)
            durations.setdefault(arm.name, []).append(seconds)
            added.append((arm.name, subset.labelled, subset.seed))
        checkpoint = checkpoints.get(arm.weights or "") if arm.encoder not in BASELINES else None
        row = {"arm": arm.name, "encoder": arm.encoder, "trainer": arm.trainer, "plans": plans_of(arm),
               "encoder_sha256": checkpoint.sha256 if checkpoint is not None else None,
               "exported_side": checkpoint.exported_side if checkpoint is not None else None,
               "clipped_window": arm.name in clipped,
               "labelled": subset.labelled, "seed": subset.seed, "fold": fold,
               "train_cases": list(subset.train_cases), "test_cases": test_cases,
               **read_dice(summary, label_names), "results_folder": str(folder),
               "seconds": None if seconds is None else round(seconds, 1)}
        rows.append(row)
        if trained_now:
            print(f"[smit_study] {what}: Dice {row['dice']:.3f} in {_format_seconds(seconds)}"
                  if row["dice"] is not None else f"[smit_study] {what}: no Dice (no foreground)", flush=True)
        write_outputs()
    write_outputs()
    print(report.markdown_table(kept_rows + rows, arm_names, labelled), flush=True)
    return out / "study.md"
