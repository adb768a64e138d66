"""OFD: the margin against a numerical integral, the partial L2 distance against the paper's piecewise definition
(margin ReLU, then zero where the student is below a non-positive target), the stage weights, which parameters
the term trains, the models' bn_before_relu() taps, and the config checks."""

import math

import numpy as np
import pytest
import torch
import torch.nn as nn

from mdistiller.config import load_config
from mdistiller.distillers import DISTILLER_REGISTRY
from mdistiller.distillers.ofd import OFD, bn_margin, partial_l2
from mdistiller.models import build_model
from mdistiller.utils.errors import ConfigError


def make(teacher="resnet20", student="resnet8", *overrides):
    cfg = load_config(None, ["DISTILLER.TYPE", "OFD", "DISTILLER.TEACHER", teacher, "DISTILLER.STUDENT", student,
                             *overrides])
    return OFD.build(cfg, build_model(student, "cifar100"), build_model(teacher, "cifar100"), None)


def conditional_negative_mean(mu, sigma):
    """E[x | x < 0], x ~ N(mu, sigma^2), by the trapezoid rule on a fine grid (no closed form used)."""
    x = np.linspace(mu - 12 * sigma, 0.0, 400001)
    pdf = np.exp(-((x - mu) ** 2) / (2 * sigma**2)) / (sigma * math.sqrt(2 * math.pi))
    return np.trapezoid(x * pdf, x) / np.trapezoid(pdf, x)


def test_margin_is_the_mean_of_the_negative_part_of_the_bn_gaussian():
    bn = nn.BatchNorm2d(5)
    with torch.no_grad():
        bn.weight.copy_(torch.tensor([1.0, 2.0, -0.5, 0.7, 0.3]))  # std |gamma|: the sign is ignored
        bn.bias.copy_(torch.tensor([0.0, -1.0, 0.5, 1.2, 2.0]))   # mean beta
    margin = bn_margin(bn)
    assert margin.shape == (1, 5, 1, 1)
    for c, (g, b) in enumerate([(1.0, 0.0), (2.0, -1.0), (0.5, 0.5), (0.7, 1.2)]):
        assert margin[0, c, 0, 0].item() == pytest.approx(conditional_negative_mean(b, g), rel=1e-5)
    # N(0, 1): -sqrt(2 / pi), by hand
    assert margin[0, 0, 0, 0].item() == pytest.approx(-math.sqrt(2 / math.pi), rel=1e-6)
    # P(x < 0) = Phi(-2 / 0.3) < 0.001: the published fallback -3 * std
    assert margin[0, 4, 0, 0].item() == pytest.approx(-0.9, rel=1e-6)


def paper_partial_l2(s, t, m):
    """Loops over every element: target max(t, m) (margin ReLU); distance 0 if s <= target <= 0, else squared."""
    n, c, h, w = s.shape
    total = 0.0
    for i in range(n):
        for j in range(c):
            for y in range(h):
                for x in range(w):
                    target = max(t[i, j, y, x].item(), m[j])
                    sv = s[i, j, y, x].item()
                    if not (sv <= target <= 0):
                        total += (sv - target) ** 2
    return total / n


def test_partial_l2_by_the_papers_definition():
    g = torch.Generator().manual_seed(0)
    s = torch.randn(3, 4, 2, 3, generator=g, dtype=torch.float64)
    t = torch.randn(3, 4, 2, 3, generator=g, dtype=torch.float64)
    m = [-0.5, -0.1, -1.0, -0.3]
    margin = torch.tensor(m, dtype=torch.float64).view(1, 4, 1, 1)
    assert partial_l2(s, t, margin).item() == pytest.approx(paper_partial_l2(s, t, m), rel=1e-12)
    # each case occurs in this sample, so the test tells the masks apart
    mm = margin.expand_as(t)
    assert bool(((s > mm) & (t <= mm)).any()) and bool(((s <= t) & (t <= 0) & (t > mm)).any())


def test_ofd_loss_stage_weights_and_margins_from_the_teacher():
    torch.manual_seed(0)
    d = make()
    teacher = d.teacher.model
    with torch.no_grad():  # a teacher whose BNs are not at their init, so each stage's margins differ
        for bn in teacher.bn_before_relu():
            bn.weight.uniform_(0.2, 2.0)
            bn.bias.uniform_(-1.0, 1.0)
    d = OFD(student=d.student, teacher=teacher)
    images = torch.randn(2, 3, 32, 32)
    _, fs = d.student(images)
    _, ft = d.teacher(images)
    got = d.ofd_loss(fs["preact_feats"][1:], ft["preact_feats"][1:]).item()
    expected = 0.0
    bns = teacher.bn_before_relu()
    for i, weight in enumerate([0.25, 0.5, 1.0]):  # 1 / 2^(n - i - 1), n = 3
        m = [conditional_negative_mean(b.item(), abs(g.item())) if math.erfc(b.item() / abs(g.item()) / math.sqrt(2)) / 2 > 0.001
             else -3 * abs(g.item()) for g, b in zip(bns[i].weight, bns[i].bias)]
        s = d.connectors[i](fs["preact_feats"][i + 1]).detach()
        expected += weight * paper_partial_l2(s, ft["preact_feats"][i + 1], m)  # same spatial size: no pooling
    assert got == pytest.approx(expected, rel=1e-4)


def test_distillation_term_trains_student_and_connectors_never_the_teacher():
    torch.manual_seed(0)
    d = make()
    d.train()
    out = d.train_forward(torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 3]), epoch=1)
    out.terms["ofd"].value.backward()
    for name, p in d.connectors.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    student = dict(d.student.named_parameters())
    assert student["conv1.weight"].grad.abs().sum() > 0
    assert student["layer3.0.conv2.weight"].grad.abs().sum() > 0
    assert student["fc.weight"].grad is None  # the logits are not in the feature term
    assert all(p.grad is None for p in d.teacher.parameters())
    assert set(DISTILLER_REGISTRY.get("OFD").ramped_terms) == {"ofd"}


def _bn_outputs(model, x):
    seen = []
    hooks = [bn.register_forward_hook(lambda m, i, o: seen.append(o.detach())) for bn in model.bn_before_relu()]
    _, feats = model(x)
    for h in hooks:
        h.remove()
    return seen, feats


@pytest.mark.parametrize("name", ["resnet8", "resnet8x4", "ResNet18", "ResNet50", "wrn_16_1", "vgg8", "MobileNetV2"])
def test_bn_before_relu_one_per_preact_stage(name):
    model = build_model(name, "cifar100").eval()
    seen, feats = _bn_outputs(model, torch.randn(2, 3, 32, 32))
    pre = feats["preact_feats"][1:]
    assert len(model.bn_before_relu()) == len(pre)
    assert all(isinstance(bn, nn.BatchNorm2d) for bn in model.bn_before_relu())
    assert [o.shape for o in seen[-len(pre):]] == [p.shape for p in pre]


@pytest.mark.parametrize("name", ["wrn_16_1", "vgg8"])
def test_bn_before_relu_outputs_are_the_preact_taps(name):
    model = build_model(name, "cifar100").eval()
    seen, feats = _bn_outputs(model, torch.randn(2, 3, 32, 32))
    for o, p in zip(seen, feats["preact_feats"][1:]):
        assert torch.equal(o, p)


def test_resnet_bn_before_relu_is_the_last_branch_bn():
    """preact = branch BN output + identity shortcut: the difference is the last block's input."""
    model = build_model("resnet20", "cifar100").eval()
    inputs = []
    hooks = [stage[-1].register_forward_hook(lambda m, i, o: inputs.append(i[0].detach()))
             for stage in (model.layer1, model.layer2, model.layer3)]
    seen, feats = _bn_outputs(model, torch.randn(2, 3, 32, 32))
    for h in hooks:
        h.remove()
    for o, x, p in zip(seen, inputs, feats["preact_feats"][1:]):
        assert torch.allclose(p - o, x, atol=1e-6)


@pytest.mark.parametrize("overrides,key", [
    (["OFD.CONNECTOR.KERNEL_SIZE", "2"], "OFD.CONNECTOR.KERNEL_SIZE"),
    (["OFD.LOSS.FEAT_WEIGHT", "-1.0"], "OFD.LOSS.FEAT_WEIGHT"),
    (["OFD.LOSS.CE_WEIGHT", "-1.0"], "OFD.LOSS.CE_WEIGHT"),
])
def test_bad_config_values(overrides, key):
    with pytest.raises(ConfigError, match=key):
        load_config(None, ["DISTILLER.TYPE", "OFD", *overrides])


def test_shufflenet_teacher_is_refused():
    with pytest.raises(ConfigError, match="DISTILLER.TEACHER"):
        OFD(student=build_model("resnet8", "cifar100"), teacher=build_model("ShuffleV1", "cifar100"))
