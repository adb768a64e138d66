"""LSKD (logit standardization, Sun et al., CVPR 2024) as the KD.LOGIT_STANDARDIZE / DKD.LOGIT_STANDARDIZE switch:
values against plain-Python computations of the published definition (every expected number below comes from the
formulas written in this file, never from the library's own losses), the switch off leaving KD and DKD the plain
Hinton / Zhao et al. losses, the "++" variants inheriting it, and the paper's CIFAR-100 configs."""

import math
import os
import statistics

import pytest
import torch

from mdistiller.bench.random_teacher import random_teacher_state
from mdistiller.config import load_config
from mdistiller.data.bundle import DatasetMeta
from mdistiller.distillers.losses import kd_loss, standardize_logits
from mdistiller.engine.classification import build_distiller
from plain_formulas import kl, plain_dkd, plain_kd, softmax, zscore

CONFIGS = os.path.join(os.path.dirname(__file__), "..", "configs", "cifar100")


# --- the published definitions in plain Python (tests/plain_formulas.py) ----------------------------------------
def ls_kd(student_rows, teacher_rows, temperature):
    return plain_kd(student_rows, teacher_rows, temperature, standardize=True)


def ls_dkd(student_rows, teacher_rows, labels, alpha, beta, temperature):
    return plain_dkd(student_rows, teacher_rows, labels, alpha, beta, temperature, standardize=True)


def test_the_plain_formulas_agree_with_each_other():
    """The test's own references, against identities: DKD's decomposition KD = TCKD + (1 - p_t^T) NCKD per sample
    (DKD appendix eq. 12), and KD on z-scored logits = LSKD."""
    s, t, y, temperature = [0.3, -1.0, 2.0, 0.5], [1.5, 0.2, -0.7, 2.2], 2, 2.0
    ps, pt = softmax([v / temperature for v in s]), softmax([v / temperature for v in t])
    tckd = plain_dkd([s], [t], [y], 1.0, 0.0, temperature) / temperature**2
    nckd = plain_dkd([s], [t], [y], 0.0, 1.0, temperature) / temperature**2
    assert plain_kd([s], [t], temperature) / temperature**2 == pytest.approx(tckd + (1 - pt[y]) * nckd, rel=1e-12)
    assert ls_kd([s], [t], temperature) == pytest.approx(plain_kd([zscore(s)], [zscore(t)], temperature), rel=1e-15)
    assert kl(pt, ps) > 0 and kl(pt, pt) == 0


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


@pytest.mark.parametrize("temperature", [1.0, 2.0, 4.0])
def test_standardized_kd_on_fixed_logits(temperature):
    """The library's standardize-then-KD (what the switch runs) against the plain-Python LSKD, in float64."""
    s = [[1.0, 2.0, 3.0, 0.0, -1.0], [0.2, -0.3, 4.0, 1.0, 1.5]]
    t = [[3.0, 2.0, 1.0, 7.0, -2.0], [5.0, 0.0, 0.0, 1.0, -1.0]]
    got = kd_loss(standardize_logits(torch.tensor(s, dtype=torch.float64)),
                  standardize_logits(torch.tensor(t, dtype=torch.float64)), temperature)
    assert got.item() == pytest.approx(ls_kd(s, t, temperature), rel=1e-10)


# --- the switch inside KD and DKD (and their "++") -----------------------------------------------------------
def toy_meta():
    return DatasetMeta(name="cifar100", num_classes=100, image_size=32, num_train=8, num_test=0,
                       mean=(0.5,) * 3, std=(0.25,) * 3, train_targets=torch.arange(8) % 100)


def build(distiller_type, *overrides, student="resnet8"):
    """The distiller in float64, so that the plain-Python references can be held to 1e-9 (float32 rounding would
    hide an error the size of the standardization's eps)."""
    cfg = load_config(None, ["DATASET.TYPE", "cifar100", "DISTILLER.TYPE", distiller_type, "DISTILLER.TEACHER",
                             "resnet20", "DISTILLER.STUDENT", student, *overrides])
    torch.manual_seed(0)
    distiller, _ = build_distiller(cfg, toy_meta(), torch.device("cpu"), random_teacher_state("resnet20", "cifar100"))
    return distiller.double().train(), cfg


def batch():
    g = torch.Generator().manual_seed(2)
    return torch.randn(4, 3, 32, 32, generator=g, dtype=torch.float64), torch.tensor([3, 17, 42, 99])


def test_switch_defaults_off():
    cfg = load_config(None, [])
    assert cfg.KD.LOGIT_STANDARDIZE is False and cfg.DKD.LOGIT_STANDARDIZE is False


@pytest.mark.parametrize("distiller_type", ["KD", "KD++"])
def test_kd_term_with_the_switch(distiller_type):
    distiller, _ = build(distiller_type, "KD.LOGIT_STANDARDIZE", "True", "KD.TEMPERATURE", "2.0",
                         "KD.LOSS.KD_WEIGHT", "9.0")
    x, y = batch()
    out = distiller.forward_train(x, y, epoch=1)
    s, t = out.logits.tolist(), out.teacher_logits.tolist()
    expected = 9.0 * ls_kd(s, t, 2.0)
    assert out.terms["kd"].value.item() == pytest.approx(expected, rel=1e-9)
    assert expected != pytest.approx(9.0 * plain_kd(s, t, 2.0), rel=1e-3)  # standardizing matters on these logits
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
    s, t = out.logits.tolist(), out.teacher_logits.tolist()
    expected = 5 / 20 * ls_dkd(s, t, y.tolist(), 9.0, 72.0, 2.0)
    assert out.terms["dkd"].value.item() == pytest.approx(expected, rel=1e-9)
    assert expected != pytest.approx(5 / 20 * plain_dkd(s, t, y.tolist(), 9.0, 72.0, 2.0), rel=1e-3)


def test_switch_off_leaves_kd_and_dkd_the_plain_losses():
    """Off, the terms are Hinton's KD and Zhao et al.'s DKD on the raw logits, at the default weights (KD: T 4,
    weight 0.9; DKD: alpha 1, beta 8, T 4, warm-up 20 epochs)."""
    x, y = batch()
    kd, _ = build("KD")
    with torch.no_grad():
        out = kd.forward_train(x, y, epoch=1)
    s, t = out.logits.tolist(), out.teacher_logits.tolist()
    assert out.terms["kd"].value.item() == pytest.approx(0.9 * plain_kd(s, t, 4.0), rel=1e-9)
    assert out.terms["kd"].value.item() != pytest.approx(0.9 * ls_kd(s, t, 4.0), rel=1e-3)
    dkd, _ = build("DKD")
    with torch.no_grad():
        out = dkd.forward_train(x, y, epoch=20)
    s, t = out.logits.tolist(), out.teacher_logits.tolist()
    assert out.terms["dkd"].value.item() == pytest.approx(plain_dkd(s, t, y.tolist(), 1.0, 8.0, 4.0), rel=1e-9)
    assert out.terms["dkd"].value.item() != pytest.approx(ls_dkd(s, t, y.tolist(), 1.0, 8.0, 4.0), rel=1e-3)


def test_standardized_kd_is_blind_to_the_students_scale_and_shift():
    """What the paper is after: a student whose logits are an affine map a*z + b (a > 0) of the teacher's pays no
    KD loss once standardized (up to eps), while plain KD charges it. The student is the teacher's network with
    its classifier scaled by a = 1/4 and shifted by b = 5, both models in eval mode (running BN statistics), so
    its logits are exactly a * z_teacher + b."""
    x, y = batch()
    losses = {}
    for switch in ("False", "True"):
        distiller, _ = build("KD", "KD.LOGIT_STANDARDIZE", switch, "KD.TEMPERATURE", "2.0", student="resnet20")
        distiller.student.load_state_dict(distiller.teacher.model.state_dict())
        with torch.no_grad():
            distiller.student.fc.weight.mul_(0.25)
            distiller.student.fc.bias.mul_(0.25).add_(5.0)
            distiller.eval()
            out = distiller.forward_train(x, y, epoch=1)
        torch.testing.assert_close(out.logits, 0.25 * out.teacher_logits + 5.0, rtol=1e-12, atol=1e-12)
        losses[switch] = out.terms["kd"].value.item()
    assert losses["False"] == pytest.approx(0.9 * plain_kd(out.logits.tolist(), out.teacher_logits.tolist(), 2.0),
                                            rel=1e-9)
    assert losses["False"] > 0.1
    # z-scores of a*z + b and of z differ only through eps (~1e-7 relative): a KL of order 1e-13
    assert losses["True"] == pytest.approx(0.0, abs=1e-10)


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
