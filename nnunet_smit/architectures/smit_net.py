"""SMITNet: the Swin-3D encoder with a convolutional decoder (the authors' or the light one), plus fixed input
intensity mapping."""
from __future__ import annotations

from typing import List, Mapping, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from nnunet_smit.architectures.config import SMITConfig
from nnunet_smit.architectures.decoder import SMITDecoder
from nnunet_smit.architectures.light_decoder import SMITLightDecoder
from nnunet_smit.architectures.swin_encoder import SwinEncoder

# Decoder kinds: "smit" is the authors' (their weights load into it), "light" narrows the top two resolutions.
DECODERS = {"smit": SMITDecoder, "light": SMITLightDecoder}


class IntensityMapping(nn.Module):
    """Map nnU-Net CT-normalised input back onto the HU window the encoder was pretrained on.

    Per channel c with statistics: HU = x * std[c] + mean[c] (undoing nnU-Net's ``CTNormalization``, which clipped
    to [clip_low, clip_high] first, so the HU inside that range is recovered exactly), then clip to ``hu_window``
    and map linearly onto ``scaled_range``. Channels whose mean is ``None`` pass through unchanged. Everything is
    a fixed, non-persistent buffer: no parameters, no state-dict keys.

    Padding: nnU-Net pads patches with exactly 0 in its normalised space (the training loader and the sliding
    window alike), which is the foreground mean in HU (soft tissue). Pretraining padded with the bottom of
    ``scaled_range`` (air). With ``pad_value`` given (the pretraining's pad, ``scaled_range[0]``), a mapped input of
    exactly 0 is taken for nnU-Net's padding and becomes ``pad_value``; None keeps nnU-Net's padding as it is (networks
    trained before this mapping existed). A real voxel is exactly 0 only when its HU equals the foreground mean to
    float precision; it then reads as padding too.
    """

    def __init__(
        self,
        mean: Sequence[Optional[float]],
        std: Sequence[Optional[float]],
        hu_window: Tuple[float, float] = (-175.0, 250.0),
        scaled_range: Tuple[float, float] = (0.0, 1.0),
        pad_value: Optional[float] = None,
    ) -> None:
        super().__init__()
        if len(mean) != len(std):
            raise ValueError("mean and std need one entry per channel.")
        mapped = [m is not None for m in mean]
        self.register_buffer("mapped", torch.tensor(mapped).view(1, -1, 1, 1, 1), persistent=False)
        self.register_buffer(
            "mean", torch.tensor([m if m is not None else 0.0 for m in mean]).view(1, -1, 1, 1, 1), persistent=False
        )
        self.register_buffer(
            "std", torch.tensor([s if s is not None else 1.0 for s in std]).view(1, -1, 1, 1, 1), persistent=False
        )
        self.hu_window = (float(hu_window[0]), float(hu_window[1]))
        self.scaled_range = (float(scaled_range[0]), float(scaled_range[1]))
        self.pad_value = None if pad_value is None else float(pad_value)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, C, D, H, W) -> same shape."""
        lo, hi = self.hu_window
        out_lo, out_hi = self.scaled_range
        hu = (x * self.std + self.mean).clamp(lo, hi)
        scaled = (hu - lo) * ((out_hi - out_lo) / (hi - lo)) + out_lo
        if self.pad_value is not None:
            scaled = torch.where(x == 0, torch.full_like(scaled, self.pad_value), scaled)
        return torch.where(self.mapped, scaled.to(x.dtype), x)

    def extra_repr(self) -> str:
        return (f"channels={self.mapped.numel()}, hu_window={self.hu_window}, scaled_range={self.scaled_range}, "
                f"pad_value={self.pad_value}")


def inverse_permutation(order: Sequence[int]) -> Tuple[int, ...]:
    """The permutation that undoes ``order`` (nnU-Net's transpose_backward of its transpose_forward)."""
    inverse = [0] * len(order)
    for position, axis in enumerate(order):
        inverse[int(axis)] = position
    return tuple(inverse)


class SMITNet(nn.Module):
    """SMIT encoder-decoder for 3D segmentation.

    Args:
        config: encoder architecture (its ``in_channels`` is replaced by ``in_channels``).
        in_channels: input channels C_in.
        num_classes: output channels (logits).
        norm: decoder normalisation, ``"instance"`` (nnU-Net's default) or ``"batch"`` (the authors').
        deep_supervision: return logits at [1, 1/2, 1/4, 1/8, 1/16]; toggled later via ``decoder.deep_supervision``.
        feature_size: decoder width F; defaults to the encoder's ``embed_dim`` (the decoder's skips assume it).
        input_mapping: optional fixed intensity mapping applied to the input first.
        gradient_checkpointing: recompute encoder blocks in backward.
        decoder: ``"smit"``, the authors' decoder (the default), or ``"light"``, :class:`SMITLightDecoder` with
            narrow full- and half-resolution stages (16 and 32 channels); both give the same deep-supervision
            outputs.
        input_axes: nnU-Net's ``transpose_forward``: the input's spatial axis i is the encoder's (z, y, x) axis
            ``input_axes[i]`` (nnU-Net stores and trains on arrays with the largest-spacing axis first). The input is
            put back into (z, y, x), the order of the pretraining cache, before the encoder, and the logits are
            returned in the input's order. None or (0, 1, 2): the input is already (z, y, x).

    Input (B, C_in, D, H, W) with every axis a multiple of 32; output logits (B, num_classes, D, H, W), both in the
    order ``input_axes`` describes.
    """

    def __init__(
        self,
        config: SMITConfig,
        in_channels: int,
        num_classes: int,
        norm: str = "instance",
        deep_supervision: bool = False,
        feature_size: Optional[int] = None,
        input_mapping: Optional[IntensityMapping] = None,
        gradient_checkpointing: bool = False,
        decoder: str = "smit",
        input_axes: Optional[Sequence[int]] = None,
    ) -> None:
        super().__init__()
        if decoder not in DECODERS:
            raise ValueError(f"Unknown decoder {decoder!r}; choose one of {sorted(DECODERS)}.")
        self.config = config.replace(in_channels=in_channels)
        feature_size = feature_size or self.config.embed_dim
        if feature_size != self.config.embed_dim:
            raise ValueError(
                f"The decoder's feature size must equal the encoder's embed_dim ({self.config.embed_dim}), "
                f"got {feature_size}."
            )
        self.input_mapping = input_mapping
        self.input_axes: Optional[Tuple[int, ...]] = None
        if input_axes is not None and tuple(int(a) for a in input_axes) != (0, 1, 2):
            if sorted(int(a) for a in input_axes) != [0, 1, 2]:
                raise ValueError(f"input_axes must be a permutation of (0, 1, 2), got {list(input_axes)}.")
            self.input_axes = tuple(int(a) for a in input_axes)
        self.encoder = SwinEncoder(self.config, gradient_checkpointing=gradient_checkpointing)
        self.decoder = DECODERS[decoder](in_channels, feature_size, num_classes, norm, deep_supervision)

    @staticmethod
    def deep_supervision_scales() -> List[List[float]]:
        """Scale of each deep-supervision output relative to the input, highest resolution first."""
        return [[1.0 / 2**i] * 3 for i in range(5)]

    def to_encoder_axes(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, *spatial) in the input's axis order -> the same voxels in the encoder's (z, y, x) order."""
        if self.input_axes is None:
            return x
        return x.permute(0, 1, *[2 + a for a in inverse_permutation(self.input_axes)])

    def from_encoder_axes(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, *spatial) in the encoder's (z, y, x) order -> the input's axis order (undoes ``to_encoder_axes``)."""
        if self.input_axes is None:
            return x
        return x.permute(0, 1, *[2 + a for a in self.input_axes])

    def encoder_input(self, x: torch.Tensor) -> torch.Tensor:
        """What the encoder gets from an input x (B, C_in, D, H, W): the intensity mapping, then (z, y, x) order."""
        if self.input_mapping is not None:
            x = self.input_mapping(x)
        return self.to_encoder_axes(x)

    def forward(self, x: torch.Tensor) -> Union[torch.Tensor, List[torch.Tensor]]:
        x = self.encoder_input(x)
        enc = self.encoder(x)
        out = self.decoder(x, enc.features, enc.bottleneck)
        if isinstance(out, (list, tuple)):
            return [self.from_encoder_axes(o) for o in out]
        return self.from_encoder_axes(out)

    # The authors' complete fine-tuning network --------------------------------------------------------------
    @classmethod
    def from_official_state_dict(cls, state_dict: Mapping[str, torch.Tensor]) -> "SMITNet":
        """Build the authors' fine-tuning network (BatchNorm decoder) from their state dict and load it strictly.

        The configuration (embed dim, depths, heads, window, MLP ratio, qkv bias, channels, classes) is inferred
        from the tensor shapes. Raises ``nnunet_smit.errors.CheckpointError`` when keys are missing or unexpected.
        """
        from nnunet_smit.architectures.official import convert_official_finetune

        converted, config, num_classes = convert_official_finetune(state_dict)
        net = cls(config, config.in_channels, num_classes, norm="batch")
        missing, unexpected = net.load_state_dict(converted, strict=False)
        missing = [k for k in missing if not k.startswith("decoder.ds_heads.")]
        if missing or unexpected:
            from nnunet_smit.errors import CheckpointError

            raise CheckpointError(
                f"The authors' fine-tuning state dict does not fit: missing {sorted(missing)}, "
                f"unexpected {sorted(unexpected)}."
            )
        return net.eval()
