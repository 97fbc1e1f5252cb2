"""SMIT settings inside nnU-Net plans, and the network built from them.

``nnUNetv2_predict`` rebuilds the network from the results folder's ``plans.json`` alone (no trainer instance),
so the trainer writes everything the network needs into ``plans['configurations'][name]['smit']``:

    {"format_version": 1,
     "encoder_config": SMITConfig.to_dict(),
     "pretrain_preprocessing": PretrainPreprocessing.to_dict(),
     "decoder": "smit" (the authors') or "light" (absent in plans written before it existed: "smit"),
     "decoder_norm": "instance",
     "gradient_checkpointing": recompute the encoder's blocks in backward (training memory; absent: false),
     "intensity_mapping": [per image channel: {"scheme", "mean", "std", "percentile_00_5", "percentile_99_5"}
                           for CTNormalization channels, else null],
     "transpose_forward": the plans' axis order (nnU-Net's array axis i is the scan's (z, y, x) axis
                          transpose_forward[i]); the network puts its input back into (z, y, x) for the encoder
                          (absent in plans written before version 2: the encoder got nnU-Net's order),
     "pad_value": what nnU-Net's zero padding of CT channels becomes on the encoder's scale, the pretraining's pad
                  (absent before version 2: nnU-Net's 0, the foreground mean),
     "patch_fit": {"planned_patch_size", "planned_batch_size", "patch_size", "batch_size"},
     "weights": {"path", "sha256", "source"} or null (random init)}

The fitted ``patch_size`` and ``batch_size`` go into the configuration itself, where nnU-Net reads them.
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence

from nnunet_smit.architectures import IntensityMapping, SMITConfig, SMITNet
from nnunet_smit.architectures.smit_net import DECODERS
from nnunet_smit.conventions import AXIS_CONVENTION_NNUNET, PretrainPreprocessing
from nnunet_smit.errors import SMITError
from nnunet_smit.trainers.patch_fitting import PatchFit

SMIT_PLANS_KEY = "smit"
# Optional encoder path inside plans['configurations'][name] (smit_plan writes it; nnUNet_SMIT_weights wins).
WEIGHTS_PLANS_KEY = "smit_weights"
# 2: "transpose_forward" and "pad_value" (the encoder gets the pretraining's axes and padding).
SETTINGS_FORMAT_VERSION = 2
# nnU-Net's normalisation whose statistics let the network recover HU exactly (inside the clip range).
CT_NORMALIZATION = "CTNormalization"
# A dataset axis whose spacing differs from the pretraining spacing by more than this factor gets a warning.
SPACING_WARNING_FACTOR = 1.5


def intensity_statistics(plans: Dict[str, Any], configuration: Dict[str, Any]) -> List[Optional[Dict[str, Any]]]:
    """Per image channel: the CTNormalization statistics from the plans, or None for other normalisations."""
    schemes = configuration["normalization_schemes"]
    properties = plans.get("foreground_intensity_properties_per_channel") or plans.get(
        "foreground_intensity_properties_by_modality", {}
    )
    stats: List[Optional[Dict[str, Any]]] = []
    for channel, scheme in enumerate(schemes):
        if scheme != CT_NORMALIZATION:
            stats.append(None)
            continue
        props = properties[str(channel)]
        stats.append(
            {
                "scheme": scheme,
                "mean": float(props["mean"]),
                "std": float(props["std"]),
                "percentile_00_5": float(props["percentile_00_5"]),
                "percentile_99_5": float(props["percentile_99_5"]),
            }
        )
    return stats


# Plans without a "decoder" key were written before the light decoder existed: the authors' decoder.
DEFAULT_DECODER = "smit"


def _known_decoder(decoder: str) -> str:
    if decoder not in DECODERS:
        raise SMITError(
            f"These SMIT settings name the decoder {decoder!r}, which this package does not know (it knows "
            f"{sorted(DECODERS)}); upgrade nnunet_smit or use one of those."
        )
    return decoder


def make_settings(
    encoder_config: SMITConfig,
    preprocessing: PretrainPreprocessing,
    patch_fit: PatchFit,
    intensity_mapping: Sequence[Optional[Dict[str, Any]]],
    weights: Optional[Dict[str, str]],
    decoder_norm: str = "instance",
    decoder: str = DEFAULT_DECODER,
    gradient_checkpointing: bool = False,
    transpose_forward: Sequence[int] = (0, 1, 2),
) -> Dict[str, Any]:
    """The JSON-able ``smit`` entry of a plans configuration (see the module docstring).

    ``transpose_forward`` is the plans' axis order (``plans['transpose_forward']``); the network undoes it before the
    encoder, so that the encoder sees (z, y, x) as in pretraining.

    ``decoder`` names SMITNet's decoder, ``"smit"`` (the authors') or ``"light"``; plans written before the key
    existed hold none and mean ``"smit"``. ``gradient_checkpointing`` makes the encoder recompute its blocks in
    the backward pass: less training memory, the same weights and outputs (prediction runs without gradients).
    """
    return {
        "format_version": SETTINGS_FORMAT_VERSION,
        "encoder_config": encoder_config.to_dict(),
        "pretrain_preprocessing": preprocessing.to_dict(),
        "decoder": _known_decoder(decoder),
        "decoder_norm": decoder_norm,
        "gradient_checkpointing": bool(gradient_checkpointing),
        "intensity_mapping": [dict(s) if s is not None else None for s in intensity_mapping],
        "patch_fit": {
            "planned_patch_size": list(patch_fit.planned_patch_size),
            "planned_batch_size": patch_fit.planned_batch_size,
            "patch_size": list(patch_fit.patch_size),
            "batch_size": patch_fit.batch_size,
        },
        "weights": dict(weights) if weights is not None else None,
        "transpose_forward": [int(a) for a in transpose_forward],
        "pad_value": float(preprocessing.scaled_range[0]),
    }


def settings_for_plans(
    plans: Dict[str, Any],
    resolved: Dict[str, Any],
    encoder_config: SMITConfig,
    preprocessing: PretrainPreprocessing,
    patch_fit: PatchFit,
    weights: Optional[Dict[str, str]],
    **network: Any,
) -> Dict[str, Any]:
    """:func:`make_settings` with what the plans decide about the encoder's input: the CT statistics of ``resolved``
    (the resolved configuration) and the plans' ``transpose_forward``. The trainer and the probe both build their
    networks through this, so both give the encoder the same input. ``network``: ``make_settings``'s keywords
    (decoder, decoder_norm, gradient_checkpointing)."""
    return make_settings(encoder_config, preprocessing, patch_fit, intensity_statistics(plans, resolved), weights,
                         transpose_forward=plans.get("transpose_forward", (0, 1, 2)), **network)


def settings_of(configuration: Dict[str, Any]) -> Dict[str, Any]:
    """The ``smit`` entry of a (resolved) plans configuration; SMITError when it is missing."""
    settings = configuration.get(SMIT_PLANS_KEY)
    if settings is None:
        raise SMITError(
            "This plans configuration holds no SMIT settings; use the plans.json that a SMIT trainer wrote into "
            "its results folder (nnUNetv2_predict does this when given the same -tr)."
        )
    if settings.get("format_version", 0) > SETTINGS_FORMAT_VERSION:
        raise SMITError(
            f"These SMIT plans settings have format version {settings['format_version']}, newer than this "
            f"package understands ({SETTINGS_FORMAT_VERSION}); upgrade nnunet_smit."
        )
    return settings


def encoder_config_of(settings: Dict[str, Any]) -> SMITConfig:
    return SMITConfig.from_dict(settings["encoder_config"])


def preprocessing_of(settings: Dict[str, Any]) -> PretrainPreprocessing:
    return PretrainPreprocessing.from_dict(settings["pretrain_preprocessing"])


# Encoder settings that leave the weights and the function alone: training-time drop path, and the input channels,
# which the network takes from the dataset.
_TRAINING_ONLY_ENCODER_KEYS = ("drop_path_rate", "in_channels")


def network_signature(settings: Dict[str, Any]) -> Dict[str, Any]:
    """What in a ``smit`` entry decides the network and its input: the encoder architecture, the decoder and its norm,
    nnU-Net's patch, the intensity mapping onto the encoder's HU window and pad, and the axis order.

    Left out: the weights it starts from (path, sha256), drop path and gradient checkpointing (training only). Two
    entries with equal signatures build networks that load each other's weights and compute the same thing on the
    same preprocessed data; absent keys of older entries count as what they meant (see the module docstring).
    """
    encoder = {key: value for key, value in settings["encoder_config"].items()
               if key not in _TRAINING_ONLY_ENCODER_KEYS}
    mapping = [dict(s) if s is not None else None for s in settings.get("intensity_mapping") or []]
    mapped = any(s is not None for s in mapping)
    preprocessing = preprocessing_of(settings)
    axes = settings.get("transpose_forward")
    return {
        **encoder,
        "decoder": settings.get("decoder", DEFAULT_DECODER),
        "decoder_norm": settings.get("decoder_norm", "instance"),
        "training patch": list(settings["patch_fit"]["patch_size"]),
        "intensity_mapping": mapping,
        # the window, scale and pad act only on mapped channels
        "hu_window": list(preprocessing.hu_window) if mapped else None,
        "scaled_range": list(preprocessing.scaled_range) if mapped else None,
        "pad_value": settings.get("pad_value") if mapped else None,
        "transpose_forward": [0, 1, 2] if axes is None else [int(a) for a in axes],
    }


def network_differences(then: Dict[str, Any], now: Dict[str, Any]) -> List[str]:
    """How the network of the ``smit`` entry ``now`` differs from that of ``then``, in words ("embed_dim 12 there, 24
    here"); [] when both build the same network on the same input (:func:`network_signature`)."""
    was, wanted = network_signature(then), network_signature(now)
    differences: List[str] = []
    for key in dict.fromkeys([*was, *wanted]):
        a, b = was.get(key), wanted.get(key)
        if a == b:
            continue
        if key == "intensity_mapping" and isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
            for channel, (x, y) in enumerate(zip(a, b)):
                if x != y:
                    fields = [f for f in dict.fromkeys([*(x or {}), *(y or {})])
                              if (x or {}).get(f) != (y or {}).get(f)]
                    differences.append(f"channel {channel} {', '.join(fields)} {_short(x, fields)} there, "
                                       f"{_short(y, fields)} here")
            continue
        if key == "pad_value":
            a = "nnU-Net's 0 (plans before format 2)" if a is None else a
        differences.append(f"{key} {a} there, {b} here")
    return differences


def _short(stats: Optional[Dict[str, Any]], fields: Sequence[str]) -> str:
    if stats is None:
        return "unmapped"
    return "/".join(f"{stats.get(field):g}" if isinstance(stats.get(field), float) else str(stats.get(field))
                    for field in fields)


def build_intensity_mapping(settings: Dict[str, Any], num_input_channels: int) -> Optional[IntensityMapping]:
    """Fixed mapping of CT-normalised channels onto the pretraining HU window; None when no channel is CT.

    Channels beyond the image channels (the cascade's one-hot segmentation of the previous stage) and
    channels with other normalisations pass through unchanged.
    """
    stats = list(settings["intensity_mapping"])[:num_input_channels]
    if not any(s is not None for s in stats):
        return None
    stats += [None] * (num_input_channels - len(stats))
    preprocessing = preprocessing_of(settings)
    return IntensityMapping(
        mean=[s["mean"] if s is not None else None for s in stats],
        std=[s["std"] if s is not None else None for s in stats],
        hu_window=preprocessing.hu_window,
        scaled_range=preprocessing.scaled_range,
        pad_value=settings.get("pad_value"),
    )


def build_network(
    configuration: Dict[str, Any],
    num_input_channels: int,
    num_output_channels: int,
    deep_supervision: bool,
) -> SMITNet:
    """SMITNet from a resolved plans configuration dict; the same call in training and in prediction."""
    settings = settings_of(configuration)
    return SMITNet(
        encoder_config_of(settings),
        in_channels=num_input_channels,
        num_classes=num_output_channels,
        norm=settings.get("decoder_norm", "instance"),
        deep_supervision=deep_supervision,
        input_mapping=build_intensity_mapping(settings, num_input_channels),
        decoder=_known_decoder(settings.get("decoder", DEFAULT_DECODER)),
        gradient_checkpointing=bool(settings.get("gradient_checkpointing", False)),
        input_axes=settings.get("transpose_forward"),
    )


# A clip range that removes more than this share of the checkpoint's HU window gets a warning.
CLIPPED_WINDOW_WARNING_SHARE = 0.01


def clip_range_warnings(
    intensity_mapping: Sequence[Optional[Dict[str, Any]]], preprocessing: PretrainPreprocessing, dataset_name: str,
    plans_name: str, encoder: Optional[str] = None,
) -> List[str]:
    """Warnings for CT channels that nnU-Net's preprocessing clipped inside the checkpoint's HU window: the values
    between the clip range and the window's ends never reach the encoder. Names the command that fixes it."""
    low, high = (float(v) for v in preprocessing.hu_window)
    warnings: List[str] = []
    for channel, stats in enumerate(intensity_mapping):
        if stats is None:
            continue
        clip_low, clip_high = stats["percentile_00_5"], stats["percentile_99_5"]
        lost = max(0.0, min(clip_low, high) - low) + max(0.0, high - max(clip_high, low))
        share = lost / (high - low)
        if share <= CLIPPED_WINDOW_WARNING_SHARE:
            continue
        cut = ([f"below {clip_low:g} HU arrives as {clip_low:g}"] if clip_low > low else []) + (
            [f"above {clip_high:g} HU arrives as {clip_high:g}"] if clip_high < high else [])
        warnings.append(
            f"WARNING: nnU-Net's {CT_NORMALIZATION} in plans {plans_name} clips channel {channel} to "
            f"[{clip_low:g}, {clip_high:g}] HU (the dataset's foreground 0.5-99.5 percentiles), inside the "
            f"checkpoint's window [{low:g}, {high:g}] HU: {share:.0%} of the window never reaches the encoder "
            f"(everything {' and '.join(cut)}). `smit_plan -d {dataset_name} --encoder {encoder or 'ENCODER'}` writes "
            f"plans that keep the whole window; then train with -p {plans_name}_SMIT.")
    return warnings


def scan_axes_spacing(spacing_mm: Sequence[float], transpose_forward: Sequence[int]) -> List[float]:
    """A plans spacing (in nnU-Net's transposed axis order) in the scan's (z, y, x) order, the encoder's."""
    zyx = [0.0] * 3
    for position, axis in enumerate(transpose_forward):
        zyx[int(axis)] = float(spacing_mm[position])
    return zyx


def convention_warnings(
    spacing_mm: Sequence[float], preprocessing: PretrainPreprocessing, normalization_schemes: Sequence[str],
    transpose_forward: Sequence[int] = (0, 1, 2),
) -> List[str]:
    """Human-readable warnings where the dataset differs from how the encoder was pretrained.

    ``spacing_mm`` is the plans' spacing, in nnU-Net's axis order (``transpose_forward``); it is compared with the
    pretraining spacing in (z, y, x), the order the encoder sees.
    """
    warnings: List[str] = []
    spacing_mm = scan_axes_spacing(spacing_mm, transpose_forward)
    target = preprocessing.target_spacing_mm
    ratios = [float(s) / float(t) for s, t in zip(spacing_mm, target)]
    if any(r > SPACING_WARNING_FACTOR or r < 1.0 / SPACING_WARNING_FACTOR for r in ratios):
        warnings.append(
            f"WARNING: the dataset spacing {[round(float(s), 3) for s in spacing_mm]} mm (z, y, x) is far from the "
            f"checkpoint's pretraining spacing {list(target)} mm (ratios {[round(r, 2) for r in ratios]}); the encoder "
            "sees anatomy at a different scale than in pretraining."
        )
    if preprocessing.axis_convention != AXIS_CONVENTION_NNUNET:
        warnings.append(
            f"WARNING: the checkpoint was pretrained with axis convention {preprocessing.axis_convention!r}, "
            f"nnU-Net feeds {AXIS_CONVENTION_NNUNET!r}; the encoder sees axes in a different order."
        )
    if preprocessing.modality.upper() == "CT" and CT_NORMALIZATION not in normalization_schemes:
        warnings.append(
            f"WARNING: the checkpoint was pretrained on CT but no channel uses {CT_NORMALIZATION} "
            f"(schemes {list(normalization_schemes)}); those channels reach the encoder as nnU-Net normalised "
            "them, without HU mapping."
        )
    return warnings
