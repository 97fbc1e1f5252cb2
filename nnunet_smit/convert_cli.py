"""``smit_convert SRC -o DST``: turn the authors' or MONAI's weights into an nnunet_smit encoder checkpoint."""
from __future__ import annotations

import argparse
import sys
from typing import List, Optional

from nnunet_smit.errors import SMITError


def convert(src: str, dst: str) -> str:
    """Convert ``src`` to the project's checkpoint at ``dst``; returns the load report text."""
    from nnunet_smit.architectures import SwinEncoder
    from nnunet_smit.checkpoint import load_encoder_checkpoint, load_encoder_weights, save_encoder_checkpoint

    ckpt = load_encoder_checkpoint(src)
    encoder = SwinEncoder(ckpt.config)
    report = load_encoder_weights(encoder, ckpt.state_dict, strict=True)
    report.adapted.extend(ckpt.notes)
    summary = dict(ckpt.summary)
    summary.setdefault("converted_from", ckpt.source)
    sha = save_encoder_checkpoint(dst, encoder.state_dict(), ckpt.config, ckpt.preprocessing, ckpt.patch_size, summary)
    return (
        f"source layout: {ckpt.source}\n"
        f"architecture: {ckpt.config.to_dict()}\n"
        f"{report.summary()}\n"
        f"wrote {dst} (sha256 {sha})"
    )


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        prog="smit_convert",
        description="Convert SMIT weights (the authors' pretraining output, released pre_train_weight.pt or "
        "fine-tuning network; MONAI SwinUNETR / model_swinvit.pt; or an nnunet_smit checkpoint) into an "
        "nnunet_smit encoder checkpoint, and print the load report.",
    )
    parser.add_argument("src", help="weights file to convert")
    parser.add_argument("-o", "--output", required=True, help="output checkpoint (.pt, or .safetensors)")
    args = parser.parse_args(argv)
    try:
        print(convert(args.src, args.output))
    except SMITError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
