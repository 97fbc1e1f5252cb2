"""Heads, DINO/iBOT losses with their centers, schedules, and the student/teacher model."""
import math

import pytest
import torch
import torch.nn.functional as F

from nnunet_smit.architectures import SMITConfig
from nnunet_smit.errors import SMITError
from nnunet_smit.pretraining.dino_loss import DINOLoss
from nnunet_smit.pretraining.heads import DINOHead, ReconstructionHead, pixel_shuffle_3d
from nnunet_smit.pretraining.ibot_loss import IBOTPatchLoss
from nnunet_smit.pretraining.koleo_loss import koleo_loss
from nnunet_smit.pretraining.masking import CubeMaskGenerator
from nnunet_smit.pretraining.model import HeadConfig, ObjectiveWeights, SMITPretrainModel
from nnunet_smit.pretraining.schedules import PretrainSchedules

SMALL_HEADS = HeadConfig(hidden_dim=32, bottleneck_dim=16, out_dim=64, num_layers=3)


def test_dino_head_shapes_and_unit_norm_prototypes():
    head = DINOHead(384, out_dim=8192, hidden_dim=2048, bottleneck_dim=256)
    linears = [m for m in head.mlp if isinstance(m, torch.nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(384, 2048), (2048, 2048), (2048, 256)]
    assert head(torch.randn(5, 384)).shape == (5, 8192)
    weight = head.last_layer.weight
    assert torch.allclose(weight.norm(dim=1), torch.ones(8192), atol=1e-5)
    assert head.last_layer.bias is None
    # Only the direction trains; the magnitude is frozen at 1.
    assert head.last_layer.parametrizations.weight.original0.requires_grad is False
    assert [p.shape for p in head.last_layer_parameters()] == [torch.Size([8192, 256])]


def test_pixel_shuffle_3d_places_channels_in_c_order():
    factor = 2
    x = torch.arange(2 * factor**3 * 3 * 1 * 2, dtype=torch.float32).view(1, 2 * factor**3, 3, 1, 2)
    y = pixel_shuffle_3d(x, factor)
    assert y.shape == (1, 2, 6, 2, 4)
    for c in range(2):
        for fd in range(2):
            for fh in range(2):
                for fw in range(2):
                    channel = ((c * 2 + fd) * 2 + fh) * 2 + fw
                    assert torch.equal(y[0, c, fd::2, fh::2, fw::2], x[0, channel])
    head = ReconstructionHead(in_dim=24, out_channels=1, factor=32)
    assert head.proj.out_channels == 32**3
    assert head(torch.randn(2, 24, 2, 3, 2)).shape == (2, 1, 64, 96, 64)


def test_dino_loss_is_cross_view_cross_entropy():
    loss_fn = DINOLoss(out_dim=10, student_temp=0.1)
    s = [torch.randn(4, 10), torch.randn(4, 10)]
    t = [F.softmax(torch.randn(4, 10), -1), F.softmax(torch.randn(4, 10), -1)]

    def ce(p, logits):
        return -(p * F.log_softmax(logits / 0.1, -1)).sum(-1).mean()

    expected = (ce(t[0], s[1]) + ce(t[1], s[0])) / 2
    assert torch.allclose(loss_fn(s, t), expected, atol=1e-6)


def test_centers_are_buffers_updated_with_momentum():
    dino = DINOLoss(out_dim=3, center_momentum=0.9)
    assert "center" in dict(dino.named_buffers())
    dino.update_center(torch.tensor([[1.0, 2.0, 3.0], [3.0, 2.0, 1.0]]))
    assert torch.allclose(dino.center, torch.tensor([[0.2, 0.2, 0.2]]))
    ibot = IBOTPatchLoss(out_dim=2, center_momentum=0.5)
    ibot.update_center(torch.tensor([[2.0, 0.0], [0.0, 4.0]]))
    assert torch.allclose(ibot.center, torch.tensor([[0.5, 1.0]]))
    # The teacher distribution is centred and sharpened.
    probs = dino.softmax_center_teacher(torch.tensor([[0.2, 0.2, 1.2]]), teacher_temp=0.5)
    assert torch.allclose(probs, F.softmax(torch.tensor([[0.0, 0.0, 2.0]]), -1))


def test_ibot_loss_averages_over_masked_tokens_of_each_view():
    loss_fn = IBOTPatchLoss(out_dim=6)
    student = torch.randn(5, 6)
    teacher = F.softmax(torch.randn(5, 6), -1)
    view = torch.tensor([0, 0, 0, 2, 2])  # view 1 has no masked token
    per_token = -(teacher * F.log_softmax(student / 0.1, -1)).sum(-1)
    expected = (per_token[:3].mean() + per_token[3:].mean()) / 2
    assert torch.allclose(loss_fn(student, teacher, view, num_views=3), expected, atol=1e-6)


def test_schedules_follow_the_global_step():
    s = PretrainSchedules(total_steps=1000, steps_per_epoch=10, peak_lr=6e-4, min_lr=1e-6, warmup_epochs=20,
                          weight_decay=0.04, weight_decay_end=0.4, momentum_start=0.996,
                          teacher_temp_start=0.04, teacher_temp_end=0.07, teacher_temp_warmup_epochs=30)
    # 20 warm-up epochs of 10 steps, then cosine over the remaining 800 steps.
    assert s.lr(0) == 0.0 and s.lr(200) == pytest.approx(6e-4) and s.lr(100) == pytest.approx(3e-4)
    assert s.lr(1000) == pytest.approx(1e-6) and s.lr(600) == pytest.approx((6e-4 + 1e-6) / 2)
    assert s.momentum(0) == pytest.approx(0.996) and s.momentum(1000) == pytest.approx(1.0)
    assert s.momentum(500) == pytest.approx(0.998)  # anneals over the run, not within an epoch
    assert s.teacher_temp(0) == 0.04 and s.teacher_temp(150) == pytest.approx(0.055)
    assert s.teacher_temp(300) == s.teacher_temp(999) == 0.07
    assert s.weight_decay_at(0) == pytest.approx(0.04) and s.weight_decay_at(1000) == pytest.approx(0.4)


@pytest.fixture(scope="module")
def model():
    return SMITPretrainModel(SMITConfig.preset("tiny"), heads=SMALL_HEADS)


def test_teacher_starts_as_the_student_and_stays_in_eval_mode(model):
    student = dict(model.student.named_parameters())
    for name, t in model.teacher.named_parameters():
        assert torch.equal(t, student[name]) and not t.requires_grad
    assert model.teacher.mask_token is None and model.teacher.recon_head is None
    model.train()
    assert model.student.training and not model.teacher.training
    assert model.student.mask_token.shape == (1, 1, 12)
    assert model.student.tap_norm.eps == 1e-6 and model.student.tap_norm.normalized_shape == (96,)


def test_ema_update():
    m = SMITPretrainModel(SMITConfig.preset("tiny"), heads=SMALL_HEADS)
    with torch.no_grad():
        for p in m.student.parameters():
            p.add_(1.0)
    before = {n: p.clone() for n, p in m.teacher.named_parameters()}
    m.update_teacher(0.9)
    student = dict(m.student.named_parameters())
    for name, t in m.teacher.named_parameters():
        assert torch.allclose(t, 0.9 * before[name] + 0.1 * student[name], atol=1e-6)


def test_losses_and_gradients_of_the_three_objectives(model):
    views = torch.rand(1, 2, 1, 64, 64, 64)
    masks = CubeMaskGenerator()(2, (64, 64, 64), generator=torch.Generator().manual_seed(0)).view(1, 2, 4, 4, 4)
    model.zero_grad()
    out = model.compute_losses(views, masks, teacher_temp=0.04, with_preview=True)
    assert set(out.terms) == {"dino", "ibot", "reconstruction", "koleo"}
    # One scan: KoLeo has no other scan to push away from, and the two views of a scan are never compared.
    assert out.terms["koleo"] == 0
    expected = 0.1 * out.terms["dino"] + 0.1 * out.terms["ibot"] + out.terms["reconstruction"]
    assert torch.allclose(out.total, expected)
    out.total.backward()
    assert model.student.mask_token.grad is not None and model.student.mask_token.grad.abs().sum() > 0
    assert all(p.grad is None for p in model.teacher.parameters())
    assert out.preview["reconstruction"].shape == (64, 64, 64)


@pytest.mark.parametrize("off", ["dino", "ibot", "reconstruction"])
def test_each_objective_can_be_switched_off(off):
    weights = ObjectiveWeights(**{off: 0.0})
    m = SMITPretrainModel(SMITConfig.preset("tiny"), weights=weights, heads=SMALL_HEADS)
    views = torch.rand(1, 2, 1, 64, 64, 64)
    masks = CubeMaskGenerator()(2, (64, 64, 64)).view(1, 2, 4, 4, 4)
    out = m.compute_losses(views, masks, 0.04)
    assert off not in out.terms and set(out.terms) - {"koleo"} == {"dino", "ibot", "reconstruction"} - {off}
    if off == "reconstruction":
        assert m.student.recon_head is None
    with pytest.raises(SMITError, match="switched off"):
        SMITPretrainModel(SMITConfig.preset("tiny"), weights=ObjectiveWeights(0, 0, 0), heads=SMALL_HEADS)


def test_koleo_loss_is_minus_log_nearest_neighbour_distance():
    # Four unit vectors at right angles: every nearest neighbour is sqrt(2) away (scale does not matter).
    square = torch.tensor([[3.0, 0.0], [0.0, 3.0], [-3.0, 0.0], [0.0, -3.0]])
    assert koleo_loss(square).item() == pytest.approx(-math.log(math.sqrt(2.0)), abs=1e-6)
    # Nearest neighbours, not all pairs: a far third point does not change the two close ones' terms.
    points = torch.tensor([[1.0, 0.0], [math.cos(0.1), math.sin(0.1)], [-1.0, 0.0]])
    d_close, d_far = 2 * math.sin(0.05), 2 * math.sin((math.pi - 0.1) / 2)
    assert koleo_loss(points).item() == pytest.approx(-(2 * math.log(d_close) + math.log(d_far)) / 3, abs=1e-5)
    single = torch.randn(1, 8, requires_grad=True)
    loss = koleo_loss(single)
    loss.backward()
    assert loss.item() == 0 and torch.equal(single.grad, torch.zeros_like(single))
    # Identical rows: large but finite loss and gradients.
    twins = torch.randn(1, 8).repeat(3, 1).requires_grad_(True)
    loss = koleo_loss(twins)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(twins.grad).all()


def test_koleo_spreads_nearly_identical_embeddings_apart():
    # The failure it guards against: a head that maps every scan to (almost) the same embedding.
    torch.manual_seed(0)
    head = DINOHead(24, out_dim=64, hidden_dim=32, bottleneck_dim=16)
    tokens = torch.randn(1, 24) + 0.05 * torch.randn(6, 24)
    optimizer = torch.optim.AdamW(head.mlp.parameters(), lr=3e-3, weight_decay=0.0)

    def mean_cosine():
        z = head.embed(tokens).detach()
        c = z @ z.t()
        return float((c.sum() - c.diag().sum()) / 30)

    before = mean_cosine()
    for _ in range(50):
        optimizer.zero_grad()
        koleo_loss(head.embed(tokens)).backward()
        optimizer.step()
    assert before > 0.9 and mean_cosine() < 0.5, (before, mean_cosine())


def test_koleo_term_compares_scans_within_each_view_on_the_global_head_embedding():
    torch.manual_seed(0)
    m = SMITPretrainModel(SMITConfig.preset("tiny"), heads=SMALL_HEADS)
    views = torch.rand(3, 2, 1, 64, 64, 64)
    masks = CubeMaskGenerator()(6, (64, 64, 64), generator=torch.Generator().manual_seed(0)).view(3, 2, 4, 4, 4)
    torch.manual_seed(1)
    out = m.compute_losses(views, masks, teacher_temp=0.04)
    # The same student pass by hand: view-major rows, KoLeo over the 3 scans of view 0 and of view 1.
    from nnunet_smit.pretraining.masking import cube_mask_to_grid
    from nnunet_smit.pretraining.model import masked_tap_index

    x = views.transpose(0, 1).flatten(0, 1)
    flat_masks = masks.transpose(0, 1).flatten(0, 1)
    torch.manual_seed(1)
    s_out = m.student(x, cube_mask_to_grid(flat_masks, 16, 2), masked_tap_index(cube_mask_to_grid(flat_masks, 16, 16)))
    z = s_out.global_embedding
    expected = (koleo_loss(z[:3]) + koleo_loss(z[3:])) / 2
    assert out.terms["koleo"].item() == pytest.approx(expected.item(), rel=1e-5)
    assert torch.allclose(out.total, 0.1 * out.terms["dino"] + 0.1 * out.terms["ibot"] + out.terms["reconstruction"]
                          + 0.1 * out.terms["koleo"])
    # It trains the global head's MLP (and the encoder), not the prototypes.
    m.zero_grad()
    (out.terms["koleo"]).backward()
    assert m.student.global_head.mlp[0].weight.grad.abs().sum() > 0
    assert m.student.encoder.patch_embed.proj.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in m.student.global_head.last_layer_parameters())
