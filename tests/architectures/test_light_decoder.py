"""The light decoder: SMITNet's outputs and deep supervision with it, its widths, and that it is lighter."""
import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from nnunet_smit.architectures import SMITConfig, SMITDecoder, SMITLightDecoder, SMITNet


def test_outputs_and_deep_supervision_on_a_non_cubic_patch():
    net = SMITNet(SMITConfig.preset("tiny"), in_channels=2, num_classes=3, deep_supervision=True, decoder="light")
    assert isinstance(net.decoder, SMITLightDecoder)
    x = torch.randn(1, 2, 32, 64, 96)
    outputs = net.train()(x)
    expected = [tuple(round(n * s) for n, s in zip(x.shape[2:], scale)) for scale in SMITNet.deep_supervision_scales()]
    assert [tuple(o.shape[2:]) for o in outputs] == expected
    assert all(o.shape[:2] == (1, 3) for o in outputs)
    sum(o.mean() for o in outputs).backward()
    assert all(p.grad is not None for p in net.decoder.parameters())  # every head and block takes part
    net.decoder.deep_supervision = False
    with torch.no_grad():
        assert net.eval()(x).shape == (1, 3, 32, 64, 96)


def test_state_dict_keys_do_not_depend_on_deep_supervision():
    config = SMITConfig.preset("tiny")
    with_ds = SMITNet(config, 1, 3, deep_supervision=True, decoder="light").state_dict()
    without = SMITNet(config, 1, 3, deep_supervision=False, decoder="light").state_dict()
    assert {k: v.shape for k, v in with_ds.items()} == {k: v.shape for k, v in without.items()}


def test_widths_are_nnunet_sized_on_top_and_never_wider_than_the_encoder():
    small = SMITLightDecoder(in_channels=1, feature_size=48, num_classes=3)
    assert small.encoder1.layer.conv2.conv.out_channels == small.decoder1.conv_block.conv2.conv.out_channels == 16
    assert small.encoder2.layer.conv2.conv.out_channels == small.decoder2.conv_block.conv2.conv.out_channels == 32
    assert small.decoder3.conv_block.conv2.conv.out_channels == 96  # 1/4 and below keep the authors' widths
    tiny = SMITLightDecoder(in_channels=1, feature_size=12, num_classes=3)
    assert tiny.decoder1.conv_block.conv2.conv.out_channels == tiny.decoder2.conv_block.conv2.conv.out_channels == 12


def _decoder_gflops(decoder_class, feature_size=48, size=96):
    """Forward GFLOP of a decoder on smit_small-shaped skips, counted on the meta device (nothing is computed)."""
    with torch.device("meta"):
        decoder = decoder_class(1, feature_size, 14)
        x = torch.empty(1, 1, size, size, size)
        features = [torch.empty(1, feature_size * 2**i, *(size // 2 ** (i + 1),) * 3) for i in range(4)]
        bottleneck = torch.empty(1, 16 * feature_size, *(size // 32,) * 3)
        with FlopCounterMode(display=False) as counter, torch.no_grad():
            decoder(x, features, bottleneck)
    return counter.get_total_flops() / 1e9


def test_the_light_decoder_does_a_quarter_of_the_authors_arithmetic_at_smit_small_width():
    # 96^3: 147 against 587 GFLOP (docs/performance.md); convolution counts are exact, so 1 GFLOP is ample.
    assert _decoder_gflops(SMITDecoder) == pytest.approx(587.4, abs=1.0)
    assert _decoder_gflops(SMITLightDecoder) == pytest.approx(147.4, abs=1.0)


def test_unknown_decoder_is_refused():
    with pytest.raises(ValueError, match="Unknown decoder 'heavy'"):
        SMITNet(SMITConfig.preset("tiny"), 1, 3, decoder="heavy")
