"""Pure torch modules: the SMIT Swin-3D encoder, its decoders and the encoder-decoder network."""
from nnunet_smit.architectures.config import MERGE_ORDERS, PRESETS, SMITConfig
from nnunet_smit.architectures.decoder import SMITDecoder
from nnunet_smit.architectures.light_decoder import SMITLightDecoder
from nnunet_smit.architectures.smit_net import IntensityMapping, SMITNet
from nnunet_smit.architectures.swin_encoder import EncoderOutput, SwinEncoder

__all__ = [
    "EncoderOutput",
    "IntensityMapping",
    "MERGE_ORDERS",
    "PRESETS",
    "SMITConfig",
    "SMITDecoder",
    "SMITLightDecoder",
    "SMITNet",
    "SwinEncoder",
]
