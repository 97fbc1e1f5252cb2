"""The pretraining loop: :class:`PretrainTrainer` trains the SMIT student and teacher on a volume source.

Like an nnU-Net trainer, it is built from named steps that a variant can override one at a time:
:meth:`~PretrainTrainer.build_model`, :meth:`~PretrainTrainer.build_optimizer`,
:meth:`~PretrainTrainer.build_loader`, :meth:`~PretrainTrainer.train_step`, :meth:`~PretrainTrainer.save_checkpoint`,
:meth:`~PretrainTrainer.load_checkpoint` and :meth:`~PretrainTrainer.export`. The state file's layout is in
:mod:`~nnunet_smit.pretraining.state`, the records and figures in :mod:`~nnunet_smit.pretraining.run_log`, the
processes in :mod:`~nnunet_smit.pretraining.distributed`.
"""
from __future__ import annotations

import contextlib
import logging
import os
import random
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader

from nnunet_smit.architectures.weight_decay import split_by_weight_decay
from nnunet_smit.conventions import PretrainPreprocessing
from nnunet_smit.errors import SMITError, TrainingDiverged, TrainingInterrupted
from nnunet_smit.files import atomic_write
from nnunet_smit.pretraining.cache import manifest_fingerprints
from nnunet_smit.pretraining.config import PretrainConfig, schedule_warnings
from nnunet_smit.pretraining.distributed import DistInfo, StepAgreement, StopSignals, gather_objects, select_device
from nnunet_smit.pretraining.export import Progress, export_encoder, exported_side
from nnunet_smit.pretraining.loader import loader_failure, make_loader
from nnunet_smit.pretraining.model import HeadConfig, SMITPretrainModel
from nnunet_smit.pretraining.probing import EncoderProbe, ProbeSchedule, run_probe
from nnunet_smit.pretraining.run_log import RunLog, StepWindow
from nnunet_smit.pretraining.sampler import TwoViewDataset, ViewSampling, VolumeSource
from nnunet_smit.pretraining.schedules import PretrainSchedules
from nnunet_smit.pretraining.state import (
    CHECKPOINT_NAME, STATE_FORMAT, STATE_VERSION, capture_rng_state, check_same_settings, json_plain,
    optimizer_state_for, read_state, restore_rng_state, scans_of_state, start_from_init_encoder,
)
from nnunet_smit.pretraining.step import StepRunner

logger = logging.getLogger(__name__)


class PretrainTrainer:
    """Trains the SMIT student/teacher on a volume source and exports the encoder.

    Args:
        config: the run's settings.
        source: scans (``CacheIndex`` or anything with ``case_ids``, ``load`` and ``preprocessing``).
        output_dir: where checkpoints, logs, plots and the export go.
        dist_info: this process in the job (from :func:`~nnunet_smit.pretraining.distributed.init_distributed`);
            single CPU/GPU process if None.
        data_summary: JSON-able description of the data, stored with the run and the export (default: the
            source's ``summary()``).
        manifest: JSON-able list of the cached cases, stored in ``checkpoint_latest`` (default: the source's
            ``manifest``).

    Attributes:
        scan_fingerprints: {fingerprint: scan name} of every scan these weights have seen, which the export records
            (``pretraining_scans``): the manifest's cases, those of the manifests the run had before a resume (scans
            removed since were still trained on), and those recorded by the ``init_encoder`` a new run starts from.
        runner: how the step's device part runs (eager, compiled, data parallel).
        probe: the online probe (:mod:`~nnunet_smit.pretraining.probing`), called on rank 0 with the exported
            side's encoder at the epoch ends its schedule picks and at the last step; None: no probe.
        probe_every_epochs: probe every that many epochs (None: within 5% of the run's time).
    """

    def __init__(
        self,
        config: PretrainConfig,
        source: VolumeSource,
        output_dir: Path,
        dist_info: Optional[DistInfo] = None,
        data_summary: Optional[Dict[str, Any]] = None,
        manifest: Optional[Dict[str, Any]] = None,
        probe: Optional[EncoderProbe] = None,
        probe_every_epochs: Optional[int] = None,
    ) -> None:
        self.config = config
        self.probe = probe
        self.probe_schedule = ProbeSchedule(probe_every_epochs)
        self.source = source
        self.output_dir = Path(output_dir)
        self.dist = dist_info or DistInfo(device=select_device(config.device))
        self.device = self.dist.device
        if data_summary is None and hasattr(source, "summary"):
            data_summary = source.summary()
        if manifest is None:
            manifest = getattr(source, "manifest", None)
        self.data_summary = json_plain(data_summary or {})
        self.manifest = json_plain(manifest or {})
        self.scan_fingerprints: Dict[str, str] = manifest_fingerprints(self.manifest)
        self.preprocessing: PretrainPreprocessing = source.preprocessing
        self.encoder_config = config.encoder_config()
        self.checkpoint_path = self.output_dir / CHECKPOINT_NAME
        self.run_log = RunLog(self.output_dir, writes=self.dist.is_main, tensorboard=config.tensorboard)
        self.agree = StepAgreement(self.dist)
        self.stop_signals = StopSignals()
        self._last_checkpoint_time = time.monotonic()
        self._last_saved_step: Optional[int] = None  # the step checkpoint_latest.pt holds
        self._finite_at_step: Optional[int] = None  # the last step whose weights check_diverged found finite
        self._resume_notes: Dict[str, Any] = {}  # what the log's resume record says of the state resumed from
        self.step = 0

        self._seed_and_warn()
        if not len(source.case_ids):
            raise SMITError("no usable scans to pretrain on; check the input folders and the cache's skipped report.")
        self._set_epoch_length(config.samples_per_epoch or len(source.case_ids))
        self.model = self.build_model()
        self.optimizer = self.build_optimizer()
        self.amp_dtype = self._amp_dtype()
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp_dtype == torch.float16)
        self.runner = self.build_runner()
        self.dataset = self.build_dataset()

    # ------------------------------------------------------------------------------------------------ set-up steps
    def _seed_and_warn(self) -> None:
        """Same initial weights on every process (DDP also broadcasts rank 0's); per-rank drop-path streams come
        later from the loader's seeds. Warns of settings that will not do what they seem to."""
        config = self.config
        if config.deterministic and self.device.type == "cuda":
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
            torch.backends.cudnn.benchmark = False
        torch.manual_seed(config.seed)
        np.random.seed(config.seed)
        random.seed(config.seed)
        if not self.dist.is_main:
            return
        if config.weight_koleo > 0 and config.batch_size < 2:
            logger.warning("KoLeo compares the scans of one process's batch: with batch size 1 it does nothing; "
                           "use --batch_size 2 or more (or --weight_koleo 0 to silence this).")
        for message in schedule_warnings(config):
            logger.warning("%s", message)

    def build_model(self) -> SMITPretrainModel:
        """Student, teacher, heads and losses, on this process's device, in training mode."""
        config = self.config
        model = SMITPretrainModel(
            self.encoder_config,
            weights=config.objective_weights(),
            heads=HeadConfig(config.head_hidden_dim, config.head_bottleneck_dim, config.head_out_dim, config.head_layers),
            mask_cube_size=config.mask_cube_size,
            student_temp=config.student_temp,
            center_momentum=config.center_momentum,
            centering=config.centering,
            separate_patch_head=config.separate_patch_head,
            gradient_checkpointing=config.gradient_checkpointing,
            reconstruct_through=config.reconstruct_through,
            decoder=config.decoder,
        ).to(self.device)
        return model.train()

    def parameter_groups(self) -> List[Dict[str, Any]]:
        """AdamW groups of the student: decayed (matrices and kernels), then not decayed, by the project's one rule
        (:mod:`nnunet_smit.architectures.weight_decay`)."""
        decay, no_decay = split_by_weight_decay(self.model.student)
        return [
            {"params": decay, "weight_decay": self.config.weight_decay, "apply_wd": True},
            {"params": no_decay, "weight_decay": 0.0, "apply_wd": False},
        ]

    def build_optimizer(self) -> torch.optim.Optimizer:
        # On a GPU the fused kernel updates every parameter in a few launches (the step is launch-bound there).
        return torch.optim.AdamW(self.parameter_groups(), lr=self.schedules.lr(0), betas=(0.9, 0.999),
                                 fused=self.device.type == "cuda" or None)

    def build_runner(self) -> StepRunner:
        """The student wrapped for data parallelism when the job has several processes, compiled if asked for."""
        student = None
        if self.dist.distributed:
            student = DistributedDataParallel(
                self.model.student,
                device_ids=[self.device.index] if self.device.type == "cuda" else None,
                # norm0..3 never get gradients in pretraining (and stage 3 none without reconstruction).
                find_unused_parameters=True,
            )
        runner = StepRunner(self.model, student)
        if self.config.compile:
            runner.compile(mode=self.config.compile_mode)
        return runner

    def build_dataset(self) -> TwoViewDataset:
        config = self.config
        sampling = ViewSampling(
            view_size=(config.view_size,) * 3,
            region_size=(config.region_size,) * 3,
            body_bias=config.body_bias,
            flips=config.flips,
            intensity_jitter=config.intensity_jitter,
            mask_cube_size=config.mask_cube_size,
            mask_ratio=config.mask_ratio,
        )
        return TwoViewDataset(self.source, sampling, seed=config.seed)

    def build_loader(self) -> DataLoader:
        """This process's loader, from the current step on."""
        return make_loader(self.dataset, len(self.source.case_ids), self.samples_per_epoch, self.config.batch_size,
                           self.dist, self.config.seed, self.step, self.config.num_workers)

    def _amp_dtype(self) -> Optional[torch.dtype]:
        precision = self.config.precision
        if self.device.type != "cuda":
            if precision in ("bf16", "fp16"):
                logger.warning("%s autocast is for GPUs; training in fp32 on %s.", precision, self.device.type)
            return None
        if precision == "auto":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else None
        return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}[precision]

    def _autocast(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.amp_dtype)

    def _set_epoch_length(self, samples: int) -> None:
        """Epoch length (``samples`` rounded down to whole global batches) and every schedule derived from it."""
        config = self.config
        global_batch = config.batch_size * self.dist.world_size
        self.samples_per_epoch = max(global_batch, (int(samples) // global_batch) * global_batch)
        self.steps_per_epoch = self.samples_per_epoch // global_batch
        self.total_steps = config.epochs * self.steps_per_epoch
        self.stop_step = min(self.total_steps, config.max_steps) if config.max_steps else self.total_steps
        self.schedules = PretrainSchedules(
            total_steps=self.total_steps,
            steps_per_epoch=self.steps_per_epoch,
            peak_lr=config.base_lr * global_batch,
            min_lr=config.min_lr,
            warmup_epochs=config.warmup_epochs,
            weight_decay=config.weight_decay,
            weight_decay_end=config.weight_decay if config.weight_decay_end is None else config.weight_decay_end,
            momentum_start=config.momentum_teacher,
            teacher_temp_start=config.teacher_temp_start,
            teacher_temp_end=config.teacher_temp_end,
            teacher_temp_warmup_epochs=config.teacher_temp_warmup_epochs,
        )

    # ------------------------------------------------------------------------------------------------ state
    def state_dict(self) -> Dict[str, Any]:
        """Everything to resume (plain containers and tensors only; every process must call this under DDP)."""
        return {
            "format": STATE_FORMAT,
            "format_version": STATE_VERSION,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict(),
            "step": self.step,
            "epoch": self.step // self.steps_per_epoch,
            "samples_per_epoch": self.samples_per_epoch,
            "finished": self.step >= self.total_steps,
            "rng_per_rank": gather_objects(self.dist, capture_rng_state(self.device)),
            "world_size": self.dist.world_size,
            "config": self.config.to_dict(),
            "encoder_config": self.encoder_config.to_dict(),
            "preprocessing": self.preprocessing.to_dict(),
            "data": self.data_summary,
            "manifest": self.manifest,
            "pretraining_scans": self.scan_fingerprints,
        }

    def _kept_state(self) -> str:
        """What a failure keeps, for its message."""
        if self._last_saved_step is None:
            return "no state was saved yet"
        return f"{self.checkpoint_path} holds step {self._last_saved_step}"

    def weights_finite(self) -> bool:
        """Whether every weight of student, teacher and heads is a finite number (one read-back from the device).

        A NaN or infinite loss makes the next optimizer step write NaN into the weights (with fp16, the gradient
        scaler skips such steps instead, and the weights stay finite).
        """
        norms = torch._foreach_norm([p.detach() for p in self.model.parameters()])
        return bool(torch.isfinite(torch.stack(norms)).all())

    def check_diverged(self, last_losses: Optional[Dict[str, Any]] = None) -> None:
        """Raise :class:`TrainingDiverged` when the weights are no longer finite, saying what is kept (read once per
        step: a step that logs and saves checks once)."""
        if self._finite_at_step == self.step:
            return
        if self.weights_finite():
            self._finite_at_step = self.step
            return
        saved = (f"{self.checkpoint_path} still holds step {self._last_saved_step}, the last state saved before"
                 if self._last_saved_step is not None else "no checkpoint was saved before it")
        losses = ""
        if last_losses:
            losses = " (last logged losses: " + ", ".join(
                f"{k} {last_losses[k]:.4g}" for k in ("loss", "dino", "ibot", "reconstruction", "koleo")
                if isinstance(last_losses.get(k), float)) + ")"
        self.run_log.write({"event": "diverged", "step": self.step, "last_saved_step": self._last_saved_step})
        raise TrainingDiverged(
            f"pretraining diverged: the weights are not finite numbers any more at step {self.step}{losses}; {saved}. "
            "Rerun the same command to retry from there, or use a new output folder with a lower --base_lr."
        )

    def save_checkpoint(self) -> None:
        """Write ``checkpoint_latest.pt`` (rank 0; all ranks must call this under DDP for the RNG gather).

        Never over a good state with a diverged one: :class:`TrainingDiverged` is raised instead.
        """
        self.check_diverged()
        state = self.state_dict()
        if self.dist.is_main:
            try:
                atomic_write(self.checkpoint_path, lambda tmp: torch.save(state, tmp))
            except OSError as error:  # a full disk, a lost mount: the previous file is untouched
                kept = (f"the one of step {self._last_saved_step} is kept" if self._last_saved_step is not None
                        else "none was written before")
                raise SMITError(
                    f"could not write {self.checkpoint_path} at step {self.step} ({error.strerror or error}); {kept}. "
                    "Free space and rerun the same command to resume."
                ) from None
            logger.info("saved %s at step %d", self.checkpoint_path, self.step)
        self._last_checkpoint_time = time.monotonic()
        self._last_saved_step = self.step

    def load_checkpoint(self) -> bool:
        """Resume from ``checkpoint_latest.pt`` if present; raises SMITError if it belongs to another run."""
        if not self.checkpoint_path.exists():
            return False
        state = read_state(self.checkpoint_path)
        check_same_settings(state, self.config, self.output_dir)
        if int(state["world_size"]) != self.dist.world_size:
            logger.warning("resuming with %d processes instead of %d: the global batch and schedules change.",
                           self.dist.world_size, state["world_size"])
        self._adopt_epoch_of_checkpoint(state)
        self.scan_fingerprints = {**scans_of_state(state), **self.scan_fingerprints}
        model_state, teacher_copied = self.model.with_teacher_state(state["model"])
        self.model.load_state_dict(model_state)
        if teacher_copied:
            self._resume_notes["teacher_copied_from_student"] = True
            if self.dist.is_main:
                logger.warning("%s holds no teacher (a reconstruction-only run from before every run kept one): the "
                               "teacher starts as a copy of the student and follows it by EMA from here.",
                               self.checkpoint_path)
        optimizer_state, regrouped = optimizer_state_for(state["optimizer"], self.model.student, self.checkpoint_path)
        if regrouped and self.dist.is_main:
            logger.info("the saved state decayed the relative position tables; from now on they are not decayed, as "
                        "in fine-tuning.")
        self.optimizer.load_state_dict(optimizer_state)
        self.scaler.load_state_dict(state["scaler"])
        self.step = int(state["step"])
        self._last_saved_step = self.step
        rngs = state["rng_per_rank"]
        restore_rng_state(rngs[self.dist.rank] if self.dist.rank < len(rngs) else rngs[0], self.device)
        logger.info("resumed from %s at step %d (epoch %d)", self.checkpoint_path, self.step, state["epoch"])
        return True

    def _adopt_epoch_of_checkpoint(self, state: Dict[str, Any]) -> None:
        """When the cache's scans changed since the run started (scans added to or removed from the folders), keep
        the run's epoch length, so its schedules go on where they were; the current scans are sampled."""
        then = {case.get("id") for case in (state.get("manifest") or {}).get("cases", [])}
        now = {case.get("id") for case in self.manifest.get("cases", [])}
        if not then or not now or then == now:
            return
        message = (f"the cache holds {len(now)} scans, the run started with {len(then)} ({len(now - then)} added, "
                   f"{len(then - now)} gone); all {len(now)} are sampled from now on")
        saved = state.get("samples_per_epoch")
        derived = self.config.samples_per_epoch is None
        if derived and saved and int(state["world_size"]) == self.dist.world_size and saved != self.samples_per_epoch:
            self._set_epoch_length(int(saved))
            message += f", and an epoch stays {saved} samples so that the schedules go on unchanged"
        if self.dist.is_main:
            logger.warning("%s.", message)

    def _start_from_init_encoder(self) -> Dict[str, Any]:
        """Both encoders from ``init_encoder``; the scans those weights have seen count as seen by this run's too (so
        held-out cases are checked against them). Returns what the log's start record keeps."""
        seen, record = start_from_init_encoder(self.model, self.config, self.preprocessing, self.dist.is_main)
        self.scan_fingerprints = {**seen, **self.scan_fingerprints}
        return record

    # ------------------------------------------------------------------------------------------------ stopping
    def request_stop(self, reason: str = "request") -> None:
        """Ask the loop to save and stop after the current step (what SIGINT/SIGTERM do)."""
        self.stop_signals.request(reason)

    # ------------------------------------------------------------------------------------------------ the step
    def _apply_schedules(self) -> Dict[str, float]:
        lr = self.schedules.lr(self.step)
        wd = self.schedules.weight_decay_at(self.step)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
            if group.get("apply_wd"):
                group["weight_decay"] = wd
        return {
            "lr": lr,
            "weight_decay": wd,
            "momentum": self.schedules.momentum(self.step),
            "teacher_temp": self.schedules.teacher_temp(self.step),
        }

    def _forward_backward(self, views: torch.Tensor, masks: torch.Tensor, teacher_temp: float, with_preview: bool):
        self.optimizer.zero_grad(set_to_none=True)
        with self._autocast():
            out = self.runner(views, masks, teacher_temp, with_preview=with_preview)
        self.scaler.scale(out.total).backward()
        return out

    def _forward_backward_or_eager(self, views: torch.Tensor, masks: torch.Tensor, teacher_temp: float,
                                   with_preview: bool):
        """The forward and backward pass; when compiling fails (no working C++ compiler or Triton, an unsupported
        operator, ...), a warning and the same pass eagerly, for this step and the rest of the run.

        Compiling happens before the forward or the backward graph first runs, so at most this step's center update
        has run (once more on the same batch when the step is repeated).
        """
        try:
            return self._forward_backward(views, masks, teacher_temp, with_preview)
        except Exception as error:
            if not (self.runner.compiled and _is_compile_failure(error)):
                raise
            cause = getattr(error, "inner_exception", None) or error
            reason = (str(cause).strip().splitlines() or [type(cause).__name__])[0][:200]
            logger.warning("torch.compile failed (%s: %s); training continues without compiling.",
                           type(cause).__name__, reason)
            self.runner.disable_compile()
            return self._forward_backward(views, masks, teacher_temp, with_preview)

    def train_step(self, batch: Dict[str, torch.Tensor], with_preview: bool = False) -> Tuple[Dict[str, Any], Any]:
        """One optimisation step on a collated batch; returns (scalars as tensors, loss output)."""
        values = self._apply_schedules()
        views = batch["views"].to(self.device, non_blocking=True)
        masks = batch["masks"]  # the step reads them on the host and sends them to the device itself
        out = self._forward_backward_or_eager(views, masks, values["teacher_temp"], with_preview)
        if self.step // self.steps_per_epoch < self.config.freeze_last_layer_epochs:
            self.model.cancel_last_layer_gradients()
        grad_norm = None
        if self.config.clip_grad and self.config.clip_grad > 0:
            self.scaler.unscale_(self.optimizer)
            params = [p for g in self.optimizer.param_groups for p in g["params"] if p.grad is not None]
            grad_norm = torch.nn.utils.clip_grad_norm_(params, self.config.clip_grad)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.model.update_teacher(values["momentum"])
        self.step += 1
        measured = {**out.terms, **out.monitors}
        scalars: Dict[str, Any] = {"loss": out.total.detach(), **{k: v.detach() for k, v in measured.items()}}
        if grad_norm is not None:
            scalars["grad_norm"] = grad_norm.detach()
        return {**values, **scalars}, out

    # ------------------------------------------------------------------------------------------------ the run
    def fit(self) -> Path:
        """Train (resuming if a checkpoint exists) until ``max_steps`` or the last epoch, then export.

        Returns:
            path of the exported encoder checkpoint.
        Raises:
            TrainingInterrupted: after SIGINT/SIGTERM (or :meth:`request_stop`), once the state is saved.
        """
        if self.dist.is_main:
            self.output_dir.mkdir(parents=True, exist_ok=True)
        resumed = self.load_checkpoint()
        start = self._start_from_init_encoder() if not resumed and self.config.init_encoder else {}
        self.run_log.write_json("pretrain_config.json", self._config_record())
        self.run_log.write({"event": "resume" if resumed else "start", "step": self.step,
                            "total_steps": self.total_steps, "stop_step": self.stop_step,
                            "world_size": self.dist.world_size, "prototypes": self._prototypes(), **start,
                            **self._resume_notes, **self._probe_notes()})
        try:
            if self.step >= self.stop_step:
                logger.info("step %d reached already; exporting.", self.step)
                return self.export()
            self._train_with_handlers()
            return self.export()
        finally:
            self.run_log.close()

    def _train_with_handlers(self) -> None:
        """The loop, with SIGINT/SIGTERM turned into a saved stop and deterministic algorithms if asked for."""
        deterministic_before = torch.are_deterministic_algorithms_enabled()
        try:
            with self.stop_signals:
                if self.config.deterministic:
                    torch.use_deterministic_algorithms(True)
                try:
                    self._train_loop()
                except (RuntimeError, SMITError) as error:
                    failure = loader_failure(error, self.step, self._kept_state())
                    if failure is not None:
                        raise failure from None
                    raise
        finally:
            torch.use_deterministic_algorithms(deterministic_before)

    def _probe_notes(self) -> Dict[str, Any]:
        """What the start record says of the online probe, with the leakage guard's lines (also logged): a probe
        case that is one of the run's pretraining scans is named."""
        if self.probe is None or not self.dist.is_main:
            return {}
        describe = getattr(self.probe, "describe", None)
        notes: Dict[str, Any] = {"probe": describe() if describe else {}}
        notes["probe"]["every_epochs"] = self.probe_schedule.every_epochs
        leakage = getattr(self.probe, "leakage", None)
        lines = leakage(self.scan_fingerprints) if leakage else []
        for line in lines:
            logger.warning("%s", line)
        notes["probe_leakage"] = lines
        return notes

    def _maybe_probe(self, epoch: int, last: bool) -> None:
        """Run the online probe on rank 0 when its schedule says so, and log its record (the other processes go on
        to the next step and wait for rank 0 there)."""
        if self.probe is None or not self.dist.is_main or not self.probe_schedule.due(epoch, last):
            return
        _, side = exported_side(self.model, self.config.export)
        record = run_probe(self.probe, side.encoder, self.preprocessing, self.step, epoch)
        self.probe_schedule.spent(record["probe_seconds"])
        self.run_log.write(record)

    def _prototypes(self) -> Dict[str, int]:
        """{head: K} of the distillation heads that are on (what the loss curves draw log K from)."""
        enabled = self.config.objective_weights().enabled()
        return {name: self.config.head_out_dim for name in ("dino", "ibot") if enabled[name]}

    def _config_record(self) -> Dict[str, Any]:
        return {
            "pretrain_config": self.config.to_dict(),
            "encoder_config": self.encoder_config.to_dict(),
            "preprocessing": self.preprocessing.to_dict(),
            "world_size": self.dist.world_size,
            "steps_per_epoch": self.steps_per_epoch,
            "total_steps": self.total_steps,
            "data": self.data_summary,
        }

    def _train_loop(self) -> None:
        progress = None
        if self.dist.is_main and self.config.progress:
            from tqdm.auto import tqdm

            progress = tqdm(total=self.stop_step, initial=self.step, desc="pretraining", unit="step", dynamic_ncols=True)
        window = StepWindow()
        fetch_start = time.perf_counter()
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        try:
            for batch in self.build_loader():
                window.data_time += time.perf_counter() - fetch_start
                if self._one_step(batch, window, progress):
                    break
                fetch_start = time.perf_counter()
        finally:
            if progress is not None:
                progress.close()

    def _one_step(self, batch: Dict[str, torch.Tensor], window: StepWindow, progress: Any) -> bool:
        """Train on one batch, then log, draw, save and stop as due; returns whether the run's last step is done."""
        config = self.config
        epoch = self.step // self.steps_per_epoch
        epoch_end = (self.step + 1) % self.steps_per_epoch == 0
        final_step = self.step + 1 >= self.stop_step
        # The last step of a run always leaves a preview, also when it stops inside an epoch.
        want_preview = self.dist.is_main and config.preview_every_epochs > 0 and (
            (epoch_end and (epoch + 1) % config.preview_every_epochs == 0) or final_step
        )
        scalars, out = self.train_step(batch, with_preview=want_preview)
        window.add(scalars, out.teacher_global_probs)
        if progress is not None:
            progress.update(1)
        last = self.step >= self.stop_step
        if self.step % max(config.log_every_steps, 1) == 0 or last or epoch_end or self.step == 1:
            # Losses are read back from the device only here (the log record, and from it the progress bar's
            # figure), so between logged steps the host queues work while the device computes.
            record = window.record(self.step, epoch, self.dist, config.batch_size)
            self.run_log.write(record)
            if progress is not None and "loss" in record:
                progress.set_postfix(loss=f"{record['loss']:.4f}", refresh=False)
            # The log has read the device back already: stop a diverged run here, not at the next save.
            self.check_diverged(record)
            window.reset()
        if epoch_end or last:
            self._maybe_probe(epoch, last)
            through = config.reconstruct_through
            self.run_log.epoch_figures(epoch, out.preview,
                                       note="" if through == "bottleneck" else f"reconstruction through the {through}")
        self._save_or_stop(epoch_end, last)
        return last

    def _save_or_stop(self, epoch_end: bool, last: bool) -> None:
        """Save when due (by steps, by the clock, at an epoch's end, at the last step, on a stop) and stop when any
        process was asked to, all processes together."""
        config = self.config
        step_due = bool(config.checkpoint_every_steps and self.step % config.checkpoint_every_steps == 0)
        minutes = config.checkpoint_every_minutes
        clock_due = bool(minutes and time.monotonic() - self._last_checkpoint_time > 60.0 * minutes)
        stop, due = self.agree(self.stop_signals.requested is not None, step_due or clock_due or epoch_end)
        if stop or last or due:
            self.save_checkpoint()
        if stop:
            self.run_log.write({"event": "interrupted", "step": self.step})
            raise TrainingInterrupted(
                f"pretraining interrupted ({self.stop_signals.requested or 'signal on another process'}) at step "
                f"{self.step}; "
                f"state saved to {self.checkpoint_path}; rerun the same command to resume.",
                self.checkpoint_path,
            )

    def export(self) -> Path:
        """Write the teacher's (or student's) encoder with full metadata; returns its path on every rank."""
        self.check_diverged()
        saved = (f"the training state of step {self._last_saved_step} is in {self.checkpoint_path}"
                 if self._last_saved_step is not None else "no training state was saved")
        path = export_encoder(
            self.model, self.config, self.preprocessing, Progress(self.step, self.steps_per_epoch, self.total_steps),
            self.dist, self.run_log, self.data_summary, self.scan_fingerprints, kept_state=saved,
            probe_schedule=self.probe_schedule.summary() if self.probe is not None else None,
        )
        if self.dist.distributed:
            torch.distributed.barrier()
        return path


def _is_compile_failure(error: BaseException) -> bool:
    """Whether ``error`` is torch.compile's backend failing to compile (not an error of the step itself)."""
    from torch._dynamo.exc import BackendCompilerFailed

    return isinstance(error, BackendCompilerFailed)
