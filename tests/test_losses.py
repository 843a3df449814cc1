"""Loss properties that could fail: margins, focal/CE identity, label smoothing, triplet, center, distill, AMP."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from train.losses import (ArcFaceHead, CenterLoss, ClassificationLoss, CombinedMarginHead, CosFaceHead,
                          DistillLoss, FocalLoss, LinearHead, TripletLoss, WeightedLoss, build_loss)


def _cos(emb: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return F.normalize(emb.double(), dim=1) @ F.normalize(weight.double(), dim=1).t()


def _at_angle(direction: torch.Tensor, angles: torch.Tensor) -> torch.Tensor:
    """Unit vectors at the given angles from ``direction`` (one per angle)."""
    w = F.normalize(direction, dim=0)
    u = torch.randn_like(w)
    u = F.normalize(u - (u @ w) * w, dim=0)
    return torch.cos(angles)[:, None] * w + torch.sin(angles)[:, None] * u


def test_arcface_target_logit_is_s_cos_theta_plus_m_and_others_s_cos_theta():
    torch.manual_seed(0)
    s, m = 30.0, 0.5
    head = ArcFaceHead(16, 10, s=s, m=m)
    emb, labels = torch.randn(12, 16), torch.randint(0, 10, (12,))
    logits = head(emb, labels).double()
    cos = _cos(emb, head.weight)
    theta = torch.acos(cos)
    rows = torch.arange(12)
    assert (theta[rows, labels] + m < math.pi).all()
    torch.testing.assert_close(logits[rows, labels], s * torch.cos(theta[rows, labels] + m), rtol=1e-5, atol=1e-4)
    mask = torch.ones_like(cos, dtype=torch.bool)
    mask[rows, labels] = False
    torch.testing.assert_close(logits[mask], s * cos[mask], rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(head(emb).double(), s * cos, rtol=1e-5, atol=1e-4)  # no labels: no margin


def test_arcface_penalty_is_monotone_and_never_helps_even_past_pi_minus_m():
    torch.manual_seed(1)
    for easy in (False, True):
        head = ArcFaceHead(8, 3, s=1.0, m=0.5, easy_margin=easy)
        angles = torch.linspace(0.01, math.pi - 0.01, 200)
        emb = _at_angle(head.weight.detach()[1], angles)
        target = head(emb, torch.ones(200, dtype=torch.long))[:, 1]
        plain = head(emb)[:, 1]
        assert (target <= plain + 1e-6).all(), "the margin must never raise the target logit"
        if not easy:
            assert (target[1:] < target[:-1]).all(), "target logit must fall as the angle grows (no wrap-around)"
            assert (plain - target)[angles < math.pi - 0.5].min() > 0


def test_cosface_equals_combined_margin_1_0_m_and_subtracts_m():
    torch.manual_seed(2)
    s, m = 64.0, 0.35
    cosface = CosFaceHead(16, 7, s=s, m=m)
    combined = CombinedMarginHead(16, 7, s=s, m1=1.0, m2=0.0, m3=m)
    combined.load_state_dict(cosface.state_dict())
    emb, labels = torch.randn(9, 16), torch.randint(0, 7, (9,))
    torch.testing.assert_close(cosface(emb, labels), combined(emb, labels))
    cos = _cos(emb, cosface.weight)
    rows = torch.arange(9)
    torch.testing.assert_close(cosface(emb, labels).double()[rows, labels], s * (cos[rows, labels] - m),
                               rtol=1e-5, atol=1e-4)


def test_combined_margin_general_form():
    torch.manual_seed(3)
    m1, m2, m3, s = 1.2, 0.2, 0.1, 10.0
    head = CombinedMarginHead(8, 5, s=s, m1=m1, m2=m2, m3=m3)
    emb = _at_angle(head.weight.detach()[2], torch.linspace(0.05, 2.0, 20))
    got = head(emb, torch.full((20,), 2))[:, 2].double()
    theta = torch.acos(_cos(emb, head.weight)[:, 2])
    torch.testing.assert_close(got, s * (torch.cos(m1 * theta + m2) - m3), rtol=1e-5, atol=1e-4)


def test_focal_with_gamma_zero_is_cross_entropy_and_gamma_down_weights():
    torch.manual_seed(4)
    head = ArcFaceHead(16, 6, s=16.0, m=0.3)
    emb, labels = torch.randn(10, 16), torch.randint(0, 6, (10,))
    ce = F.cross_entropy(head(emb, labels), labels)
    torch.testing.assert_close(FocalLoss(head, gamma=0.0)(emb, labels), ce)
    torch.testing.assert_close(ClassificationLoss(head)(emb, labels), ce)
    focal = FocalLoss(head, gamma=2.0)(emb, labels)
    assert 0 < focal < ce


def test_label_smoothing_matches_torch_and_the_formula():
    torch.manual_seed(5)
    head = LinearHead(16, 5)
    emb, labels = torch.randn(8, 16), torch.randint(0, 5, (8,))
    eps = 0.1
    got = ClassificationLoss(head, label_smoothing=eps)(emb, labels)
    logits = head(emb)
    torch.testing.assert_close(got, F.cross_entropy(logits, labels, label_smoothing=eps))
    logp = logits.log_softmax(1)
    manual = ((1 - eps) * -logp[torch.arange(8), labels] - eps * logp.mean(1)).mean()
    torch.testing.assert_close(got, manual)
    assert got > ClassificationLoss(head)(emb, labels) - 1  # sanity: same order of magnitude


def _brute_force_batch_hard(emb, labels, margin):
    x = F.normalize(emb.double(), dim=1)
    losses = []
    for i in range(len(labels)):
        d = (x - x[i]).norm(dim=1)
        pos = [d[j] for j in range(len(labels)) if j != i and labels[j] == labels[i]]
        neg = [d[j] for j in range(len(labels)) if labels[j] != labels[i]]
        if pos and neg:
            losses.append(max(0.0, float(max(pos) - min(neg) + margin)))
    return sum(losses) / len(losses)


def test_triplet_is_zero_once_every_margin_is_met_and_positive_otherwise():
    torch.manual_seed(6)
    labels = torch.tensor([0, 0, 0, 1, 1, 1, 2, 2, 2])
    clustered = F.one_hot(labels, 8).float() * 5 + 0.01 * torch.randn(9, 8)  # d_ap ≈ 0, d_an ≈ √2
    assert TripletLoss(margin=0.3)(clustered, labels) == 0
    assert TripletLoss(margin=1.5)(clustered, labels) > 0  # √2 < 1.5: margin not met
    emb = torch.randn(9, 8)
    loss = TripletLoss(margin=0.3)(emb, labels)
    assert loss > 0
    assert abs(float(loss) - _brute_force_batch_hard(emb, labels, 0.3)) < 1e-5
    assert TripletLoss(margin=2.1)(emb, labels) > 0.1  # distances of unit vectors are ≤ 2


def test_triplet_without_positives_is_zero_but_differentiable():
    emb = torch.randn(4, 8, requires_grad=True)
    loss = TripletLoss()(emb, torch.arange(4))
    loss.backward()
    assert loss == 0 and emb.grad is not None


def test_center_loss_is_zero_at_the_centres_and_half_mean_squared_distance_elsewhere():
    torch.manual_seed(7)
    loss = CenterLoss(num_classes=4, embedding_size=8)
    labels = torch.tensor([0, 1, 2, 3, 1])
    at_centres = loss.centers.detach()[labels].clone()
    assert float(loss(at_centres, labels).detach()) == 0.0
    emb = at_centres + torch.randn(5, 8)
    want = 0.5 * (emb - loss.centers.detach()[labels]).pow(2).sum(1).mean()
    torch.testing.assert_close(loss(emb, labels), want)


def test_distill_similarity_and_embedding_modes():
    torch.manual_seed(8)
    teacher = torch.randn(6, 32)
    assert float(DistillLoss(32, 32, mode="similarity")(teacher * 3.0, teacher)) < 1e-6
    assert float(DistillLoss(32, 32, mode="embedding")(teacher, teacher)) < 1e-6
    assert DistillLoss(32, 32, mode="similarity")(torch.randn(6, 32), teacher) > 0
    # different sizes: a learned projection; when it maps the student onto the teacher the loss vanishes
    student = torch.randn(6, 16)
    loss = DistillLoss(16, 32, mode="embedding")
    assert loss(student, teacher) > 0
    with torch.no_grad():
        loss.proj.weight.copy_(torch.linalg.lstsq(student, teacher).solution.t())
    # 6 samples, 16 dims: the least-squares projection fits exactly
    assert float(loss(student, teacher).detach()) < 1e-4
    assert DistillLoss(16, 32, mode="similarity")(student, teacher) > 0
    with pytest.raises(ValueError, match="student"):
        loss(torch.randn(6, 8), teacher)


def test_weighted_loss_sums_parts_and_build_loss_reads_config():
    torch.manual_seed(9)
    config = {"embedding_size": 16, "num_classes": 5,
              "loss": {"head": "arcface", "s": 32, "m": 0.4, "center": {"weight": 0.5},
                       "triplet": {"weight": 2.0, "margin": 0.2}, "distill": {"weight": 3.0, "teacher_dim": 24}}}
    loss = build_loss(config)
    assert isinstance(loss, WeightedLoss) and set(loss.parts) == {"arcface", "center", "triplet", "distill"}
    emb = torch.randn(8, 16, requires_grad=True)
    labels = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])
    total, parts = loss(emb, labels, teacher=torch.randn(8, 24))
    want = parts["arcface"] + 0.5 * parts["center"] + 2.0 * parts["triplet"] + 3.0 * parts["distill"]
    torch.testing.assert_close(total.detach(), want)
    total.backward()
    assert torch.isfinite(emb.grad).all()
    assert loss.parts["arcface"].head.s == 32 and loss.parts["arcface"].head.m2 == 0.4
    with pytest.raises(ValueError, match="num_classes"):
        build_loss({"loss": {"head": "cosface"}})
    with pytest.raises(ValueError, match="teacher"):
        loss(emb, labels)
    triplet_only = build_loss({"loss": {"head": "none", "triplet": True}})
    assert set(triplet_only.parts) == {"triplet"}


def test_unlabelled_rows_feed_only_the_distillation_part():
    torch.manual_seed(3)
    loss = build_loss({"embedding_size": 16, "num_classes": 4,
                       "loss": {"head": "arcface", "s": 16, "m": 0.3, "distill": {"weight": 2.0, "teacher_dim": 16}}})
    emb, teacher = torch.randn(6, 16, requires_grad=True), torch.randn(6, 16)
    labels = torch.tensor([0, -1, 1, -1, 2, 3])  # −1: a morph or other sample without an identity
    total, parts = loss(emb, labels, teacher)
    keep = labels >= 0
    torch.testing.assert_close(parts["arcface"], loss.parts["arcface"](emb[keep], labels[keep]).detach())
    torch.testing.assert_close(parts["distill"], loss.parts["distill"](emb, teacher).detach())  # every row
    total, parts = loss(emb, torch.full((6,), -1), teacher)  # no labelled row: the identity term is 0
    assert parts["arcface"].item() == 0.0
    total.backward()
    torch.testing.assert_close(emb.grad, torch.autograd.grad(2.0 * loss.parts["distill"](emb, teacher), emb)[0])


HEADS = {
    "arcface": lambda: ArcFaceHead(32, 4, s=64.0, m=0.5),
    "cosface": lambda: CosFaceHead(32, 4, s=64.0, m=0.35),
    "combined": lambda: CombinedMarginHead(32, 4, s=64.0, m1=1.0, m2=0.3, m3=0.2),
    "softmax": lambda: LinearHead(32, 4),
}


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("name", sorted(HEADS))
def test_autocast_losses_and_gradients_are_finite_at_theta_0_and_pi(name, dtype):
    torch.manual_seed(10)
    head = HEADS[name]()
    w = head.weight if name != "softmax" else head.fc.weight
    with torch.no_grad():  # axis-aligned class centres make cos exactly ±1; large: normalise in fp32
        w.copy_(torch.eye(4, 32) * 100.0)
    # rows 0-1 sit exactly on their class centre (θ = 0), rows 2-3 exactly opposite (θ = π); norm 6 as for a
    # BN1d output of 32 features (fp16 weight gradients of far larger inputs overflow without a grad scaler)
    base = torch.cat([torch.eye(4, 32)[:2], -torch.eye(4, 32)[2:]]) * 6.0
    proj = torch.nn.Linear(32, 32, bias=False)
    with torch.no_grad():
        proj.weight.copy_(torch.eye(32))
    labels = torch.tensor([0, 1, 2, 3])
    parts = {"cls": (1.0, FocalLoss(head, gamma=2.0, label_smoothing=0.1)), "center": (0.1, CenterLoss(4, 32)),
             "triplet": (1.0, TripletLoss()), "distill": (1.0, DistillLoss(32, 16))}
    loss = WeightedLoss(parts)
    with torch.autocast("cpu", dtype=dtype):
        emb = proj(base)
        assert emb.dtype == dtype
        total, values = loss(emb, labels, teacher=torch.randn(4, 16))
    assert total.dtype == torch.float32 and torch.isfinite(total)
    assert all(torch.isfinite(v) for v in values.values())
    total.backward()
    for p in list(loss.parameters()) + [proj.weight]:
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
