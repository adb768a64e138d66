"""RKD, PKT and SP: each loss against the paper's formula written out with explicit loops in the test, where the
gradients go, and the config errors."""

import itertools
import math

import pytest
import torch

from mdistiller.config import load_config
from mdistiller.distillers import DISTILL, DISTILLER_REGISTRY, TASK
from mdistiller.distillers.pkt import pkt_loss
from mdistiller.distillers.rkd import pairwise_distance, rkd_loss
from mdistiller.distillers.sp import sp_loss
from mdistiller.models import build_model
from mdistiller.utils.errors import ConfigError


def make(method, *overrides):
    torch.manual_seed(0)
    cfg = load_config(None, ["DISTILLER.TYPE", method, *overrides])
    return DISTILLER_REGISTRY.get(method).build(
        cfg, build_model("resnet8", "cifar100"), build_model("resnet20", "cifar100"), None)


def batch(n=6, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 32, 32, generator=g), torch.randint(0, 100, (n,), generator=g)


def features(n, d, seed):
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def smooth_l1(a, b):
    x = abs(a - b)
    return 0.5 * x * x if x < 1 else x - 0.5


def nonzero_grads(distiller, term):
    distiller.zero_grad(set_to_none=True)
    x, y = batch()
    distiller.train_forward(x, y, epoch=1).terms[term].value.backward()
    return {n for n, p in distiller.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}


# ---------------------------------------------------------------- RKD

def plain_rkd(s, t, w_d, w_a):
    """Park et al.'s distance and angle losses, one pair / triplet at a time."""
    n = len(s)

    def dist(e):
        return [[math.sqrt(sum((e[i][k] - e[j][k]) ** 2 for k in range(len(e[0])))) for j in range(n)]
                for i in range(n)]

    def normalized(e):
        d = dist(e)
        mu = sum(d[i][j] for i in range(n) for j in range(n) if i != j) / (n * (n - 1))
        return [[d[i][j] / mu for j in range(n)] for i in range(n)]

    def cosine(e, i, j, k):
        u = [e[j][c] - e[i][c] for c in range(len(e[0]))]
        v = [e[k][c] - e[i][c] for c in range(len(e[0]))]
        nu, nv = math.sqrt(sum(a * a for a in u)), math.sqrt(sum(a * a for a in v))
        if nu == 0 or nv == 0:
            return 0.0
        return sum(a * b for a, b in zip(u, v)) / (nu * nv)

    ds, dt = normalized(s), normalized(t)
    loss_d = sum(smooth_l1(ds[i][j], dt[i][j]) for i in range(n) for j in range(n)) / n ** 2
    loss_a = sum(smooth_l1(cosine(s, i, j, k), cosine(t, i, j, k))
                 for i, j, k in itertools.product(range(n), repeat=3)) / n ** 3
    return w_d * loss_d + w_a * loss_a


def test_rkd_loss_matches_pairs_and_triplets_by_loop():
    s, t = features(5, 4, 0), features(5, 7, 1) * 3  # different widths: only relations are compared
    expected = plain_rkd(s.tolist(), t.tolist(), 25.0, 50.0)
    assert rkd_loss(s, t, distance_weight=25.0, angle_weight=50.0).item() == pytest.approx(expected, rel=1e-9)
    # the distance part alone, and its invariance to the teacher's scale
    only_d = plain_rkd(s.tolist(), t.tolist(), 1.0, 0.0)
    assert rkd_loss(s, 10 * t, distance_weight=1.0, angle_weight=0.0).item() == pytest.approx(only_d, rel=1e-9)


def test_rkd_distances_by_hand():
    e = torch.tensor([[0.0, 0.0], [3.0, 4.0], [0.0, 1.0]], dtype=torch.float64)
    d = pairwise_distance(e)
    r18 = math.sqrt(18)
    assert d.flatten().tolist() == pytest.approx([0, 5, 1, 5, 0, r18, 1, r18, 0], abs=1e-7)
    assert pairwise_distance(e, squared=True).flatten().tolist() == pytest.approx([0, 25, 1, 25, 0, 18, 1, 18, 0])


def test_rkd_term_on_pooled_features_and_gradients():
    d = make("RKD")
    x, y = batch()
    out = d.train_forward(x, y, epoch=1)
    s, t = out.student_features["pooled_feat"], out.teacher_features["pooled_feat"]
    expected = plain_rkd(s.double().tolist(), t.double().tolist(), 25.0, 50.0)
    assert out.terms["rkd"].kind == DISTILL and out.terms["ce"].kind == TASK
    assert out.terms["rkd"].value.item() == pytest.approx(expected, rel=1e-4)
    got = nonzero_grads(d, "rkd")
    assert any(n.startswith("student.conv1.") for n in got) and any(n.startswith("student.layer3.") for n in got)
    assert not any(n.startswith(("student.fc.", "teacher.")) for n in got)  # the classifier is past the pooled feature


@pytest.mark.parametrize("key, value", [("RKD.DISTANCE_WEIGHT", "-1"), ("RKD.ANGLE_WEIGHT", "-1"),
                                        ("RKD.LOSS.FEAT_WEIGHT", "-1"), ("RKD.PDIST.EPSILON", "0")])
def test_rkd_bad_values_name_the_key(key, value):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(None, ["DISTILLER.TYPE", "RKD", key, value])


def test_rkd_published_defaults():
    c = load_config(None, ["DISTILLER.TYPE", "RKD"]).RKD
    assert (c.DISTANCE_WEIGHT, c.ANGLE_WEIGHT, c.LOSS.CE_WEIGHT, c.LOSS.FEAT_WEIGHT) == (25, 50, 1, 1)
    assert (c.PDIST.EPSILON, c.PDIST.SQUARED) == (1e-12, False)


# ---------------------------------------------------------------- PKT

def plain_pkt(s, t, eps=1e-7):
    """Passalis & Tefas' conditional similarity distributions and their divergence, entry by entry, averaged
    over the N^2 entries as the published code reduces it."""
    n = len(s)

    def probs(e):
        unit = []
        for row in e:
            norm = math.sqrt(sum(v * v for v in row))
            unit.append([v / (norm + eps) for v in row])
        k = [[(sum(a * b for a, b in zip(unit[i], unit[j])) + 1) / 2 for j in range(n)] for i in range(n)]
        return [[k[i][j] / sum(k[i]) for j in range(n)] for i in range(n)]

    ps, pt = probs(s), probs(t)
    return sum(pt[i][j] * math.log((pt[i][j] + eps) / (ps[i][j] + eps)) for i in range(n) for j in range(n)) / n ** 2


def test_pkt_loss_matches_loop_and_vanishes_for_equal_directions():
    s, t = features(5, 4, 2), features(5, 9, 3)
    assert pkt_loss(s, t).item() == pytest.approx(plain_pkt(s.tolist(), t.tolist()), rel=1e-9)
    # only directions count: a per-sample rescaling of the student leaves it at zero against itself
    assert pkt_loss(s * torch.arange(1.0, 6.0, dtype=torch.float64)[:, None], s).item() == pytest.approx(0, abs=1e-12)


def test_pkt_term_on_pooled_features_and_gradients():
    d = make("PKT")
    x, y = batch()
    out = d.train_forward(x, y, epoch=1)
    s, t = out.student_features["pooled_feat"], out.teacher_features["pooled_feat"]
    assert out.terms["pkt"].kind == DISTILL and out.terms["ce"].kind == TASK
    # The wiring: the term is 30000 x pkt_loss of the pooled features (pkt_loss itself is checked against the plain
    # float64 formula above). The float32 value sits within float32 cancellation of that formula: a KL of
    # near-identical distributions loses digits, by a CPU-kind-dependent 0.2% here, so that bound is loose.
    assert torch.equal(out.terms["pkt"].value, 30000 * pkt_loss(s, t))
    expected = 30000 * plain_pkt(s.double().tolist(), t.double().tolist())
    assert out.terms["pkt"].value.item() == pytest.approx(expected, rel=2e-2)
    got = nonzero_grads(d, "pkt")
    assert any(n.startswith("student.conv1.") for n in got) and any(n.startswith("student.layer3.") for n in got)
    assert not any(n.startswith(("student.fc.", "teacher.")) for n in got)


def test_pkt_bad_values_and_defaults():
    with pytest.raises(ConfigError, match=r"PKT\.LOSS\.FEAT_WEIGHT"):
        load_config(None, ["DISTILLER.TYPE", "PKT", "PKT.LOSS.FEAT_WEIGHT", "-1"])
    c = load_config(None, ["DISTILLER.TYPE", "PKT"]).PKT
    assert (c.LOSS.CE_WEIGHT, c.LOSS.FEAT_WEIGHT) == (1.0, 30000.0)


# ---------------------------------------------------------------- SP

def plain_sp(s, t):
    """Tung & Mori's loss: Gram matrices of the flattened activations, rows L2-normalised, squared Frobenius
    distance over N^2, entry by entry."""
    n = len(s)

    def gram(e):
        g = [[sum(a * b for a, b in zip(e[i], e[j])) for j in range(n)] for i in range(n)]
        return [[v / math.sqrt(sum(w * w for w in row)) for v in row] for row in g]

    gs, gt = gram(s), gram(t)
    return sum((gt[i][j] - gs[i][j]) ** 2 for i in range(n) for j in range(n)) / n ** 2


def test_sp_loss_matches_loop_by_hand_and_ignores_shapes():
    # by hand: s rows (1, 0), (1, 1) -> G = [[1, 1], [1, 2]] -> rows /sqrt2, /sqrt5; t orthogonal -> G_t = I
    s = torch.tensor([[1.0, 0.0], [1.0, 1.0]], dtype=torch.float64)
    t = torch.tensor([[2.0, 0.0, 0.0], [0.0, 3.0, 0.0]], dtype=torch.float64)
    r2, r5 = math.sqrt(2), math.sqrt(5)
    by_hand = ((1 - 1 / r2) ** 2 + (1 / r2) ** 2 + (1 / r5) ** 2 + (1 - 2 / r5) ** 2) / 4
    assert sp_loss(s, t).item() == pytest.approx(by_hand, rel=1e-12)
    # feature maps of different widths and sizes compare through their N x N similarities
    f_s = features(4, 2 * 3 * 3, 4).view(4, 2, 3, 3)
    f_t = features(4, 5 * 2 * 2, 5).view(4, 5, 2, 2)
    expected = plain_sp(f_s.flatten(1).tolist(), f_t.flatten(1).tolist())
    assert sp_loss(f_s, f_t).item() == pytest.approx(expected, rel=1e-9)
    assert sp_loss(f_s, f_t).dim() == 0


def test_sp_term_on_last_stage_and_gradients():
    d = make("SP")
    x, y = batch()
    out = d.train_forward(x, y, epoch=1)
    s, t = out.student_features["feats"][-1], out.teacher_features["feats"][-1]
    assert s.shape[1] == 64 and t.shape[1] == 64  # the last stage of each resnet
    assert out.terms["sp"].kind == DISTILL and out.terms["ce"].kind == TASK
    expected = 3000 * plain_sp(s.flatten(1).double().tolist(), t.flatten(1).double().tolist())
    assert out.terms["sp"].value.item() == pytest.approx(expected, rel=1e-4)
    got = nonzero_grads(d, "sp")
    assert any(n.startswith("student.conv1.") for n in got) and any(n.startswith("student.layer3.") for n in got)
    assert not any(n.startswith(("student.fc.", "teacher.")) for n in got)


def test_sp_bad_values_and_defaults():
    with pytest.raises(ConfigError, match=r"SP\.LOSS\.CE_WEIGHT"):
        load_config(None, ["DISTILLER.TYPE", "SP", "SP.LOSS.CE_WEIGHT", "-0.5"])
    c = load_config(None, ["DISTILLER.TYPE", "SP"]).SP
    assert (c.LOSS.CE_WEIGHT, c.LOSS.FEAT_WEIGHT) == (1.0, 3000.0)
