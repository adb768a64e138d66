"""KD and DKD against hand computations and the published identity of the DKD appendix."""

import math

import pytest
import torch
import torch.nn.functional as F

from mdistiller.config import load_config
from mdistiller.distillers import DISTILL, DISTILLER_REGISTRY, TASK
from mdistiller.distillers.dkd import decoupled_kl, dkd_loss
from mdistiller.distillers.losses import kd_loss
from mdistiller.models import build_model
from plain_formulas import plain_dkd, plain_kd, softmax


@pytest.mark.parametrize("temperature", [1.0, 2.0, 4.0])
def test_kd_loss_by_hand(temperature):
    s, t = [1.0, 2.0, 3.0], [3.0, 2.0, 1.0]
    ps, pt = softmax([v / temperature for v in s]), softmax([v / temperature for v in t])
    expected = sum(a * math.log(a / b) for a, b in zip(pt, ps)) * temperature**2
    # logits differ by 2 in classes 0 and 2, so KL = (2 / T) * (pt0 - pt2): a second, closed-form check
    assert expected == pytest.approx((2 / temperature) * (pt[0] - pt[2]) * temperature**2)
    batch_s = torch.tensor([s, s], dtype=torch.float64)
    batch_t = torch.tensor([t, t], dtype=torch.float64)
    assert kd_loss(batch_s, batch_t, temperature).item() == pytest.approx(expected, rel=1e-12)
    assert kd_loss(batch_t, batch_t, temperature).item() == pytest.approx(0.0, abs=1e-12)
    # rows without that symmetry, where KL(p^T || p^S) and KL(p^S || p^T) differ
    g = torch.Generator().manual_seed(3)
    a, b = (torch.randn(3, 6, generator=g, dtype=torch.float64) * 2 for _ in range(2))
    assert kd_loss(a, b, temperature).item() == pytest.approx(plain_kd(a.tolist(), b.tolist(), temperature),
                                                              rel=1e-12)


@pytest.mark.parametrize("temperature", [1.0, 4.0])
def test_dkd_decomposition_identity_per_sample(temperature):
    """KD = KL(b^T||b^S) + (1 - p_t^T) KL(p_hat^T||p_hat^S)  (DKD appendix eq. 12)."""
    g = torch.Generator().manual_seed(0)
    s = torch.randn(16, 10, generator=g, dtype=torch.float64) * 3
    t = torch.randn(16, 10, generator=g, dtype=torch.float64) * 3
    y = torch.randint(0, 10, (16,), generator=g)
    tckd, nckd = decoupled_kl(s, t, y, temperature)
    log_ps, log_pt = F.log_softmax(s / temperature, 1), F.log_softmax(t / temperature, 1)
    kd = (log_pt.exp() * (log_pt - log_ps)).sum(1)
    pt_target = log_pt.exp().gather(1, y[:, None])[:, 0]
    torch.testing.assert_close(tckd + (1 - pt_target) * nckd, kd, rtol=1e-10, atol=1e-12)
    assert (tckd >= 0).all() and (nckd >= 0).all()


def test_dkd_tckd_by_hand():
    s, t = torch.tensor([[0.0, 1.0, 2.0]]), torch.tensor([[2.0, 1.0, 0.0]])
    tckd, nckd = decoupled_kl(s, t, torch.tensor([0]))
    ps, pt = softmax([0, 1, 2]), softmax([2, 1, 0])
    bs, bt = (ps[0], 1 - ps[0]), (pt[0], 1 - pt[0])
    assert tckd.item() == pytest.approx(sum(a * math.log(a / b) for a, b in zip(bt, bs)), rel=1e-5)
    hs, ht = softmax([1, 2]), softmax([1, 0])
    assert nckd.item() == pytest.approx(sum(a * math.log(a / b) for a, b in zip(ht, hs)), rel=1e-5)


def test_dkd_is_finite_for_two_classes():
    s = torch.tensor([[5.0, -5.0], [0.3, 0.1], [-20.0, 20.0]], requires_grad=True)
    t = torch.tensor([[-5.0, 5.0], [0.1, 0.3], [20.0, -20.0]])
    y = torch.tensor([0, 1, 1])
    loss = dkd_loss(s, t, y, alpha=1.0, beta=8.0, temperature=4.0)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(s.grad).all()
    _, nckd = decoupled_kl(s, t, y, 4.0)
    assert torch.equal(nckd, torch.zeros(3))  # one non-target class: p_hat is a point mass
    # with two classes the binary distribution is the whole one: DKD = alpha * KD
    assert loss.item() == pytest.approx(plain_kd(s.tolist(), t.tolist(), 4.0), rel=1e-5)
    assert loss.item() == pytest.approx(plain_dkd(s.tolist(), t.tolist(), y.tolist(), 1.0, 8.0, 4.0), rel=1e-5)


def make(distiller_type, *overrides, dataset="cifar100"):
    """The distiller in float64, so that the plain-Python references hold to 1e-9 rather than float32's 1e-5."""
    cfg = load_config(None, ["DATASET.TYPE", dataset, "DISTILLER.TYPE", distiller_type, "DISTILLER.TEACHER",
                             "resnet20", "DISTILLER.STUDENT", "resnet8", *overrides])
    student, teacher = build_model("resnet8", dataset), build_model("resnet20", dataset)
    return DISTILLER_REGISTRY.get(distiller_type).build(cfg, student, teacher, None).double(), cfg


def images(n=4):
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(5), dtype=torch.float64)


def test_kd_distiller_terms_and_teacher_frozen():
    distiller, cfg = make("KD")
    distiller.train()
    assert not distiller.teacher.training and distiller.student.training
    x, y = images(), torch.tensor([3, 17, 42, 99])
    out = distiller.forward_train(x, y, epoch=1)
    logits, terms = out.logits, out.terms
    assert logits.shape == (4, 100) and set(terms) == {"ce", "kd"}
    assert terms["ce"].kind == TASK and terms["kd"].kind == DISTILL
    with torch.no_grad():
        lt = distiller.teacher(x)[0]
    s, t = logits.tolist(), lt.tolist()
    ce = -sum(math.log(softmax(row)[label]) for row, label in zip(s, y.tolist())) / len(s)
    assert terms["ce"].value.item() == pytest.approx(0.1 * ce, rel=1e-9)
    assert terms["kd"].value.item() == pytest.approx(0.9 * plain_kd(s, t, 4.0), rel=1e-9)
    (terms["ce"].value + terms["kd"].value).backward()
    assert all(p.grad is None for p in distiller.teacher.parameters())
    assert not any(name.startswith("teacher.") for name, _ in distiller.named_parameters()
                   if any(p is _ for p in distiller.learnable_parameters()))
    assert all(k.startswith("student.") for k in distiller.learnable_state_dict())


def test_dkd_term_and_warmup_ramp():
    """The DKD term at the default alpha 1, beta 8, T 4 against the plain-Python DKD, ramped linearly over the
    20 warm-up epochs (epoch / 20, then 1)."""
    distiller, cfg = make("DKD", "DKD.WARMUP", "20")
    x, y = images(), torch.tensor([3, 17, 42, 99])
    with torch.no_grad():
        out = {e: distiller.forward_train(x, y, epoch=e) for e in (1, 5, 20, 40)}
    s, t = out[20].logits.tolist(), out[20].teacher_logits.tolist()
    full = plain_dkd(s, t, y.tolist(), 1.0, 8.0, 4.0)
    assert full != pytest.approx(plain_kd(s, t, 4.0), rel=1e-2)  # beta 8 makes DKD differ from KD here
    for epoch, ramp in ((1, 1 / 20), (5, 5 / 20), (20, 1.0), (40, 1.0)):
        assert out[epoch].terms["dkd"].value.item() == pytest.approx(ramp * full, rel=1e-9), epoch
    ce = -sum(math.log(softmax(row)[label]) for row, label in zip(s, y.tolist())) / len(s)
    assert out[20].terms["ce"].value.item() == pytest.approx(ce, rel=1e-9)
