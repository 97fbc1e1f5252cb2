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


def _block_widths(decoder):
    """Output channels of each resolution's blocks, full resolution to 1/32, read from the modules themselves."""
    pairs = [(decoder.encoder1, decoder.decoder1), (decoder.encoder2, decoder.decoder2),
             (decoder.encoder3, decoder.decoder3), (decoder.encoder4, decoder.decoder4), (None, decoder.decoder5),
             (decoder.encoder10, None)]
    widths = []
    for skip_block, up_block in pairs:
        outs = {b.conv2.conv.out_channels for b in (skip_block and skip_block.layer, up_block and up_block.conv_block) if b}
        assert len(outs) == 1  # a resolution's blocks agree
        widths.append(outs.pop())
    return widths


def test_widths_are_nnunet_sized_and_never_wider_than_the_authors():
    small = SMITLightDecoder(in_channels=1, feature_size=48, num_classes=3)
    # 16 / 32 on top, the encoder's 2F / 4F in the middle, nnU-Net's cap of 320 at 1/16 and 1/32 (not 384 / 768)
    assert _block_widths(small) == [16, 32, 96, 192, 320, 320] == list(small.widths)
    assert [h.conv.conv.in_channels for h in small.ds_heads] == [32, 96, 192, 320]
    assert small.decoder5.conv_block.conv1.conv.in_channels == 320 + 384  # the encoder's 1/16 skip enters as is
    assert _block_widths(SMITDecoder(1, 48, 3)) == [48, 48, 96, 192, 384, 768]
    tiny = SMITLightDecoder(in_channels=1, feature_size=12, num_classes=3)
    assert _block_widths(tiny) == _block_widths(SMITDecoder(1, 12, 3)) == [12, 12, 24, 48, 96, 192]


def test_the_authors_decoder_keeps_its_keys_and_shapes():
    """The general widths must not move a single authors' tensor: their released network loads by these."""
    decoder = SMITDecoder(1, 48, 14, norm="batch")
    shapes = {k: tuple(v.shape) for k, v in decoder.state_dict().items()}
    assert shapes["encoder10.layer.conv1.conv.weight"] == (768, 768, 3, 3, 3)
    assert shapes["decoder5.transp_conv.conv.weight"] == (768, 384, 2, 2, 2)
    assert shapes["decoder5.conv_block.conv1.conv.weight"] == (384, 768, 3, 3, 3)
    assert shapes["decoder5.conv_block.conv3.conv.weight"] == (384, 768, 1, 1, 1)
    assert shapes["decoder1.conv_block.conv1.conv.weight"] == (48, 96, 3, 3, 3)
    assert "encoder10.layer.conv3.conv.weight" not in shapes  # same width in and out: identity residual
    assert sum(v.numel() for v in decoder.state_dict().values() if v.is_floating_point()) == pytest.approx(54.15e6, rel=1e-3)


def test_six_positive_widths_are_required():
    with pytest.raises(ValueError, match="6 positive widths"):
        SMITDecoder(1, 12, 3, widths=(12, 12, 24, 48, 96))


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
    # 96^3: 145 against 587 GFLOP (docs/performance.md); convolution counts are exact, so 1 GFLOP is ample.
    assert _decoder_gflops(SMITDecoder) == pytest.approx(587.2, abs=1.0)
    assert _decoder_gflops(SMITLightDecoder) == pytest.approx(144.6, abs=1.0)


def test_the_light_network_holds_little_more_than_half_the_authors_parameters():
    config = SMITConfig.preset("smit_small")
    counts = {d: sum(p.numel() for p in SMITNet(config, 1, 14, decoder=d).parameters()) for d in ("smit", "light")}
    assert counts["smit"] / 1e6 == pytest.approx(62.91, abs=0.01)
    assert counts["light"] / 1e6 == pytest.approx(35.48, abs=0.01)


def test_checkpointing_the_light_networks_encoder_changes_no_gradient():
    torch.manual_seed(0)
    plain = SMITNet(SMITConfig.preset("tiny"), 1, 3, deep_supervision=True, decoder="light").train()
    checkpointed = SMITNet(SMITConfig.preset("tiny"), 1, 3, deep_supervision=True, decoder="light",
                           gradient_checkpointing=True).train()
    checkpointed.load_state_dict(plain.state_dict())
    x = torch.randn(1, 1, 32, 32, 64)
    for net in (plain, checkpointed):
        sum(o.square().mean() for o in net(x)).backward()
    for (name, a), (_, b) in zip(plain.named_parameters(), checkpointed.named_parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-6, msg=name)


def test_unknown_decoder_is_refused():
    with pytest.raises(ValueError, match="Unknown decoder 'heavy'"):
        SMITNet(SMITConfig.preset("tiny"), 1, 3, decoder="heavy")
