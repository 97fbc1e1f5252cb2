"""The SMIT Swin-3D encoder.

Key names and numerics follow the authors' released encoder (``patch_embed.*``, ``layers.{i}.blocks.{j}.*``,
``layers.{i}.downsample.*``, ``norm{i}.*``), generalised to any width, depth, heads, window and input size
whose axes are multiples of 32. Window attention runs through ``scaled_dot_product_attention`` with the
relative position bias (and the shifted-window mask) as additive mask, so fused kernels are used where the
hardware has them.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Set, Tuple

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn

from nnunet_smit.architectures.config import MERGE_ORDERS, SMITConfig
from nnunet_smit.architectures.weight_decay import no_weight_decay_names
from nnunet_smit.errors import InputShapeError

Size3 = Tuple[int, int, int]

# Attention logit added between tokens of different regions of a shifted window (the authors' value).
SHIFT_MASK_VALUE = -100.0


@dataclass
class EncoderOutput:
    """What the encoder returns.

    Attributes:
        features: four skip features, stage i of shape (B, C * 2**i, D / 2**(i+1), H / 2**(i+1), W / 2**(i+1));
            empty when the forward pass was asked for none (``with_features=False``).
        merged: the output of each stage's patch merging, stage i of shape
            (B, 2C * 2**i, D / 2**(i+2), ...), a channels-first view of channels-last memory (not contiguous).
            ``merged[2]`` (8C channels at 1/16) is the SMIT distillation tap, ``merged[3]`` the raw bottleneck.
        bottleneck: (B, 16C, D/32, H/32, W/32), the decoder's deepest input; None when the forward pass stopped
            before the last stage (``num_stages`` < 4).
    """

    features: List[torch.Tensor]
    merged: List[torch.Tensor]
    bottleneck: Optional[torch.Tensor]


def relative_position_index(window_size: int) -> torch.Tensor:
    """Index (N, N), N = window_size**3, into the ((2w-1)**3, heads) relative position bias table."""
    coords = torch.stack(
        torch.meshgrid(*[torch.arange(window_size)] * 3, indexing="ij")
    ).flatten(1)  # (3, N)
    rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0) + (window_size - 1)  # (N, N, 3)
    span = 2 * window_size - 1
    return rel[..., 0] * span * span + rel[..., 1] * span + rel[..., 2]


def window_partition(x: torch.Tensor, window: Size3) -> torch.Tensor:
    """(B, D, H, W, C) with each axis a multiple of its window -> (B * num_windows, prod(window), C)."""
    b, d, h, w, c = x.shape
    x = x.view(b, d // window[0], window[0], h // window[1], window[1], w // window[2], window[2], c)
    return x.permute(0, 1, 3, 5, 2, 4, 6, 7).reshape(-1, window[0] * window[1] * window[2], c)


def window_reverse(windows: torch.Tensor, window: Size3, b: int, d: int, h: int, w: int) -> torch.Tensor:
    """Inverse of :func:`window_partition`: (B * num_windows, N, C) -> (B, D, H, W, C)."""
    x = windows.view(b, d // window[0], h // window[1], w // window[2], window[0], window[1], window[2], -1)
    return x.permute(0, 1, 4, 2, 5, 3, 6, 7).reshape(b, d, h, w, -1)


def window_reverse_legacy(windows: torch.Tensor, window: Size3, b: int, d: int, h: int, w: int) -> torch.Tensor:
    """The authors' window reverse: (B * num_windows, N, C) -> (B, D, H, W, C) through the partition's own axis
    permutation, which is not its inverse in 3D, so attention outputs land on permuted token positions.

    Their released weights were trained with this token placement, so it is kept (``legacy_window_reverse``) for
    bit-compatibility with them.
    """
    x = windows.view(b, d // window[0], h // window[1], w // window[2], window[0], window[1], window[2], -1)
    return x.permute(0, 1, 3, 5, 2, 4, 6, 7).reshape(b, d, h, w, -1)


def shifted_window_mask(padded: Size3, window: Size3, shift: Size3, device: torch.device) -> torch.Tensor:
    """Additive mask (num_windows, N, N) separating the regions a cyclic shift brings into one window.

    Regions are labelled on the padded grid as in the standard 3D Swin: per shifted axis the slices
    [0, -window), [-window, -shift) and [-shift, end); an axis without shift is one region. Computed with tensor
    operations only, so ``torch.compile`` can trace it.
    """
    bins = []
    for size, win, sh in zip(padded, window, shift):
        coords = torch.arange(size, device=device)
        bins.append((coords >= size - win).long() + (coords >= size - sh).long() if sh > 0 else coords * 0)
    labels = bins[0][:, None, None] * 9 + bins[1][None, :, None] * 3 + bins[2][None, None, :]  # (D, H, W)
    label_windows = window_partition(labels[None, ..., None], window).squeeze(-1)  # (nW, N)
    different = label_windows[:, None, :] != label_windows[:, :, None]
    return torch.zeros(different.shape, device=device).masked_fill(different, SHIFT_MASK_VALUE)


class DropPath(nn.Module):
    """Stochastic depth per sample (identity in eval mode or at rate 0)."""

    def __init__(self, drop_prob: float = 0.0) -> None:
        super().__init__()
        self.drop_prob = drop_prob

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.drop_prob == 0.0 or not self.training:
            return x
        keep = 1.0 - self.drop_prob
        shape = (x.shape[0],) + (1,) * (x.ndim - 1)
        return x * x.new_empty(shape).bernoulli_(keep).div_(keep)

    def extra_repr(self) -> str:
        return f"drop_prob={self.drop_prob}"


class Mlp(nn.Module):
    """Linear -> exact GELU -> Linear."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


# Fused (memory-efficient) attention on CUDA takes 16-bit inputs only with a head dimension that is a multiple of 8;
# otherwise SDPA falls back to its explicit math path (smit_small's first stage has 48 / 4 = 12 channels per head).
FUSED_HEAD_DIM_MULTIPLE = 8


def fused_head_dim(head_dim: int, device: torch.device, dtype: torch.dtype) -> int:
    """Head dimension to run SDPA with: ``head_dim`` rounded up to a multiple of 8 for 16-bit inputs on CUDA,
    where that keeps the fused kernel; unchanged elsewhere (fp32, or the CPU, whose kernels take any size)."""
    if device.type == "cuda" and dtype in (torch.float16, torch.bfloat16):
        return -(-head_dim // FUSED_HEAD_DIM_MULTIPLE) * FUSED_HEAD_DIM_MULTIPLE
    return head_dim


def attention(qkv: torch.Tensor, attn_mask: torch.Tensor, padded_head_dim: Optional[int] = None) -> torch.Tensor:
    """``softmax(q k^T / sqrt(head_dim) + attn_mask) v`` through SDPA, from the packed projections
    qkv (B, N, 3, heads, head_dim); returns (B, heads, N, head_dim).

    With ``padded_head_dim`` larger than head_dim, q, k and v are zero-padded to it in one copy of the packed tensor
    (which changes no dot product and only adds zero output channels, sliced off again) and the scale stays that of
    the true head_dim.
    """
    head_dim = qkv.shape[-1]
    padded = head_dim if padded_head_dim is None else padded_head_dim
    if padded > head_dim:
        qkv = F.pad(qkv, (0, padded - head_dim))
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (B, heads, N, padded), the last axis contiguous
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, scale=head_dim**-0.5)
    return out[..., :head_dim] if padded > head_dim else out


class WindowAttention(nn.Module):
    """Multi-head self-attention inside 3D windows, with a learned relative position bias."""

    def __init__(self, dim: int, num_heads: int, window_size: int, qkv_bias: bool) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.window_size = window_size
        self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * window_size - 1) ** 3, num_heads))
        # Derived from the window size alone, so it is not part of the state dict.
        self.register_buffer("relative_position_index", relative_position_index(window_size), persistent=False)
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        nn.init.trunc_normal_(self.relative_position_bias_table, std=0.02)

    def forward(self, x: torch.Tensor, shift_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """x: (B * nW, N, C); shift_mask: (nW, N, N) additive, or None. Returns (B * nW, N, C)."""
        bw, n, c = x.shape
        qkv = self.qkv(x).view(bw, n, 3, self.num_heads, c // self.num_heads)
        # A window shrunk to a small grid (MONAI behaviour) reads the top-left block of the full index.
        index = self.relative_position_index[:n, :n].reshape(-1)
        bias = self.relative_position_bias_table[index].view(n, n, self.num_heads).permute(2, 0, 1)
        if shift_mask is None:
            attn_mask = bias.unsqueeze(0).to(qkv.dtype)  # broadcast over windows
        else:
            num_windows = shift_mask.shape[0]
            attn_mask = bias.unsqueeze(0) + shift_mask.unsqueeze(1)  # (nW, heads, N, N)
            attn_mask = attn_mask.to(qkv.dtype).unsqueeze(0).expand(bw // num_windows, -1, -1, -1, -1)
            attn_mask = attn_mask.reshape(bw, self.num_heads, n, n)
        out = attention(qkv, attn_mask, fused_head_dim(qkv.shape[-1], qkv.device, qkv.dtype))
        return self.proj(out.transpose(1, 2).reshape(bw, n, c))


class SwinBlock(nn.Module):
    """Pre-norm Swin block on channels-last tokens (B, D, H, W, C), plain or shifted windows."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        window_size: int,
        shifted: bool,
        mlp_ratio: float,
        qkv_bias: bool,
        drop_path: float,
        layer_norm_eps: float,
        shrink_window_to_grid: bool,
        legacy_window_reverse: bool = False,
    ) -> None:
        super().__init__()
        self.window_size = window_size
        self.reverse = window_reverse_legacy if legacy_window_reverse else window_reverse
        self.shift_size = window_size // 2 if shifted else 0
        self.shrink_window_to_grid = shrink_window_to_grid
        self.norm1 = nn.LayerNorm(dim, eps=layer_norm_eps)
        self.attn = WindowAttention(dim, num_heads, window_size, qkv_bias)
        self.drop_path = DropPath(drop_path)
        self.norm2 = nn.LayerNorm(dim, eps=layer_norm_eps)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self._mask_cache: Dict[Tuple, torch.Tensor] = {}

    def window_and_shift(self, grid: Sequence[int]) -> Tuple[Size3, Size3]:
        """Window and shift per axis for a token grid (D, H, W)."""
        window = [self.window_size] * 3
        shift = [self.shift_size] * 3
        if self.shrink_window_to_grid:
            for a in range(3):
                if grid[a] <= self.window_size:
                    window[a], shift[a] = grid[a], 0
        return tuple(window), tuple(shift)

    def _shift_mask(self, padded: Size3, window: Size3, shift: Size3, device: torch.device) -> torch.Tensor:
        key = (padded, window, shift, device)
        mask = self._mask_cache.get(key)
        if mask is None:
            mask = shifted_window_mask(padded, window, shift, device)
            self._mask_cache[key] = mask
        return mask

    def _attention(self, x: torch.Tensor) -> torch.Tensor:
        b, d, h, w, c = x.shape
        window, shift = self.window_and_shift((d, h, w))
        pads = [(-size) % win for size, win in zip((d, h, w), window)]  # each axis padded by its own amount
        if any(pads):  # F.pad copies even when it pads nothing
            x = F.pad(x, (0, 0, 0, pads[2], 0, pads[1], 0, pads[0]))
        padded = (d + pads[0], h + pads[1], w + pads[2])
        shifted = any(s > 0 for s in shift)
        mask = None
        if shifted:
            x = torch.roll(x, shifts=tuple(-s for s in shift), dims=(1, 2, 3))
            mask = self._shift_mask(padded, window, shift, x.device)
        x = self.reverse(self.attn(window_partition(x, window), mask), window, b, *padded)
        if shifted:
            x = torch.roll(x, shifts=shift, dims=(1, 2, 3))
        return x[:, :d, :h, :w, :] if any(pads) else x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path(self._attention(self.norm1(x)))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class PatchMerging(nn.Module):
    """Concatenate 2x2x2 neighbours (B, D, H, W, C) -> (B, D/2, H/2, W/2, 8C), LayerNorm, Linear to 2C."""

    def __init__(self, dim: int, merge_order: str, layer_norm_eps: float) -> None:
        super().__init__()
        self.offsets = MERGE_ORDERS[merge_order]
        self.norm = nn.LayerNorm(8 * dim, eps=layer_norm_eps)
        self.reduction = nn.Linear(8 * dim, 2 * dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.cat([x[:, a::2, b::2, c::2, :] for a, b, c in self.offsets], dim=-1)
        return self.reduction(self.norm(x))


class SwinStage(nn.Module):
    """The blocks of one stage followed by its patch merging (``layers.{i}``)."""

    def __init__(self, config: SMITConfig, stage: int, drop_path: Sequence[float]) -> None:
        super().__init__()
        dim = config.stage_dims[stage]
        self.blocks = nn.ModuleList(
            SwinBlock(
                dim=dim,
                num_heads=config.num_heads[stage],
                window_size=config.window_size,
                shifted=j % 2 == 1,
                mlp_ratio=config.mlp_ratio,
                qkv_bias=config.qkv_bias,
                drop_path=drop_path[j],
                layer_norm_eps=config.layer_norm_eps,
                shrink_window_to_grid=config.shrink_window_to_grid,
                legacy_window_reverse=config.legacy_window_reverse,
            )
            for j in range(config.depths[stage])
        )
        self.downsample = PatchMerging(dim, config.merge_order, config.layer_norm_eps)
        self.gradient_checkpointing = False

    def run_blocks(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            if self.gradient_checkpointing and torch.is_grad_enabled():
                x = torch.utils.checkpoint.checkpoint(block, x, use_reentrant=False)
            else:
                x = block(x)
        return x


class PatchEmbed(nn.Module):
    """Conv3d(kernel = stride = patch) then an optional LayerNorm; returns channels-last tokens."""

    def __init__(self, config: SMITConfig) -> None:
        super().__init__()
        self.proj = nn.Conv3d(config.in_channels, config.embed_dim, config.patch_size, config.patch_size)
        self.norm = nn.LayerNorm(config.embed_dim, eps=config.layer_norm_eps) if config.patch_norm else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.proj(x).permute(0, 2, 3, 4, 1)  # (B, D/2, H/2, W/2, C)
        return self.norm(x) if self.norm is not None else x


def _channels_first(x: torch.Tensor) -> torch.Tensor:
    return x.permute(0, 4, 1, 2, 3).contiguous()


class SwinEncoder(nn.Module):
    """SMIT Swin-3D encoder.

    Args:
        config: the architecture.
        gradient_checkpointing: recompute each block in the backward pass to save activation memory.

    Input (B, in_channels, D, H, W) with D, H, W multiples of 32; see :class:`EncoderOutput` for outputs.
    """

    def __init__(self, config: SMITConfig, gradient_checkpointing: bool = False) -> None:
        super().__init__()
        self.config = config
        self.patch_embed = PatchEmbed(config)
        rates = torch.linspace(0, config.drop_path_rate, sum(config.depths)).tolist()
        starts = [sum(config.depths[:i]) for i in range(4)]
        self.layers = nn.ModuleList(
            SwinStage(config, i, rates[starts[i] : starts[i] + config.depths[i]]) for i in range(4)
        )
        if config.stage_outputs == "smit":
            for i, dim in enumerate(config.stage_dims):
                self.add_module(f"norm{i}", nn.LayerNorm(dim, eps=config.layer_norm_eps))
        self.apply(_init_weights)
        self.set_gradient_checkpointing(gradient_checkpointing)

    def no_weight_decay(self) -> Set[str]:
        """Names of the parameters that take no weight decay (norms, biases, relative position tables), by the
        project's one rule (:mod:`nnunet_smit.architectures.weight_decay`)."""
        return no_weight_decay_names(self.named_parameters())

    def set_gradient_checkpointing(self, enabled: bool) -> None:
        for stage in self.layers:
            stage.gradient_checkpointing = enabled

    def check_input_size(self, spatial: Sequence[int]) -> None:
        """Raise :class:`InputShapeError` unless every spatial axis is a positive multiple of 32."""
        divisor = self.config.size_divisor
        if len(spatial) != 3 or any(s <= 0 or s % divisor for s in spatial):
            raise InputShapeError(
                f"SMIT needs every spatial axis to be a multiple of {divisor} (patch 2 x four 2x merges); "
                f"got {tuple(spatial)}: crop or pad the input to e.g. "
                f"{tuple(max(divisor, -(-s // divisor) * divisor) for s in spatial)}."
            )

    def forward(
        self,
        x: torch.Tensor,
        token_mask: Optional[torch.Tensor] = None,
        mask_token: Optional[torch.Tensor] = None,
        with_features: bool = True,
        num_stages: int = 4,
    ) -> EncoderOutput:
        """x: (B, C_in, D, H, W). token_mask: bool (B, D/2, H/2, W/2), True where the patch token is replaced by
        ``mask_token`` (1, 1, C) after the patch embedding and its norm (masked image modelling).
        ``with_features=False`` leaves ``features`` empty (pretraining reads only ``merged`` and ``bottleneck``;
        the four normalised, channels-first copies of the stage outputs are then not made). ``num_stages`` < 4
        runs only the first stages (blocks and merge) and returns no bottleneck (a pretraining teacher reads only
        the stage-2 merge)."""
        if not 1 <= num_stages <= len(self.layers):
            raise ValueError(f"num_stages must lie in [1, {len(self.layers)}], got {num_stages}.")
        if x.ndim != 5:
            raise InputShapeError(f"SMIT expects a 5-D input (B, C, D, H, W); got shape {tuple(x.shape)}.")
        self.check_input_size(x.shape[2:])
        tokens = self.patch_embed(x)
        if token_mask is not None:
            if mask_token is None:
                raise ValueError("token_mask needs a mask_token to put in place of the masked tokens.")
            if token_mask.shape != tokens.shape[:4]:
                raise InputShapeError(
                    f"token_mask must have the patch-grid shape {tuple(tokens.shape[:4])}, got {tuple(token_mask.shape)}."
                )
            tokens = torch.where(token_mask.unsqueeze(-1), mask_token.to(tokens.dtype).view(1, 1, 1, 1, -1), tokens)

        features: List[torch.Tensor] = []
        merged: List[torch.Tensor] = []
        monai_outputs = self.config.stage_outputs == "monai"
        for i, stage in enumerate(self.layers[:num_stages]):
            if monai_outputs and with_features:
                features.append(_channels_first(F.layer_norm(tokens, tokens.shape[-1:])))
            tokens = stage.run_blocks(tokens)
            if not monai_outputs and with_features:
                features.append(_channels_first(getattr(self, f"norm{i}")(tokens)))
            tokens = stage.downsample(tokens)
            merged.append(tokens.permute(0, 4, 1, 2, 3))  # a view: the tap reads it back as tokens without a copy
        if num_stages < len(self.layers):
            bottleneck = None
        elif monai_outputs:
            bottleneck = _channels_first(F.layer_norm(tokens, tokens.shape[-1:]))
        else:
            bottleneck = _channels_first(tokens)
        return EncoderOutput(features=features, merged=merged, bottleneck=bottleneck)


def _init_weights(module: nn.Module) -> None:
    if isinstance(module, nn.Linear):
        nn.init.trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)
