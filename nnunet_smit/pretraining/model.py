"""SMIT pretraining meta-architecture: student, EMA teacher, heads, mask token and the three objectives.

The student sees masked views (masked patch tokens replaced by a learned ``mask_token`` after the patch embedding
and its norm); the teacher, an exponential moving average of the student, sees the whole views. Both tap the tokens
after the stage-2 patch merging (8C channels at 1/16 of the view, one token per 16^3 mask cube), normalise them
(LayerNorm, eps 1e-6) and average them into a global token. The teacher exists in every run, whichever objectives
are on: without DINO and iBOT it runs no forward pass but still follows the student, so that the export can take the
same side whatever the objectives. Objectives:

* DINO: global token of the teacher on one view vs. the student's on the other view.
* iBOT: patch tokens of the student on masked positions vs. the teacher's on the same positions of the same view.
* Reconstruction: the student's bottleneck (16C at 1/32) through a 1x1x1 conv and a 3D pixel shuffle back to the
  view, or through SMITNet's own conv blocks (``reconstruct_through``, :mod:`~nnunet_smit.pretraining.
  reconstruction_paths`), L1 on masked voxels (:mod:`~nnunet_smit.pretraining.reconstruction_loss`, with its trivial
  baselines).
* KoLeo (not in SMIT, on by default): spreads the student's global embeddings (the DINO head's L2-normalised
  bottleneck) of the different scans of a view slot, DINOv2's regulariser, here against a teacher whose output
  becomes the same for every scan (docs/pretraining.md, "Teacher collapse").

The module knows nothing about data loading or compiling; the trainer feeds it views and cube masks, and
:class:`~nnunet_smit.pretraining.step.StepRunner` decides how the device part runs.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Mapping, Optional, Tuple

import torch
import torch.nn as nn

from nnunet_smit.architectures import SMITConfig, SwinEncoder
from nnunet_smit.errors import SMITError
from nnunet_smit.pretraining.dino_loss import DINOLoss
from nnunet_smit.pretraining.heads import DINOHead, ReconstructionHead
from nnunet_smit.pretraining.ibot_loss import IBOTPatchLoss
from nnunet_smit.pretraining.koleo_loss import koleo_loss
from nnunet_smit.pretraining.masking import cube_mask_to_grid, upsample_mask
from nnunet_smit.pretraining.reconstruction_loss import RECONSTRUCTION_BASELINES, masked_l1, reconstruction_baselines
from nnunet_smit.pretraining.reconstruction_paths import ConvReconstructionHead

# Voxels per token edge at the distillation tap: patch embedding (2) x three merges (2^3).
TAP_STRIDE = 16
TAP_STAGE = 2
# What the device part measures beside the loss terms (not part of the loss): the reconstruction loss's trivial
# baselines, and the mean entropy of the iBOT teacher's distribution over the masked patch tokens.
MONITORS = (*RECONSTRUCTION_BASELINES, "teacher_patch_entropy")


@dataclass
class ObjectiveWeights:
    """Loss weights; a weight of 0 switches the objective off (its head is not built).

    ``koleo`` weighs the KoLeo regulariser of the student's global embeddings (the global token itself when DINO
    is off); a regulariser, not an objective of its own: at least one of the other three must be on.
    """

    dino: float = 0.1
    ibot: float = 0.1
    reconstruction: float = 1.0
    koleo: float = 0.1

    def enabled(self) -> Dict[str, bool]:
        return {"dino": self.dino > 0, "ibot": self.ibot > 0, "reconstruction": self.reconstruction > 0}


@dataclass
class HeadConfig:
    """Sizes of the DINO/iBOT heads (SMIT: 2048 hidden, 256 bottleneck, 8192 prototypes, 3 layers)."""

    hidden_dim: int = 2048
    bottleneck_dim: int = 256
    out_dim: int = 8192
    num_layers: int = 3


@dataclass
class StudentOutput:
    """Student (or teacher) outputs for a batch of N = V*B views.

    Attributes:
        global_token: (N, 8C) global tokens (mean of the normalised tap tokens), or None.
        global_embedding: (N, bottleneck) L2-normalised bottleneck of the DINO head, or None.
        global_logits: (N, K) or None.
        patch_logits: (M, K) logits of the M masked tap tokens, or None.
        reconstruction: (N, C_in, D, H, W) or None (teacher: always None).
    """

    global_token: Optional[torch.Tensor] = None
    global_embedding: Optional[torch.Tensor] = None
    global_logits: Optional[torch.Tensor] = None
    patch_logits: Optional[torch.Tensor] = None
    reconstruction: Optional[torch.Tensor] = None


def check_objectives_and_cube(weights: ObjectiveWeights, mask_cube_size: int) -> None:
    """Raise SMITError when every objective is off or the mask cube does not line up with the tap tokens."""
    if not any(weights.enabled().values()):
        raise SMITError("All pretraining objectives are switched off; give at least one a positive weight.")
    if TAP_STRIDE % int(mask_cube_size) and int(mask_cube_size) % TAP_STRIDE:
        raise SMITError(f"mask cube size {mask_cube_size} must divide or be a multiple of {TAP_STRIDE} voxels.")


def tap_tokens(merged: torch.Tensor) -> torch.Tensor:
    """(N, 8C, d, h, w) stage-2 merge output -> (N, d*h*w, 8C) tokens in C order over (d, h, w)."""
    return merged.flatten(2).transpose(1, 2)


class EncoderWithHeads(nn.Module):
    """Encoder, tap norm, heads, mask token and reconstruction head of one side: the student, and (without mask
    token and reconstruction head) the teacher.

    Args:
        config: encoder architecture.
        weights: which objectives are on (decides which heads exist).
        heads: DINO/iBOT head sizes.
        separate_patch_head: SMIT uses separate heads for global and patch tokens; False shares one.
        with_reconstruction: build the reconstruction head (student only).
        gradient_checkpointing: recompute encoder blocks in backward.
        reconstruct_through: ``"bottleneck"`` (SMIT's head), ``"skips"`` or ``"decoder"`` (SMITNet's conv blocks of
            ``decoder`` kind, :class:`~nnunet_smit.pretraining.reconstruction_paths.ConvReconstructionHead`).
        decoder: SMITNet's decoder kind whose blocks ``skips`` and ``decoder`` train.
    """

    def __init__(
        self,
        config: SMITConfig,
        weights: ObjectiveWeights,
        heads: HeadConfig,
        separate_patch_head: bool = True,
        with_reconstruction: bool = True,
        gradient_checkpointing: bool = False,
        reconstruct_through: str = "bottleneck",
        decoder: str = "smit",
    ) -> None:
        super().__init__()
        tap_dim = config.stage_dims[TAP_STAGE] * 2
        enabled = weights.enabled()
        self.encoder = SwinEncoder(config, gradient_checkpointing=gradient_checkpointing)
        self.tap_norm = nn.LayerNorm(tap_dim, eps=1e-6)
        head_kwargs = dict(
            out_dim=heads.out_dim, hidden_dim=heads.hidden_dim, bottleneck_dim=heads.bottleneck_dim,
            num_layers=heads.num_layers,
        )
        self.global_head = DINOHead(tap_dim, **head_kwargs) if enabled["dino"] else None
        self.patch_head: Optional[DINOHead] = None
        if enabled["ibot"]:
            # Shared head (separate_patch_head=False): _patch_head() falls back to the global head.
            if separate_patch_head or self.global_head is None:
                self.patch_head = DINOHead(tap_dim, **head_kwargs)
        self.recon_head: Optional[nn.Module] = None
        if with_reconstruction and enabled["reconstruction"]:
            self.recon_head = (
                ReconstructionHead(config.bottleneck_dim, config.in_channels, config.size_divisor)
                if reconstruct_through == "bottleneck" else ConvReconstructionHead(config, reconstruct_through, decoder)
            )
        # Whether forward runs the reconstruction (a teacher may keep an EMA of the trained conv blocks, never run).
        self.reconstructs = self.recon_head is not None
        self.mask_token = nn.Parameter(torch.zeros(1, 1, config.embed_dim)) if with_reconstruction else None
        if self.mask_token is not None:
            nn.init.trunc_normal_(self.mask_token, std=0.02)
        self.patch_head_enabled = enabled["ibot"]
        self.global_token_wanted = with_reconstruction and weights.koleo > 0

    def _patch_head(self) -> Optional[DINOHead]:
        if not self.patch_head_enabled:
            return None
        return self.patch_head if self.patch_head is not None else self.global_head

    def head_modules(self) -> List[DINOHead]:
        return [h for h in (self.global_head, self.patch_head) if h is not None]

    def forward(
        self, views: torch.Tensor, token_mask: Optional[torch.Tensor], patch_index: Optional[torch.Tensor]
    ) -> StudentOutput:
        """Run one side.

        Args:
            views: (N, C_in, D, H, W).
            token_mask: bool (N, D/2, H/2, W/2) masked patch tokens, or None for the unmasked teacher pass.
            patch_index: long (M,) tap tokens whose patch logits are wanted, as rows of the (N * T) tap tokens
                (view-major, T = D/16 * H/16 * W/16 per view, see :func:`masked_tap_index`), or None.
        """
        # Only the reconstruction reads the last stage: without it (the teacher) the encoder stops at the tap.
        conv_head = self.reconstructs and isinstance(self.recon_head, ConvReconstructionHead)
        out = self.encoder(
            views, token_mask=token_mask, mask_token=self.mask_token if token_mask is not None else None,
            with_features=conv_head, num_stages=4 if self.reconstructs else TAP_STAGE + 1,
        )
        result = StudentOutput()
        need_tap = self.global_head is not None or self.patch_head_enabled or self.global_token_wanted
        if need_tap:
            tokens = self.tap_norm(tap_tokens(out.merged[TAP_STAGE]))
            result.global_token = tokens.mean(dim=1)
            if self.global_head is not None:
                result.global_embedding = self.global_head.embed(result.global_token)
                result.global_logits = self.global_head.last_layer(result.global_embedding)
            patch_head = self._patch_head()
            if patch_head is not None and patch_index is not None:
                # A gather with indices known in advance: unlike a boolean selection, it does not wait for the
                # device to count the selected tokens.
                result.patch_logits = patch_head(tokens.flatten(0, 1).index_select(0, patch_index))
        if conv_head:
            # Hidden where the encoder saw the mask token: every voxel of a masked cube (and no more, for cubes of
            # 2 voxels or more).
            hidden = (upsample_mask(token_mask, self.encoder.config.patch_size) if token_mask is not None
                      else torch.zeros_like(views[:, 0], dtype=torch.bool))
            result.reconstruction = self.recon_head(views, hidden, out.features, out.bottleneck)
        elif self.reconstructs:
            result.reconstruction = self.recon_head(out.bottleneck)
        return result


def to_device_async(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Copy a host tensor to ``device`` without the host waiting: to a GPU through pinned memory (a copy from
    pageable memory may wait for the device's queue)."""
    if device.type == "cuda":
        return tensor.pin_memory().to(device, non_blocking=True)
    return tensor.to(device)


def masked_tap_index(tap_mask: torch.Tensor) -> torch.Tensor:
    """bool (N, d, h, w) tap mask -> long (M,) indices of its True cells as rows of the (N * d*h*w) tap tokens."""
    return tap_mask.flatten().nonzero().squeeze(1)


@dataclass
class LossOutput:
    """Total loss, its terms (floats, detached), what is measured beside them (:data:`MONITORS`, those that apply)
    and tensors for monitoring and previews."""

    total: torch.Tensor
    terms: Dict[str, torch.Tensor] = field(default_factory=dict)
    monitors: Dict[str, torch.Tensor] = field(default_factory=dict)
    teacher_global_probs: Optional[torch.Tensor] = None
    preview: Optional[Dict[str, torch.Tensor]] = None


@dataclass
class StepInputs:
    """A step's inputs as the device part takes them (:meth:`SMITPretrainModel.prepare_inputs`).

    Attributes:
        x: (N, C_in, D, H, W) views, view-major (N = V*B).
        host_masks: bool (N, D/cube, H/cube, W/cube) cube masks on the host (for the preview).
        masks: the same on the views' device.
        patch_index: long (M,) masked tap tokens (:func:`masked_tap_index`), on the device.
        token_view: long (M,) the view of each of them, on the device.
        teacher_temp: 0-d float tensor (a tensor, so that a changing temperature does not recompile).
        num_views: views per scan (V).
    """

    x: torch.Tensor
    host_masks: torch.Tensor
    masks: torch.Tensor
    patch_index: torch.Tensor
    token_view: torch.Tensor
    teacher_temp: torch.Tensor
    num_views: int

    def device_arguments(self, update_centers: bool) -> Tuple[Any, ...]:
        """The arguments of :meth:`SMITPretrainModel.losses_on_device` after the student."""
        return (self.x, self.masks, self.patch_index, self.token_view, self.teacher_temp, self.num_views,
                update_centers)


class SMITPretrainModel(nn.Module):
    """Student + EMA teacher + losses of SMIT pretraining.

    Args:
        config: encoder architecture (any preset).
        weights: objective weights; 0 switches an objective off.
        heads: DINO/iBOT head sizes.
        mask_cube_size: voxels per masking cube edge (16).
        student_temp: student softmax temperature (0.1).
        center_momentum: EMA momentum of the teacher centers (0.9).
        centering: teacher centering of both losses, ``"sinkhorn_knopp"`` or ``"center"`` (running mean).
        separate_patch_head: separate heads for global and patch tokens (SMIT: True).
        gradient_checkpointing: recompute student encoder blocks in backward (the teacher needs no gradients).
        reconstruct_through: ``"bottleneck"`` (SMIT), ``"skips"`` or ``"decoder"``: what the reconstruction reads
            (:mod:`~nnunet_smit.pretraining.reconstruction_paths`).
        decoder: SMITNet's decoder kind whose blocks ``skips`` and ``decoder`` train (``"smit"`` or ``"light"``).
    """

    def __init__(
        self,
        config: SMITConfig,
        weights: Optional[ObjectiveWeights] = None,
        heads: Optional[HeadConfig] = None,
        mask_cube_size: int = 16,
        student_temp: float = 0.1,
        center_momentum: float = 0.9,
        centering: str = "center",
        separate_patch_head: bool = True,
        gradient_checkpointing: bool = False,
        reconstruct_through: str = "bottleneck",
        decoder: str = "smit",
    ) -> None:
        super().__init__()
        self.config = config
        self.weights = weights or ObjectiveWeights()
        heads = heads or HeadConfig()
        check_objectives_and_cube(self.weights, mask_cube_size)
        enabled = self.weights.enabled()
        self.mask_cube_size = int(mask_cube_size)
        self.student = EncoderWithHeads(config, self.weights, heads, separate_patch_head, True, gradient_checkpointing,
                                        reconstruct_through, decoder)
        # Whether the teacher runs forward (DINO or iBOT); it is kept, and follows the student, in every run.
        self.distills = enabled["dino"] or enabled["ibot"]
        self.teacher = self._copy_student_as_teacher()
        loss_kwargs = dict(student_temp=student_temp, center_momentum=center_momentum, centering=centering)
        self.dino_loss = DINOLoss(heads.out_dim, **loss_kwargs) if enabled["dino"] else None
        self.ibot_loss = IBOTPatchLoss(heads.out_dim, **loss_kwargs) if enabled["ibot"] else None

    def _copy_student_as_teacher(self) -> EncoderWithHeads:
        """The teacher starts as an exact copy of the student without mask token; with reconstruction alone it is
        the encoder and the tap norm. It never reconstructs, but keeps an EMA of a conv reconstruction head (SMITNet's
        blocks, exported with the teacher's encoder); SMIT's bottleneck head it drops."""
        teacher = copy.deepcopy(self.student)
        if not isinstance(teacher.recon_head, ConvReconstructionHead):
            teacher.recon_head = None
        teacher.reconstructs = False
        teacher.mask_token = None
        teacher.encoder.set_gradient_checkpointing(False)
        for p in teacher.parameters():
            p.requires_grad_(False)
        teacher.eval()
        return teacher

    def train(self, mode: bool = True) -> "SMITPretrainModel":
        """Only the student changes mode: the teacher always runs in eval mode (no drop path)."""
        super().train(mode)
        self.teacher.eval()
        return self

    # ------------------------------------------------------------------------------------------------------
    def teacher_student_pairs(self) -> Tuple[List[torch.Tensor], List[torch.Tensor]]:
        """Matching (teacher, student) parameter lists for the EMA update."""
        student_params = dict(self.student.named_parameters())
        teacher_list, student_list = [], []
        for name, t in self.teacher.named_parameters():
            teacher_list.append(t)
            student_list.append(student_params[name])
        return teacher_list, student_list

    @torch.no_grad()
    def update_teacher(self, momentum: float) -> None:
        """teacher <- momentum * teacher + (1 - momentum) * student, for every teacher parameter."""
        teacher_list, student_list = self.teacher_student_pairs()
        torch._foreach_mul_(teacher_list, momentum)
        torch._foreach_add_(teacher_list, student_list, alpha=1.0 - momentum)

    def with_teacher_state(self, saved: Mapping[str, torch.Tensor]) -> Tuple[Dict[str, torch.Tensor], bool]:
        """(``saved``, a state dict of this model, with the teacher's entries; whether they had to be copied from the
        student's): states written before every run kept a teacher (reconstruction alone) hold none."""
        if any(key.startswith("teacher.") for key in saved):
            return dict(saved), False
        copied = {f"teacher.{name}": saved[f"student.{name}"] for name in self.teacher.state_dict()}
        return {**saved, **copied}, True

    def last_layer_parameters(self) -> List[nn.Parameter]:
        """Prototype-layer parameters of the student heads (frozen in the first epoch)."""
        return [p for head in self.student.head_modules() for p in head.last_layer_parameters()]

    def cancel_last_layer_gradients(self) -> None:
        for p in self.last_layer_parameters():
            p.grad = None

    # ------------------------------------------------------------------------------------------------------
    def compute_losses(
        self,
        views: torch.Tensor,
        cube_masks: torch.Tensor,
        teacher_temp: float,
        update_centers: bool = True,
        with_preview: bool = False,
    ) -> LossOutput:
        """Forward student and teacher eagerly and compute the weighted SMIT loss (a compiled or data-parallel step
        runs through :class:`~nnunet_smit.pretraining.step.StepRunner`, which calls the same three parts).

        Args:
            views: (B, V, C_in, D, H, W) float, V views of each of B scans.
            cube_masks: bool (B, V, D/cube, H/cube, W/cube), True where the student's view is masked; best on the
                CPU, as the loader delivers them (on the device they are copied back once).
            teacher_temp: current teacher temperature.
            update_centers: update the DINO/iBOT centers with this step's teacher outputs.
            with_preview: also return the first view's input, mask and reconstruction (detached, on CPU).

        Returns:
            :class:`LossOutput` with the total loss and the unweighted terms ``dino``, ``ibot``, ``reconstruction``
            and ``koleo`` (those switched on).
        """
        inputs = self.prepare_inputs(views, cube_masks, teacher_temp)
        outputs = self.losses_on_device(self.student, *inputs.device_arguments(update_centers))
        return self.loss_output(outputs, inputs, with_preview)

    def prepare_inputs(self, views: torch.Tensor, cube_masks: torch.Tensor, teacher_temp: float) -> "StepInputs":
        """The host part of a step before the device part: views in view-major order, and the masks with the
        masked tap tokens' indices counted on the host, where the masks come from, and sent along with them, so
        that no step waits for the device to count them."""
        device = views.device
        x = views.transpose(0, 1).flatten(0, 1)  # rows [v*B:(v+1)*B] hold view v of every scan
        host_masks = cube_masks.transpose(0, 1).flatten(0, 1).cpu()
        tap_host = cube_mask_to_grid(host_masks, self.mask_cube_size, TAP_STRIDE)
        patch_index_host = masked_tap_index(tap_host)
        token_view_host = patch_index_host // tap_host[0].numel()
        masks, patch_index, token_view = (
            to_device_async(t, device) for t in (host_masks, patch_index_host, token_view_host)
        )
        temperature = torch.full((), float(teacher_temp), dtype=torch.float32, device=device)
        return StepInputs(x, host_masks, masks, patch_index, token_view, temperature, views.shape[1])

    def loss_output(self, outputs: Dict[str, torch.Tensor], inputs: "StepInputs", with_preview: bool) -> LossOutput:
        """The device part's outputs as a :class:`LossOutput`, with the preview when asked for."""
        outputs = dict(outputs)
        result = LossOutput(
            total=outputs.pop("total"),
            teacher_global_probs=outputs.pop("teacher_global_probs", None),
        )
        reconstruction = outputs.pop("reconstruction_output", None)
        result.monitors = {name: outputs.pop(name) for name in MONITORS if name in outputs}
        result.terms = outputs
        if with_preview:
            voxels = cube_mask_to_grid(inputs.host_masks[:1], self.mask_cube_size, 1)
            result.preview = {
                "input": inputs.x[0, 0].detach().float().cpu(),
                "mask": voxels[0].cpu(),
                "reconstruction": reconstruction[0, 0].detach().float().cpu() if reconstruction is not None else None,
            }
        return result

    def losses_on_device(
        self,
        student: Callable[..., StudentOutput],
        x: torch.Tensor,
        masks: torch.Tensor,
        patch_index: torch.Tensor,
        token_view: torch.Tensor,
        teacher_temp: torch.Tensor,
        num_views: int,
        update_centers: bool,
    ) -> Dict[str, torch.Tensor]:
        """The device part of :meth:`compute_losses`: student and teacher passes and the weighted loss.

        Free of host synchronisation and data-dependent shapes, so the device never waits for the host's next
        command and ``torch.compile`` can trace it whole (:meth:`~nnunet_smit.pretraining.step.StepRunner.compile`).

        Args:
            student: the callable that runs the student.
            x: (N, C_in, D, H, W) views, view-major.
            masks: bool (N, D/cube, H/cube, W/cube) cube masks on the device.
            patch_index: long (M,) masked tap tokens (:func:`masked_tap_index`).
            token_view: long (M,) the view of each of them.
            teacher_temp: 0-d float tensor (a tensor, so that a changing temperature does not recompile).
            num_views: views per scan.
            update_centers: update the DINO/iBOT centers.

        Returns:
            ``total``, the unweighted terms, ``teacher_global_probs`` (detached) when DINO is on,
            ``reconstruction_output`` (the student's reconstruction, detached) and the reconstruction baselines when
            reconstruction is on, and ``teacher_patch_entropy`` when iBOT is on.
        """
        token_mask = cube_mask_to_grid(masks, self.mask_cube_size, self.config.patch_size)
        s_out = student(x, token_mask, patch_index)
        outputs: Dict[str, torch.Tensor] = {}
        if self.distills:
            self._distillation_losses(s_out, x, patch_index, token_view, teacher_temp, num_views, update_centers,
                                      outputs)
        if self.weights.koleo > 0:
            # Per view slot, over the scans of the batch: the two views of one scan are not pushed apart. On the
            # embedding the prototypes are compared with: its spread is what makes the teacher input-dependent.
            spread = s_out.global_embedding if s_out.global_embedding is not None else s_out.global_token
            outputs["koleo"] = torch.stack([koleo_loss(t) for t in spread.chunk(num_views)]).mean()
        if s_out.reconstruction is not None:
            outputs["reconstruction"] = masked_l1(s_out.reconstruction, x, masks, self.mask_cube_size)
            outputs["reconstruction_output"] = s_out.reconstruction.detach()
            outputs.update(reconstruction_baselines(x, masks, self.mask_cube_size, self.config.size_divisor))
        total = x.new_zeros((), dtype=torch.float32)
        for name in ("dino", "ibot", "koleo", "reconstruction"):  # the order of the sum, fixed
            if name in outputs:
                total = total + getattr(self.weights, name) * outputs[name]
        outputs["total"] = total
        return outputs

    def _distillation_losses(
        self, s_out: StudentOutput, x: torch.Tensor, patch_index: torch.Tensor, token_view: torch.Tensor,
        teacher_temp: torch.Tensor, num_views: int, update_centers: bool, outputs: Dict[str, torch.Tensor],
    ) -> None:
        """The teacher's pass, and DINO (global token across views) and iBOT (masked patch tokens, same view)
        into ``outputs``, with the teacher's global probabilities; updates the centers after the losses."""
        with torch.no_grad():
            t_out = self.teacher(x, None, patch_index)
        if self.dino_loss is not None:
            t_probs = self.dino_loss.teacher_probs(t_out.global_logits, teacher_temp)
            outputs["dino"] = self.dino_loss(s_out.global_logits.chunk(num_views), t_probs.chunk(num_views))
            outputs["teacher_global_probs"] = t_probs.detach()
            if update_centers:
                self.dino_loss.update_center(t_out.global_logits)
        if self.ibot_loss is not None:
            t_probs = self.ibot_loss.teacher_probs(t_out.patch_logits, teacher_temp)
            outputs["ibot"] = self.ibot_loss(s_out.patch_logits, t_probs, token_view, x.shape[0])
            outputs["teacher_patch_entropy"] = mean_entropy(t_probs.detach().float())
            if update_centers:
                self.ibot_loss.update_center(t_out.patch_logits)


def mean_entropy(probs: torch.Tensor) -> torch.Tensor:
    """Mean entropy (nats) of the rows of (N, K) probabilities, 0-d; 0 for no row."""
    entropy = -(probs * (probs + 1e-12).log()).sum(dim=-1)
    return entropy.sum() / max(entropy.numel(), 1)


def teacher_collapse_stats(probs: torch.Tensor) -> Dict[str, float]:
    """Collapse indicators of (N, K) teacher probabilities.

    Returns:
        ``entropy``: mean per-sample entropy (near log K: collapse to uniform);
        ``marginal_entropy``: entropy of the batch-mean distribution (near 0: collapse to one prototype);
        ``dim_std``: per-prototype standard deviation across samples, averaged (near 0: every sample alike).
    """
    probs = probs.float()
    entropy = mean_entropy(probs)
    marginal_entropy = mean_entropy(probs.mean(dim=0, keepdim=True))
    dim_std = probs.std(dim=0, unbiased=False).mean() if probs.shape[0] > 1 else probs.new_zeros(())
    return {"entropy": float(entropy), "marginal_entropy": float(marginal_entropy), "dim_std": float(dim_std)}
