"""Training engine of SMIT pretraining: one process or many (DDP via ``torchrun``), resumable.

:func:`run_pretraining` is what ``smit_pretrain`` calls: it sets up the process group from torchrun's environment,
builds (rank 0) or waits for the preprocessed cache, trains with :class:`PretrainTrainer` and exports the encoder.
:class:`PretrainTrainer` trains on any :class:`~nnunet_smit.pretraining.sampler.VolumeSource`.

Output folder:
    ``pretrain_config.json``   the :class:`PretrainConfig` of the run (plus encoder config and data summary)
    ``checkpoint_latest.pt``   everything needed to resume, written atomically (torch.load(weights_only=True))
    ``log.jsonl``              one JSON record per logged step: every loss term, lr, wd, momentum, teacher
                               temperature and collapse indicators, throughput, memory
    ``plots/``                 loss curves and per-epoch reconstruction previews (PNG)
    ``smit_encoder_teacher.pt``  the exported encoder (``_student`` with ``export="student"``)
    ``run_summary.json``       what the export's metadata summary holds
"""
from __future__ import annotations

import contextlib
import dataclasses
import datetime
import ipaddress
import json
import logging
import os
import random
import resource
import signal
import socket
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader

from nnunet_smit.architectures import SMITConfig
from nnunet_smit.checkpoint import (
    EncoderCheckpoint, atomic_write, load_encoder_checkpoint, load_encoder_weights, save_encoder_checkpoint,
    state_dict_sha256,
)
from nnunet_smit.conventions import PretrainPreprocessing
from nnunet_smit.errors import SMITError
from nnunet_smit.pretraining.cache import manifest_fingerprints
from nnunet_smit.pretraining.cli import COMPILE_MODES
from nnunet_smit.pretraining.dino_loss import CENTERING_MODES
from nnunet_smit.pretraining.masking import CubeMaskGenerator
from nnunet_smit.pretraining.model import (
    HeadConfig, ObjectiveWeights, SMITPretrainModel, check_objectives_and_cube, teacher_collapse_stats,
)
from nnunet_smit.pretraining.sampler import EpochShardSampler, TwoViewDataset, ViewSampling, VolumeSource, make_worker_init_fn
from nnunet_smit.pretraining.schedules import PretrainSchedules

logger = logging.getLogger(__name__)

CHECKPOINT_NAME = "checkpoint_latest.pt"
STATE_FORMAT = "nnunet_smit.pretrain_state"
STATE_VERSION = 1

# A loader worker that delivers no batch for this long is taken for hung (a stalled network filesystem, say): the run
# stops with an error instead of waiting for days.
LOADER_TIMEOUT_S = 1800.0

# Under DDP the processes agree on stopping and on saving at every step, through a CPU (gloo) group; how long a
# process waits there for the others (rank 0 writing a checkpoint or the epoch's plots, say).
FLAG_GROUP_TIMEOUT = datetime.timedelta(hours=1)

# Fields that may change between a run and its resumption without changing what is trained.
RUNTIME_FIELDS = frozenset(
    {
        "max_steps", "num_workers", "log_every_steps", "checkpoint_every_steps", "checkpoint_every_minutes",
        "preview_every_epochs", "compile", "compile_mode", "export", "device", "progress", "gradient_checkpointing",
    }
)


@dataclass
class PretrainConfig:
    """Every setting of a pretraining run (serialised to ``pretrain_config.json`` and into the checkpoint).

    Defaults are the authors' where sound. Learning rate = ``base_lr`` x global batch (batch_size x processes).
    """

    # Encoder
    preset: str = "smit_small"
    encoder_overrides: Dict[str, Any] = field(default_factory=dict)
    # Encoder weights a new run starts from (student and teacher) instead of random ones; not read when resuming.
    init_encoder: Optional[str] = None
    # Views and masking
    view_size: int = 96
    region_size: int = 128
    flips: bool = False
    intensity_jitter: float = 0.0
    body_bias: float = 0.9
    mask_ratio: float = 0.7
    mask_cube_size: int = 16
    # Objectives (0 switches one off) and heads
    weight_dino: float = 0.1
    weight_ibot: float = 0.1
    weight_reconstruction: float = 1.0
    # Not in SMIT: DINOv2's KoLeo regulariser on the global embedding keeps the teacher input-dependent (dino_loss.py).
    weight_koleo: float = 0.1
    head_hidden_dim: int = 2048
    head_bottleneck_dim: int = 256
    head_out_dim: int = 8192
    head_layers: int = 3
    separate_patch_head: bool = True
    student_temp: float = 0.1
    teacher_temp_start: float = 0.04
    # DINO's default, not SMIT's 0.07: with 0.07 the teacher goes back to uniform once the warm-up ends (README).
    teacher_temp_end: float = 0.04
    teacher_temp_warmup_epochs: float = 30
    center_momentum: float = 0.9
    centering: str = "center"
    momentum_teacher: float = 0.996
    # Optimisation
    batch_size: int = 6
    epochs: int = 500
    samples_per_epoch: Optional[int] = None
    base_lr: float = 1e-4
    min_lr: float = 1e-6
    warmup_epochs: float = 20
    weight_decay: float = 0.01
    weight_decay_end: Optional[float] = None
    clip_grad: float = 3.0
    freeze_last_layer_epochs: int = 1
    # Runtime
    precision: str = "auto"
    gradient_checkpointing: bool = False
    compile: bool = False
    compile_mode: str = "default"
    device: str = "auto"
    num_workers: Optional[int] = None  # None: auto_loader_workers()
    seed: int = 0
    deterministic: bool = False
    max_steps: Optional[int] = None
    checkpoint_every_steps: int = 500
    checkpoint_every_minutes: float = 15.0
    log_every_steps: int = 10
    preview_every_epochs: int = 1
    export: str = "teacher"
    progress: bool = True

    def __post_init__(self) -> None:
        if self.compile_mode not in COMPILE_MODES:
            raise SMITError(f"compile mode must be one of {', '.join(COMPILE_MODES)}, got {self.compile_mode!r}.")
        if self.precision not in ("auto", "bf16", "fp16", "fp32"):
            raise SMITError(f"precision must be auto, bf16, fp16 or fp32, got {self.precision!r}.")
        if self.export not in ("teacher", "student"):
            raise SMITError(f"export must be 'teacher' or 'student', got {self.export!r}.")
        if self.batch_size < 1:
            raise SMITError("batch size must be at least 1.")
        if self.view_size % 32 or self.view_size <= 0:
            raise SMITError(f"view size must be a multiple of 32 voxels, got {self.view_size}.")
        if self.epochs < 1:
            raise SMITError("epochs must be at least 1.")
        if self.centering not in CENTERING_MODES:
            raise SMITError(f"centering must be one of {', '.join(CENTERING_MODES)}, got {self.centering!r}.")
        self._check_ranges()
        # An unknown preset, a bad encoder override or a mask cube that does not tile the view fails here, before
        # hours of cache building.
        try:
            encoder = self.encoder_config()
        except TypeError as error:
            raise SMITError(f"encoder overrides {self.encoder_overrides}: {error}.") from None
        if self.view_size % encoder.size_divisor:
            raise SMITError(f"view size must be a multiple of {encoder.size_divisor} voxels for preset "
                            f"{self.preset!r}, got {self.view_size}.")
        ViewSampling(view_size=(self.view_size,) * 3, region_size=(self.region_size,) * 3)  # its size checks
        masked = CubeMaskGenerator(self.mask_cube_size, self.mask_ratio).num_masked((self.view_size,) * 3)
        check_objectives_and_cube(self.objective_weights(), self.mask_cube_size)
        if (self.weight_ibot > 0 or self.weight_reconstruction > 0) and not masked:
            raise SMITError(f"mask ratio {self.mask_ratio} masks no {self.mask_cube_size}^3 cube of a "
                            f"{self.view_size}^3 view, so iBOT and reconstruction would learn nothing; raise it or "
                            "switch them off (--no_ibot --no_reconstruction).")

    def _check_ranges(self) -> None:
        """One-line errors for settings outside their meaningful range (NaN included)."""
        def require(ok: bool, name: str, what: str) -> None:
            if not ok:
                raise SMITError(f"{name} must be {what}, got {getattr(self, name)}.")

        for name in ("weight_dino", "weight_ibot", "weight_reconstruction", "weight_koleo"):
            require(getattr(self, name) >= 0, name, "0 (off) or positive")
        for name in ("base_lr", "student_temp", "teacher_temp_start", "teacher_temp_end"):
            require(getattr(self, name) > 0, name, "positive")
        for name in ("min_lr", "weight_decay", "warmup_epochs", "teacher_temp_warmup_epochs",
                     "checkpoint_every_minutes"):
            require(getattr(self, name) >= 0, name, "0 or positive")
        # A jitter of 1 or more could scale a view by a negative factor (inverted contrast).
        require(0 <= self.intensity_jitter < 1, "intensity_jitter", "in [0, 1)")
        require(self.weight_decay_end is None or self.weight_decay_end >= 0, "weight_decay_end", "0 or positive")
        require(self.clip_grad >= 0, "clip_grad", "0 (off) or positive")
        for name in ("momentum_teacher", "center_momentum", "body_bias"):
            require(0 <= getattr(self, name) <= 1, name, "in [0, 1]")
        for name in ("head_hidden_dim", "head_bottleneck_dim", "head_out_dim", "head_layers", "log_every_steps"):
            require(getattr(self, name) >= 1, name, "at least 1")
        for name in ("checkpoint_every_steps", "preview_every_epochs", "freeze_last_layer_epochs"):
            require(getattr(self, name) >= 0, name, "0 or more")
        require(self.num_workers is None or self.num_workers >= 0, "num_workers", "0 or more (or unset: automatic)")
        for name in ("max_steps", "samples_per_epoch"):
            require(getattr(self, name) is None or getattr(self, name) >= 1, name, "at least 1 (or unset)")

    def encoder_config(self) -> SMITConfig:
        return SMITConfig.preset(self.preset, **self.encoder_overrides)

    def objective_weights(self) -> ObjectiveWeights:
        return ObjectiveWeights(self.weight_dino, self.weight_ibot, self.weight_reconstruction, self.weight_koleo)

    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Dict[str, Any]) -> "PretrainConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})

    def training_fields(self) -> Dict[str, Any]:
        """The fields a resumed run must share with the checkpoint."""
        return {k: v for k, v in self.to_dict().items() if k not in RUNTIME_FIELDS}


# Encoder settings that shape no weight and no output of a trained encoder (stochastic depth acts in training only).
TRAINING_ONLY_ENCODER_FIELDS = frozenset({"drop_path_rate"})


def encoder_differences(found: SMITConfig, wanted: SMITConfig) -> List[str]:
    """The architecture settings in which ``found`` is not ``wanted``, as "name found instead of wanted"."""
    a, b = found.to_dict(), wanted.to_dict()
    return [f"{k} {a.get(k)} instead of {b[k]}" for k in b
            if k not in TRAINING_ONLY_ENCODER_FIELDS and a.get(k) != b[k]]


def load_init_encoder(config: PretrainConfig) -> EncoderCheckpoint:
    """The encoder weights ``config.init_encoder`` names (any file fine-tuning reads), or one line saying why they
    cannot start this run: unreadable, or an architecture other than the run's encoder (with the preset that fits)."""
    checkpoint = load_encoder_checkpoint(config.init_encoder)
    differences = encoder_differences(checkpoint.config, config.encoder_config())
    if differences:
        fitting = [name for name in SMITConfig.preset_names()
                   if not encoder_differences(checkpoint.config, SMITConfig.preset(name))]
        hint = f"pass --preset {fitting[0]}" if fitting else "no preset has its architecture"
        raise SMITError(f"--init_encoder {config.init_encoder} holds another encoder than the run's preset "
                        f"{config.preset!r} ({'; '.join(differences[:4])}): {hint}.")
    return checkpoint


# --------------------------------------------------------------------------------------------------------------
# Distributed helpers


@dataclass
class DistInfo:
    """This process in the job: rank, world size, local rank and device."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


# Loader processes per GPU at most: on a 16-core H200 host, 8 workers read 439 crops/s from the cache, 12x what the
# bf16 step consumed (README); more only add memory.
MAX_AUTO_LOADER_WORKERS = 8


def auto_loader_workers(device: torch.device) -> int:
    """Loader processes for this process when ``num_workers`` is not set: on a GPU, the CPU cores this process may
    use (its affinity shared with the other processes of the node) less one for itself, at most 8; on the CPU,
    where training needs the cores, one when there are at least two."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    if device.type != "cuda":
        return 1 if cores >= 2 else 0
    per_process = cores // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    return max(1, min(MAX_AUTO_LOADER_WORKERS, per_process - 1))


def select_device(requested: str, local_rank: int = 0) -> torch.device:
    if requested == "auto":
        requested = "cuda" if torch.cuda.is_available() else "cpu"
    if requested.startswith("cuda"):
        if not torch.cuda.is_available():
            raise SMITError("a CUDA device was requested but none is available; use --device cpu.")
        device = torch.device("cuda", local_rank) if requested == "cuda" else torch.device(requested)
        torch.cuda.set_device(device)
        return device
    return torch.device(requested)


def check_gloo_address(environ: Optional[Dict[str, str]] = None) -> None:
    """Refuse a run over several nodes whose gloo groups would bind to a loopback address.

    The processes coordinate through gloo groups beside NCCL (rank 0's outcome of the cache build, the agreement on
    stopping). Without ``GLOO_SOCKET_IFNAME`` gloo binds to the address this node's name resolves to first, or to
    the loopback address when it resolves to none; a loopback address (127.0.1.1 in many /etc/hosts files) cannot
    be reached from the other nodes, and their connection attempts go on until the group's timeout (hours).
    A torchrun job is over several nodes when WORLD_SIZE exceeds LOCAL_WORLD_SIZE; without LOCAL_WORLD_SIZE (a
    launcher other than torchrun) nothing is checked.
    """
    environ = os.environ if environ is None else environ
    world_size = int(environ.get("WORLD_SIZE", "1"))
    local_world_size = int(environ.get("LOCAL_WORLD_SIZE", str(world_size)))
    if world_size <= local_world_size or environ.get("GLOO_SOCKET_IFNAME"):
        return
    hostname = socket.gethostname()
    try:
        address: Optional[str] = socket.getaddrinfo(hostname, None, type=socket.SOCK_STREAM)[0][4][0]
    except (OSError, IndexError):
        address = None
    if address is not None and not ipaddress.ip_address(address.split("%")[0]).is_loopback:
        return
    resolved = f"resolves to the loopback address {address}" if address else "does not resolve to an address"
    raise SMITError(
        f"this node's name {hostname!r} {resolved}, so the other nodes could not reach its gloo groups (which "
        "coordinate the processes) and the run would hang until their timeout; set GLOO_SOCKET_IFNAME "
        "to the network interface that reaches the other nodes (the one `ip route get $MASTER_ADDR` names, e.g. "
        "GLOO_SOCKET_IFNAME=eth0) on every node.")


def init_distributed(requested_device: str = "auto") -> DistInfo:
    """Join the process group torchrun describes in the environment (single process when it does not)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = select_device(requested_device, local_rank)
    if world_size > 1 and not dist.is_initialized():
        check_gloo_address()
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend, timeout=datetime.timedelta(minutes=30))
    return DistInfo(rank=rank, world_size=world_size, local_rank=local_rank, device=device)


def schedule_warnings(config: PretrainConfig) -> List[str]:
    """Schedules that the run's length cuts short (likely a shortened --epochs with the other defaults kept)."""
    warnings = []
    if config.warmup_epochs >= config.epochs:
        warnings.append(f"the learning-rate warm-up ({config.warmup_epochs:g} epochs) is not shorter than the run "
                        f"({config.epochs} epochs): the learning rate never reaches its peak; lower --warmup_epochs")
    if config.teacher_temp_start != config.teacher_temp_end and config.teacher_temp_warmup_epochs > config.epochs:
        warnings.append(f"the teacher temperature warm-up ({config.teacher_temp_warmup_epochs:g} epochs) is longer "
                        f"than the run ({config.epochs} epochs): the temperature never reaches "
                        f"{config.teacher_temp_end:g}; lower --teacher_temp_warmup_epochs")
    if config.freeze_last_layer_epochs >= config.epochs and (config.weight_dino > 0 or config.weight_ibot > 0):
        warnings.append(f"the prototypes stay frozen for the whole run (--freeze_last_layer_epochs "
                        f"{config.freeze_last_layer_epochs} of {config.epochs} epochs): DINO and iBOT cannot learn "
                        "them; lower --freeze_last_layer_epochs")
    return warnings


def describe_os_error(error: OSError) -> str:
    """One line for a file-system error: the path and what went wrong."""
    what = error.strerror or type(error).__name__
    path = error.filename if error.filename is not None else "a file"
    return f"{path}: {what}; check the path, its permissions and the free space."


def share_outcome(error: Optional[str]) -> Optional[str]:
    """Wait (for hours if need be, e.g. while rank 0 builds the cache) and share rank 0's error message, if any."""
    if not (dist.is_available() and dist.is_initialized()):
        return error
    group = dist.new_group(backend="gloo", timeout=datetime.timedelta(days=2))
    payload = [error]
    dist.broadcast_object_list(payload, src=0, group=group)
    dist.destroy_process_group(group)
    return payload[0]


# --------------------------------------------------------------------------------------------------------------
# RNG state <-> plain containers (torch.load(weights_only=True) accepts them)


def capture_rng_state(device: torch.device) -> Dict[str, Any]:
    version, state, gauss = random.getstate()
    np_state = np.random.get_state()
    captured = {
        "python": [version, list(state), gauss],
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), int(np_state[2]), int(np_state[3]),
                  float(np_state[4])],
        "torch": torch.get_rng_state(),
    }
    if device.type == "cuda":
        captured["cuda"] = torch.cuda.get_rng_state(device)
    return captured


def restore_rng_state(state: Dict[str, Any], device: torch.device) -> None:
    version, values, gauss = state["python"]
    random.setstate((int(version), tuple(int(v) for v in values), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), int(pos), int(has_gauss), float(cached)))
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def _json_plain(obj: Any) -> Any:
    """A JSON round trip: only plain containers, numbers and strings remain."""
    return json.loads(json.dumps(obj, default=str))


class TrainingInterrupted(KeyboardInterrupt):
    """SIGINT/SIGTERM arrived; the state was saved and the run can be resumed by rerunning the same command."""

    def __init__(self, message: str, checkpoint_path: Path) -> None:
        super().__init__(message)
        self.message = message
        self.checkpoint_path = checkpoint_path


class TrainingDiverged(SMITError):
    """The weights stopped being finite numbers; the last checkpoint written before is kept."""


# --------------------------------------------------------------------------------------------------------------


class PretrainTrainer:
    """Trains the SMIT student/teacher on a volume source and exports the encoder.

    Args:
        config: the run's settings.
        source: scans (``CacheIndex`` or anything with ``case_ids``, ``load`` and ``preprocessing``).
        output_dir: where checkpoints, logs, plots and the export go.
        dist_info: this process in the job (from :func:`init_distributed`); single CPU/GPU process if None.
        data_summary: JSON-able description of the data, stored with the run and the export (default: the
            source's ``summary()``).
        manifest: JSON-able list of the cached cases, stored in ``checkpoint_latest`` (default: the source's
            ``manifest``).

    Attributes:
        scan_fingerprints: {fingerprint: scan name} of every scan these weights have seen, which the export records
            (``pretraining_scans``): the manifest's cases, those of the manifests the run had before a resume (scans
            removed since were still trained on), and those recorded by the ``init_encoder`` a new run starts from.
    """

    def __init__(
        self,
        config: PretrainConfig,
        source: VolumeSource,
        output_dir: Path,
        dist_info: Optional[DistInfo] = None,
        data_summary: Optional[Dict[str, Any]] = None,
        manifest: Optional[Dict[str, Any]] = None,
    ) -> None:
        self.config = config
        self.source = source
        self.output_dir = Path(output_dir)
        self.dist = dist_info or DistInfo(device=select_device(config.device))
        self.device = self.dist.device
        if data_summary is None and hasattr(source, "summary"):
            data_summary = source.summary()
        if manifest is None:
            manifest = getattr(source, "manifest", None)
        self.data_summary = _json_plain(data_summary or {})
        self.manifest = _json_plain(manifest or {})
        self.scan_fingerprints: Dict[str, str] = manifest_fingerprints(self.manifest)
        self.preprocessing: PretrainPreprocessing = source.preprocessing
        self.encoder_config = config.encoder_config()
        self.checkpoint_path = self.output_dir / CHECKPOINT_NAME
        self.log_path = self.output_dir / "log.jsonl"
        self.plot_dir = self.output_dir / "plots"
        self._stop_signal: Optional[str] = None
        self._flag_group: Optional[Any] = None  # _sync_flags' CPU group (made at first use unless the default is gloo)
        self._last_checkpoint_time = time.monotonic()
        self._last_saved_step: Optional[int] = None  # the step checkpoint_latest.pt holds
        self._finite_at_step: Optional[int] = None  # the last step whose weights check_diverged found finite

        if config.deterministic and self.device.type == "cuda":
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
            torch.backends.cudnn.benchmark = False
        # Same initial weights on every process (DDP also broadcasts rank 0's); per-rank drop-path streams.
        torch.manual_seed(config.seed)
        np.random.seed(config.seed)
        random.seed(config.seed)

        if config.weight_koleo > 0 and config.batch_size < 2 and self.dist.is_main:
            logger.warning("KoLeo compares the scans of one process's batch: with batch size 1 it does nothing; "
                           "use --batch_size 2 or more (or --weight_koleo 0 to silence this).")
        if self.dist.is_main:
            for message in schedule_warnings(config):
                logger.warning("%s", message)
        num_cases = len(source.case_ids)
        if num_cases == 0:
            raise SMITError("no usable scans to pretrain on; check the input folders and the cache's skipped report.")
        self._set_epoch_length(config.samples_per_epoch or num_cases)

        self.model = SMITPretrainModel(
            self.encoder_config,
            weights=config.objective_weights(),
            heads=HeadConfig(config.head_hidden_dim, config.head_bottleneck_dim, config.head_out_dim, config.head_layers),
            mask_cube_size=config.mask_cube_size,
            student_temp=config.student_temp,
            center_momentum=config.center_momentum,
            centering=config.centering,
            separate_patch_head=config.separate_patch_head,
            gradient_checkpointing=config.gradient_checkpointing,
        ).to(self.device)
        self.model.train()
        # On a GPU the fused kernel updates every parameter in a few launches (the step is launch-bound there).
        self.optimizer = torch.optim.AdamW(
            self._param_groups(), lr=self.schedules.lr(0), betas=(0.9, 0.999), fused=self.device.type == "cuda" or None
        )
        self.amp_dtype = self._amp_dtype()
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp_dtype == torch.float16)

        self.student_fn = self.model.student
        if self.dist.distributed:
            self.student_fn = DistributedDataParallel(
                self.model.student,
                device_ids=[self.device.index] if self.device.type == "cuda" else None,
                # norm0..3 never get gradients in pretraining (and stage 3 none without reconstruction).
                find_unused_parameters=True,
            )
        self._eager_student_fn = self.student_fn
        if config.compile:
            if self.dist.distributed:
                # Under DDP the wrapped student is compiled (DDP's own graph splitting at its gradient buckets).
                self.student_fn = torch.compile(self.student_fn, mode=config.compile_mode)
            else:
                # One process: student, teacher and losses as one graph (the step's device part has no host
                # synchronisation or data-dependent shape, so it traces whole).
                self.model.compile_losses(mode=config.compile_mode)

        self.step = 0
        self.sampling = ViewSampling(
            view_size=(config.view_size,) * 3,
            region_size=(config.region_size,) * 3,
            body_bias=config.body_bias,
            flips=config.flips,
            intensity_jitter=config.intensity_jitter,
            mask_cube_size=config.mask_cube_size,
            mask_ratio=config.mask_ratio,
        )
        self.dataset = TwoViewDataset(source, self.sampling, seed=config.seed)

    # ----------------------------------------------------------------------------------------------------------
    def _param_groups(self) -> List[Dict[str, Any]]:
        """Weight decay on matrices and kernels; none on biases, norms and the mask token."""
        decay, no_decay = [], []
        for name, p in self.model.student.named_parameters():
            if not p.requires_grad:
                continue
            (no_decay if p.ndim <= 1 or name.endswith(".bias") or name == "mask_token" else decay).append(p)
        return [
            {"params": decay, "weight_decay": self.config.weight_decay, "apply_wd": True},
            {"params": no_decay, "weight_decay": 0.0, "apply_wd": False},
        ]

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

    # ----------------------------------------------------------------------------------------------------------
    def state_dict(self) -> Dict[str, Any]:
        """Everything to resume (plain containers and tensors only)."""
        rng = capture_rng_state(self.device)
        rng_per_rank = [rng]
        if self.dist.distributed:
            gathered: List[Any] = [None] * self.dist.world_size
            dist.all_gather_object(gathered, rng)
            rng_per_rank = gathered
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
            "rng_per_rank": rng_per_rank,
            "world_size": self.dist.world_size,
            "config": self.config.to_dict(),
            "encoder_config": self.encoder_config.to_dict(),
            "preprocessing": self.preprocessing.to_dict(),
            "data": self.data_summary,
            "manifest": self.manifest,
            "pretraining_scans": self.scan_fingerprints,
        }

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
        if self.dist.is_main:
            self._log({"event": "diverged", "step": self.step, "last_saved_step": self._last_saved_step})
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
        try:
            state = torch.load(self.checkpoint_path, map_location="cpu", weights_only=True)
        except Exception as error:  # noqa: BLE001 - any unreadable file is reported the same way
            raise SMITError(
                f"{self.checkpoint_path} cannot be read ({type(error).__name__}); delete it to start over."
            ) from error
        if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
            raise SMITError(f"{self.checkpoint_path} is not a pretraining state; use another output folder.")
        # Runs saved before the centering and KoLeo settings existed used the running-mean center and no KoLeo.
        defaults_then = {"centering": "center", "weight_koleo": 0.0}
        saved = PretrainConfig.from_dict({**defaults_then, **state["config"]}).training_fields()
        current = self.config.training_fields()
        changed = sorted(k for k in current if saved.get(k) != current[k])
        if changed:
            details = ", ".join(f"{k}: {saved.get(k)!r} -> {current[k]!r}" for k in changed[:4])
            raise SMITError(
                f"{self.output_dir} holds a run with other settings ({details}); rerun with the same settings to "
                "resume, or choose a new output folder."
            )
        if int(state["world_size"]) * self.config.batch_size != self.dist.world_size * self.config.batch_size:
            logger.warning(
                "resuming with %d processes instead of %d: the global batch and schedules change.",
                self.dist.world_size, state["world_size"],
            )
        self._adopt_epoch_of_checkpoint(state)
        # States saved before pretraining_scans existed: their manifest still names the scans of the run so far.
        earlier = {**manifest_fingerprints(state.get("manifest") or {}), **(state.get("pretraining_scans") or {})}
        self.scan_fingerprints = {**earlier, **self.scan_fingerprints}
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scaler.load_state_dict(state["scaler"])
        self.step = int(state["step"])
        self._last_saved_step = self.step
        rngs = state["rng_per_rank"]
        restore_rng_state(rngs[self.dist.rank] if self.dist.rank < len(rngs) else rngs[0], self.device)
        logger.info("resumed from %s at step %d (epoch %d)", self.checkpoint_path, self.step, state["epoch"])
        return True

    # ----------------------------------------------------------------------------------------------------------
    def _install_signal_handlers(self) -> Dict[int, Any]:
        previous: Dict[int, Any] = {}
        if threading.current_thread() is not threading.main_thread():
            return previous

        def handler(signum, frame):  # noqa: ARG001 - signal handler signature
            self._stop_signal = signal.Signals(signum).name
            # A second signal while saving falls back to the default behaviour.
            signal.signal(signum, previous.get(signum, signal.SIG_DFL))

        for sig in (signal.SIGINT, signal.SIGTERM):
            previous[sig] = signal.getsignal(sig)
            signal.signal(sig, handler)
        return previous

    @staticmethod
    def _restore_signal_handlers(previous: Dict[int, Any]) -> None:
        for sig, old in previous.items():
            signal.signal(sig, old)

    def _sync_flags(self, checkpoint_due: bool) -> Tuple[bool, bool]:
        """(stop requested, checkpoint due) agreed by all processes: any process's signal stops all, and the
        clock-based checkpoint decision cannot differ between processes (they must save together).

        Under DDP an all-reduce of two numbers on the CPU (a gloo group): it does not wait for the device, so the
        processes agree at every step and stop at the step after the signal."""
        flags = torch.tensor([1.0 if self._stop_signal else 0.0, 1.0 if checkpoint_due else 0.0])
        if self.dist.distributed:
            if self._flag_group is None and dist.get_backend() != "gloo":
                self._flag_group = dist.new_group(backend="gloo", timeout=FLAG_GROUP_TIMEOUT)
            dist.all_reduce(flags, op=dist.ReduceOp.MAX, group=self._flag_group)
        stop, due = flags.tolist()
        return stop > 0, due > 0

    def request_stop(self, reason: str = "request") -> None:
        """Ask the loop to save and stop after the current step (what SIGINT/SIGTERM do)."""
        self._stop_signal = reason

    # ----------------------------------------------------------------------------------------------------------
    def _make_loader(self) -> DataLoader:
        sampler = _ResumableSampler(
            EpochShardSampler(
                len(self.source.case_ids), self.samples_per_epoch, self.config.batch_size,
                self.dist.rank, self.dist.world_size, self.config.seed,
            ),
            start_step=self.step,
        )
        workers = (auto_loader_workers(self.device) if self.config.num_workers is None
                   else max(int(self.config.num_workers), 0))
        logger.info("data loader: %d worker processes", workers)
        return DataLoader(
            self.dataset,
            batch_size=self.config.batch_size,
            sampler=sampler,
            num_workers=workers,
            worker_init_fn=make_worker_init_fn(self.config.seed, self.dist.rank),
            pin_memory=self.device.type == "cuda",
            drop_last=True,
            persistent_workers=False,
            prefetch_factor=4 if workers > 0 else None,
            timeout=LOADER_TIMEOUT_S if workers > 0 else 0,
        )

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
            out = self.model.compute_losses(views, masks, teacher_temp, student=self.student_fn,
                                            with_preview=with_preview, eager_student=self._eager_student_fn)
        self.scaler.scale(out.total).backward()
        return out

    def _disable_compile(self) -> None:
        self.model.compiled_losses = None
        self.student_fn = self._eager_student_fn

    def train_step(self, batch: Dict[str, torch.Tensor], with_preview: bool = False) -> Tuple[Dict[str, Any], Any]:
        """One optimisation step on a collated batch; returns (scalars as tensors, loss output)."""
        values = self._apply_schedules()
        views = batch["views"].to(self.device, non_blocking=True)
        masks = batch["masks"]  # compute_losses reads them on the host and sends them to the device itself
        try:
            out = self._forward_backward(views, masks, values["teacher_temp"], with_preview)
        except Exception as error:
            compiled = self.model.compiled_losses is not None or self.student_fn is not self._eager_student_fn
            if not (compiled and _is_compile_failure(error)):
                raise
            # Compiling failed (no working C++ compiler or Triton, an unsupported operator, ...): compiling happens
            # before the forward or the backward graph first runs, so at most this step's center update has run
            # (once more on the same batch when the step is repeated): train on eagerly rather than stop.
            cause = getattr(error, "inner_exception", None) or error
            reason = (str(cause).strip().splitlines() or [type(cause).__name__])[0][:200]
            logger.warning("torch.compile failed (%s: %s); training continues without compiling.",
                           type(cause).__name__, reason)
            self._disable_compile()
            out = self._forward_backward(views, masks, values["teacher_temp"], with_preview)
        epoch = self.step // self.steps_per_epoch
        if epoch < self.config.freeze_last_layer_epochs:
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
        scalars: Dict[str, Any] = {"loss": out.total.detach(), **{k: v.detach() for k, v in out.terms.items()}}
        if grad_norm is not None:
            scalars["grad_norm"] = grad_norm.detach()
        return {**values, **scalars}, out

    # ----------------------------------------------------------------------------------------------------------
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
        if self.dist.is_main:
            self._write_config()
            self._log({"event": "resume" if resumed else "start", "step": self.step, "total_steps": self.total_steps,
                       "stop_step": self.stop_step, "world_size": self.dist.world_size, **start})
        if self.step >= self.stop_step:
            logger.info("step %d reached already; exporting.", self.step)
            return self.export()

        previous = self._install_signal_handlers()
        deterministic_before = torch.are_deterministic_algorithms_enabled()
        try:
            if self.config.deterministic:
                torch.use_deterministic_algorithms(True)
            try:
                self._train_loop()
            except (RuntimeError, SMITError) as error:
                self._raise_loader_failure(error)
                raise
        finally:
            torch.use_deterministic_algorithms(deterministic_before)
            self._restore_signal_handlers(previous)
        return self.export()

    def _start_from_init_encoder(self) -> Dict[str, Any]:
        """Load ``init_encoder`` strictly into the student's encoder and copy it to the teacher's (every process
        reads the file); returns what the start record of the log keeps of it."""
        checkpoint = load_init_encoder(self.config)
        report = load_encoder_weights(self.model.student.encoder, checkpoint.state_dict, strict=True)
        if self.model.teacher is not None:
            self.model.teacher.encoder.load_state_dict(self.model.student.encoder.state_dict())
        # The starting weights have seen their own pretraining scans: held-out cases are checked against those too.
        self.scan_fingerprints = {**checkpoint.pretraining_scans, **self.scan_fingerprints}
        if self.dist.is_main:
            logger.info("student and teacher encoders start from %s (%s, sha256 %s): %s", checkpoint.path,
                        checkpoint.source, checkpoint.sha256[:16], report.summary())
            # Files from elsewhere record no preprocessing (the authors' defaults are assumed for them).
            theirs, ours = checkpoint.preprocessing.to_dict(), self.preprocessing.to_dict()
            changed = [f"{k} {theirs[k]} there, {ours[k]} here" for k in ours if theirs.get(k) != ours[k]]
            if changed and checkpoint.source == "nnunet_smit":
                logger.warning("the --init_encoder weights were pretrained on differently prepared scans (%s): their "
                               "filters meet other intensities or scales at first.", "; ".join(changed))
        return {"init_encoder": {"path": checkpoint.path, "source": checkpoint.source, "sha256": checkpoint.sha256,
                                 "tensors": report.loaded, "notes": checkpoint.notes}}

    def _raise_loader_failure(self, error: BaseException) -> None:
        """A data-loader failure as a one-line :class:`SMITError` saying which state is kept; other errors return.

        A worker killed (out of memory, say) or silent for ``LOADER_TIMEOUT_S`` makes torch raise in the main
        process wherever it is, possibly inside a step: nothing is saved from that state.
        """
        text = str(error).strip()
        if isinstance(error, SMITError) and text.startswith("Caught "):  # raised in a worker, re-raised by torch
            last = text.splitlines()[-1]
            raise SMITError(last.split(": ", 1)[1] if last.startswith("nnunet_smit.") else last) from None
        if not isinstance(error, RuntimeError) or not text.startswith(("DataLoader worker", "DataLoader timed out")):
            return
        kept = (f"{self.checkpoint_path} holds step {self._last_saved_step}" if self._last_saved_step is not None
                else "no state was saved yet")
        raise SMITError(
            f"the data loader failed near step {self.step} ({text.splitlines()[0].rstrip('. ')}; out of memory?); "
            f"{kept}. Rerun the same command to resume, with a smaller --num_workers if memory is short."
        ) from None

    def _train_loop(self) -> None:
        config = self.config
        loader = self._make_loader()
        progress = None
        if self.dist.is_main and config.progress:
            from tqdm.auto import tqdm

            progress = tqdm(total=self.stop_step, initial=self.step, desc="pretraining", unit="step", dynamic_ncols=True)
        window: Dict[str, List[Any]] = {}
        window_start = time.perf_counter()
        window_steps = 0
        data_time = 0.0
        fetch_start = time.perf_counter()
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        try:
            for batch in loader:
                data_time += time.perf_counter() - fetch_start
                epoch_end = (self.step + 1) % self.steps_per_epoch == 0
                epoch = self.step // self.steps_per_epoch
                final_step = self.step + 1 >= self.stop_step
                # The last step of a run always leaves a preview, also when it stops inside an epoch.
                want_preview = self.dist.is_main and config.preview_every_epochs > 0 and (
                    (epoch_end and (epoch + 1) % config.preview_every_epochs == 0) or final_step
                )
                scalars, out = self.train_step(batch, with_preview=want_preview)
                for key, value in scalars.items():
                    window.setdefault(key, []).append(value)
                if out.teacher_global_probs is not None:
                    window.setdefault("_teacher_probs", []).append(out.teacher_global_probs)
                window_steps += 1
                if progress is not None:
                    progress.update(1)

                last = self.step >= self.stop_step
                log_due = self.step % max(config.log_every_steps, 1) == 0 or last or epoch_end or self.step == 1
                if log_due:
                    # Losses are read back from the device only here (the log record, and from it the progress
                    # bar's figure), so between logged steps the host queues work while the device computes.
                    elapsed = time.perf_counter() - window_start
                    record = self._log_window(window, window_steps, elapsed, data_time, epoch)
                    if progress is not None and "loss" in record:
                        progress.set_postfix(loss=f"{record['loss']:.4f}", refresh=False)
                    window, window_steps, data_time = {}, 0, 0.0
                    # The log has read the device back already: stop a diverged run here, not at the next save.
                    self.check_diverged(record)
                    window_start = time.perf_counter()
                if (epoch_end or last) and self.dist.is_main:
                    self._epoch_outputs(epoch, out.preview)
                step_due = bool(config.checkpoint_every_steps and self.step % config.checkpoint_every_steps == 0)
                minutes = config.checkpoint_every_minutes
                clock_due = bool(minutes and time.monotonic() - self._last_checkpoint_time > 60.0 * minutes)
                due = step_due or clock_due or epoch_end
                stop, due = self._sync_flags(due)
                if stop or last or due:
                    self.save_checkpoint()
                if stop:
                    message = (
                        f"pretraining interrupted ({self._stop_signal or 'signal on another process'}) at step "
                        f"{self.step}; state saved to {self.checkpoint_path}; rerun the same command to resume."
                    )
                    if self.dist.is_main:
                        self._log({"event": "interrupted", "step": self.step})
                    raise TrainingInterrupted(message, self.checkpoint_path)
                if last:
                    break
                fetch_start = time.perf_counter()
        finally:
            if progress is not None:
                progress.close()

    # ----------------------------------------------------------------------------------------------------------
    def _log_window(
        self, window: Dict[str, List[Any]], steps: int, elapsed: float, data_time: float, epoch: int
    ) -> Dict[str, Any]:
        """Reduce the window's values (mean over steps, and over processes), write one log record and return it."""
        probs = window.pop("_teacher_probs", None)
        keys = sorted(k for k, v in window.items() if v and torch.is_tensor(v[0]))
        means = torch.stack([torch.stack([v.float() for v in window[k]]).mean() for k in keys]) if keys else None
        if means is not None and self.dist.distributed:
            means = means.to(self.device)
            dist.all_reduce(means)
            means /= self.dist.world_size
        record: Dict[str, Any] = {"event": "train", "step": self.step, "epoch": epoch}
        if means is not None:
            record.update({k: float(v) for k, v in zip(keys, means.cpu())})
        for key in ("lr", "weight_decay", "momentum", "teacher_temp"):
            if window.get(key):
                record[key] = float(window[key][-1])
        if probs:
            stats = teacher_collapse_stats(torch.cat(probs))
            record.update({f"teacher_{k}": v for k, v in stats.items()})
        samples = steps * self.config.batch_size * self.dist.world_size
        record["samples_per_s"] = samples / elapsed if elapsed > 0 else None
        record["steps_per_s"] = steps / elapsed if elapsed > 0 else None
        record["data_wait_fraction"] = data_time / elapsed if elapsed > 0 else None
        record["memory_mb"] = self._memory_mb()
        if self.dist.is_main:
            self._log(record)
        return record

    def _memory_mb(self) -> float:
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device) / 2**20
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux reports KiB

    def _log(self, record: Dict[str, Any]) -> None:
        record = {"time": round(time.time(), 3), **record}
        with open(self.log_path, "a") as handle:
            handle.write(json.dumps(record) + "\n")

    def _write_config(self) -> None:
        payload = {
            "pretrain_config": self.config.to_dict(),
            "encoder_config": self.encoder_config.to_dict(),
            "preprocessing": self.preprocessing.to_dict(),
            "world_size": self.dist.world_size,
            "steps_per_epoch": self.steps_per_epoch,
            "total_steps": self.total_steps,
            "data": self.data_summary,
        }
        (self.output_dir / "pretrain_config.json").write_text(json.dumps(payload, indent=2, default=str))

    def _epoch_outputs(self, epoch: int, preview: Optional[Dict[str, Any]]) -> None:
        from nnunet_smit.pretraining.plots import plot_loss_curves, plot_reconstruction

        try:
            plot_loss_curves(self.log_path, self.plot_dir / "loss_curves.png")
            if preview is not None:
                plot_reconstruction(
                    preview, self.plot_dir / f"reconstruction_epoch{epoch + 1:04d}.png", title=f"epoch {epoch + 1}"
                )
        except Exception as error:  # noqa: BLE001 - a figure must never stop training
            logger.warning("could not write plots: %s", error)

    # ----------------------------------------------------------------------------------------------------------
    def export(self) -> Path:
        """Write the teacher's (or student's) encoder with full metadata; returns its path on every rank."""
        self.check_diverged()
        which = self.config.export
        side = self.model.teacher if which == "teacher" and self.model.teacher is not None else self.model.student
        if which == "teacher" and self.model.teacher is None:
            logger.warning("no teacher without distillation objectives; exporting the student.")
            which = "student"
        path = self.output_dir / f"smit_encoder_{which}.pt"
        checksums = {"student": state_dict_sha256(self.model.student.state_dict())}
        if self.model.teacher is not None:
            checksums["teacher"] = state_dict_sha256(self.model.teacher.state_dict())
        ranks_checksums = [checksums]
        if self.dist.distributed:
            gathered: List[Any] = [None] * self.dist.world_size
            dist.all_gather_object(gathered, checksums)
            ranks_checksums = gathered
        if self.dist.is_main:
            records = _read_records(self.log_path)
            last = [r for r in records if r.get("event") == "train"][-1:]
            init = next((r["init_encoder"] for r in records if r.get("event") == "start" and "init_encoder" in r),
                        None)
            summary = {
                "kind": "smit_pretraining",
                "exported": which,
                "steps": self.step,
                "epochs_completed": self.step / self.steps_per_epoch,
                "total_steps": self.total_steps,
                "finished": self.step >= self.total_steps,
                "world_size": self.dist.world_size,
                "global_batch": self.config.batch_size * self.dist.world_size,
                "last_log": last[0] if last else None,
                "objectives": self.model.weights.enabled(),
                "pretrain_config": self.config.to_dict(),
                "init_encoder": init,
                "data": self.data_summary,
                "fingerprinted_scans": len(self.scan_fingerprints),
                "weights_checksums_per_rank": ranks_checksums,
            }
            state_dict = {k: v.detach().cpu() for k, v in side.encoder.state_dict().items()}
            try:
                save_encoder_checkpoint(
                    path, state_dict, self.encoder_config, self.preprocessing,
                    patch_size=(self.config.view_size,) * 3, summary=_json_plain(summary),
                    scan_fingerprints=self.scan_fingerprints,
                )
                atomic_write(self.output_dir / "run_summary.json",
                             lambda tmp: Path(tmp).write_text(json.dumps(_json_plain(summary), indent=2)))
            except OSError as error:
                saved = (f"the training state of step {self._last_saved_step} is in {self.checkpoint_path}"
                         if self._last_saved_step is not None else "no training state was saved")
                raise SMITError(
                    f"could not write {path} ({error.strerror or error}); {saved}. Free space and rerun the same "
                    "command to export."
                ) from None
            self._log({"event": "export", "step": self.step, "path": str(path)})
            plot_dir_outputs = self.plot_dir / "loss_curves.png"
            try:
                from nnunet_smit.pretraining.plots import plot_loss_curves

                plot_loss_curves(self.log_path, plot_dir_outputs)
            except Exception as error:  # noqa: BLE001
                logger.warning("could not write plots: %s", error)
        if self.dist.distributed:
            dist.barrier()
        return path


def _is_compile_failure(error: BaseException) -> bool:
    """Whether ``error`` is torch.compile's backend failing to compile (not an error of the step itself)."""
    from torch._dynamo.exc import BackendCompilerFailed

    return isinstance(error, BackendCompilerFailed)


def _read_records(path: Path) -> List[Dict[str, Any]]:
    from nnunet_smit.pretraining.plots import read_log

    return read_log(path)


class _ResumableSampler(torch.utils.data.Sampler):
    """Endless stream of ``(case_index, sample_key)`` from global step ``start_step`` on, epoch after epoch."""

    def __init__(self, shard: EpochShardSampler, start_step: int) -> None:
        self.shard = shard
        self.start_step = int(start_step)

    def __iter__(self):
        epoch, skip = divmod(self.start_step, self.shard.batches_per_epoch)
        while True:
            self.shard.set_epoch(epoch, skip)
            yield from iter(self.shard)
            epoch, skip = epoch + 1, 0


# --------------------------------------------------------------------------------------------------------------


def run_pretraining(
    sources: Sequence[Path],
    output_dir: Path,
    config: PretrainConfig,
    cache_dir: Optional[Path] = None,
    preprocessing: Optional[PretrainPreprocessing] = None,
    cache_workers: Optional[int] = None,
    cache_only: bool = False,
) -> Path:
    """Build or open the cache, pretrain, export; what ``smit_pretrain`` runs on every process.

    Args:
        sources: folders with CT scans (searched recursively).
        output_dir: run folder.
        config: run settings.
        cache_dir: preprocessed cache (default ``output_dir/cache``); shared between runs on the same data.
        preprocessing: spacing/HU window of the cache (authors' defaults if None).
        cache_workers: processes building the cache (default: CPU count, at most 8).
        cache_only: build the cache and return its folder without training.

    Returns:
        the exported encoder checkpoint's path (or the cache folder with ``cache_only``).
    """
    from nnunet_smit.pretraining.cache import CacheIndex, build_cache

    output_dir = Path(output_dir)
    cache_dir = Path(cache_dir) if cache_dir is not None else output_dir / "cache"
    preprocessing = preprocessing or PretrainPreprocessing()
    info = init_distributed(config.device)
    try:
        error: Optional[str] = None
        if info.is_main:
            workers = cache_workers if cache_workers is not None else min(os.cpu_count() or 1, 8)
            try:
                # Weights a new run starts from are checked before hours of cache building.
                if config.init_encoder and not (output_dir / CHECKPOINT_NAME).exists():
                    load_init_encoder(config)
                output_dir.mkdir(parents=True, exist_ok=True)
                build_cache(
                    [Path(s) for s in sources], cache_dir, preprocessing,
                    min_shape=(config.view_size,) * 3, num_workers=workers, progress=config.progress,
                )
            except SMITError as failure:
                error = str(failure)
            except OSError as failure:  # a folder that cannot be made or written (a file in the path, a full disk)
                error = describe_os_error(failure)
        error = share_outcome(error)
        if error is not None:
            raise SMITError(error)
        cache = CacheIndex.open(cache_dir)
        if cache_only:
            return cache_dir
        data_summary = {"cache_dir": str(cache_dir), **_json_plain(cache.summary())}
        trainer = PretrainTrainer(config, cache, output_dir, info, data_summary=data_summary, manifest=cache.manifest)
        return trainer.fit()
    finally:
        if info.distributed and dist.is_initialized():
            dist.destroy_process_group()
