"""``smit_convert SRC -o DST``: turn the authors' or MONAI's weights (or a pretraining run's ``checkpoint_latest.pt``, or
its folder) into an nnunet_smit encoder checkpoint."""
from __future__ import annotations

import argparse
import sys
from typing import List, Optional

from nnunet_smit.errors import SMITError, describe_os_error


def convert(src: str, dst: str) -> str:
    """Convert ``src`` to the project's checkpoint at ``dst``; returns the load report text. Decoder blocks the source
    carries beside the encoder (``smit_pretrain --reconstruct_through``) travel along, checked by a strict load into
    SMITNet's decoder."""
    from nnunet_smit.architectures import SwinEncoder
    from nnunet_smit.architectures.smit_net import DECODERS
    from nnunet_smit.checkpoint import (
        load_decoder_parts, load_encoder_checkpoint, load_encoder_weights, save_encoder_checkpoint,
    )

    ckpt = load_encoder_checkpoint(src)
    encoder = SwinEncoder(ckpt.config)
    report = load_encoder_weights(encoder, ckpt.state_dict, strict=True)
    report.adapted.extend(ckpt.notes)
    reports = [report.summary()]
    parts = ckpt.decoder_parts
    if parts is not None:
        decoder = DECODERS[parts.kind](ckpt.config.in_channels, ckpt.config.embed_dim, 1, parts.norm)
        reports.append(load_decoder_parts(decoder, parts, parts.kind, parts.norm).summary())
    summary = dict(ckpt.summary)
    summary.setdefault("converted_from", ckpt.source)
    # The fingerprints of the scans the weights have seen travel along (the fine-tuning leakage check reads them).
    sha = save_encoder_checkpoint(dst, encoder.state_dict(), ckpt.config, ckpt.preprocessing, ckpt.patch_size,
                                  summary, scan_fingerprints=ckpt.pretraining_scans, decoder_parts=parts)
    return (
        f"source layout: {ckpt.source}\n"
        f"architecture: {ckpt.config.to_dict()}\n"
        f"parts: {', '.join(ckpt.parts)}\n"
        + "\n".join(reports) + "\n"
        f"wrote {dst} (sha256 {sha})"
    )


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        prog="smit_convert",
        description="Convert SMIT weights (the authors' pretraining output, released pre_train_weight.pt or "
        "fine-tuning network; MONAI SwinUNETR / model_swinvit.pt; an nnunet_smit checkpoint, or a smit_pretrain run's "
        "checkpoint_latest.pt or folder) into an nnunet_smit encoder checkpoint, and print the load report.",
    )
    parser.add_argument("src", help="weights file to convert, or a smit_pretrain output folder")
    parser.add_argument("-o", "--output", required=True, help="output checkpoint (.pt, or .safetensors)")
    args = parser.parse_args(argv)
    try:
        print(convert(args.src, args.output))
    except SMITError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # the output cannot be written (a missing folder's parent is made; a full disk is not)
        print(f"error: {describe_os_error(exc)}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
