"""SRRL: both losses recomputed by explicit loops from the paper's / authors' definitions, the teacher classifier
SRRL applies is the one that makes the teacher's logits, which parameters the terms train, and config checks."""

import pytest
import torch

from mdistiller.config import load_config
from mdistiller.distillers import DISTILLER_REGISTRY
from mdistiller.distillers.srrl import SRRL, teacher_linear
from mdistiller.models import build_model, model_names
from mdistiller.utils.errors import ConfigError


def make(teacher="resnet20", student="resnet8", *overrides):
    cfg = load_config(None, ["DISTILLER.TYPE", "SRRL", "DISTILLER.TEACHER", teacher, "DISTILLER.STUDENT", student,
                             *overrides])
    return SRRL.build(cfg, build_model(student, "cifar100"), build_model(teacher, "cifar100"), None)


def test_losses_by_loops():
    torch.manual_seed(0)
    d = make("resnet32x4", "resnet8")  # 64 -> 256 channels: the connector changes the width
    d.train()
    images = torch.randn(3, 3, 32, 32)
    logits, feats = d.student(images)
    logits_t, feats_t = d.teacher(images)
    fm, sr = d.srrl_losses(feats["feats"][-1], feats_t["pooled_feat"], logits_t)

    mapped = d.connector(feats["feats"][-1]).detach()  # (N, 256, H, W), after the connector's ReLU
    n, c, h, w = mapped.shape
    pooled = torch.zeros(n, c)
    fm_ref = 0.0
    for i in range(n):
        for j in range(c):
            pooled[i, j] = sum(mapped[i, j, y, x].item() for y in range(h) for x in range(w)) / (h * w)
            fm_ref += (pooled[i, j].item() - feats_t["pooled_feat"][i, j].item()) ** 2
    fm_ref /= n * c
    # softmax regression through the teacher model's own classifier module (not SRRL's copy of it)
    with torch.no_grad():
        z = d.teacher.model.fc(pooled)
    k = z.shape[1]
    sr_ref = sum((z[i, j].item() - logits_t[i, j].item()) ** 2 for i in range(n) for j in range(k)) / (n * k)
    assert fm.item() == pytest.approx(fm_ref, rel=1e-5)
    assert sr.item() == pytest.approx(sr_ref, rel=1e-5)


def test_weights_scale_the_terms():
    torch.manual_seed(0)
    d = make("resnet20", "resnet8", "SRRL.LOSS.FM_WEIGHT", "2.0", "SRRL.LOSS.SR_WEIGHT", "3.0",
             "SRRL.LOSS.CE_WEIGHT", "0.5")
    d.eval()  # fixed BN: the same connector output in both forwards
    images, labels = torch.randn(2, 3, 32, 32), torch.tensor([1, 2])
    out = d.train_forward(images, labels, epoch=1)
    logits, feats = d.student(images)
    logits_t, feats_t = d.teacher(images)
    fm, sr = d.srrl_losses(feats["feats"][-1], feats_t["pooled_feat"], logits_t)
    assert out.terms["fm"].value.item() == pytest.approx(2.0 * fm.item(), rel=1e-6)
    assert out.terms["sr"].value.item() == pytest.approx(3.0 * sr.item(), rel=1e-6)
    assert out.terms["ce"].value.item() == pytest.approx(
        0.5 * torch.nn.functional.cross_entropy(logits, labels).item(), rel=1e-6)
    assert (out.terms["fm"].kind, out.terms["sr"].kind, out.terms["ce"].kind) == ("distill", "distill", "task")


@pytest.mark.parametrize("term", ["fm", "sr"])
def test_distillation_terms_train_student_and_connector_never_the_teacher(term):
    torch.manual_seed(0)
    d = make()
    d.train()
    out = d.train_forward(torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 3]), epoch=1)
    out.terms[term].value.backward()
    for name, p in d.connector.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    student = dict(d.student.named_parameters())
    assert student["conv1.weight"].grad.abs().sum() > 0
    assert student["fc.weight"].grad is None  # the student's own logits are not in these terms
    assert all(p.grad is None for p in d.teacher.parameters())
    assert all(not p.requires_grad for p in d.teacher.parameters())
    assert not d.teacher_fc_weight.requires_grad
    assert "teacher_fc_weight" not in d.learnable_state_dict()
    assert set(DISTILLER_REGISTRY.get("SRRL").ramped_terms) == {"fm", "sr"}


@pytest.mark.parametrize("name", model_names("cifar100"))
def test_teacher_classifier_maps_pooled_feat_to_logits(name):
    model = build_model(name, "cifar100").eval()
    with torch.no_grad():
        logits, feats = model(torch.randn(2, 3, 32, 32))
        assert torch.allclose(teacher_linear(model)(feats["pooled_feat"]), logits, atol=1e-5)


@pytest.mark.parametrize("key", ["CE_WEIGHT", "FM_WEIGHT", "SR_WEIGHT"])
def test_bad_config_values(key):
    with pytest.raises(ConfigError, match=f"SRRL.LOSS.{key}"):
        load_config(None, ["DISTILLER.TYPE", "SRRL", f"SRRL.LOSS.{key}", "-1.0"])
