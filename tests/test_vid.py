"""VID against the published Gaussian negative log-likelihood written out with loops, its gradients and its config."""

import math

import pytest
import torch

from mdistiller.config import load_config
from mdistiller.distillers import DISTILL, DISTILLER_REGISTRY, TASK
from mdistiller.distillers.vid import VID, gaussian_nll, initial_alpha
from mdistiller.models import build_model
from mdistiller.utils.errors import ConfigError


def make(*overrides, teacher="resnet20", student="resnet8"):
    cfg = load_config(None, ["DISTILLER.TYPE", "VID", "DISTILLER.TEACHER", teacher, "DISTILLER.STUDENT", student,
                             *overrides])
    torch.manual_seed(0)
    return DISTILLER_REGISTRY.get("VID").build(cfg, build_model(student, "cifar100"),
                                                     build_model(teacher, "cifar100"), None)


def nll_by_loops(mean, alpha, target, eps):
    """mean over n, c, h, w of 0.5 * ((mu - t)^2 / v_c + ln v_c), v_c = ln(1 + e^alpha_c) + eps."""
    n, c, h, w = mean.shape
    total = 0.0
    for ci in range(c):
        v = math.log(1 + math.exp(float(alpha[ci]))) + eps
        for ni in range(n):
            for hi in range(h):
                for wi in range(w):
                    d = float(mean[ni, ci, hi, wi]) - float(target[ni, ci, hi, wi])
                    total += 0.5 * (d * d / v + math.log(v))
    return total / (n * c * h * w)


def test_initial_variance_is_init_pred_var():
    a = initial_alpha(5.0, 1e-5)
    assert math.log(1 + math.exp(a)) + 1e-5 == pytest.approx(5.0, rel=1e-12)
    d = make()
    assert len(d.log_scales) == 3  # stem dropped: resnet8's three stages
    for alpha, c in zip(d.log_scales, [16, 32, 64]):
        assert alpha.shape == (c,) and torch.allclose(alpha, torch.full((c,), a))


def test_gaussian_nll_by_hand():
    # one channel, two positions, var = 1 (alpha = ln(e - 1), eps 0): 0.5 * ((1^2 + 3^2) / 2) = 2.5
    mean = torch.tensor([[[[1.0, 2.0]]]], dtype=torch.float64)
    target = torch.tensor([[[[0.0, 5.0]]]], dtype=torch.float64)
    alpha = torch.tensor([math.log(math.e - 1)], dtype=torch.float64)
    assert gaussian_nll(mean, alpha, target, eps=0.0).item() == pytest.approx(2.5, abs=1e-12)
    g = torch.Generator().manual_seed(0)
    mean, target = torch.randn(2, 3, 2, 2, generator=g), torch.randn(2, 3, 2, 2, generator=g)
    alpha = torch.tensor([-1.0, 0.5, 3.0])
    assert gaussian_nll(mean, alpha, target, 1e-5).item() == pytest.approx(
        nll_by_loops(mean, alpha, target, 1e-5), rel=1e-5)


def test_vid_loss_pools_and_regresses_by_hand():
    d = make()
    g = torch.Generator().manual_seed(1)
    stem = torch.zeros(2, 16, 8, 8)
    # student maps twice the teacher's size at the first stage: pooled 2x2 -> 1x1 blocks first
    fs = [stem, torch.rand(2, 16, 4, 4, generator=g), torch.rand(2, 32, 2, 2, generator=g),
          torch.rand(2, 64, 1, 1, generator=g)]
    ft = [stem, torch.rand(2, 16, 2, 2, generator=g), torch.rand(2, 32, 2, 2, generator=g),
          torch.rand(2, 64, 1, 1, generator=g)]
    with torch.no_grad():
        for p in d.log_scales:
            p.uniform_(-1, 2, generator=g)
    expected = 0.0
    for i in range(3):
        s, t = fs[i + 1], ft[i + 1]
        if s.shape[-1] != t.shape[-1]:
            k = s.shape[-1] // t.shape[-1]
            pooled = torch.zeros(s.shape[0], s.shape[1], t.shape[-2], t.shape[-1])
            for y in range(t.shape[-2]):
                for x in range(t.shape[-1]):
                    pooled[:, :, y, x] = s[:, :, y * k:(y + 1) * k, x * k:(x + 1) * k].mean(dim=(-2, -1))
            s = pooled
        # the regressor's 1x1 convolutions as matrix products over channels at each position
        w1, w2, w3 = (m.weight.detach()[:, :, 0, 0] for m in d.regressors[i] if isinstance(m, torch.nn.Conv2d))
        x = s.permute(0, 2, 3, 1)
        mu = (((x @ w1.T).clamp(min=0) @ w2.T).clamp(min=0) @ w3.T).permute(0, 3, 1, 2)
        expected += nll_by_loops(mu, d.log_scales[i].detach(), t, 1e-5)
    assert d.vid_loss(fs, ft).item() == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("learn", [True, False])
def test_distill_term_reaches_student_regressors_and_variances_only(learn):
    d = make("VID.LEARN_VARIANCE", str(learn))
    out = d.forward_train(torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(2)),
                          torch.tensor([0, 1, 2, 3]), epoch=1)
    assert out.terms["vid"].kind == DISTILL and out.terms["ce"].kind == TASK
    out.terms["vid"].value.backward()
    for name, p in d.named_parameters():
        nonzero = p.grad is not None and bool(p.grad.abs().sum() > 0)
        if name.startswith("teacher."):
            assert p.grad is None, name
        elif name.startswith("student.fc."):
            assert not nonzero, name  # the classifier is after the last stage
        elif name.startswith("log_scales."):
            assert nonzero == learn, name
        else:
            assert nonzero, name
    learnable = {id(p) for p in d.learnable_parameters()}
    assert all((id(p) in learnable) == learn for p in d.log_scales)
    assert all(id(p) in learnable for p in d.regressors.parameters())
    assert any(k.startswith("log_scales.") for k in d.learnable_state_dict())


def test_channels_follow_the_pair():
    d = make(teacher="resnet32x4", student="resnet8x4")
    assert [r[0].in_channels for r in d.regressors] == [64, 128, 256]
    assert [r[-1].out_channels for r in d.regressors] == [64, 128, 256]
    assert isinstance(d, VID)


@pytest.mark.parametrize("key,value,match", [
    ("VID.EPS", "-1.0", "VID.EPS"),
    ("VID.INIT_PRED_VAR", "1e-6", "VID.INIT_PRED_VAR"),
    ("VID.LOSS.FEAT_WEIGHT", "-1.0", "VID.LOSS.FEAT_WEIGHT"),
    ("VID.LOSS.CE_WEIGHT", "-0.5", "VID.LOSS.CE_WEIGHT"),
])
def test_bad_config_values(key, value, match):
    with pytest.raises(ConfigError, match=match):
        load_config(None, ["DISTILLER.TYPE", "VID", key, value])
