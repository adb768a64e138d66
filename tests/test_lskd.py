"""LSKD (logit standardization, Sun et al., CVPR 2024) as the KD.LOGIT_STANDARDIZE / DKD.LOGIT_STANDARDIZE switch:
values against plain-Python computations of the published definition, the switch off leaving KD and DKD exactly as
they were, the "++" variants inheriting it, and the paper's CIFAR-100 configs."""

import math
import os
import statistics

import pytest
import torch

from mdistiller.bench.random_teacher import random_teacher_state
from mdistiller.config import load_config
from mdistiller.data.bundle import DatasetMeta
from mdistiller.distillers.dkd import dkd_loss
from mdistiller.distillers.losses import kd_loss, standardize_logits
from mdistiller.engine.build import build_distiller

CONFIGS = os.path.join(os.path.dirname(__file__), "..", "configs", "cifar100")


# --- an independent plain-Python version of the published definition ---------------------------------------
def zscore(row, eps=1e-7):
    """(z - mean) / (eps + sample std, n - 1 in the denominator), as the authors' `normalize`."""
    m = sum(row) / len(row)
    return [(v - m) / (eps + statistics.stdev(row)) for v in row]


def softmax(row):
    top = max(row)
    e = [math.exp(v - top) for v in row]
    return [v / sum(e) for v in e]


def kl(p, q):
    return sum(a * math.log(a / b) for a, b in zip(p, q) if a > 0)


def ls_kd(student_rows, teacher_rows, temperature):
    """T^2 * mean over samples of KL(softmax(zscore(t) / T) || softmax(zscore(s) / T))."""
    total = 0.0
    for s, t in zip(student_rows, teacher_rows):
        ps = softmax([v / temperature for v in zscore(s)])
        pt = softmax([v / temperature for v in zscore(t)])
        total += kl(pt, ps)
    return total / len(student_rows) * temperature**2


def ls_dkd(student_rows, teacher_rows, labels, alpha, beta, temperature):
    """alpha * TCKD + beta * NCKD on z-scored logits, batch means, times T^2 (DKD's definition, written out)."""
    tckd = nckd = 0.0
    for s, t, y in zip(student_rows, teacher_rows, labels):
        ps = softmax([v / temperature for v in zscore(s)])
        pt = softmax([v / temperature for v in zscore(t)])
        tckd += kl([pt[y], 1 - pt[y]], [ps[y], 1 - ps[y]])
        hs = [v / (1 - ps[y]) for i, v in enumerate(ps) if i != y]
        ht = [v / (1 - pt[y]) for i, v in enumerate(pt) if i != y]
        nckd += kl(ht, hs)
    n = len(labels)
    return (alpha * tckd / n + beta * nckd / n) * temperature**2


# --- the helper -----------------------------------------------------------------------------------------------
def test_standardize_logits_matches_the_definition_by_hand():
    rows = [[1.0, 2.0, 3.0, 6.0], [-4.0, 0.5, 0.5, 10.0]]
    # first row: mean 3, sample variance (4 + 1 + 0 + 9) / 3 = 14 / 3
    std = math.sqrt(14 / 3)
    expected_first = [(v - 3.0) / (1e-7 + std) for v in rows[0]]
    got = standardize_logits(torch.tensor(rows, dtype=torch.float64))
    assert got[0].tolist() == pytest.approx(expected_first, rel=1e-12)
    assert got[1].tolist() == pytest.approx(zscore(rows[1]), rel=1e-12)
    # the unbiased std: each row's population std is sqrt((n - 1) / n), not 1
    for row in got.tolist():
        assert statistics.pstdev(row) == pytest.approx(math.sqrt(3 / 4), rel=1e-6)


def test_standardized_kd_is_blind_to_the_students_scale_and_shift():
    """What the paper is after: a student whose logits are an affine map a*z + b (a > 0) of the teacher's pays no
    KD loss once standardized (up to eps), while plain KD charges it."""
    g = torch.Generator().manual_seed(1)
    t = torch.randn(6, 10, generator=g, dtype=torch.float64) * 3
    s = 0.25 * t + 5.0
    assert kd_loss(s, t, 2.0).item() > 0.1
    assert kd_loss(standardize_logits(s), standardize_logits(t), 2.0).item() == pytest.approx(0.0, abs=1e-10)


@pytest.mark.parametrize("temperature", [1.0, 2.0, 4.0])
def test_standardized_kd_on_fixed_logits(temperature):
    s = [[1.0, 2.0, 3.0, 0.0, -1.0], [0.2, -0.3, 4.0, 1.0, 1.5]]
    t = [[3.0, 2.0, 1.0, 7.0, -2.0], [5.0, 0.0, 0.0, 1.0, -1.0]]
    got = kd_loss(standardize_logits(torch.tensor(s, dtype=torch.float64)),
                  standardize_logits(torch.tensor(t, dtype=torch.float64)), temperature)
    assert got.item() == pytest.approx(ls_kd(s, t, temperature), rel=1e-10)


# --- the switch inside KD and DKD (and their "++") -----------------------------------------------------------
def toy_meta():
    return DatasetMeta(name="cifar100", num_classes=100, image_size=32, num_train=8, num_test=0,
                       mean=(0.5,) * 3, std=(0.25,) * 3, train_targets=torch.arange(8) % 100)


def build(distiller_type, *overrides):
    cfg = load_config(None, ["DATASET.TYPE", "cifar100", "DISTILLER.TYPE", distiller_type, "DISTILLER.TEACHER",
                             "resnet20", "DISTILLER.STUDENT", "resnet8", *overrides])
    torch.manual_seed(0)
    distiller, _ = build_distiller(cfg, toy_meta(), torch.device("cpu"), random_teacher_state("resnet20", "cifar100"))
    return distiller.train(), cfg


def batch():
    g = torch.Generator().manual_seed(2)
    return torch.randn(4, 3, 32, 32, generator=g), torch.tensor([3, 17, 42, 99])


def test_switch_defaults_off():
    cfg = load_config(None, [])
    assert cfg.KD.LOGIT_STANDARDIZE is False and cfg.DKD.LOGIT_STANDARDIZE is False


@pytest.mark.parametrize("distiller_type", ["KD", "KD++"])
def test_kd_term_with_the_switch(distiller_type):
    distiller, _ = build(distiller_type, "KD.LOGIT_STANDARDIZE", "True", "KD.TEMPERATURE", "2.0",
                         "KD.LOSS.KD_WEIGHT", "9.0")
    x, y = batch()
    out = distiller.forward_train(x, y, epoch=1)
    expected = 9.0 * ls_kd(out.logits.tolist(), out.teacher_logits.tolist(), 2.0)
    assert out.terms["kd"].value.item() == pytest.approx(expected, rel=1e-5)
    # gradients reach the student only, through the standardized logits
    out.terms["kd"].value.backward()
    assert all(p.grad is None for p in distiller.teacher.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in distiller.student.parameters())


@pytest.mark.parametrize("distiller_type", ["DKD", "DKD++"])
def test_dkd_term_with_the_switch(distiller_type):
    distiller, _ = build(distiller_type, "DKD.LOGIT_STANDARDIZE", "True", "DKD.T", "2.0", "DKD.ALPHA", "9.0",
                         "DKD.BETA", "72.0", "DKD.WARMUP", "20")
    x, y = batch()
    with torch.no_grad():
        out = distiller.forward_train(x, y, epoch=5)
    expected = 5 / 20 * ls_dkd(out.logits.tolist(), out.teacher_logits.tolist(), y.tolist(), 9.0, 72.0, 2.0)
    assert out.terms["dkd"].value.item() == pytest.approx(expected, rel=1e-5)


def test_switch_off_leaves_kd_and_dkd_exactly_as_before():
    """Off, the terms are the unstandardized losses bit for bit (the pre-LSKD code path)."""
    x, y = batch()
    kd, _ = build("KD")
    with torch.no_grad():
        out = kd.forward_train(x, y, epoch=1)
    assert torch.equal(out.terms["kd"].value, 0.9 * kd_loss(out.logits, out.teacher_logits, 4.0))
    dkd, _ = build("DKD")
    with torch.no_grad():
        out = dkd.forward_train(x, y, epoch=20)
    assert torch.equal(out.terms["dkd"].value, 1.0 * dkd_loss(out.logits, out.teacher_logits, y, 1.0, 8.0, 4.0))


def test_switch_on_changes_the_term_and_not_the_ce():
    x, y = batch()
    plain, _ = build("KD")
    ls, _ = build("KD", "KD.LOGIT_STANDARDIZE", "True")
    with torch.no_grad():
        a, b = plain.forward_train(x, y, epoch=1), ls.forward_train(x, y, epoch=1)
    assert torch.equal(a.logits, b.logits) and torch.equal(a.terms["ce"].value, b.terms["ce"].value)
    assert not torch.allclose(a.terms["kd"].value, b.terms["kd"].value)


# --- the paper's CIFAR-100 settings --------------------------------------------------------------------------
def test_kd_ls_config_is_the_papers_setting():
    cfg = load_config(os.path.join(CONFIGS, "kd_ls", "resnet32x4_resnet8x4.yaml"), [])
    assert cfg.DISTILLER.TYPE == "KD" and (cfg.DISTILLER.TEACHER, cfg.DISTILLER.STUDENT) == ("resnet32x4", "resnet8x4")
    assert cfg.KD.LOGIT_STANDARDIZE is True
    assert (cfg.KD.TEMPERATURE, cfg.KD.LOSS.KD_WEIGHT, cfg.KD.LOSS.CE_WEIGHT) == (2.0, 9.0, 1.0)
    assert (cfg.SOLVER.EPOCHS, cfg.SOLVER.LR, cfg.SOLVER.BATCH_SIZE) == (240, 0.05, 64)


def test_dkd_ls_config_is_the_papers_setting():
    cfg = load_config(os.path.join(CONFIGS, "dkd_ls", "resnet32x4_resnet8x4.yaml"), [])
    assert cfg.DISTILLER.TYPE == "DKD" and cfg.DKD.LOGIT_STANDARDIZE is True
    # DKD's own resnet32x4 setting (alpha 1, beta 8) times the LSKD KD weight 9, at the base temperature 2
    assert (cfg.DKD.ALPHA, cfg.DKD.BETA, cfg.DKD.T) == (1.0 * 9, 8.0 * 9, 2.0)
    assert (cfg.DKD.CE_WEIGHT, cfg.DKD.WARMUP) == (1.0, 20)
