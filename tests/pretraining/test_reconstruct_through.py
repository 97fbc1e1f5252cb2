"""Pretraining SMITNet's conv blocks through the reconstruction (``--reconstruct_through skips`` / ``decoder``): no
masked voxel reaches a prediction, the export carries the blocks under SMITNet's keys and they load strictly, an
encoder-only file still loads, resume is bit exact (CPU, tiny preset, 64^3 views, 1-2 steps)."""
import logging

import pytest
import torch

from nnunet_smit.architectures import SMITConfig, SMITNet, SwinEncoder
from nnunet_smit.architectures.decoder import DECODER_PARTS
from nnunet_smit.checkpoint import (
    load_decoder_parts, load_encoder_checkpoint, load_encoder_weights, save_encoder_checkpoint,
)
from nnunet_smit.convert_cli import convert
from nnunet_smit.errors import CheckpointError, SMITError
from nnunet_smit.pretraining.cli import build_parser, config_from_args
from nnunet_smit.pretraining.masking import cube_mask_to_grid
from nnunet_smit.pretraining.model import HeadConfig, SMITPretrainModel
from nnunet_smit.pretraining.reconstruction_paths import PARTS_TRAINED
from nnunet_smit.pretraining.state import CHECKPOINT_NAME
from nnunet_smit.pretraining.trainer import PretrainTrainer
from tests.pretraining.training_support import VIEW, phantom_cache, tiny_config

CUBE = 16
STEPS = 2


def _masks() -> torch.Tensor:
    """(2 scans, 1 view, 4, 4, 4) cube masks, half of the cubes masked, differently per scan."""
    masks = torch.zeros(2, 1, 4, 4, 4, dtype=torch.bool)
    masks[0, 0, ::2] = True
    masks[1, 0, :, 1::2] = True
    return masks


def _views(masks: torch.Tensor) -> torch.Tensor:
    """Visible voxels around 0.3, masked ones around 0.9: a copy of the input would score about 0."""
    torch.manual_seed(1)
    voxels = cube_mask_to_grid(masks.flatten(0, 1), CUBE, 1).view(2, 1, 1, VIEW, VIEW, VIEW)
    return torch.where(voxels, 0.9 + 0.1 * torch.rand(voxels.shape), 0.3 + 0.1 * torch.rand(voxels.shape))


@pytest.mark.parametrize("through", ["bottleneck", "skips", "decoder"])
def test_no_reconstruction_target_leaks_through_a_skip(through):
    torch.manual_seed(0)
    model = SMITPretrainModel(SMITConfig.preset("tiny"), heads=HeadConfig(64, 32, 128), mask_cube_size=CUBE,
                              reconstruct_through=through)
    masks = _masks()
    views = _views(masks)
    # Not ~0 at initialisation: nothing carries the masked voxels' values to their predictions.
    assert model.compute_losses(views, masks, 0.04).terms["reconstruction"] > 0.1

    x = views[:, 0].clone().requires_grad_(True)
    hidden = cube_mask_to_grid(masks[:, 0], CUBE, 1)[:, None]
    token_mask = cube_mask_to_grid(masks[:, 0], CUBE, 2)
    reconstruction = model.student(x, token_mask, None).reconstruction
    (gradient,) = torch.autograd.grad(reconstruction.sum(), x)
    # Every prediction, masked voxels' and visible ones', is blind to the masked input voxels ...
    assert torch.count_nonzero(gradient[hidden.expand_as(x)]) == 0
    # ... while the path is live (the check could fail): visible voxels do move the predictions.
    assert torch.count_nonzero(gradient[~hidden.expand_as(x)]) > 0
    # Bit for bit (the same kernels: with gradients, as above).
    changed = torch.where(hidden, torch.rand_like(x), x).detach()
    assert torch.equal(model.student(changed, token_mask, None).reconstruction, reconstruction)


def test_the_conv_paths_train_smitnets_blocks_and_the_teacher_keeps_their_ema_without_running_them():
    torch.manual_seed(0)
    model = SMITPretrainModel(SMITConfig.preset("tiny"), heads=HeadConfig(64, 32, 128), mask_cube_size=CUBE,
                              reconstruct_through="decoder")
    masks = _masks()
    model.compute_losses(_views(masks), masks, 0.04).total.backward()
    for name in DECODER_PARTS["skips"] + DECODER_PARTS["decoder"]:
        block = getattr(model.student.recon_head.decoder, name)
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in block.parameters()), name
    # The encoder's skip norms get a gradient too (they get none with SMIT's bottleneck head).
    assert model.student.encoder.norm0.weight.grad.abs().sum() > 0
    assert model.teacher.reconstructs is False and model.teacher.recon_head is not None
    assert all(not p.requires_grad for p in model.teacher.recon_head.parameters())


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return phantom_cache(tmp_path_factory)


@pytest.fixture(scope="module", params=["skips", "decoder"])
def run(request, cache, tmp_path_factory):
    """A run of STEPS steps through ``skips`` or ``decoder``: (through, trainer, exported path)."""
    out = tmp_path_factory.mktemp(f"through_{request.param}")
    trainer = PretrainTrainer(tiny_config(max_steps=STEPS, reconstruct_through=request.param), cache, out)
    return request.param, trainer, trainer.fit()


def test_the_export_carries_the_trained_blocks_under_smitnets_keys_and_they_load_strictly(run):
    through, trainer, exported = run
    raw = torch.load(exported, map_location="cpu", weights_only=True)
    assert raw["format_version"] == 2 and raw["parts"] == ["encoder", *PARTS_TRAINED[through]]
    assert raw["decoder"]["kind"] == "smit" and raw["decoder"]["norm"] == "instance"
    checkpoint = load_encoder_checkpoint(exported)
    assert checkpoint.parts == ("encoder", *PARTS_TRAINED[through])
    parts = checkpoint.decoder_parts
    network = SMITNet(checkpoint.config, 1, 3, deep_supervision=True)
    modules = [name for part in PARTS_TRAINED[through] for name in DECODER_PARTS[part]]
    assert set(parts.state_dict) == {k for k in network.state_dict() if k.split(".")[1] in modules}
    untouched = {k: v.clone() for k, v in network.decoder.state_dict().items() if k.split(".")[0] not in modules}

    assert load_encoder_weights(network.encoder, checkpoint.state_dict, strict=True).ok
    report = load_decoder_parts(network.decoder, parts, "smit", "instance")
    assert report.ok and report.loaded == len(parts.state_dict)
    assert "at their initialisation: " + ("decoder5, decoder4, decoder3, decoder2, decoder1, out, ds_heads"
                                          if through == "skips" else "out, ds_heads") in report.summary()
    # The teacher's blocks (its EMA), beside the teacher's encoder; the segmentation outputs stay as they were.
    teacher = trainer.model.teacher.recon_head.decoder.state_dict()
    loaded = network.decoder.state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in teacher.items())
    assert all(torch.equal(loaded[k], v) for k, v in untouched.items())
    with pytest.raises(CheckpointError, match="'light' decoder"):
        load_decoder_parts(SMITNet(checkpoint.config, 1, 3, decoder="light").decoder, parts, "light", "instance")


def test_the_blocks_travel_through_smit_convert_and_a_run_still_going(run, tmp_path):
    through, trainer, exported = run
    exported_parts = load_encoder_checkpoint(exported).decoder_parts
    converted = tmp_path / "converted.safetensors"
    assert f"parts: encoder, {', '.join(PARTS_TRAINED[through])}" in convert(str(exported), str(converted))
    for path in (converted, trainer.output_dir / CHECKPOINT_NAME):
        parts = load_encoder_checkpoint(path).decoder_parts
        assert (parts.parts, parts.kind, parts.norm) == (exported_parts.parts, "smit", "instance")
        assert parts.state_dict.keys() == exported_parts.state_dict.keys()
        assert all(torch.equal(v, exported_parts.state_dict[k]) for k, v in parts.state_dict.items()), path


@pytest.mark.parametrize("run", ["decoder"], indirect=True)  # every block of the skips run, and more
def test_resume_with_the_new_parts_is_bit_exact(run, cache, tmp_path):
    through, reference, _ = run
    PretrainTrainer(tiny_config(max_steps=1, reconstruct_through=through), cache, tmp_path).fit()
    resumed = PretrainTrainer(tiny_config(max_steps=STEPS, reconstruct_through=through), cache, tmp_path)
    resumed.fit()
    assert resumed.step == reference.step == STEPS
    expected = reference.model.state_dict()
    assert any(k.startswith("teacher.recon_head.decoder.") for k in expected)
    for key, value in resumed.model.state_dict().items():
        assert torch.equal(value, expected[key]), key


def test_an_encoder_only_checkpoint_is_still_version_1_and_loads_everywhere(run, cache, tmp_path, caplog):
    config = SMITConfig.preset("tiny")
    path = tmp_path / "encoder.pt"
    save_encoder_checkpoint(path, SwinEncoder(config).state_dict(), config)
    raw = torch.load(path, map_location="cpu", weights_only=True)
    assert raw["format_version"] == 1 and raw["parts"] == ["encoder"] and "decoder_state_dict" not in raw
    del raw["parts"]  # written before the field existed
    torch.save(raw, path)
    checkpoint = load_encoder_checkpoint(path)
    assert checkpoint.parts == ("encoder",) and checkpoint.decoder_parts is None
    assert "parts: encoder\n" in convert(str(path), str(tmp_path / "converted.pt"))
    # A run through the skips starts from it (encoders only), and from an export with blocks, which it says it skips.
    _, _, exported = run
    for init in (path, exported):
        trainer = PretrainTrainer(tiny_config(max_steps=1, reconstruct_through="skips", init_encoder=str(init)),
                                  cache, tmp_path / init.stem)
        with caplog.at_level(logging.INFO, logger="nnunet_smit.pretraining.state"):
            trainer._start_from_init_encoder()
        assert torch.equal(trainer.model.student.encoder.layers[0].blocks[0].attn.qkv.weight,
                           load_encoder_checkpoint(init).state_dict["layers.0.blocks.0.attn.qkv.weight"])
    assert "are not read: --init_encoder starts the encoders only" in caplog.text


@pytest.mark.parametrize("argv, message", [
    (["--decoder", "light"], "--decoder light names the decoder"),
    (["--reconstruct_through", "skips", "--no_reconstruction"], "--reconstruct_through skips trains"),
])
def test_an_option_that_would_train_no_block_is_one_line(argv, message):
    with pytest.raises(SMITError, match=message):
        config_from_args(build_parser().parse_args(["-o", "out", "--preset", "tiny", *argv]))


def test_the_options_reach_the_config_and_default_to_the_authors_head():
    parse = build_parser().parse_args
    assert config_from_args(parse(["-o", "out"])).reconstruct_through == "bottleneck"
    config = config_from_args(parse(["-o", "out", "--reconstruct_through", "decoder", "--decoder", "light"]))
    assert (config.reconstruct_through, config.decoder) == ("decoder", "light")
