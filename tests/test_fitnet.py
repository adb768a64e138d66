"""FitNet: the hint loss against a hand-written regressor + MSE, the regressor's shape rules, where its
gradients go, and the config errors."""

import pytest
import torch
import torch.nn as nn

from mdistiller.config import load_config
from mdistiller.distillers import DISTILL, TASK
from mdistiller.distillers.fitnet import FitNet, HintRegressor, stage_shape
from mdistiller.models import build_model
from mdistiller.utils.errors import ConfigError


def make(hint_layer=2, feat_weight=100.0):
    torch.manual_seed(0)
    return FitNet(student=build_model("resnet8", "cifar100"), teacher=build_model("resnet20", "cifar100"),
                  image_size=32, hint_layer=hint_layer, ce_weight=1.0, feat_weight=feat_weight)


def images(n=4, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 32, 32, generator=g), torch.randint(0, 100, (n,), generator=g)


def plain_hint(f_s, f_t, conv, bn):
    """1x1 conv, training-mode BN (batch mean, biased variance), ReLU, then the squared error averaged over every
    element, written out with explicit sums."""
    w, b = conv.weight[:, :, 0, 0], conv.bias
    r = torch.einsum("oc,nchw->nohw", w, f_s) + b[None, :, None, None]
    count = r.shape[0] * r.shape[2] * r.shape[3]
    mean = r.sum(dim=(0, 2, 3)) / count
    var = ((r - mean[None, :, None, None]) ** 2).sum(dim=(0, 2, 3)) / count
    r = (r - mean[None, :, None, None]) / torch.sqrt(var[None, :, None, None] + bn.eps)
    r = torch.clamp(r * bn.weight[None, :, None, None] + bn.bias[None, :, None, None], min=0)
    return ((r - f_t) ** 2).sum() / f_t.numel()


def test_hint_term_matches_plain_regression_and_mse():
    d = make()
    x, y = images()
    with torch.no_grad():  # a non-trivial BN affine, so the test sees it applied
        d.regressor.bn.weight.uniform_(0.5, 1.5)
        d.regressor.bn.bias.uniform_(-0.2, 0.2)
    out = d.train_forward(x, y, epoch=1)
    f_s = d.student(x)[1]["feats"][2]
    f_t = d.teacher(x)[1]["feats"][2]
    assert f_s.shape == f_t.shape == (4, 32, 16, 16)  # feats[2]: the second stage of both resnets
    expected = plain_hint(f_s.detach(), f_t, d.regressor.conv, d.regressor.bn)
    assert out.terms["fitnet"].kind == DISTILL and out.terms["ce"].kind == TASK
    assert out.terms["fitnet"].value.item() == pytest.approx(100 * expected.item(), rel=1e-5)
    assert out.terms["ce"].value.item() == pytest.approx(nn.functional.cross_entropy(out.logits, y).item(), rel=1e-6)


@pytest.mark.parametrize("s_hw, t_hw, conv_type, kernel", [
    ((16, 16), (8, 8), nn.Conv2d, (3, 3)),             # student twice as large: strided 3x3
    ((8, 8), (16, 16), nn.ConvTranspose2d, (4, 4)),    # student half as large: transposed 4x4
    ((8, 8), (8, 8), nn.Conv2d, (1, 1)),               # equal: 1x1
    ((10, 9), (7, 7), nn.Conv2d, (4, 3)),              # larger: kernel 1 + Hs - Ht by 1 + Ws - Wt
])
def test_regressor_maps_student_size_onto_teacher_size(s_hw, t_hw, conv_type, kernel):
    reg = HintRegressor((5, *s_hw), (7, *t_hw))
    assert type(reg.conv) is conv_type and tuple(reg.conv.kernel_size) == kernel
    out = reg(torch.randn(2, 5, *s_hw))
    assert out.shape == (2, 7, *t_hw) and (out >= 0).all()  # ends in a ReLU


def test_regressor_refuses_a_teacher_map_over_twice_as_large():
    with pytest.raises(ConfigError, match="FITNET.HINT_LAYER"):
        HintRegressor((5, 4, 4), (7, 16, 16))


def test_gradients_reach_student_up_to_the_hint_and_the_regressor_only():
    d = make()
    x, y = images()
    d.train_forward(x, y, epoch=1).terms["fitnet"].value.backward()
    grads = {n: p.grad for n, p in d.named_parameters()}
    nonzero = {n for n, g in grads.items() if g is not None and g.abs().sum() > 0}
    for prefix in ("student.conv1.", "student.layer1.", "student.layer2.", "regressor."):
        assert any(n.startswith(prefix) for n in nonzero), prefix
    # past the hint stage, and the teacher, nothing
    assert not any(n.startswith(("student.layer3.", "student.fc.", "teacher.")) for n in nonzero)
    assert all(p.grad is None for p in d.teacher.parameters())


def test_shape_probe_leaves_student_batchnorm_statistics_alone():
    student = build_model("resnet8", "cifar100")
    student.train()
    before = {k: v.clone() for k, v in student.state_dict().items()}
    FitNet(student=student, teacher=build_model("resnet20", "cifar100"))
    assert student.training
    assert all(torch.equal(before[k], v) for k, v in student.state_dict().items())


def test_bad_values_name_the_key():
    with pytest.raises(ConfigError, match="FITNET.HINT_LAYER"):
        load_config(None, ["DISTILLER.TYPE", "FITNET", "FITNET.HINT_LAYER", "-1"])
    with pytest.raises(ConfigError, match="FITNET.LOSS.FEAT_WEIGHT"):
        load_config(None, ["DISTILLER.TYPE", "FITNET", "FITNET.LOSS.FEAT_WEIGHT", "-5"])
    with pytest.raises(ConfigError, match="FITNET.HINT_LAYER"):
        make(hint_layer=4)  # resnets have 4 feature maps: 0..3


def test_regressor_sized_from_the_datasets_image_size():
    """The probe runs at the data's size: resnet8's last stage is a quarter of the input's side."""
    from types import SimpleNamespace
    assert stage_shape(build_model("resnet8", "cifar100"), 3, 64) == (64, 16, 16)
    assert stage_shape(build_model("resnet8", "cifar100"), 3, 32) == (64, 8, 8)
    cfg = load_config(None, ["DISTILLER.TYPE", "FITNET", "FITNET.HINT_LAYER", "3"])
    s, t = build_model("resnet8", "cifar100"), build_model("resnet20", "cifar100")
    d = FitNet.build(cfg, s, t, SimpleNamespace(image_size=64))
    assert tuple(d.regressor.conv.kernel_size) == (1, 1) and d.hint_layer == 3
    x = torch.randn(2, 3, 64, 64)
    assert d.regressor(d.student(x)[1]["feats"][3]).shape == d.teacher(x)[1]["feats"][3].shape == (2, 64, 16, 16)


def test_published_defaults():
    cfg = load_config(None, ["DISTILLER.TYPE", "FITNET"])
    assert (cfg.FITNET.HINT_LAYER, cfg.FITNET.LOSS.CE_WEIGHT, cfg.FITNET.LOSS.FEAT_WEIGHT) == (2, 1.0, 100.0)
