"""MONAI SwinUNETR's Swin encoder imported into a SMIT encoder config reproduces MONAI's features."""
import pytest
import torch

from nnunet_smit.architectures import SMITConfig, SwinEncoder
from nnunet_smit.architectures.official import convert_monai_swinvit
from nnunet_smit.checkpoint import load_encoder_checkpoint, load_encoder_weights

monai_swin = pytest.importorskip("monai.networks.nets.swin_unetr", reason="monai is a test extra")


def perturbed_monai_swinunetr(downsample="merging"):
    torch.manual_seed(3)
    model = monai_swin.SwinUNETR(in_channels=1, out_channels=2, feature_size=48, downsample=downsample).eval()
    with torch.no_grad():
        for p in model.parameters():  # LayerNorms at 1/0 and zero bias tables would hide mistakes
            p.add_(torch.randn_like(p) * 0.1)
    return model


@pytest.mark.parametrize("shape", [(64, 64, 64), (96, 64, 128)])
def test_monai_swinvit_features_reproduced(shape):
    model = perturbed_monai_swinunetr()
    conversion = convert_monai_swinvit(model.state_dict())
    assert conversion.config == SMITConfig.preset("monai_swinvit")
    assert len(conversion.dropped["outside the Swin encoder"]) > 0  # the SwinUNETR decoder
    encoder = SwinEncoder(conversion.config).eval()
    report = load_encoder_weights(encoder, conversion.state_dict)
    assert report.ok
    x = torch.randn(1, 1, *shape)
    with torch.no_grad():
        theirs = model.swinViT(x, normalize=True)
        ours = encoder(x)
    for a, b in zip(ours.features + [ours.bottleneck], theirs):
        assert a.shape == b.shape
        assert (a - b).abs().max().item() < 1e-4


def test_monai_merging_v2_is_a_different_order():
    model = perturbed_monai_swinunetr(downsample="mergingv2")
    conversion = convert_monai_swinvit(model.state_dict())
    x = torch.randn(1, 1, 64, 64, 64)
    with torch.no_grad():
        theirs = model.swinViT(x, normalize=True)
        default = SwinEncoder(conversion.config).eval()
        load_encoder_weights(default, conversion.state_dict)
        v2 = SwinEncoder(conversion.config.replace(merge_order="monai_v2")).eval()
        load_encoder_weights(v2, conversion.state_dict)
        assert (v2(x).bottleneck - theirs[4]).abs().max().item() < 1e-4
        assert (default(x).bottleneck - theirs[4]).abs().max().item() > 1e-3


def test_model_swinvit_layout_file(tmp_path):
    """MONAI's self-supervised model_swinvit.pt: {'state_dict': {'module.layers1.0.blocks.0.mlp.fc1.weight', ...}}."""
    model = perturbed_monai_swinunetr()
    sd = {}
    for key, value in model.swinViT.state_dict().items():
        key = key.replace(".mlp.linear1.", ".mlp.fc1.").replace(".mlp.linear2.", ".mlp.fc2.")
        sd[f"module.{key}"] = value
    sd["module.rotation_head.weight"] = torch.zeros(4, 768)
    path = tmp_path / "model_swinvit.pt"
    torch.save({"epoch": 100, "state_dict": sd}, path)
    ckpt = load_encoder_checkpoint(path)
    assert ckpt.source == "monai_swinvit"
    encoder = SwinEncoder(ckpt.config).eval()
    assert load_encoder_weights(encoder, ckpt.state_dict).ok
    x = torch.randn(1, 1, 64, 64, 64)
    with torch.no_grad():
        assert (encoder(x).bottleneck - model.swinViT(x, normalize=True)[4]).abs().max().item() < 1e-4
