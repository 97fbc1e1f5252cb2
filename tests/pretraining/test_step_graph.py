"""The device part of a pretraining step: free of host synchronisation, traceable whole, and the same when compiled.

On a GPU the eager step is bound by the host issuing kernels; every point where the host waits for the device (a
boolean selection, ``bool(tensor)``, a count read back) stalls that pipeline, and every data-dependent shape splits
a ``torch.compile`` graph. These tests hold the step's device part to a single graph without breaks.
"""
import copy

import pytest
import torch

from nnunet_smit.architectures import SMITConfig
from nnunet_smit.errors import SMITError
from nnunet_smit.pretraining.config import PretrainConfig
from nnunet_smit.pretraining.ibot_loss import IBOTPatchLoss
from nnunet_smit.pretraining.masking import CubeMaskGenerator, cube_mask_to_grid
from nnunet_smit.pretraining.model import (
    TAP_STRIDE,
    HeadConfig,
    SMITPretrainModel,
    masked_l1,
    masked_tap_index,
)
from nnunet_smit.pretraining.step import StepRunner

HEADS = HeadConfig(hidden_dim=32, bottleneck_dim=16, out_dim=64)


def make_batch(scans=2, seed=0):
    generator = torch.Generator().manual_seed(seed)
    views = torch.rand(scans, 2, 1, 64, 64, 64, generator=generator)
    masks = CubeMaskGenerator()(2 * scans, (64, 64, 64), generator=generator).view(scans, 2, 4, 4, 4)
    return views, masks


def device_arguments(model, views, masks):
    """The arguments compute_losses passes to losses_on_device."""
    x = views.transpose(0, 1).flatten(0, 1)
    flat = masks.transpose(0, 1).flatten(0, 1)
    tap = cube_mask_to_grid(flat, 16, TAP_STRIDE)
    index = masked_tap_index(tap)
    return (model.student, x, flat, index, index // tap[0].numel(), torch.tensor(0.04), 2, True)


def test_the_device_part_of_a_step_traces_as_one_graph_without_breaks():
    torch.manual_seed(0)
    model = SMITPretrainModel(SMITConfig.preset("tiny"), heads=HEADS).train()
    views, masks = make_batch()
    explanation = torch._dynamo.explain(model.losses_on_device)(*device_arguments(model, views, masks))
    reasons = [str(b.reason) for b in explanation.break_reasons]
    assert explanation.graph_break_count == 0 and explanation.graph_count == 1, reasons


def test_masked_tap_index_lists_the_masked_tokens_view_major():
    mask = torch.zeros(2, 2, 2, 2, dtype=torch.bool)
    mask[0, 0, 0, 1] = mask[1, 1, 1, 1] = mask[1, 0, 0, 0] = True
    # Rows of the (2 * 8) tap tokens: view 0 cell 1, view 1 cells 0 and 7.
    assert masked_tap_index(mask).tolist() == [1, 8, 15]
    tokens = torch.arange(16.0).view(2, 8, 1)
    assert torch.equal(tokens[mask.flatten(1)], tokens.flatten(0, 1).index_select(0, masked_tap_index(mask)))


def test_masked_l1_is_the_mean_over_masked_voxels():
    generator = torch.Generator().manual_seed(0)
    recon = torch.rand(3, 2, 32, 32, 64, generator=generator, requires_grad=True)
    target = torch.rand(3, 2, 32, 32, 64, generator=generator)
    cubes = torch.rand(3, 2, 2, 4, generator=generator) > 0.6
    voxels = cube_mask_to_grid(cubes, 16, 1).unsqueeze(1).expand_as(target)
    expected = (recon - target).abs()[voxels].mean()
    assert masked_l1(recon, target, cubes, 16).item() == pytest.approx(expected.item(), rel=1e-6)
    # Nothing masked: 0, with a gradient path of zeros (every process must reach backward under DDP).
    loss = masked_l1(recon, target, torch.zeros_like(cubes), 16)
    loss.backward()
    assert loss.item() == 0.0 and torch.equal(recon.grad, torch.zeros_like(recon))


def test_ibot_loss_without_any_masked_token_is_zero_with_a_gradient_path():
    student = torch.zeros(0, 6, requires_grad=True)
    loss = IBOTPatchLoss(6)(student, torch.zeros(0, 6), torch.zeros(0, dtype=torch.long), num_views=2)
    loss.backward()
    assert loss.item() == 0.0 and student.grad is not None


def test_compiled_losses_match_eager_losses_and_gradients():
    # aot_eager runs the traced forward and backward graphs without generating kernels: it checks what compiling
    # changes (tracing, functionalisation of the center updates, autograd through the graph) in seconds.
    torch.manual_seed(0)
    eager = SMITPretrainModel(SMITConfig.preset("tiny"), heads=HEADS).train()
    compiled = copy.deepcopy(eager)
    runners = {id(eager): eager.compute_losses, id(compiled): StepRunner(compiled)}
    runners[id(compiled)].compile(backend="aot_eager", fullgraph=True)
    for step in range(2):
        views, masks = make_batch(seed=step)
        results = []
        for model in (eager, compiled):
            model.zero_grad()
            out = runners[id(model)](views, masks, teacher_temp=0.04, with_preview=True)
            out.total.backward()
            grads = {n: p.grad.clone() for n, p in model.student.named_parameters() if p.grad is not None}
            results.append((out, grads))
        (a, grads_a), (b, grads_b) = results
        assert set(a.terms) == set(b.terms) == {"dino", "ibot", "reconstruction", "koleo"}
        for name in a.terms:
            assert b.terms[name].item() == pytest.approx(a.terms[name].item(), rel=1e-5, abs=1e-6), name
        assert torch.allclose(a.teacher_global_probs, b.teacher_global_probs, atol=1e-6)
        assert torch.allclose(a.preview["reconstruction"], b.preview["reconstruction"], atol=1e-5)
        assert set(grads_a) == set(grads_b)
        for name in grads_a:
            assert torch.allclose(grads_a[name], grads_b[name], rtol=1e-4, atol=1e-6), name
        # The centers are updated inside the compiled graph as in eager mode.
        assert torch.allclose(eager.dino_loss.center, compiled.dino_loss.center, atol=1e-6)
        assert torch.allclose(eager.ibot_loss.center, compiled.ibot_loss.center, atol=1e-6)


def test_the_compiled_step_compiles_once():
    # The first step runs eagerly and fills the encoders' shift-mask caches; the compiled graph then reads the masks
    # as constants (filling a cache while tracing would change the state the graph is guarded on: a second compile;
    # computing the masks inside the graph instead made the inductor-compiled CPU step 2.43 s against 0.78 s).
    graphs = []

    def counting_backend(graph_module, example_inputs):
        graphs.append(graph_module)
        return graph_module.forward

    torch.manual_seed(0)
    model = SMITPretrainModel(SMITConfig.preset("tiny"), heads=HEADS).train()
    runner = StepRunner(model)
    runner.compile(backend=counting_backend, fullgraph=True)
    for step in range(3):
        views, masks = make_batch(seed=step)
        model.zero_grad()
        runner(views, masks, teacher_temp=0.04 + 0.01 * step).total.backward()
    assert len(graphs) == 1


def test_unknown_compile_mode_is_a_one_line_error():
    with pytest.raises(SMITError, match="compile mode must be one of default, reduce-overhead"):
        PretrainConfig(compile=True, compile_mode="fastest")


def test_a_failing_compiler_warns_and_the_run_continues_eagerly(tmp_path_factory, tmp_path, caplog):
    from nnunet_smit.pretraining.trainer import PretrainTrainer

    from .training_support import phantom_cache, tiny_config

    def broken_backend(graph_module, example_inputs):
        raise RuntimeError("no C++ compiler found")

    cache = phantom_cache(tmp_path_factory)
    trainers = {}
    for name, compile_step in (("eager", False), ("compiled", True)):
        torch.manual_seed(0)
        trainers[name] = PretrainTrainer(tiny_config(compile=compile_step), cache, tmp_path / name)
    compiled = trainers["compiled"]
    compiled.runner.compile(backend=broken_backend)
    batch = torch.utils.data.default_collate([trainers["eager"].dataset.sample(0, 0)])
    losses = {}
    with caplog.at_level("WARNING", logger="nnunet_smit.pretraining"):
        for name, trainer in trainers.items():
            # Step 1 runs eagerly in both; step 2 is the compiled one's first compiled step.
            losses[name] = [float(trainer.train_step(batch)[0]["loss"]) for _ in range(3)]
    warnings = [r.getMessage() for r in caplog.records if "torch.compile failed" in r.getMessage()]
    assert warnings == ["torch.compile failed (RuntimeError: no C++ compiler found); training continues without "
                        "compiling."]
    assert not compiled.runner.compiled
    # Compiling failed before anything ran, so the step was repeated exactly: the same losses as eager training.
    assert losses["compiled"] == losses["eager"]
