"""The encoder checkpoint format, strict loading with reports, and the importers of foreign weights."""
import json

import pytest
import torch

from nnunet_smit.architectures import SMITConfig, SMITNet, SwinEncoder
from nnunet_smit.checkpoint import (
    FORMAT_NAME,
    load_encoder_checkpoint,
    load_encoder_weights,
    save_encoder_checkpoint,
)
from nnunet_smit.conventions import PretrainPreprocessing
from nnunet_smit.errors import CheckpointError


def official_random_encoder(reference_dir):
    """Random tensors with exactly the names and shapes of the authors' pretraining output."""
    shapes = json.loads((reference_dir / "official_pretrain_encoder_keys.json").read_text())
    sd = {}
    for key, shape in shapes.items():
        if key.endswith("relative_position_index"):
            sd[key] = torch.randint(0, 343, shape)
        else:
            sd[key] = torch.randn(shape)
    return sd


WRAPPERS = {
    "flat": lambda sd: sd,
    "state_dict": lambda sd: {"state_dict": sd},
    "module": lambda sd: {f"module.{k}": v for k, v in sd.items()},
    "state_dict+module": lambda sd: {"state_dict": {f"module.{k}": v for k, v in sd.items()}, "epoch": 3},
    "backbone": lambda sd: {f"backbone.{k}": v for k, v in sd.items()},
    "module.backbone": lambda sd: {"state_dict": {f"module.backbone.{k}": v for k, v in sd.items()}},
    "transformer": lambda sd: {f"transformer.{k}": v for k, v in sd.items()},
}


@pytest.mark.parametrize("wrapper", sorted(WRAPPERS))
def test_official_pretrain_keys_load_with_zero_missing(tmp_path, reference_dir, wrapper):
    sd = official_random_encoder(reference_dir)
    path = tmp_path / "pre_train_weight.pt"
    torch.save(WRAPPERS[wrapper](sd), path)
    ckpt = load_encoder_checkpoint(path)
    assert ckpt.source == "official_pretrain"
    # the authors' weights come with their window-reverse slip: the smit_small_authors preset, not a fresh smit_small
    assert ckpt.config == SMITConfig.preset("smit_small_authors").replace(drop_path_rate=ckpt.config.drop_path_rate)
    assert not SMITConfig.preset("smit_small").legacy_window_reverse
    encoder = SwinEncoder(SMITConfig.preset("smit_small_authors"))
    report = load_encoder_weights(encoder, ckpt.state_dict)
    assert report.ok and report.missing == [] and report.unexpected == []
    assert report.loaded == 155 - 10 - 1  # minus 10 derived position indices and the mask token
    assert torch.equal(encoder.layers[2].blocks[3].attn.qkv.weight, sd["layers.2.blocks.3.attn.qkv.weight"])
    assert any("mask token" in note for note in ckpt.notes)


def test_shape_mismatch_names_the_key(tmp_path, reference_dir):
    sd = official_random_encoder(reference_dir)
    sd["layers.1.blocks.0.mlp.fc1.weight"] = torch.randn(100, 96)
    encoder = SwinEncoder(SMITConfig.preset("smit_small"))
    with pytest.raises(CheckpointError, match=r"layers\.1\.blocks\.0\.mlp\.fc1\.weight"):
        load_encoder_weights(encoder, {k: v for k, v in sd.items() if "index" not in k and k != "mask_token"})


def test_missing_and_unexpected_are_reported_when_not_strict():
    encoder = SwinEncoder(SMITConfig.preset("tiny"))
    sd = encoder.state_dict()
    sd.pop("norm0.weight")
    sd["extra.weight"] = torch.zeros(1)
    with pytest.raises(CheckpointError, match="missing"):
        load_encoder_weights(encoder, sd)
    report = load_encoder_weights(encoder, sd, strict=False)
    assert report.missing == ["norm0.weight"] and report.unexpected == ["extra.weight"]
    assert "missing: norm0.weight" in report.summary()


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_roundtrip_with_metadata_and_weights_only(tmp_path, suffix):
    config = SMITConfig.preset("tiny")
    encoder = SwinEncoder(config)
    prep = PretrainPreprocessing(target_spacing_mm=(1.5, 1.5, 2.0), hu_window=(-500, 500))
    path = tmp_path / f"enc{suffix}"
    sha = save_encoder_checkpoint(path, encoder.state_dict(), config, prep, (64, 64, 64), {"cases": 3})
    if suffix == ".pt":
        raw = torch.load(path, weights_only=True)
        assert raw["format"] == FORMAT_NAME and raw["sha256"] == sha and raw["config"]["embed_dim"] == 12
    ckpt = load_encoder_checkpoint(path)
    assert ckpt.source == "nnunet_smit" and ckpt.sha256 == sha
    assert ckpt.config == config and ckpt.preprocessing == prep and ckpt.patch_size == (64, 64, 64)
    assert ckpt.summary == {"cases": 3}
    fresh = SwinEncoder(config)
    assert load_encoder_weights(fresh, ckpt.state_dict).loaded == len(encoder.state_dict())
    assert all(torch.equal(a, b) for a, b in zip(fresh.state_dict().values(), encoder.state_dict().values()))


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_pretraining_scan_fingerprints_travel_with_the_checkpoint(tmp_path, suffix):
    config = SMITConfig.preset("tiny")
    scans = {f"{i:016x}": f"case_{i:05d}_{i * 7919:08x}" for i in range(500)}
    path = tmp_path / f"enc{suffix}"
    save_encoder_checkpoint(path, SwinEncoder(config).state_dict(), config, scan_fingerprints=scans)
    assert load_encoder_checkpoint(path).pretraining_scans == scans
    save_encoder_checkpoint(path, SwinEncoder(config).state_dict(), config)
    assert load_encoder_checkpoint(path).pretraining_scans == {}


def test_a_checkpoint_written_before_fingerprints_loads_with_none(tmp_path):
    config = SMITConfig.preset("tiny")
    path = tmp_path / "enc.pt"
    sha = save_encoder_checkpoint(path, SwinEncoder(config).state_dict(), config, scan_fingerprints={"ab" * 8: "x"})
    raw = torch.load(path, weights_only=True)
    del raw["pretraining_scans"]  # the layout of format version 1 before the key existed
    torch.save(raw, path)
    ckpt = load_encoder_checkpoint(path)
    assert ckpt.sha256 == sha and ckpt.pretraining_scans == {}


def test_corrupt_weights_fail_the_hash(tmp_path):
    config = SMITConfig.preset("tiny")
    path = tmp_path / "enc.pt"
    save_encoder_checkpoint(path, SwinEncoder(config).state_dict(), config)
    raw = torch.load(path, weights_only=True)
    raw["state_dict"]["norm0.weight"] += 1
    torch.save(raw, path)
    with pytest.raises(CheckpointError, match="sha256"):
        load_encoder_checkpoint(path)


class CodePayload:
    pass


def test_unreadable_and_code_carrying_files_are_refused(tmp_path):
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint at all")
    with pytest.raises(CheckpointError, match="cannot be read"):
        load_encoder_checkpoint(junk)

    evil = tmp_path / "evil.pt"
    torch.save({"state_dict": CodePayload()}, evil)  # unpickling it would need code
    with pytest.raises(CheckpointError, match="weights-only"):
        load_encoder_checkpoint(evil)
    unknown = tmp_path / "unknown.pt"
    torch.save({"fc.weight": torch.zeros(2, 2)}, unknown)
    with pytest.raises(CheckpointError, match="no known"):
        load_encoder_checkpoint(unknown)


def test_single_channel_weights_into_four_channels_repeat_divided():
    config = SMITConfig.preset("tiny")
    one = SwinEncoder(config).eval()
    four = SwinEncoder(config.replace(in_channels=4)).eval()
    report = load_encoder_weights(four, one.state_dict())
    assert report.ok and any("divided by 4" in note for note in report.adapted)
    x = torch.randn(1, 1, 64, 64, 64)
    with torch.no_grad():
        assert torch.allclose(one(x).bottleneck, four(x.repeat(1, 4, 1, 1, 1)).bottleneck, atol=1e-5)


def test_official_finetune_network_imports_encoder(tmp_path, reference_dir):
    sd = torch.load(reference_dir / "state_dict.pt", weights_only=True)
    path = tmp_path / "finetuned.pt"
    torch.save({"state_dict": sd}, path)
    ckpt = load_encoder_checkpoint(path)
    assert ckpt.source == "official_finetune" and ckpt.config.embed_dim == 12
    assert ckpt.pretraining_scans == {}  # the authors' weights record no pretraining scans: unknown, not none
    net = SMITNet(ckpt.config, 1, 3)
    report = load_encoder_weights(net.encoder, ckpt.state_dict)
    assert report.ok and report.loaded == len(net.encoder.state_dict())


def test_official_finetune_key_layout_builds_full_network(reference_dir):
    shapes = json.loads((reference_dir / "official_finetune_keys.json").read_text())
    sd = {k: (torch.randint(0, 5, s) if "index" in k or "num_batches" in k else torch.randn(s)) for k, s in shapes.items()}
    net = SMITNet.from_official_state_dict(sd)
    assert net.config == SMITConfig.preset("smit_small_authors").replace(drop_path_rate=net.config.drop_path_rate)
    assert net.decoder.out.conv.conv.out_channels == 14
    assert torch.equal(net.decoder.encoder10.layer.conv1.conv.weight, sd["encoder10.layer.conv1.conv.weight"])


def test_a_folder_without_a_checkpoint_is_one_line(tmp_path):
    from nnunet_smit.checkpoint import load_encoder_checkpoint

    with pytest.raises(CheckpointError, match=r"is a folder without an encoder checkpoint \(smit_encoder_teacher.pt, "
                                              r"smit_encoder_student.pt, checkpoint_latest.pt\)"):
        load_encoder_checkpoint(tmp_path)


def test_a_truncated_checkpoint_is_one_line_that_says_so(tmp_path):
    from nnunet_smit.architectures import SMITConfig, SwinEncoder
    from nnunet_smit.checkpoint import load_encoder_checkpoint, save_encoder_checkpoint

    config = SMITConfig.preset("tiny")
    save_encoder_checkpoint(tmp_path / "whole.pt", SwinEncoder(config).state_dict(), config)
    data = (tmp_path / "whole.pt").read_bytes()
    (tmp_path / "cut.pt").write_bytes(data[: len(data) // 3])
    with pytest.raises(CheckpointError) as info:
        load_encoder_checkpoint(tmp_path / "cut.pt")
    message = str(info.value)
    assert "a truncated or damaged copy" in message and "copy it again" in message and "\n" not in message
    assert "Python objects" not in message


def test_a_safetensors_file_without_metadata_is_read_as_the_authors_layout_and_says_so(tmp_path):
    from safetensors.torch import save_file

    from nnunet_smit.architectures import SMITConfig, SwinEncoder
    from nnunet_smit.checkpoint import load_encoder_checkpoint

    encoder = SwinEncoder(SMITConfig.preset("tiny"))
    save_file({k: v.contiguous() for k, v in encoder.state_dict().items()}, tmp_path / "plain.safetensors")
    checkpoint = load_encoder_checkpoint(tmp_path / "plain.safetensors")
    assert checkpoint.source == "official_pretrain"
    assert any("no nnunet_smit metadata in this safetensors file" in note for note in checkpoint.notes)
