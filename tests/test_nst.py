"""NST against the squared MMD with the polynomial kernel written out by hand and with loops, its gradients, config."""

import math

import pytest
import torch

from mdistiller.config import load_config
from mdistiller.distillers import DISTILL, DISTILLER_REGISTRY, TASK
from mdistiller.distillers.nst import nst_loss, stage_mmd
from mdistiller.models import build_model
from mdistiller.utils.errors import ConfigError


def make(*overrides, teacher="resnet20", student="resnet8"):
    cfg = load_config(None, ["DISTILLER.TYPE", "NST", "DISTILLER.TEACHER", teacher, "DISTILLER.STUDENT", student,
                             *overrides])
    torch.manual_seed(0)
    return DISTILLER_REGISTRY.get("NST").build(cfg, build_model(student, "cifar100"),
                                                     build_model(teacher, "cifar100"), None)


def mmd_by_loops(f_s, f_t):
    """Paper's Eq.: per sample, 1/Ct^2 sum k(t,t') + 1/Cs^2 sum k(s,s') - 2/(Cs Ct) sum k(s,t), k(x,y) = (x.y)^2
    on L2-normalised flattened channel maps; averaged over the batch."""
    def unit_maps(f):
        rows = []
        for c in range(f.shape[0]):
            v = [float(x) for x in f[c].flatten()]
            norm = math.sqrt(sum(x * x for x in v))
            rows.append([x / norm for x in v])
        return rows

    def mean_k(a, b):
        return sum(sum(x * y for x, y in zip(u, w)) ** 2 for u in a for w in b) / (len(a) * len(b))

    total = 0.0
    for n in range(f_s.shape[0]):
        s, t = unit_maps(f_s[n]), unit_maps(f_t[n])
        total += mean_k(t, t) + mean_k(s, s) - 2 * mean_k(s, t)
    return total / f_s.shape[0]


def test_stage_mmd_by_hand():
    # student channels e1, e2 (orthogonal: k(s, s') = identity, mean 1/2); teacher one channel (1, 1) -> unit
    # (1, 1)/sqrt(2): k(t, t) = 1, k(s, t) = 1/2 each. MMD^2 = 1 + 1/2 - 2 * 1/2 = 1/2.
    f_s = torch.tensor([[[[1.0, 0.0]], [[0.0, 3.0]]]])  # the scale of a map does not matter
    f_t = torch.tensor([[[[2.0, 2.0]]]])
    assert stage_mmd(f_s, f_t).item() == pytest.approx(0.5, abs=1e-7)
    assert stage_mmd(f_t, f_t).item() == pytest.approx(0.0, abs=1e-7)


def test_nst_loss_matches_loops_with_pooling():
    g = torch.Generator().manual_seed(3)
    stem = torch.rand(2, 4, 8, 8, generator=g)
    fs = [stem, torch.rand(2, 3, 4, 4, generator=g), torch.rand(2, 5, 2, 2, generator=g)]
    ft = [stem, torch.rand(2, 6, 2, 2, generator=g), torch.rand(2, 2, 2, 2, generator=g), torch.rand(2, 7, 1, 1)]
    # first pair: the student's 4x4 maps averaged over 2x2 blocks to the teacher's 2x2; the teacher's extra stage
    # has no partner
    pooled = torch.stack([torch.stack([fs[1][:, :, 2 * y:2 * y + 2, 2 * x:2 * x + 2].mean(dim=(-2, -1))
                                       for x in range(2)], -1) for y in range(2)], -2)
    expected = mmd_by_loops(pooled, ft[1]) + mmd_by_loops(fs[2], ft[2])
    assert nst_loss(fs, ft).item() == pytest.approx(expected, rel=1e-5)


def test_distill_term_reaches_student_only():
    d = make()
    out = d.forward_train(torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(2)),
                          torch.tensor([0, 1, 2, 3]), epoch=1)
    assert out.terms["nst"].kind == DISTILL and out.terms["ce"].kind == TASK
    feats_s = [f.detach() for f in out.student_features["feats"]]
    expected = 50.0 * sum(mmd_by_loops(s, t) for s, t in zip(feats_s[1:], out.teacher_features["feats"][1:]))
    assert out.terms["nst"].value.item() == pytest.approx(expected, rel=1e-4)
    out.terms["nst"].value.backward()
    for name, p in d.named_parameters():
        nonzero = p.grad is not None and bool(p.grad.abs().sum() > 0)
        if name.startswith("teacher."):
            assert p.grad is None, name
        elif name.startswith("student.fc."):
            assert not nonzero, name
        else:
            assert nonzero, name
    assert not [n for n, _ in d.named_parameters() if not n.startswith(("student.", "teacher."))]  # no modules


@pytest.mark.parametrize("key", ["NST.LOSS.FEAT_WEIGHT", "NST.LOSS.CE_WEIGHT"])
def test_bad_config_values(key):
    with pytest.raises(ConfigError, match=key):
        load_config(None, ["DISTILLER.TYPE", "NST", key, "-1.0"])
    assert load_config(None, ["DISTILLER.TYPE", "NST"]).NST.LOSS.FEAT_WEIGHT == 50.0
