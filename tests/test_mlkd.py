"""MLKD (distillers/mlkd.py) against the published KD_ours.forward_train, written out here in float64 loops.

- kd / cc / bc on fixed logits against plain loops; the mask fraction against np.percentile (linear interpolation,
  even and odd sizes, ties);
- a whole step on stub models: every logged term equals the published sum (the weak logits in the strong sum's
  T = 2 and 6 terms included), gradients reach the student and not the teacher, 4-D images are refused;
- two epochs through tools/train.py on Fashion-MNIST for MLKD, MLKD++ and SOLVER.UPDATE_RULE dot.
"""

import json
import math

import numpy as np
import pytest
import torch
import torch.nn as nn

from cli_runs import SMALL, train_main
from plain_formulas import plain_kd, softmax
from mdistiller.config import load_config
from mdistiller.distillers import DISTILLER_REGISTRY
from mdistiller.distillers.mlkd import MLKD, bc_loss, below_median_fraction, cc_loss
from mdistiller.utils.errors import ConfigError

CFG = "configs/fashion_mnist/mlkd/resnet20_resnet8.yaml"
TEMPS = (4.0, 3.0, 5.0, 2.0, 6.0)


def rows(t):
    return t.double().tolist()


def plain_gram_loss(student_rows, teacher_rows, temperature, over_classes):
    """sum((G_t - G_s)^2) / n, G = P^T P (C x C, n = C) or P P^T (B x B, n = B), P the softened rows."""
    def gram(rs):
        p = [softmax([v / temperature for v in r]) for r in rs]
        if over_classes:
            c = len(p[0])
            return [[sum(p[b][i] * p[b][j] for b in range(len(p))) for j in range(c)] for i in range(c)]
        return [[sum(x * y for x, y in zip(p[a], p[b])) for b in range(len(p))] for a in range(len(p))]
    gs, gt = gram(student_rows), gram(teacher_rows)
    n = len(student_rows[0]) if over_classes else len(student_rows)
    return sum((a - b) ** 2 for ra, rb in zip(gt, gs) for a, b in zip(ra, rb)) / n


def plain_fraction(values):
    threshold = np.percentile(np.asarray(values), 50)
    return float(np.mean(np.asarray(values) <= threshold))


def logits(seed, b=6, c=5, scale=3.0):
    return torch.randn(b, c, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * scale


@pytest.mark.parametrize("temperature", [1.0, 4.0])
def test_cc_and_bc_against_plain_loops(temperature):
    s, t = logits(0), logits(1)
    assert math.isclose(cc_loss(s, t, temperature).item(), plain_gram_loss(rows(s), rows(t), temperature, True),
                        rel_tol=1e-10)
    assert math.isclose(bc_loss(s, t, temperature).item(), plain_gram_loss(rows(s), rows(t), temperature, False),
                        rel_tol=1e-10)


@pytest.mark.parametrize("values", [[0.3, 0.1, 0.9, 0.5], [0.3, 0.1, 0.9, 0.5, 0.7], [0.2, 0.2, 0.2, 0.9],
                                    [0.5, 0.5, 0.5, 0.5], [0.4, 0.1, 0.4, 0.8, 0.4, 0.9]])
def test_mask_fraction_is_numpy_percentile(values):
    assert below_median_fraction(torch.tensor(values)).item() == pytest.approx(plain_fraction(values))


class Stub(nn.Module):
    """A linear classifier returning (logits, {"pooled_feat": ...}) like the library's models."""

    def __init__(self, seed, dim=12, classes=5):
        super().__init__()
        torch.manual_seed(seed)
        self.fc = nn.Linear(dim, classes).double()

    def forward(self, x):
        feat = x.flatten(1)
        return self.fc(feat) * 3, {"pooled_feat": feat}


def plain_step(s_w, s_s, t_w, t_s, labels, ce_weight=0.1, w=0.9):
    """The published forward_train's four returned losses, from the four logit matrices (float64 lists)."""
    conf = [max(softmax(r)) for r in t_w]
    class_conf = [sum(softmax(r)[c] for r in t_w) for c in range(len(t_w[0]))]
    m, m_c = plain_fraction(conf), plain_fraction(class_conf)

    def ce(rs):
        return sum(-math.log(softmax(r)[y]) for r, y in zip(rs, labels)) / len(rs)

    strong_pairs = [(s_s, t_s), (s_s, t_s), (s_s, t_s), (s_w, t_w), (s_w, t_w)]  # T = 2 and 6: weak logits
    kd = sum(w * m * plain_kd(s_w, t_w, T) for T in TEMPS) + sum(w * plain_kd(s, t, T)
                                                                 for (s, t), T in zip(strong_pairs, TEMPS))
    cc = sum(w * m_c * plain_gram_loss(s_w, t_w, T, True) for T in TEMPS)
    bc = sum(w * m * plain_gram_loss(s_w, t_w, T, False) for T in TEMPS)
    return {"ce": ce_weight * (ce(s_w) + ce(s_s)), "kd": kd, "cc": cc, "bc": bc}


def test_a_step_equals_the_published_sums_and_trains_the_student_only():
    student, teacher = Stub(0), Stub(1)
    method = MLKD(student=student, teacher=teacher, temperature=4.0, ce_weight=0.1, kd_weight=0.9)
    images = torch.randn(7, 2, 3, 2, 2, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    labels = torch.tensor([0, 1, 2, 3, 4, 0, 1])
    out = method.train_forward(images, labels, epoch=1)
    assert set(out.terms) == {"ce", "kd", "cc", "bc"} and out.terms["ce"].kind == "task"
    assert all(out.terms[k].kind == "distill" for k in ("kd", "cc", "bc"))
    with torch.no_grad():
        s_w, s_s = student(images[:, 0])[0], student(images[:, 1])[0]
        t_w, t_s = teacher(images[:, 0])[0], teacher(images[:, 1])[0]
    assert torch.equal(out.logits, s_w) and torch.equal(out.teacher_logits, t_w)
    expected = plain_step(rows(s_w), rows(s_s), rows(t_w), rows(t_s), labels.tolist())
    for name, value in expected.items():
        assert out.terms[name].value.item() == pytest.approx(value, rel=1e-9), name
    sum(t.value for t in out.terms.values()).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in student.parameters())
    assert all(p.grad is None for p in method.teacher.parameters())
    learnable = {id(p) for p in method.learnable_parameters()}
    assert learnable == {id(p) for p in student.parameters()}


def test_plain_batches_are_refused_and_config_checked():
    method = MLKD(student=Stub(0), teacher=Stub(1))
    with pytest.raises(ValueError, match="weak_strong"):
        method.train_forward(torch.randn(4, 3, 2, 2, dtype=torch.float64), torch.zeros(4, dtype=torch.long), 1)
    assert DISTILLER_REGISTRY.get("MLKD++").train_views == "weak_strong"
    with pytest.raises(ConfigError, match="KD.LOGIT_STANDARDIZE"):
        load_config(CFG, ["KD.LOGIT_STANDARDIZE", "True"])


@pytest.mark.parametrize("method,rule", [("MLKD", "vanilla"), ("MLKD++", "vanilla"), ("MLKD", "dot")])
def test_two_epochs_through_the_cli(method, rule, small_teacher_ckpt, tmp_path):
    train_main()(["--cfg", CFG, "LOG.PREFIX", str(tmp_path), "EXPERIMENT.NAME", "run",
                  "DISTILLER.TEACHER_CKPT", small_teacher_ckpt, *SMALL, "SOLVER.EPOCHS", "2",
                  "SOLVER.LR_DECAY_STAGES", "[2]", "DATASET.TRAIN_SUBSET", "128", "DATASET.TEST_SUBSET", "64",
                  "DISTILLER.TYPE", method, "SOLVER.UPDATE_RULE", rule])
    with open(tmp_path / "run" / "metrics.jsonl") as f:
        records = [json.loads(line) for line in f]
    assert [r["epoch"] for r in records] == [1, 2]
    names = {"loss/ce", "loss/kd", "loss/cc", "loss/bc"} | ({"loss/dino"} if method.endswith("++") else set())
    for record in records:
        terms = {k: v for k, v in record.items() if k.startswith("loss/") and not k.endswith("_total")}
        assert set(terms) == names
        assert all(math.isfinite(v) and v > 0 for v in terms.values())
    assert (tmp_path / "run" / "summary.json").exists()
