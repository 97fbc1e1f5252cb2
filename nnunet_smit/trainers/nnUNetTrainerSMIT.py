"""nnUNetTrainerSMIT: fine-tune a SMIT Swin-3D encoder with its convolutional decoder inside nnU-Net v2.

Everything the network needs is written into the plans configuration before nnU-Net's ``__init__`` runs (see
:mod:`nnunet_smit.trainers.plans_settings`), so the results ``plans.json`` rebuilds it in ``nnUNetv2_predict``.
Pretrained weights come from the environment variable ``nnUNet_SMIT_weights`` (or the configuration key
``smit_weights``); the encoder is loaded strictly, on every rank, at the start of epoch 0 only. Then the fold's
validation cases are checked against the scans the encoder was pretrained on (:mod:`nnunet_smit.fingerprints`) and
the outcome is written to the training log; a validation case seen in pretraining is warned about, never refused.

``nnUNet_SMIT_weights`` may name any file :func:`~nnunet_smit.checkpoint.load_encoder_checkpoint` reads, a
``smit_pretrain`` output folder (its export, or the ``checkpoint_latest.pt`` of a run still going, whose teacher is
used), and what the file is and what was converted is written to the training log. A project error raised in a
process that imported this module (``nnUNetv2_train``) prints as one line, without a traceback.
"""
from __future__ import annotations

import contextlib
import os
import re
import sys
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from batchgenerators.utilities.file_and_folder_operations import isfile, join, load_json
from nnunetv2.paths import nnUNet_raw, nnUNet_results
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
from nnunetv2.utilities.plans_handling.plans_handler import ConfigurationManager, PlansManager
from torch import nn

from nnunet_smit.architectures import SMITConfig, SMITNet
from nnunet_smit.checkpoint import (
    EncoderCheckpoint, load_decoder_parts, load_encoder_checkpoint, load_encoder_weights,
)
from nnunet_smit.conventions import PretrainPreprocessing
from nnunet_smit.errors import CheckpointError, SMITError
from nnunet_smit.files import atomic_write
from nnunet_smit.fingerprints import check_raw_cases
from nnunet_smit.trainers import plans_settings
from nnunet_smit.trainers.param_groups import build_param_groups, unwrap_network
from nnunet_smit.trainers.patch_fitting import fit_patch_size
from nnunet_smit.trainers.schedule import EpochLRScheduler

def _one_line_for_project_errors(previous: Any) -> Any:
    """A ``sys.excepthook`` printing the project's errors as ``error: ...`` (they say what to do); others go on to
    ``previous``."""
    def hook(kind, value, traceback):
        if isinstance(value, SMITError):
            print(f"error: {value}", file=sys.stderr)
        else:
            previous(kind, value, traceback)

    hook.smit_one_line = True
    return hook


if not getattr(sys.excepthook, "smit_one_line", False):
    sys.excepthook = _one_line_for_project_errors(sys.excepthook)

WEIGHTS_ENV = "nnUNet_SMIT_weights"
WEIGHTS_PLANS_KEY = plans_settings.WEIGHTS_PLANS_KEY  # optional path inside plans['configurations'][name]
MISSING_WEIGHTS_MESSAGE = (
    f"No SMIT encoder checkpoint given: set the environment variable {WEIGHTS_ENV} to an encoder checkpoint "
    "(from smit_pretrain or smit_convert), or train from random init with -tr nnUNetTrainerSMITScratch."
)
_TRUE = ("true", "1", "t")
LEAKAGE_CHECK = "SMIT leakage check"
_LEAKED_CASES_NAMED = 20  # the warning names this many cases, then counts the rest
# What nnU-Net's --c looks for in a fold folder, in its order.
_NNUNET_CHECKPOINTS = ("checkpoint_final.pth", "checkpoint_latest.pth", "checkpoint_best.pth")


def _numpy_safe_globals() -> List[Any]:
    """numpy types that nnU-Net's checkpoints pickle (logged losses, Dice values and the best EMA are numpy
    scalars), allowed on top of torch's weights-only set."""
    multiarray = (np._core if hasattr(np, "_core") else np.core).multiarray
    types: List[Any] = [np.dtype, np.ndarray, multiarray.scalar, multiarray._reconstruct]
    types += [type(np.dtype(name)) for name in ("float64", "float32", "float16", "int64", "int32", "bool")]
    return types


def load_nnunet_checkpoint(path: str, map_location: Union[str, torch.device]) -> Dict[str, Any]:
    """Read an nnU-Net training checkpoint with ``weights_only=True``: tensors, plain containers, torch.device
    and numpy scalars/arrays only (what nnU-Net's ``save_checkpoint`` writes); anything else is refused."""
    with torch.serialization.safe_globals(_numpy_safe_globals()):
        return torch.load(path, map_location=map_location, weights_only=True)


class nnUNetTrainerSMIT(nnUNetTrainer):
    """SMIT encoder (pretrained) + SMIT convolutional decoder, trained with nnU-Net's data pipeline.

    Recipe (class attributes, so a variant changes one): AdamW (``initial_lr``, ``weight_decay``), linear warm-up
    over ``warmup_epochs`` then ``lr_decay`` ("cosine" or "poly"), layer-wise decay ``layer_decay`` over the
    encoder (``freeze_encoder`` trains the decoder only; ``decoder_first_epochs`` holds the pretrained parts
    at first), gradient clipping at ``grad_clip_norm``, bf16 autocast on CUDA GPUs that support it, deep
    supervision at [1, 1/2, 1/4, 1/8, 1/16].
    """

    # --- what a variant changes ----------------------------------------------------------------------------
    require_pretrained_weights: bool = True
    scratch_preset: str = "smit_small"  # architecture when no checkpoint is given (Scratch variants only)
    fixed_patch_size: Optional[Tuple[int, int, int]] = None  # None: fit nnU-Net's planned patch
    decoder_norm: str = "instance"
    decoder: str = "smit"  # the authors' decoder; "light": SMITLightDecoder (nnUNetTrainerSMITLight)
    gradient_checkpointing: bool = False  # the encoder recomputes its blocks in backward (the light variants)
    smit_initial_lr: float = 3e-4
    smit_weight_decay: float = 5e-2
    warmup_epochs: int = 50
    lr_decay: str = "cosine"
    layer_decay: float = 0.9
    freeze_encoder: bool = False
    # decoder-first warm-up (nnUNetTrainerSMITDecoderFirst): the parts the checkpoint carried are held at rate 0 for
    # this many epochs while the rest trains, then ramp up over as many (0: the whole network warms up together)
    decoder_first_epochs: int = 0
    grad_clip_norm: float = 1.0

    def __init__(
        self,
        plans: dict,
        configuration: str,
        fold: int,
        dataset_json: dict,
        device: torch.device = torch.device("cuda"),
    ):
        notes, self._encoder_checkpoint = self._write_smit_plans(plans, configuration, fold)
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.initial_lr = self.smit_initial_lr
        self.weight_decay = self.smit_weight_decay
        self.autocast_dtype = torch.float16
        if self.device.type == "cuda" and torch.cuda.is_available() and torch.cuda.is_bf16_supported():
            # bf16 has fp32's range: no loss scaling, no fp16 overflow in attention
            self.autocast_dtype = torch.bfloat16
            self.grad_scaler = None
        self._initial_encoder_fingerprint: Optional[torch.Tensor] = None
        for note in notes:
            self.print_to_log_file(note)

    # --- plans: everything the network needs, before nnU-Net copies them --------------------------------------
    @classmethod
    def _weights_path(cls, configuration: Dict[str, Any]) -> Optional[str]:
        path = os.environ.get(WEIGHTS_ENV) or configuration.get(WEIGHTS_PLANS_KEY)
        return os.path.abspath(os.path.expanduser(path)) if path else None

    @classmethod
    def _results_folder(cls, plans: dict, configuration: str) -> Optional[str]:
        """nnU-Net's results folder of this trainer, plans and configuration (None when nnUNet_results is unset)."""
        if not nnUNet_results.is_set():
            return None
        return join(nnUNet_results.get(), plans["dataset_name"],
                    f"{cls.__name__}__{plans['plans_name']}__{configuration}")

    @classmethod
    def _results_settings(cls, plans: dict, configuration: str) -> Optional[Dict[str, Any]]:
        """SMIT settings from this trainer's results plans.json, if a previous run wrote them."""
        folder = cls._results_folder(plans, configuration)
        if folder is None or not isfile(join(folder, "plans.json")):
            return None
        return load_json(join(folder, "plans.json"))["configurations"].get(configuration, {}).get(
            plans_settings.SMIT_PLANS_KEY
        )

    @classmethod
    def _has_checkpoint(cls, plans: dict, configuration: str, fold: Union[int, str]) -> bool:
        """Whether ``--c`` finds a checkpoint of this fold to continue from (nnU-Net starts afresh otherwise)."""
        folder = cls._results_folder(plans, configuration)
        return folder is not None and any(
            isfile(join(folder, f"fold_{fold}", name)) for name in _NNUNET_CHECKPOINTS)

    @classmethod
    def _refuse_another_network(cls, plans: dict, configuration: str, previous: Dict[str, Any],
                                settings: Dict[str, Any], source: str) -> None:
        """One line, before nnU-Net writes anything, when this run would build another network than the one the
        results folder's ``plans.json`` describes and a fold there was trained with (holds a checkpoint): that file
        serves every fold (``nnUNetv2_predict`` rebuilds each fold's network from it), and nnU-Net rewrites it when
        training starts."""
        folder = cls._results_folder(plans, configuration)
        folds = sorted(  # nnU-Net's fold folders only (not a fold_5.replaced-<time> that smit_study moved aside)
            name[len("fold_"):] for name in (os.listdir(folder) if folder and os.path.isdir(folder) else [])
            if re.fullmatch(r"fold_(\d+|all)", name)
            and any(isfile(join(folder, name, checkpoint)) for checkpoint in _NNUNET_CHECKPOINTS))
        differences = plans_settings.network_differences(previous, settings)
        # no fold with a checkpoint: the plans.json of a run killed before its first one, which may be rewritten
        if not folds or not differences:
            return
        trained = ("fold " if len(folds) == 1 else "folds ") + ", ".join(folds)
        started = (previous.get("weights") or {}).get("path") or "random init"
        raise SMITError(
            f"{source} gives another SMIT network ({'; '.join(differences[:3])}) than the one {folder} holds "
            f"({trained}, started from {started}), whose plans.json serves every fold; refused before anything is "
            f"written: set {WEIGHTS_ENV} to an encoder of that network, or train this one into another results "
            "folder (another -tr trainer variant, another -p plans, or another nnUNet_results).")

    @classmethod
    def _settings_from(cls, plans: dict, resolved: Dict[str, Any], checkpoint: Optional[Any],
                       weights_path: Optional[str]) -> Dict[str, Any]:
        """The ``smit`` entry this trainer writes for an encoder checkpoint (None: the Scratch preset)."""
        if checkpoint is not None:
            encoder_config, preprocessing = checkpoint.config, checkpoint.preprocessing
            weights = {"path": weights_path, "sha256": checkpoint.sha256, "source": checkpoint.source}
        else:
            encoder_config, preprocessing = SMITConfig.preset(cls.scratch_preset), PretrainPreprocessing()
            weights = None
        fit = fit_patch_size(resolved["patch_size"], resolved["batch_size"], fixed_patch_size=cls.fixed_patch_size)
        return plans_settings.settings_for_plans(
            plans,
            resolved,
            encoder_config,
            preprocessing,
            fit,
            weights if cls.require_pretrained_weights else None,
            decoder_norm=cls.decoder_norm,
            decoder=cls.decoder,
            gradient_checkpointing=cls.gradient_checkpointing,
        )

    @classmethod
    def _write_smit_plans(cls, plans: dict, configuration: str,
                          fold: Optional[Union[int, str]] = None) -> Tuple[List[str], Optional[Any]]:
        """Write the ``smit`` entry, patch and batch size into ``plans['configurations'][configuration]``.

        A run whose network would differ from the one in the results folder's ``plans.json`` (another encoder
        architecture, decoder, intensity mapping or axis order; other weights of the same network are fine, one per
        fold) is refused here, before nnU-Net's ``__init__`` creates the fold folder. ``fold`` (None: not known)
        tells ``--c`` with a checkpoint to continue from (the network is the folder's) from ``--c`` that starts afresh.

        Returns notes for the training log and the loaded encoder checkpoint (None when not read here).
        """
        resolved = PlansManager(plans).get_configuration(configuration).configuration
        if len(resolved["patch_size"]) != 3:
            raise SMITError(
                f"SMIT trainers need a 3D configuration but {configuration!r} is "
                f"{len(resolved['patch_size'])}D; use 3d_fullres, 3d_lowres or 3d_cascade_fullres."
            )
        target = plans["configurations"][configuration]
        previous = cls._results_settings(plans, configuration)
        weights_path = cls._weights_path(resolved)
        notes: List[str] = []
        checkpoint = None

        continuing = plans.get("continue_training") and previous is not None and (
            fold is None or cls._has_checkpoint(plans, configuration, fold))
        source = (f"{WEIGHTS_ENV}={weights_path}" if os.environ.get(WEIGHTS_ENV) else
                  f"the plans' {WEIGHTS_PLANS_KEY} {weights_path}")
        if continuing:
            # --c: rebuild exactly the network that the nnU-Net checkpoint holds. Weights naming another network are
            # refused (the run would silently go on with the folder's); other weights of the same one, or a file
            # that is gone, are not needed: the nnU-Net checkpoint holds every weight
            unread = ""
            if weights_path is not None:
                try:
                    requested = cls._settings_from(plans, resolved, load_encoder_checkpoint(weights_path),
                                                   weights_path)
                except SMITError as error:
                    unread = f"; it cannot be read ({str(error).splitlines()[0]}), which continuing does not need"
                else:
                    cls._refuse_another_network(plans, configuration, previous, requested, source)
            settings = previous
            notes.append("SMIT: continuing; network settings taken from the results folder's plans.json"
                         + (f" ({WEIGHTS_ENV}={weights_path} is not loaded when continuing{unread})."
                            if weights_path else "."))
        elif weights_path is not None or previous is None:
            if weights_path is not None:
                checkpoint = load_encoder_checkpoint(weights_path)
            elif cls.require_pretrained_weights:
                raise SMITError(MISSING_WEIGHTS_MESSAGE)
            settings = cls._settings_from(plans, resolved, checkpoint, weights_path)
            if previous is not None:
                cls._refuse_another_network(plans, configuration, previous, settings, source)
            if weights_path is not None and not cls.require_pretrained_weights:
                notes.append(f"SMIT: random init; architecture and conventions taken from {weights_path}.")
        else:
            # --val (or a restart) without weights: the results folder says what was trained
            settings = previous
            notes.append("SMIT: no weights given; network settings taken from the results folder's plans.json.")

        fit = settings["patch_fit"]
        target[plans_settings.SMIT_PLANS_KEY] = settings
        target["patch_size"] = list(fit["patch_size"])
        target["batch_size"] = int(fit["batch_size"])
        notes.append(
            f"SMIT patch fitting: planned patch {fit['planned_patch_size']} x batch {fit['planned_batch_size']} -> "
            f"patch {fit['patch_size']} x batch {fit['batch_size']}"
            + (" (fixed by the trainer variant)" if cls.fixed_patch_size is not None else "")
        )
        mapped = [i for i, s in enumerate(settings["intensity_mapping"]) if s is not None]
        preprocessing = plans_settings.preprocessing_of(settings)
        notes.append(
            f"SMIT intensities: channels {mapped} (CTNormalization) mapped back to HU {list(preprocessing.hu_window)} "
            f"-> {list(preprocessing.scaled_range)}; other channels pass through as nnU-Net normalised them."
        )
        axes = settings.get("transpose_forward")
        notes.append(
            f"SMIT axes: nnU-Net's arrays are the scans' (z, y, x) axes in the order {axes}; the network puts them back "
            "into (z, y, x) for the encoder, as in pretraining, and returns logits in nnU-Net's order."
            if axes is not None else
            "SMIT axes: plans written before the axis handling; the encoder gets nnU-Net's axis order as trained.")
        notes += plans_settings.convention_warnings(resolved["spacing"], preprocessing, resolved["normalization_schemes"],
                                                    axes or (0, 1, 2))
        notes += plans_settings.clip_range_warnings(settings["intensity_mapping"], preprocessing, plans["dataset_name"],
                                                    plans["plans_name"], (settings.get("weights") or {}).get("path"))
        return notes, checkpoint

    # --- network -------------------------------------------------------------------------------------------
    @staticmethod
    def build_network_architecture(
        plans_manager: PlansManager,
        configuration_manager: ConfigurationManager,
        num_input_channels: int,
        num_output_channels: int,
        enable_deep_supervision: bool = True,
    ) -> nn.Module:
        """SMITNet from the configuration's ``smit`` entry; prediction calls this on the class."""
        return plans_settings.build_network(
            configuration_manager.configuration, num_input_channels, num_output_channels, enable_deep_supervision
        )

    def _get_deep_supervision_scales(self):
        """The SMIT decoder's output scales (nnU-Net derives them from CNN pooling strides)."""
        return SMITNet.deep_supervision_scales() if self.enable_deep_supervision else None

    def _do_i_compile(self) -> bool:
        """torch.compile only when nnUNet_compile asks for it (nnU-Net compiles by default on CUDA)."""
        return os.environ.get("nnUNet_compile", "").lower() in _TRUE and super()._do_i_compile()

    def initialize(self):
        super().initialize()
        encoder = unwrap_network(self.network).encoder
        # detects weights loaded by someone else before training starts (nnUNetv2_train -pretrained_weights)
        self._initial_encoder_fingerprint = next(encoder.parameters()).detach().clone()

    # --- pretrained encoder ---------------------------------------------------------------------------------
    def _load_pretrained_encoder(self) -> None:
        """Load every part the checkpoint carries, strictly: the encoder, and the SMITNet decoder blocks that
        ``smit_pretrain --reconstruct_through`` trained (the segmentation outputs stay random); one load report each
        in the training log. The Scratch twin loads nothing."""
        settings = self.configuration_manager.configuration[plans_settings.SMIT_PLANS_KEY]
        if not self.require_pretrained_weights:
            self.print_to_log_file("SMIT: encoder starts from random init (no pretrained weights).")
            return
        checkpoint, self._encoder_checkpoint = self._encoder_checkpoint, None
        if checkpoint is None:
            path = self._weights_path(self.configuration_manager.configuration)
            if path is None:
                raise SMITError(MISSING_WEIGHTS_MESSAGE)
            checkpoint = load_encoder_checkpoint(path)
        expected = plans_settings.encoder_config_of(settings)
        if checkpoint.config.replace(in_channels=1) != expected.replace(in_channels=1):
            raise CheckpointError(
                f"The encoder checkpoint {checkpoint.path} has a different architecture than this training's plans "
                "(from an earlier run in the same results folder); point nnUNet_SMIT_weights at the checkpoint "
                "used before, or start in a fresh results folder."
            )
        parts, decoder = checkpoint.decoder_parts, settings.get("decoder", plans_settings.DEFAULT_DECODER)
        if parts is not None and parts.kind != decoder:
            raise CheckpointError(
                f"The encoder checkpoint {checkpoint.path} carries pretrained blocks of the {parts.kind!r} decoder, "
                f"and {type(self).__name__} builds the {decoder!r} decoder: fine-tune it with "
                f"{'nnUNetTrainerSMITLight' if parts.kind == 'light' else 'nnUNetTrainerSMIT'} (or a variant of it).")
        network = unwrap_network(self.network)
        report = load_encoder_weights(network.encoder, checkpoint.state_dict, strict=True)
        self.print_to_log_file(
            f"SMIT: loaded pretrained encoder from {checkpoint.path} (sha256 {checkpoint.sha256}, "
            f"source {checkpoint.source})\n{report.summary()}"
        )
        if parts is not None:
            report = load_decoder_parts(network.decoder, parts, decoder, settings.get("decoder_norm", "instance"))
            self.print_to_log_file(
                f"SMIT: loaded pretrained decoder blocks ({', '.join(parts.parts)}) from the same checkpoint "
                f"(sha256 {parts.sha256})\n{report.summary()}"
            )
        for note in checkpoint.notes:
            self.print_to_log_file(f"SMIT: {note}")
        if self.decoder_first_epochs > 0:
            self._hold_pretrained_parts(("encoder",) + (tuple(parts.parts) if parts is not None else ()))
        if self.local_rank == 0:  # nnU-Net's local_rank is the global rank: the one process that writes the log
            self.check_pretraining_leakage(checkpoint)

    def _hold_pretrained_parts(self, pretrained: Sequence[str]) -> None:
        """Decoder-first warm-up: the optimizer groups of the pretrained parts get ``hold_epochs`` (see
        :func:`~nnunet_smit.trainers.schedule.hold_factor`); kept in the optimizer's state, so ``--c`` goes on with
        it. The parts at their initialisation (always the segmentation outputs) train from the first epoch."""
        names = {"encoder": "encoder", "skips": "skip blocks", "decoder": "upsampling blocks",
                 "outputs": "segmentation outputs"}
        parts = [names[part] for part in names if any(group["part"] == part for group in self.optimizer.param_groups)]
        held = [names[part] for part in names if part in pretrained and names[part] in parts]
        free = [name for name in parts if name not in held]
        for group in self.optimizer.param_groups:
            if group["part"] in pretrained:
                group["hold_epochs"] = self.decoder_first_epochs
        epochs = self.decoder_first_epochs

        def span(first: int, last: int) -> str:
            return f"epoch {first}" if first == last else f"epochs {first}-{last}"

        self.print_to_log_file(
            f"SMIT: decoder-first warm-up: the pretrained parts ({', '.join(held)}) are held at rate 0 for "
            f"{span(0, epochs - 1)} while the parts at their initialisation ({', '.join(free)}) train, then ramp up to "
            f"the schedule's rate over {span(epochs, 2 * epochs - 1)}.")

    def check_pretraining_leakage(
        self, checkpoint: EncoderCheckpoint, val_keys: Optional[Sequence[str]] = None
    ) -> None:
        """Write to the training log whether any validation case was among the encoder's pretraining scans.

        The raw images of each validation case (every channel, ``nnUNet_raw/<dataset>/imagesTr``) are fingerprinted
        and looked up in ``checkpoint.pretraining_scans``. The log gets one line: none seen, a WARNING naming the cases
        seen (their validation scores are optimistic), or why the check was skipped. Never raises: a failing check
        must not stop a training run.

        Args:
            checkpoint: the encoder checkpoint being fine-tuned.
            val_keys: the validation case ids (default: this fold's, from :meth:`do_split`).
        """
        try:
            message = self._leakage_report(checkpoint, val_keys)
        except Exception as error:  # noqa: BLE001 - a check that cannot run is reported, training goes on
            message = f"{LEAKAGE_CHECK} skipped: it failed ({type(error).__name__}: {error})."
        self.print_to_log_file(message)

    def _leakage_report(self, checkpoint: EncoderCheckpoint, val_keys: Optional[Sequence[str]]) -> str:
        """The log line of :meth:`check_pretraining_leakage` (may raise)."""
        scans = checkpoint.pretraining_scans
        if not scans:
            return (f"{LEAKAGE_CHECK} skipped: the encoder checkpoint {checkpoint.path} records no fingerprints of its "
                    f"pretraining scans (source {checkpoint.source}: foreign weights, or exported before fingerprints "
                    "were recorded), so whether validation cases were seen in pretraining is unknown.")
        if not nnUNet_raw.is_set():
            return f"{LEAKAGE_CHECK} skipped: nnUNet_raw is not set, so the validation cases' raw images are unknown."
        if val_keys is None:
            _, val_keys = self.do_split()
        dataset_folder = join(nnUNet_raw.get(), self.plans_manager.dataset_name)
        result = check_raw_cases(dataset_folder, self.dataset_json, list(val_keys), scans)
        if not result.checked:
            return (f"{LEAKAGE_CHECK} skipped: the raw images of the {len(result.missing)} validation cases were not "
                    f"found under {join(dataset_folder, 'imagesTr')}.")
        note = (f" ({len(result.missing)} validation cases without raw images under {dataset_folder} were not "
                f"checked, first {sorted(result.missing)[0]})" if result.missing else "")
        leaked, found = result.leaked, result.checked
        if not leaked:
            return (f"{LEAKAGE_CHECK}: {len(found)} validation cases checked against {len(scans)} pretraining scans; "
                    f"none was seen in pretraining{note}.")
        named = "; ".join(f"{case} = pretraining scan {', '.join(matches)}"
                          for case, matches in list(leaked.items())[:_LEAKED_CASES_NAMED])
        more = f"; and {len(leaked) - _LEAKED_CASES_NAMED} more" if len(leaked) > _LEAKED_CASES_NAMED else ""
        return (f"WARNING: {LEAKAGE_CHECK}: {len(leaked)} of the {len(found)} validation cases were seen in "
                f"pretraining ({named}{more}){note}: this fold's validation scores overstate performance on unseen "
                "scans; pretrain without the held-out cases for an unbiased estimate.")

    def on_train_start(self):
        if not self.was_initialized:
            self.initialize()
        if self.current_epoch == 0:
            encoder = unwrap_network(self.network).encoder
            if torch.equal(next(encoder.parameters()).detach(), self._initial_encoder_fingerprint):
                self._load_pretrained_encoder()
            else:
                self.print_to_log_file("SMIT: network weights were loaded before training (-pretrained_weights); "
                                       "the SMIT encoder checkpoint is not applied on top.")
        else:
            self.print_to_log_file(f"SMIT: continuing at epoch {self.current_epoch}; encoder not reloaded.")
        self._encoder_checkpoint = None
        self._initial_encoder_fingerprint = None
        super().on_train_start()

    # --- optimisation ---------------------------------------------------------------------------------------
    def configure_optimizers(self):
        network = unwrap_network(self.network)
        if self.freeze_encoder:
            network.encoder.requires_grad_(False)
        groups = build_param_groups(
            network,
            weight_decay=self.weight_decay,
            layer_decay=0.0 if self.freeze_encoder else self.layer_decay,
            depths=network.encoder.config.depths,
            split_decoder=self.decoder_first_epochs > 0,
        )
        optimizer = torch.optim.AdamW(groups, lr=self.initial_lr, weight_decay=self.weight_decay)
        scheduler = EpochLRScheduler(optimizer, self.initial_lr, self.num_epochs, self.warmup_epochs, self.lr_decay)
        return optimizer, scheduler

    def on_train_epoch_start(self):
        super().on_train_epoch_start()
        if self.freeze_encoder:
            unwrap_network(self.network).encoder.eval()  # a fixed feature extractor: no drop path

    def _autocast(self):
        if self.device.type != "cuda":
            return contextlib.nullcontext()
        return torch.autocast("cuda", dtype=self.autocast_dtype)

    @contextlib.contextmanager
    def _cuda_autocast_dtype(self):
        """nnU-Net's own autocast blocks (validation, prediction) use our dtype inside this context."""
        if self.device.type != "cuda":
            yield
            return
        previous = torch.get_autocast_dtype("cuda")
        torch.set_autocast_dtype("cuda", self.autocast_dtype)
        try:
            yield
        finally:
            torch.set_autocast_dtype("cuda", previous)

    def train_step(self, batch: dict) -> dict:
        """nnU-Net's step with bf16 autocast (where supported) and transformer-sized gradient clipping."""
        data = batch["data"].to(self.device, non_blocking=True)
        target = batch["target"]
        if isinstance(target, list):
            target = [t.to(self.device, non_blocking=True) for t in target]
        else:
            target = target.to(self.device, non_blocking=True)

        self.optimizer.zero_grad(set_to_none=True)
        with self._autocast():
            loss = self.loss(self.network(data), target)
        # parameters held at rate 0 (decoder-first warm-up) get no gradient: AdamW leaves them and their moments
        # alone (no weight decay either), and they do not count in the clipping norm
        held = [p for group in self.optimizer.param_groups if group["lr"] == 0 for p in group["params"]]
        held_ids = {id(p) for p in held}
        parameters = [p for p in self.network.parameters() if p.requires_grad and id(p) not in held_ids]
        if self.grad_scaler is not None:
            self.grad_scaler.scale(loss).backward()
            for p in held:
                p.grad = None
            self.grad_scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(parameters, self.grad_clip_norm)
            self.grad_scaler.step(self.optimizer)
            self.grad_scaler.update()
        else:
            loss.backward()
            for p in held:
                p.grad = None
            torch.nn.utils.clip_grad_norm_(parameters, self.grad_clip_norm)
            self.optimizer.step()
        return {"loss": loss.detach().cpu().numpy()}

    def validation_step(self, batch: dict) -> dict:
        with self._cuda_autocast_dtype():
            return super().validation_step(batch)

    def perform_actual_validation(self, save_probabilities: bool = False):
        with self._cuda_autocast_dtype():
            return super().perform_actual_validation(save_probabilities)

    # --- checkpoints ----------------------------------------------------------------------------------------
    def save_checkpoint(self, filename: str) -> None:
        """nnU-Net's checkpoint, written atomically: a run killed while writing keeps the previous file whole (2.8.1
        writes in place, and a half-written ``checkpoint_latest.pth`` stops ``--c``)."""
        if self.local_rank != 0 or self.disable_checkpointing:
            super().save_checkpoint(filename)  # writes nothing here (and says so when checkpointing is disabled)
            return
        atomic_write(filename, lambda tmp: super(nnUNetTrainerSMIT, self).save_checkpoint(tmp))

    def load_checkpoint(self, filename_or_checkpoint: Union[dict, str]) -> None:
        """Restore what nnU-Net's ``save_checkpoint`` wrote (``--c``, ``--val``), reading the file weights-only.

        Overrides 2.8.1's method, which reads with ``weights_only=False`` and fails when handed a dict. The
        network is loaded strictly into the unwrapped module.
        """
        if not self.was_initialized:
            self.initialize()
        checkpoint = filename_or_checkpoint
        if isinstance(checkpoint, str):
            checkpoint = load_nnunet_checkpoint(checkpoint, self.device)
        self._check_same_network(checkpoint, filename_or_checkpoint)
        network = unwrap_network(self.network)
        own_keys = network.state_dict().keys()
        weights = {
            (key[len("module."):] if key not in own_keys and key.startswith("module.") else key): value
            for key, value in checkpoint["network_weights"].items()
        }
        network.load_state_dict(weights)
        self.my_init_kwargs = checkpoint["init_args"]
        self.current_epoch = checkpoint["current_epoch"]
        self.logger.load_checkpoint(checkpoint["logging"])
        self._best_ema = checkpoint["_best_ema"]
        self.inference_allowed_mirroring_axes = checkpoint.get(
            "inference_allowed_mirroring_axes", self.inference_allowed_mirroring_axes
        )
        self.optimizer.load_state_dict(checkpoint["optimizer_state"])
        if self.grad_scaler is not None and checkpoint.get("grad_scaler_state") is not None:
            self.grad_scaler.load_state_dict(checkpoint["grad_scaler_state"])


    def _check_same_network(self, checkpoint: Dict[str, Any], source: Union[dict, str]) -> None:
        """One line when an nnU-Net checkpoint holds another SMIT network than this run builds (compared by
        :func:`~nnunet_smit.trainers.plans_settings.network_differences`): ``--val`` with ``nnUNet_SMIT_weights``
        naming an encoder of another architecture where the results folder has no plans.json, or a results folder
        whose plans.json another network's training rewrote (before such runs were refused)."""
        plans = (checkpoint.get("init_args") or {}).get("plans") or {}
        saved = (plans.get("configurations") or {}).get(self.configuration_name, {}).get(plans_settings.SMIT_PLANS_KEY)
        current = self.configuration_manager.configuration[plans_settings.SMIT_PLANS_KEY]
        if not saved:
            return
        differences = plans_settings.network_differences(saved, current)
        if differences:
            name = source if isinstance(source, str) else "the checkpoint"
            started = (saved.get("weights") or {}).get("path") or "random init"
            raise SMITError(
                f"{name} holds another SMIT network than this run builds ({'; '.join(differences[:3])}): "
                f"{WEIGHTS_ENV} names another encoder than the run started from ({started}); point it there, or "
                "unset it, to continue this run (if it is unset, the results folder's plans.json describes another "
                "network than this fold's, and the fold must be trained again in a results folder of its own).")


class nnUNetTrainerSMITScratch(nnUNetTrainerSMIT):
    """The same network and recipe from random init: the matched baseline. Uses the checkpoint's architecture when
    ``nnUNet_SMIT_weights`` is set (weights are not loaded), the ``smit_small`` preset otherwise.

    Layer-wise learning-rate decay exists to protect pretrained weights; a random encoder gets none (one learning rate
    for the whole network, with the same warm-up and decay), as anyone training it from scratch would."""

    require_pretrained_weights = False
    layer_decay = 1.0


class nnUNetTrainerSMITFrozenEncoder(nnUNetTrainerSMIT):
    """Linear-probe style: the pretrained encoder is frozen (no gradients, eval mode); only the decoder trains."""

    freeze_encoder = True
