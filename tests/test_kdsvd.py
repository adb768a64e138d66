"""KDSVD against hand computations and a loop implementation of the published loss, its gradients and config."""

import math

import pytest
import torch

from mdistiller.config import load_config
from mdistiller.distillers import DISTILL, DISTILLER_REGISTRY, TASK
from mdistiller.distillers.kdsvd import align_to, kdsvd_loss, leading_right_singular
from mdistiller.models import build_model
from mdistiller.utils.errors import ConfigError


def make(*overrides, teacher="resnet20", student="resnet8"):
    cfg = load_config(None, ["DISTILLER.TYPE", "KDSVD", "DISTILLER.TEACHER", teacher, "DISTILLER.STUDENT", student,
                             *overrides])
    torch.manual_seed(0)
    return DISTILLER_REGISTRY.get("KDSVD").build(cfg, build_model(student, "cifar100"),
                                                       build_model(teacher, "cifar100"), None)


def loss_by_loops(feats_s, feats_t, k):
    """The published loss, one sample and one entry at a time; only the decomposition itself is a library call
    (torch.linalg.svd, whose sign choice both sides then share)."""
    def top(f, n):  # per sample: (values normalised, [vector_j as a list], j < n), matrix (C*H, W)
        out = []
        for x in f.float():
            _, s, vh = torch.linalg.svd(x.reshape(-1, x.shape[-1]), full_matrices=False)
            s = [float(a) for a in s[:n]]
            norm_s = math.sqrt(sum(a * a for a in s))
            vecs = []
            for j in range(min(n, vh.shape[0])):
                v = [float(a) for a in vh[j]]
                norm = math.sqrt(sum(a * a for a in v))
                vecs.append([a / norm for a in v])
            out.append(([a / norm_s for a in s], vecs))
        return out

    total, prev = 0.0, None
    batch = feats_s[1].shape[0]
    for f_s, f_t in zip(feats_s[1:], feats_t[1:]):
        teacher, student = top(f_t, k), top(f_s, k + 3)
        stage = []
        for (s_t, v_t), (_, v_s) in zip(teacher, student):
            aligned_s, scaled_t = [], []
            for j in range(k):
                cos = [sum(a * b for a, b in zip(c, v_t[j])) for c in v_s]
                best = max(abs(c) for c in cos)
                vec = [0.0] * len(v_t[j])
                for c, cand in zip(cos, v_s):
                    if abs(c) == best:
                        vec = [a + math.copysign(1.0, c) * b for a, b in zip(vec, cand)]
                aligned_s.append([a * s_t[j] for a in vec])
                scaled_t.append([a * s_t[j] for a in v_t[j]])
            stage.append((aligned_s, scaled_t))
        if prev is not None:
            for (vs, vt), (ps, pt) in zip(stage, prev):
                for j in range(k):
                    for a in range(len(vs[j])):
                        for b in range(len(ps[j])):
                            rs = math.exp(-(vs[j][a] - ps[j][b]) ** 2 / 8)
                            rt = math.exp(-(vt[j][a] - pt[j][b]) ** 2 / 8)
                            total += (rs - rt) ** 2 / batch
        prev = stage
    return total


def test_align_by_hand():
    # candidates (columns) c0 = (1, 0), c1 = (0, -1), c2 = (0.6, 0.8); references r0 = (0, 1), r1 = (1, 0).
    # r0: cosines 0, -1, 0.8 -> -c1 = (0, 1); r1: cosines 1, 0, 0.6 -> c0 = (1, 0)
    cand = torch.tensor([[[1.0, 0.0, 0.6], [0.0, -1.0, 0.8]]])
    ref = torch.tensor([[[0.0, 1.0], [1.0, 0.0]]])
    assert torch.equal(align_to(cand, ref), torch.tensor([[[0.0, 1.0], [1.0, 0.0]]]))


def test_leading_singular_by_hand():
    # one sample, C 1, H 2, W 2: the matrix diag(3, 1); singular values (3, 1) -> normalised (3, 1) / sqrt(10)
    feat = torch.tensor([[[[3.0, 0.0], [0.0, 1.0]]]])
    s, v = leading_right_singular(feat, 2)
    assert s[0].tolist() == pytest.approx([3 / math.sqrt(10), 1 / math.sqrt(10)], abs=1e-6)
    assert v[0].abs().flatten().tolist() == pytest.approx([1.0, 0.0, 0.0, 1.0], abs=1e-6)  # (W, n): e1, e2
    s1, v1 = leading_right_singular(feat, 1)
    assert s1.item() == pytest.approx(1.0) and v1.shape == (1, 2, 1)


def test_zero_when_student_equals_teacher():
    g = torch.Generator().manual_seed(4)
    feats = [torch.rand(3, 2, 8, 8, generator=g), torch.rand(3, 4, 8, 8, generator=g),
             torch.rand(3, 6, 4, 4, generator=g), torch.rand(3, 8, 2, 2, generator=g)]
    assert kdsvd_loss(feats, feats, 1).item() == pytest.approx(0.0, abs=1e-10)


@pytest.mark.parametrize("k", [1, 2])
def test_loss_matches_loops(k):
    g = torch.Generator().manual_seed(5)
    shapes = [(2, 3, 8, 8), (2, 4, 8, 8), (2, 5, 4, 4), (2, 6, 4, 4)]
    fs = [torch.randn(*s, generator=g) for s in shapes]
    ft = [torch.randn(s[0], s[1] + 2, s[2], s[3], generator=g) for s in shapes]  # other channel counts
    assert kdsvd_loss(fs, ft, k).item() == pytest.approx(loss_by_loops(fs, ft, k), rel=1e-5, abs=1e-7)


def test_distill_term_reaches_student_only():
    d = make()
    out = d.forward_train(torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(2)),
                          torch.tensor([0, 1, 2, 3]), epoch=1)
    assert out.terms["kdsvd"].kind == DISTILL and out.terms["ce"].kind == TASK
    feats_s = [f.detach() for f in out.student_features["feats"]]
    assert out.terms["kdsvd"].value.item() == pytest.approx(
        loss_by_loops(feats_s, out.teacher_features["feats"], 1), rel=1e-4, abs=1e-7)
    assert out.terms["kdsvd"].value.item() > 0
    out.terms["kdsvd"].value.backward()
    for name, p in d.named_parameters():
        if name.startswith("teacher."):
            assert p.grad is None, name
            continue
        assert p.grad is None or bool(torch.isfinite(p.grad).all()), name
        nonzero = p.grad is not None and bool(p.grad.abs().sum() > 0)
        assert nonzero == (not name.startswith("student.fc.")), name
    assert not [n for n, _ in d.named_parameters() if not n.startswith(("student.", "teacher."))]


def test_unequal_widths_are_refused():
    f = [torch.rand(2, 2, 8, 8), torch.rand(2, 2, 8, 8)]
    g = [torch.rand(2, 2, 8, 8), torch.rand(2, 2, 4, 4)]
    with pytest.raises(ConfigError, match="equal widths"):
        kdsvd_loss(f, g, 1)


@pytest.mark.parametrize("key,value", [("KDSVD.K", "0"), ("KDSVD.LOSS.FEAT_WEIGHT", "-1.0"),
                                       ("KDSVD.LOSS.CE_WEIGHT", "-1.0")])
def test_bad_config_values(key, value):
    with pytest.raises(ConfigError, match=key):
        load_config(None, ["DISTILLER.TYPE", "KDSVD", key, value])


def test_degenerate_sample_gradient_is_zeroed_others_kept():
    # sample 0's maps have all-zero columns: repeated zero singular values, where the plain SVD gradient is not
    # finite; sample 1 is generic. The loss is a per-sample sum / batch size, so sample 1's gradient in the
    # batch is half its gradient alone.
    g = torch.Generator().manual_seed(6)
    shapes = [(2, 4, 8, 8), (2, 4, 8, 8), (2, 6, 4, 4)]
    fs = [torch.rand(*s, generator=g) for s in shapes]
    ft = [torch.rand(*s, generator=g) for s in shapes]
    for f in fs[1:]:
        f[0, :, :, -3:] = 0
    raw = fs[1][:1].clone().requires_grad_()
    _, _, vh = torch.linalg.svd(raw.reshape(1, -1, 8), full_matrices=False)
    vh[:, 0].sum().backward()
    assert not bool(torch.isfinite(raw.grad).all())  # what the guard is for

    batch = [f.clone().requires_grad_() for f in fs]
    kdsvd_loss(batch, ft, 1).backward()
    alone = [f[1:].clone().requires_grad_() for f in fs]
    kdsvd_loss(alone, [f[1:] for f in ft], 1).backward()
    for b, a in zip(batch[1:], alone[1:]):
        assert bool(torch.isfinite(b.grad).all())
        assert torch.equal(b.grad[0], torch.zeros_like(b.grad[0]))
        assert torch.allclose(b.grad[1], a.grad[0] / 2, rtol=1e-5, atol=1e-9)
        assert bool(a.grad.abs().sum() > 0)
