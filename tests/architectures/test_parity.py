"""Numerical parity with the authors' fine-tuning network (reference case A)."""
import torch

from nnunet_smit.architectures import SMITNet

# fp32 noise on this vector is ~1e-7; a wrong merge order or position-bias index moves logits by ~4e-3.
TOL = 1e-4


def _load(reference_dir, name):
    return torch.load(reference_dir / name, map_location="cpu", weights_only=True)


def test_case_a_logits_and_features_match_reference(reference_dir):
    net = SMITNet.from_official_state_dict(_load(reference_dir, "state_dict.pt"))
    x = _load(reference_dir, "caseA_input.pt")
    expected_logits = _load(reference_dir, "caseA_output.pt")
    expected = _load(reference_dir, "caseA_encoder_feats.pt")
    assert net.config.embed_dim == 12 and net.config.depths == (2, 2, 4, 2) and net.config.window_size == 4
    with torch.no_grad():
        logits = net(x)
        enc = net.encoder(x)
    assert logits.shape == expected_logits.shape == (1, 3, 64, 64, 64)
    assert (logits - expected_logits).abs().max().item() < TOL
    assert len(enc.features) == len(expected["outs"]) == 4
    for ours, theirs in zip(enc.features, expected["outs"]):
        assert ours.shape == theirs.shape
        assert (ours - theirs).abs().max().item() < TOL
    tokens = enc.bottleneck.flatten(2).transpose(1, 2)  # (B, N, 16C)
    assert tokens.shape == expected["bottleneck_tokens"].shape
    assert (tokens - expected["bottleneck_tokens"]).abs().max().item() < TOL


def test_parity_breaks_with_standard_window_reverse(reference_dir):
    """The authors' token placement is what their weights need: the standard inverse moves the logits."""
    state_dict = _load(reference_dir, "state_dict.pt")
    net = SMITNet.from_official_state_dict(state_dict)
    standard = SMITNet(net.config.replace(legacy_window_reverse=False), 1, 3, norm="batch").eval()
    standard.load_state_dict(net.state_dict())
    x = _load(reference_dir, "caseA_input.pt")
    with torch.no_grad():
        assert (standard(x) - _load(reference_dir, "caseA_output.pt")).abs().max().item() > 1e-3
