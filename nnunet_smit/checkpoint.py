"""The encoder checkpoint format, shared by pretraining (writer) and fine-tuning (reader).

A checkpoint is the encoder's weights plus the metadata needed to use them: format name and version, package
version, the full architecture config, how pretraining preprocessed its input, the pretraining patch size, a
data/training summary, the fingerprints of the scans pretraining saw (``pretraining_scans``, see
:mod:`nnunet_smit.fingerprints`; absent in files written before it existed, which load with none) and the sha256 of
the weights. It is a ``torch.save`` file of plain containers and
tensors, read back with ``torch.load(weights_only=True)``, or a safetensors file with the metadata as JSON:
loading a checkpoint never executes code from it.

Beside the encoder a checkpoint may carry SMITNet decoder blocks that pretraining trained (:class:`DecoderParts`,
``smit_pretrain --reconstruct_through``): ``parts`` names what it carries (``["encoder"]``, ``["encoder", "skips"]``
or ``["encoder", "skips", "decoder"]``), ``decoder`` their decoder kind, norm and sha256, and their tensors keep
SMITNet's keys (``decoder.encoder1.layer.conv1.conv.weight``, ...): under ``decoder_state_dict`` in a ``.pt`` file,
beside the encoder's in a ``.safetensors`` file. Such a file is format version 2; one with the encoder alone is still
written as version 1.

Loading into a network is strict by default and reports what happened (:class:`LoadReport`).
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from nnunet_smit import __version__
from nnunet_smit.architectures.config import SMITConfig
from nnunet_smit.architectures.decoder import DECODER_PARTS
from nnunet_smit.architectures.official import (
    Conversion,
    convert_monai_swinvit,
    convert_official_encoder,
    convert_official_finetune,
    infer_encoder_config,
    select_prefix,
    strip_prefixes,
)
from nnunet_smit.conventions import PretrainPreprocessing
from nnunet_smit.errors import CheckpointError
from nnunet_smit.files import atomic_write
from nnunet_smit.unreadable_weights import describe_unreadable_weights

logger = logging.getLogger(__name__)

FORMAT_NAME = "nnunet_smit.encoder"
# 2: decoder parts beside the encoder. A file with the encoder alone is written as 1, which every version reads.
FORMAT_VERSION = 2
ENCODER_ONLY_FORMAT_VERSION = 1
ENCODER_PART = "encoder"
# SMITNet's keys of the decoder parts start with this.
DECODER_PREFIX = "decoder."
# smit_pretrain's resumable state (checkpoint_latest.pt, nnunet_smit.pretraining.state): readable as an encoder too.
PRETRAIN_STATE_FORMAT = "nnunet_smit.pretrain_state"
PRETRAIN_STATE_NAME = "checkpoint_latest.pt"
# What a smit_pretrain run folder stands for, in this order: its export, then (a run still going) its state.
RUN_FOLDER_FILES = ("smit_encoder_teacher.pt", "smit_encoder_student.pt", PRETRAIN_STATE_NAME)
PathLike = Union[str, os.PathLike]
StateDict = Dict[str, torch.Tensor]


# --------------------------------------------------------------------------------------------------------------
# Hashing and writing
# --------------------------------------------------------------------------------------------------------------
def state_dict_sha256(state_dict: Mapping[str, torch.Tensor]) -> str:
    """sha256 over the sorted key names, dtypes, shapes and raw bytes of every tensor."""
    digest = hashlib.sha256()
    for key in sorted(state_dict):
        tensor = state_dict[key].detach().cpu().contiguous()
        digest.update(f"{key}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()


@dataclass
class DecoderParts:
    """SMITNet decoder blocks a checkpoint carries beside the encoder (trained by ``smit_pretrain
    --reconstruct_through skips`` or ``decoder``).

    Attributes:
        parts: ``("skips",)`` (``encoder1``-``encoder4``, ``encoder10``) or ``("skips", "decoder")`` (and
            ``decoder1``-``decoder5``), keys of :data:`~nnunet_smit.architectures.decoder.DECODER_PARTS`.
        kind: the SMITNet decoder they belong to, ``"smit"`` (the authors') or ``"light"``.
        norm: its normalisation, ``"instance"`` or ``"batch"``.
        state_dict: the blocks' tensors under SMITNet's keys (``decoder.encoder1.layer.conv1.conv.weight``, ...).
    """

    parts: Tuple[str, ...]
    kind: str
    norm: str
    state_dict: StateDict

    @property
    def sha256(self) -> str:
        return state_dict_sha256(self.state_dict)

    @property
    def modules(self) -> Tuple[str, ...]:
        """SMITNet decoder module names carried (``encoder1``, ...)."""
        return tuple(name for part in self.parts for name in DECODER_PARTS[part])

    def metadata(self) -> Dict[str, str]:
        return {"kind": self.kind, "norm": self.norm, "sha256": self.sha256}


def decoder_parts_of(state_dict: Mapping[str, torch.Tensor]) -> Tuple[str, ...]:
    """The parts (of :data:`DECODER_PARTS`) whose modules have keys in a SMITNet-keyed ``state_dict``."""
    modules = {key[len(DECODER_PREFIX):].split(".", 1)[0] for key in state_dict if key.startswith(DECODER_PREFIX)}
    return tuple(part for part, names in DECODER_PARTS.items() if modules & set(names))


def check_decoder_parts(parts: DecoderParts, where: str) -> None:
    """Raise :class:`CheckpointError` unless ``parts`` holds exactly the modules of its named parts."""
    unknown = [part for part in parts.parts if part not in DECODER_PARTS]
    if unknown:
        raise CheckpointError(f"{where} carries decoder parts {unknown} this package does not know (it knows "
                              f"{sorted(DECODER_PARTS)}): upgrade nnunet_smit.")
    carried = {key[len(DECODER_PREFIX):].split(".", 1)[0] if key.startswith(DECODER_PREFIX) else key
               for key in parts.state_dict}
    if carried != set(parts.modules):
        raise CheckpointError(f"{where} is corrupt: its decoder parts {list(parts.parts)} should hold "
                              f"{list(parts.modules)} but hold {sorted(carried)}.")


def save_encoder_checkpoint(
    path: PathLike,
    state_dict: Mapping[str, torch.Tensor],
    config: SMITConfig,
    preprocessing: Optional[PretrainPreprocessing] = None,
    patch_size: Sequence[int] = (96, 96, 96),
    summary: Optional[Dict[str, Any]] = None,
    scan_fingerprints: Optional[Mapping[str, str]] = None,
    exported_side: Optional[str] = None,
    decoder_parts: Optional[DecoderParts] = None,
) -> str:
    """Write an encoder checkpoint atomically; returns the sha256 of the encoder's weights.

    ``state_dict`` is a :class:`SwinEncoder` state dict (keys without prefix). ``scan_fingerprints`` is
    {fingerprint: scan name} of every scan the weights were pretrained on (:mod:`nnunet_smit.fingerprints`), stored
    as ``pretraining_scans`` (about 40 bytes a scan). ``exported_side`` is the side of the pretraining run the
    weights are, ``"teacher"`` or ``"student"`` (stored when given). A path ending in ``.safetensors`` is written as
    safetensors with the metadata as JSON, anything else with ``torch.save``. ``decoder_parts``: SMITNet decoder
    blocks to carry beside the encoder (format version 2).
    """
    weights = {k: v.detach().cpu().contiguous() for k, v in state_dict.items()}
    sha = state_dict_sha256(weights)
    decoder_weights: StateDict = {}
    if decoder_parts is not None:
        check_decoder_parts(decoder_parts, str(path))
        decoder_weights = {k: v.detach().cpu().contiguous() for k, v in decoder_parts.state_dict.items()}
    metadata = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION if decoder_weights else ENCODER_ONLY_FORMAT_VERSION,
        "parts": [ENCODER_PART, *(decoder_parts.parts if decoder_weights else ())],
        "package_version": __version__,
        "config": config.to_dict(),
        "preprocessing": (preprocessing or PretrainPreprocessing()).to_dict(),
        "patch_size": [int(s) for s in patch_size],
        "summary": json.loads(json.dumps(summary or {}, default=str)),
        "pretraining_scans": {str(k): str(v) for k, v in sorted((scan_fingerprints or {}).items())},
        "sha256": sha,
    }
    if exported_side is not None:
        metadata["exported_side"] = str(exported_side)
    if decoder_weights:
        metadata["decoder"] = decoder_parts.metadata()
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import save_file

        # One flat file: the decoder's keys start with "decoder.", which no encoder key does.
        atomic_write(path, lambda tmp: save_file({**weights, **decoder_weights}, tmp,
                                                 metadata={"nnunet_smit": json.dumps(metadata)}))
    else:
        extra = {"decoder_state_dict": decoder_weights} if decoder_weights else {}
        atomic_write(path, lambda tmp: torch.save({**metadata, "state_dict": weights, **extra}, tmp))
    return sha


# --------------------------------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------------------------------
@dataclass
class EncoderCheckpoint:
    """An encoder checkpoint in memory, whatever file it came from.

    Attributes:
        state_dict: encoder weights in this package's key layout.
        config: the architecture.
        preprocessing: how pretraining prepared its input (defaults for foreign files, which record none).
        patch_size: pretraining crop size (D, H, W).
        summary: data and training summary written by pretraining.
        sha256: hash of ``state_dict`` (verified for this package's files).
        source: ``"nnunet_smit"``, ``"nnunet_smit_state"`` (the teacher of a pretraining run's
            ``checkpoint_latest.pt``), ``"official_pretrain"``, ``"official_finetune"`` or ``"monai_swinvit"``.
        notes: what a conversion dropped or changed.
        pretraining_scans: {fingerprint: scan name} of every scan the weights were pretrained on
            (:mod:`nnunet_smit.fingerprints`). Empty when the file records none: foreign weights (the authors',
            MONAI's) and exports written before fingerprints existed; that means "unknown", not "no scan".
        exported_side: which side of a pretraining run the weights are, ``"teacher"`` or ``"student"``; for exports
            written before the field existed, their summary's ``exported``; None for files from elsewhere.
        decoder_parts: SMITNet decoder blocks carried beside the encoder, or None (the encoder alone).
    """

    state_dict: StateDict
    config: SMITConfig
    preprocessing: PretrainPreprocessing
    patch_size: Tuple[int, int, int]
    summary: Dict[str, Any]
    sha256: str
    source: str
    path: Optional[str] = None
    notes: List[str] = field(default_factory=list)
    pretraining_scans: Dict[str, str] = field(default_factory=dict)
    exported_side: Optional[str] = None
    decoder_parts: Optional[DecoderParts] = None

    @property
    def parts(self) -> Tuple[str, ...]:
        """What the checkpoint carries: ``("encoder",)``, ``("encoder", "skips")`` or ``("encoder", "skips",
        "decoder")``."""
        return (ENCODER_PART, *(self.decoder_parts.parts if self.decoder_parts is not None else ()))


def _read_file(path: Path) -> Any:
    if not path.is_file():
        raise CheckpointError(f"Checkpoint file {path} does not exist.")
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
                tensors = {k: f.get_tensor(k) for k in f.keys()}
        except Exception as exc:  # safetensors raises several types for a bad file
            raise CheckpointError(f"{path} is not a readable safetensors file ({exc}).") from None
        if "nnunet_smit" in meta:
            return {**json.loads(meta["nnunet_smit"]), "state_dict": tensors}
        return tensors
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises many types for a bad or unsafe file
        message = str(error).lower()
        # "Unsupported operand N": a byte no pickle starts with, so not a checkpoint at all, rather than code
        if "weights only load failed" in message and "unsupported operand" not in message:
            raise CheckpointError(
                f"{path} cannot be read as a weights-only torch checkpoint: it holds Python objects that would need "
                "code to load (refused; convert it where it was made)."
            ) from None
        raise CheckpointError(
            f"{path} cannot be read as a torch checkpoint: {describe_unreadable_weights(path, str(error))}"
        ) from None


def resolve_weights_path(path: PathLike) -> Path:
    """A file as it is; a ``smit_pretrain`` run folder as its export or, while the run goes on, its
    ``checkpoint_latest.pt`` (:data:`RUN_FOLDER_FILES`, in that order)."""
    path = Path(path)
    if not path.is_dir():
        return path
    for name in RUN_FOLDER_FILES:
        if (path / name).is_file():
            return path / name
    raise CheckpointError(
        f"{path} is a folder without an encoder checkpoint ({', '.join(RUN_FOLDER_FILES)}); point at a checkpoint "
        "file, or at a smit_pretrain output folder."
    )


def _tensor_dict(obj: Any) -> Optional[StateDict]:
    if isinstance(obj, Mapping) and obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        return dict(obj)
    return None


def classify_state_dict(sd: Mapping[str, torch.Tensor]) -> str:
    """Name the layout of a tensor dict: official_finetune, monai_swinvit, official_pretrain or unknown."""
    keys = list(sd)
    bare = strip_prefixes(sd, ("module.",))
    if any(k.startswith("transformer.") for k in bare) and any(k.startswith("decoder5.") for k in bare):
        return "official_finetune"
    if any(k.startswith("swinViT.") for k in keys) or any(".layers1.0." in f".{k}" for k in bare):
        return "monai_swinvit"
    stripped = strip_prefixes(sd)
    if "patch_embed.proj.weight" in stripped and any(k.startswith("layers.0.blocks.") for k in stripped):
        return "official_pretrain"
    # This package's SMITNet state dict (encoder.* and decoder.*).
    encoder, _ = select_prefix(bare, "encoder.")
    if "patch_embed.proj.weight" in encoder:
        return "smitnet"
    return "unknown"


def convert_state_dict(sd: Mapping[str, torch.Tensor]) -> Conversion:
    """Turn any known layout into an encoder state dict in this package's layout, with the inferred config."""
    kind = classify_state_dict(sd)
    if kind == "official_finetune":
        net_sd, config, _ = convert_official_finetune(sd)
        encoder, rest = select_prefix(net_sd, "encoder.")
        return Conversion(encoder, config, kind, {"the authors' decoder (not part of the encoder)": rest})
    if kind == "monai_swinvit":
        return convert_monai_swinvit(sd)
    if kind == "official_pretrain":
        return convert_official_encoder(sd)
    if kind == "smitnet":
        bare = strip_prefixes(sd, ("module.", "_orig_mod."))
        encoder, rest = select_prefix(bare, "encoder.")
        return Conversion(encoder, infer_encoder_config(encoder), kind, {"decoder (not part of the encoder)": rest})
    raise CheckpointError(
        "The file holds tensors but no known SMIT, MONAI SwinViT or nnunet_smit encoder layout "
        f"(first keys: {list(sd)[:3]})."
    )


def load_encoder_checkpoint(path: PathLike) -> EncoderCheckpoint:
    """Read an encoder checkpoint: this package's format, or the authors' / MONAI's files converted on the fly.

    Accepted foreign files: the authors' pretraining output and released ``pre_train_weight.pt`` (flat or
    ``{'state_dict': ...}``, with or without ``module.``/``backbone.``/``transformer.`` prefixes), the authors'
    complete fine-tuning network, and MONAI SwinUNETR / ``model_swinvit.pt`` weights. Raises
    :class:`CheckpointError` for unreadable or unknown files and for a sha256 mismatch.
    """
    path = resolve_weights_path(path)
    obj = _read_file(path)
    if isinstance(obj, Mapping) and obj.get("format") == PRETRAIN_STATE_FORMAT:
        return _from_pretraining_state(obj, path)
    if isinstance(obj, Mapping) and obj.get("format") == FORMAT_NAME:
        if int(obj.get("format_version", 0)) > FORMAT_VERSION:
            raise CheckpointError(
                f"{path} has checkpoint format version {obj['format_version']}, newer than this package reads "
                f"({FORMAT_VERSION}): upgrade nnunet_smit."
            )
        state_dict = _tensor_dict(obj.get("state_dict")) or {}
        decoder_parts = _decoder_parts_of_file(obj, state_dict, path)
        if decoder_parts is not None and "decoder_state_dict" not in obj:  # safetensors: one flat file
            state_dict = {k: v for k, v in state_dict.items() if not k.startswith(DECODER_PREFIX)}
        sha = state_dict_sha256(state_dict)
        if sha != obj.get("sha256"):
            raise CheckpointError(f"{path} is corrupt: the weights' sha256 does not match the one recorded in it.")
        scans = obj.get("pretraining_scans", {})
        if not isinstance(scans, Mapping):
            raise CheckpointError(f"{path} is corrupt: its pretraining_scans entry is not a mapping of fingerprints.")
        summary = dict(obj.get("summary", {}))
        side = obj.get("exported_side", summary.get("exported"))
        return EncoderCheckpoint(
            state_dict=state_dict,
            config=SMITConfig.from_dict(obj["config"]),
            preprocessing=PretrainPreprocessing.from_dict(obj.get("preprocessing", {})),
            patch_size=tuple(int(s) for s in obj.get("patch_size", (96, 96, 96))),
            summary=summary,
            sha256=sha,
            source="nnunet_smit",
            path=str(path),
            pretraining_scans={str(k): str(v) for k, v in scans.items()},
            exported_side=str(side) if side is not None else None,
            decoder_parts=decoder_parts,
        )
    sd = _tensor_dict(obj)
    if sd is None and isinstance(obj, Mapping):
        for wrapper in ("state_dict", "model", "student", "teacher", "net"):
            sd = _tensor_dict(obj.get(wrapper))
            if sd is not None:
                break
    if sd is None:
        raise CheckpointError(f"{path} holds no tensor dictionary that could be encoder weights.")
    conversion = convert_state_dict(sd)
    notes = conversion.notes()
    if path.suffix == ".safetensors" and conversion.source == "official_pretrain":
        notes.append("no nnunet_smit metadata in this safetensors file: read as the authors' encoder (their window "
                     "order, default preprocessing); for an encoder exported by nnunet_smit use its .pt export or "
                     "smit_convert's output, which carry the metadata")
    return EncoderCheckpoint(
        state_dict=conversion.state_dict,
        config=conversion.config,
        preprocessing=PretrainPreprocessing(),
        patch_size=(96, 96, 96),
        summary={"converted_from": conversion.source, "original_file": path.name},
        sha256=state_dict_sha256(conversion.state_dict),
        source=conversion.source,
        path=str(path),
        notes=notes,
    )


def _decoder_parts_of_file(obj: Mapping[str, Any], state_dict: StateDict, path: Path) -> Optional[DecoderParts]:
    """The decoder parts an nnunet_smit checkpoint carries (None for the encoder alone), checked against their
    recorded sha256."""
    parts = tuple(p for p in obj.get("parts", [ENCODER_PART]) if p != ENCODER_PART)
    if not parts:
        return None
    info = obj.get("decoder") or {}
    tensors = _tensor_dict(obj.get("decoder_state_dict")) if "decoder_state_dict" in obj else {
        k: v for k, v in state_dict.items() if k.startswith(DECODER_PREFIX)}
    decoder_parts = DecoderParts(parts, str(info.get("kind", "smit")), str(info.get("norm", "instance")),
                                 tensors or {})
    check_decoder_parts(decoder_parts, str(path))
    if decoder_parts.sha256 != info.get("sha256"):
        raise CheckpointError(f"{path} is corrupt: the decoder blocks' sha256 does not match the one recorded in it.")
    return decoder_parts


def _from_pretraining_state(state: Mapping[str, Any], path: Path) -> EncoderCheckpoint:
    """The encoder of a pretraining run's ``checkpoint_latest.pt``: the teacher's (the student's in states of
    reconstruction-only runs from before every run kept a teacher), with the run's architecture, preprocessing,
    view size and scan fingerprints."""
    model = _tensor_dict(state.get("model")) or {}
    side = "teacher" if any(k.startswith("teacher.encoder.") for k in model) else "student"
    state_dict, _ = select_prefix(model, f"{side}.encoder.")
    if not state_dict or "encoder_config" not in state:
        raise CheckpointError(f"{path} is a pretraining state without encoder weights or architecture (damaged?).")
    step, finished = state.get("step"), bool(state.get("finished"))
    scans = state.get("pretraining_scans") or {}
    # SMITNet's blocks a conv reconstruction head trains sit under recon_head.decoder with SMITNet's names.
    blocks, _ = select_prefix(model, f"{side}.recon_head.decoder.")
    blocks = {f"{DECODER_PREFIX}{k}": v for k, v in blocks.items()}
    decoder_parts = None
    if blocks:
        norm = "batch" if any(k.endswith(".running_mean") for k in blocks) else "instance"
        decoder_parts = DecoderParts(decoder_parts_of(blocks), str((state.get("config") or {}).get("decoder", "smit")),
                                     norm, blocks)
    view = int((state.get("config") or {}).get("view_size", 96))
    return EncoderCheckpoint(
        state_dict=state_dict,
        config=SMITConfig.from_dict(state["encoder_config"]),
        preprocessing=PretrainPreprocessing.from_dict(state.get("preprocessing", {})),
        patch_size=(view, view, view),
        summary={"from_pretraining_state": {"step": step, "finished": finished, "encoder": side}},
        sha256=state_dict_sha256(state_dict),
        source="nnunet_smit_state",
        path=str(path),
        notes=[f"the {side} encoder of a pretraining state at step {step}"
               + ("" if finished else " (the run had not finished: its export is written at the end)")],
        pretraining_scans={str(k): str(v) for k, v in scans.items()} if isinstance(scans, Mapping) else {},
        exported_side=side,
        decoder_parts=decoder_parts,
    )


# --------------------------------------------------------------------------------------------------------------
# Loading into a network
# --------------------------------------------------------------------------------------------------------------
@dataclass
class LoadReport:
    """What loading a state dict into a module did.

    Attributes:
        loaded: number of tensors copied into the module.
        missing: module keys the state dict lacked.
        unexpected: state-dict keys the module does not have.
        mismatched: (key, checkpoint shape, module shape) for keys present in both with different shapes.
        adapted: notes on tensors changed to fit (e.g. in-channel repetition), and on what a conversion dropped.
    """

    loaded: int = 0
    missing: List[str] = field(default_factory=list)
    unexpected: List[str] = field(default_factory=list)
    mismatched: List[Tuple[str, Tuple[int, ...], Tuple[int, ...]]] = field(default_factory=list)
    adapted: List[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not (self.missing or self.unexpected or self.mismatched)

    def summary(self) -> str:
        lines = [
            f"loaded {self.loaded} tensors; missing keys: {len(self.missing)}; unexpected keys: "
            f"{len(self.unexpected)}; shape mismatches: {len(self.mismatched)}"
        ]
        lines += [f"  missing: {k}" for k in self.missing]
        lines += [f"  unexpected: {k}" for k in self.unexpected]
        lines += [f"  shape mismatch: {k}: checkpoint {list(a)} vs model {list(b)}" for k, a, b in self.mismatched]
        lines += [f"  note: {n}" for n in self.adapted]
        return "\n".join(lines)

    def problem(self) -> str:
        """One sentence naming the offending keys (for errors)."""
        parts = []
        if self.mismatched:
            k, a, b = self.mismatched[0]
            parts.append(f"{len(self.mismatched)} shape mismatch(es), first {k}: checkpoint {list(a)} vs model {list(b)}")
        if self.missing:
            parts.append(f"{len(self.missing)} missing key(s), first {self.missing[:3]}")
        if self.unexpected:
            parts.append(f"{len(self.unexpected)} unexpected key(s), first {self.unexpected[:3]}")
        return "; ".join(parts)


def adapt_in_channels(weight: torch.Tensor, in_channels: int) -> torch.Tensor:
    """Patch-embedding kernel (C, 1, k, k, k) -> (C, n, k, k, k): repeated and divided by n, so that n identical
    input channels give the single-channel response."""
    return weight.repeat(1, in_channels, 1, 1, 1) / in_channels


def load_state_dict_reported(
    module: nn.Module,
    state_dict: Mapping[str, torch.Tensor],
    strict: bool = True,
    what: str = "encoder",
) -> LoadReport:
    """Load what fits, report everything, and with ``strict`` raise :class:`CheckpointError` on any problem
    (before copying anything)."""
    own = module.state_dict()
    report = LoadReport()
    usable = {}
    for key, value in state_dict.items():
        if key not in own:
            report.unexpected.append(key)
        elif tuple(value.shape) != tuple(own[key].shape):
            report.mismatched.append((key, tuple(value.shape), tuple(own[key].shape)))
        else:
            usable[key] = value
    report.missing = [k for k in own if k not in state_dict]
    if strict and not report.ok:
        raise CheckpointError(f"The checkpoint does not fit the {what}: {report.problem()}.")
    module.load_state_dict(usable, strict=False)
    report.loaded = len(usable)
    return report


def load_encoder_weights(encoder: nn.Module, state_dict: Mapping[str, torch.Tensor], strict: bool = True) -> LoadReport:
    """Load an encoder state dict (this package's layout) into a :class:`SwinEncoder`, strictly by default.

    A single-channel patch embedding loads into an n-channel encoder by repeating the kernel divided by n; the
    report says so. With ``strict`` any missing, unexpected or mismatched key raises :class:`CheckpointError`
    naming it; otherwise what fits is loaded and the rest is listed in the report.
    """
    sd = dict(state_dict)
    notes = []
    key = "patch_embed.proj.weight"
    own = encoder.state_dict()
    if key in sd and key in own and sd[key].shape[1] == 1 and own[key].shape[1] > 1:
        n = own[key].shape[1]
        if sd[key].shape[0] == own[key].shape[0]:
            sd[key] = adapt_in_channels(sd[key], n)
            notes.append(f"patch embedding: 1-channel kernel repeated over {n} input channels and divided by {n}")
    report = load_state_dict_reported(encoder, sd, strict=strict, what="encoder")
    report.adapted = notes + report.adapted
    for note in notes:
        logger.info(note)
    return report


def load_decoder_parts(decoder: nn.Module, parts: DecoderParts, kind: str, norm: str) -> LoadReport:
    """Load the decoder blocks a checkpoint carries into SMITNet's ``decoder``, a decoder of ``kind`` (``"smit"`` or
    ``"light"``) with ``norm``, strictly: a block of another decoder kind or norm, or a carried tensor that is
    missing, unexpected or of another shape raises :class:`CheckpointError` before anything is copied.

    The blocks the checkpoint does not carry keep their initialisation (the segmentation outputs ``out`` and
    ``ds_heads`` always; ``decoder1``-``decoder5`` with the skips alone), and the report's note names them. A
    1-channel ``encoder1`` loads into an n-channel one as the patch embedding does (kernel repeated, divided by n).
    """
    if (parts.kind, parts.norm) != (kind, norm):
        raise CheckpointError(
            f"The checkpoint's decoder blocks belong to the {parts.kind!r} decoder with {parts.norm} norm, this network "
            f"has the {kind!r} decoder with {norm} norm; fine-tune with the network they were pretrained for.")
    own_modules = [name for name, _ in decoder.named_children()]
    absent = [name for name in parts.modules if name not in own_modules]
    if absent:
        raise CheckpointError(f"The checkpoint's decoder blocks {absent} do not exist in this network's decoder.")
    carried = nn.Module()  # the carried blocks of ``decoder`` itself (shared, so loading into it loads into them)
    for name in parts.modules:
        carried.add_module(name, getattr(decoder, name))
    state_dict = {k[len(DECODER_PREFIX):]: v for k, v in parts.state_dict.items()}
    own = carried.state_dict()
    notes = []
    for key in ("encoder1.layer.conv1.conv.weight", "encoder1.layer.conv3.conv.weight"):
        if key in state_dict and key in own and state_dict[key].shape[1] == 1 and own[key].shape[1] > 1 \
                and state_dict[key].shape[0] == own[key].shape[0]:
            state_dict[key] = adapt_in_channels(state_dict[key], own[key].shape[1])
            notes.append(f"{key}: 1-channel kernel repeated over {own[key].shape[1]} input channels and divided by "
                         f"{own[key].shape[1]}")
    report = load_state_dict_reported(carried, state_dict, strict=True, what="decoder blocks")
    kept = [name for name in own_modules if name not in parts.modules]
    report.adapted = notes + [f"decoder blocks loaded ({', '.join(parts.parts)}): {', '.join(parts.modules)}; "
                              f"at their initialisation: {', '.join(kept) or 'none'}"]
    return report
