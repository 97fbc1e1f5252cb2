"""Teacher centering: the mode check, the center buffer, and Sinkhorn-Knopp (normalisation, reference values, shift
invariance, the DDP path)."""
import math

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from nnunet_smit.errors import SMITError
from nnunet_smit.pretraining.centering import CENTERING_MODES, check_centering, sinkhorn_knopp
from nnunet_smit.pretraining.dino_loss import DINOLoss
from nnunet_smit.pretraining.ibot_loss import IBOTPatchLoss


def reference_sinkhorn(logits: torch.Tensor, temp: float, iterations: int) -> torch.Tensor:
    """Plain float64 transcription of the algorithm on the whole batch."""
    q = torch.exp(logits.double() / temp).t()  # (K, N)
    k, n = q.shape
    q = q / q.sum()
    for _ in range(iterations):
        q = q / q.sum(dim=1, keepdim=True) / k
        q = q / q.sum(dim=0, keepdim=True) / n
    return (q * n).t()


def test_rows_sum_to_one_and_prototypes_share_the_mass():
    logits = torch.randn(12, 7, generator=torch.Generator().manual_seed(0))
    q = sinkhorn_knopp(logits, 0.5, n_iterations=3)
    assert q.shape == (12, 7) and q.dtype == torch.float32 and bool((q >= 0).all())
    assert torch.allclose(q.sum(dim=1), torch.ones(12), atol=1e-5)
    # Converged, every prototype carries N/K of the N samples' mass.
    q = sinkhorn_knopp(logits, 0.5, n_iterations=200)
    assert torch.allclose(q.sum(dim=0), torch.full((7,), 12 / 7), atol=1e-4)


def test_matches_a_reference_computation_on_a_small_matrix():
    logits = torch.tensor([[0.1, 0.5, -0.2], [0.3, -0.1, 0.0], [0.9, 0.2, 0.4], [-0.5, 0.0, 0.6]])
    for iterations in (1, 3, 10):
        expected = reference_sinkhorn(logits, 0.1, iterations).float()
        assert torch.allclose(sinkhorn_knopp(logits, 0.1, iterations), expected, atol=1e-6), iterations
    # One iteration by hand: Q = exp(L/T), rows (prototypes) to 1/K, then columns (samples) to 1.
    q = torch.exp(logits.double() / 0.1)
    q = q / q.sum(dim=0, keepdim=True)
    q = q / q.sum(dim=1, keepdim=True)
    assert torch.allclose(sinkhorn_knopp(logits, 0.1, 1).double(), q, atol=1e-6)


def test_invariant_to_constant_shifts_of_the_logits():
    logits = torch.randn(8, 16, generator=torch.Generator().manual_seed(1))
    q = sinkhorn_knopp(logits, 0.04)
    assert torch.allclose(sinkhorn_knopp(logits + 25.0, 0.04), q, atol=1e-5)
    # A per-prototype constant cancels in the first normalisation; a per-sample one only once converged.
    assert torch.allclose(sinkhorn_knopp(logits + 3.0 * torch.arange(16.0)[None], 0.04), q, atol=1e-5)
    sample_shift = 0.01 * torch.arange(8.0)[:, None]
    converged = sinkhorn_knopp(logits, 0.5, n_iterations=500)
    assert torch.allclose(sinkhorn_knopp(logits + sample_shift, 0.5, n_iterations=500), converged, atol=1e-4)
    # Large logits at a low temperature do not overflow.
    assert torch.isfinite(sinkhorn_knopp(logits * 50.0, 0.02)).all()


def test_sinkhorn_sharpens_an_almost_input_invariant_teacher_that_centering_flattens():
    # The situation of a fresh encoder: every sample has nearly the same logits (common part 1.0 x noise,
    # sample-specific part 0.01). Running-mean centering that has absorbed the common part leaves a near-uniform
    # teacher; Sinkhorn-Knopp centres on the current batch and keeps the per-sample differences.
    g = torch.Generator().manual_seed(2)
    common = torch.randn(1, 64, generator=g)
    logits = common + 0.01 * torch.randn(16, 64, generator=g)
    loss = DINOLoss(64, centering="center")
    loss.center.copy_(common)
    centred = loss.teacher_probs(logits, 0.04)
    sinkhorn = DINOLoss(64, centering="sinkhorn_knopp").teacher_probs(logits, 0.04)
    assert torch.allclose(sinkhorn, sinkhorn_knopp(logits, 0.04))
    entropy = lambda p: float(-(p * p.clamp_min(1e-12).log()).sum(-1).mean())  # noqa: E731
    assert entropy(centred) > 0.99 * math.log(64)
    assert torch.allclose(centred, F.softmax((logits - common) / 0.04, -1))


def test_losses_validate_the_mode_and_keep_the_center_buffer():
    with pytest.raises(SMITError, match="centering"):
        DINOLoss(8, centering="mean")
    for loss in (DINOLoss(8), IBOTPatchLoss(8)):
        assert loss.centering == "center" and "center" in dict(loss.named_buffers())
        loss.update_center(torch.ones(3, 8))
        assert torch.allclose(loss.center, torch.full((1, 8), 0.1))
    assert IBOTPatchLoss(8, centering="sinkhorn_knopp").teacher_probs(torch.zeros(0, 8), 0.04).shape == (0, 8)


def test_check_centering_names_the_allowed_modes():
    assert [check_centering(mode) for mode in CENTERING_MODES] == list(CENTERING_MODES)
    with pytest.raises(SMITError, match="sinkhorn_knopp, center, got 'bogus'") as error:
        check_centering("bogus")
    assert "\n" not in str(error.value)


@pytest.mark.parametrize("centering", CENTERING_MODES)
def test_state_dict_keys_are_unchanged_so_old_checkpoints_load(centering):
    # Existing checkpoints hold exactly these keys (the center only); a renamed or added buffer would not resume.
    for loss_class in (DINOLoss, IBOTPatchLoss):
        state = loss_class(8, centering=centering).state_dict()
        assert list(state) == ["center"], loss_class
        assert state["center"].shape == (1, 8) and state["center"].dtype == torch.float32
        restored = loss_class(8, centering=centering)
        restored.load_state_dict({"center": torch.full((1, 8), 0.5)}, strict=True)
        assert torch.equal(restored.center, torch.full((1, 8), 0.5))


def _ddp_worker(rank: int, world_size: int, init_file: str, logits: torch.Tensor, splits, results) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        start = sum(splits[:rank])
        local = logits[start:start + splits[rank]]
        results[rank] = sinkhorn_knopp(local, 0.1, 3)
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(not dist.is_available(), reason="torch without distributed support")
def test_two_processes_with_different_token_counts_match_the_whole_batch(tmp_path):
    # Ranks hold 3 and 5 samples (iBOT: masked-token counts differ per process); the all-reduced sums and count
    # make each rank's rows equal to the single-process result on all 8 samples.
    logits = torch.randn(8, 6, generator=torch.Generator().manual_seed(3))
    splits = [3, 5]
    manager = mp.get_context("spawn").Manager()
    results = manager.dict()
    mp.spawn(_ddp_worker, args=(2, str(tmp_path / "init"), logits, splits, results), nprocs=2, join=True)
    combined = torch.cat([results[0], results[1]])
    assert torch.allclose(combined, sinkhorn_knopp(logits, 0.1, 3), atol=1e-6)
    assert not torch.allclose(results[0], sinkhorn_knopp(logits[:3], 0.1, 3), atol=1e-3)
