"""Settings of a pretraining run: :class:`PretrainConfig`, the choices each option allows, and their checks.

Every option's default and every tuple of allowed values is written here once; the CLI's help and choices and the
losses' checks read them from here.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from nnunet_smit.architectures import SMITConfig
from nnunet_smit.architectures.smit_net import DECODERS
from nnunet_smit.errors import SMITError
from nnunet_smit.pretraining.centering import CENTERING_MODES
from nnunet_smit.pretraining.masking import CubeMaskGenerator
from nnunet_smit.pretraining.model import ObjectiveWeights, check_objectives_and_cube
from nnunet_smit.pretraining.reconstruction_paths import RECONSTRUCT_THROUGH
from nnunet_smit.pretraining.sampler import ViewSampling

# torch.compile's modes.
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
# Autocast: auto = bf16 on GPUs that support it, fp32 on CPU.
PRECISIONS = ("auto", "bf16", "fp16", "fp32")
# Which encoder the export holds.
EXPORTS = ("teacher", "student")

# Fields that may change between a run and its resumption without changing what is trained.
RUNTIME_FIELDS = frozenset(
    {
        "max_steps", "num_workers", "log_every_steps", "checkpoint_every_steps", "checkpoint_every_minutes",
        "preview_every_epochs", "compile", "compile_mode", "export", "device", "progress", "gradient_checkpointing",
        "tensorboard",
    }
)

# Settings of ``smit_pretrain --demo``: the tiny preset on 64^3 views of 3 mm phantoms, 288 steps, chosen so that a
# short CPU run shows every objective learning (docs/pretraining-demo.md has the reasons and the measurements).
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
    # What the reconstruction reads: SMIT's bottleneck (the authors'), or SMITNet's conv blocks on the raw image and
    # the skips ("skips") or its whole decoder ("decoder"), of the ``decoder`` kind, which the export then carries.
    reconstruct_through: str = "bottleneck"
    decoder: str = "smit"
    # Not in SMIT: DINOv2's KoLeo regulariser on the global embedding keeps the teacher input-dependent
    # (docs/pretraining.md, "Teacher collapse").
    weight_koleo: float = 0.1
    head_hidden_dim: int = 2048
    head_bottleneck_dim: int = 256
    head_out_dim: int = 8192
    head_layers: int = 3
    separate_patch_head: bool = True
    student_temp: float = 0.1
    teacher_temp_start: float = 0.04
    # DINO's default, not SMIT's 0.07: with 0.07 the teacher goes back to uniform once the warm-up ends.
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
    num_workers: Optional[int] = None  # None: loader.auto_loader_workers()
    seed: int = 0
    deterministic: bool = False
    max_steps: Optional[int] = None
    checkpoint_every_steps: int = 500
    checkpoint_every_minutes: float = 15.0
    log_every_steps: int = 10
    preview_every_epochs: int = 1
    export: str = "teacher"
    progress: bool = True
    # Also write the scalars of log.jsonl as TensorBoard event files (OUT/tensorboard).
    tensorboard: bool = False

    def __post_init__(self) -> None:
        for name, allowed in (("compile_mode", COMPILE_MODES), ("precision", PRECISIONS), ("export", EXPORTS),
                              ("centering", CENTERING_MODES), ("reconstruct_through", RECONSTRUCT_THROUGH),
                              ("decoder", tuple(DECODERS))):
            if getattr(self, name) not in allowed:
                raise SMITError(f"{name.replace('_', ' ')} must be one of {', '.join(allowed)}, "
                                f"got {getattr(self, name)!r}.")
        if self.batch_size < 1:
            raise SMITError("batch size must be at least 1.")
        if self.view_size % 32 or self.view_size <= 0:
            raise SMITError(f"view size must be a multiple of 32 voxels, got {self.view_size}.")
        if self.epochs < 1:
            raise SMITError("epochs must be at least 1.")
        self._check_ranges()
        self._check_encoder_and_masking()
        self._check_reconstruction_path()

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

    def _check_encoder_and_masking(self) -> None:
        """An unknown preset, a bad encoder override or a mask cube that does not tile the view fails here, before
        hours of cache building."""
        try:
            encoder = self.encoder_config()
        except TypeError as error:
            raise SMITError(f"encoder overrides {self.encoder_overrides}: {error}.") from None
        if not 0.0 <= encoder.drop_path_rate < 1.0:
            raise SMITError(f"drop_path_rate must be in [0, 1), got {encoder.drop_path_rate}.")
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

    def _check_reconstruction_path(self) -> None:
        """A reconstruction path or decoder kind that would train nothing is refused."""
        if self.reconstruct_through != "bottleneck" and self.weight_reconstruction <= 0:
            raise SMITError(f"--reconstruct_through {self.reconstruct_through} trains SMITNet's blocks through the "
                            "reconstruction, which is switched off; give it a positive weight or drop the option.")
        if self.reconstruct_through == "bottleneck" and self.decoder != "smit":
            raise SMITError(f"--decoder {self.decoder} names the decoder whose blocks the reconstruction trains, "
                            "which the bottleneck path has none of; add --reconstruct_through skips or decoder.")

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


def default_of(name: str) -> Any:
    """The default of a :class:`PretrainConfig` field (what ``--help`` shows)."""
    return next(f.default for f in dataclasses.fields(PretrainConfig) if f.name == name)


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
