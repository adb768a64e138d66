"""The KD++ family as its authors' code runs it (../shared/reference/kdpp_recipes.md): the 0-based loss-weight ramp
and which terms it covers, Nesterov SGD against the update written out by hand, the projector wrapper's Linear
init, and every "++" config against the per-pair table of the recipes file (typed in here, not read from our
configs)."""

import math
import os

import pytest
import torch
import torch.nn.functional as F

from mdistiller.bench.random_teacher import random_teacher_state
from mdistiller.config import load_config
from mdistiller.data.bundle import DatasetMeta
from mdistiller.distillers.loss_ramp import ramp_factor
from mdistiller.engine.classification import build_distiller
from mdistiller.engine.update_rule import UPDATE_RULE_REGISTRY, SGDRule
from mdistiller.utils.errors import ConfigError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


META = DatasetMeta(name="cifar100", num_classes=100, image_size=32, num_train=8, num_test=0, mean=(0.5,) * 3,
                   std=(0.25,) * 3, train_targets=torch.arange(8))


def make(method, teacher="resnet20", student="resnet8", *overrides):
    """The distiller as a run builds it (with the dino term of "X++" and the loss ramp), with a random teacher."""
    cfg = load_config(None, ["DATASET.TYPE", "cifar100", "DISTILLER.TYPE", method, "DISTILLER.TEACHER", teacher,
                             "DISTILLER.STUDENT", student, *overrides])
    torch.manual_seed(0)
    d, _ = build_distiller(cfg, META, torch.device("cpu"), random_teacher_state(teacher, "cifar100"))
    return d, cfg


def unramped_terms(d, x, y, epoch):
    """The same step's terms (the dino term included) with the run's loss ramp taken off."""
    ramp, d.loss_ramp = d.loss_ramp, None
    try:
        return d.train_forward(x, y, epoch).terms
    finally:
        d.loss_ramp = ramp


def test_ramp_factor_uses_the_zero_based_epoch():
    # the trainer's epochs are 1-based; the authors' factor is min(1, e / 20) of the 0-based e
    assert [ramp_factor(20, epoch) for epoch in (1, 2, 3, 20, 21, 22, 240)] == [0.0, 0.05, 0.1, 0.95, 1.0, 1.0, 1.0]
    assert [ramp_factor(5, epoch) for epoch in range(1, 8)] == [0.0, 0.2, 0.4, 0.6, 0.8, 1.0, 1.0]
    assert ramp_factor(0, 1) == 1.0


def _hand_kd(zs, zt, temperature):
    """T^2 * mean over samples of sum_c p_t log(p_t / p_s), with softmaxes written out."""
    total = 0.0
    for s_row, t_row in zip(zs.tolist(), zt.tolist()):
        es = [math.exp(v / temperature) for v in s_row]
        et = [math.exp(v / temperature) for v in t_row]
        ps, pt = [v / sum(es) for v in es], [v / sum(et) for v in et]
        total += sum(b * math.log(b / a) for a, b in zip(ps, pt))
    return temperature ** 2 * total / len(zs)


def test_kd_term_is_ramped_and_ce_is_not():
    d, _ = make("KD", "resnet20", "resnet8", "KD.LOSS.CE_WEIGHT", "1.0", "KD.LOSS.KD_WEIGHT", "3.5",
                "LOSS_RAMP.EPOCHS", "20")
    d.eval()  # BatchNorm on running statistics: the student's logits do not depend on the call
    x, y = torch.randn(6, 3, 32, 32), torch.tensor([0, 5, 9, 1, 1, 2])
    with torch.no_grad():
        zs, zt = d.student(x)[0].double(), d.teacher(x)[0].double()
    kd = _hand_kd(zs, zt, 4.0)
    ce = F.cross_entropy(zs, y).item()
    for epoch, factor in ((1, 0.0), (3, 0.1), (21, 1.0)):
        terms = d.train_forward(x, y, epoch).terms
        assert terms["kd"].value.item() == pytest.approx(factor * 3.5 * kd, rel=1e-5, abs=1e-7)
        assert terms["ce"].value.item() == pytest.approx(ce, rel=1e-5)
    d.train()
    terms = d.train_forward(x, y, 1).terms
    terms["kd"].value.backward()  # the first epoch trains without the distillation term at all
    assert all(p.grad is None or not p.grad.any() for p in d.student.parameters())


def test_each_method_names_its_ramped_terms_and_the_config_may_add_dino():
    x, y = torch.randn(4, 3, 32, 32), torch.tensor([3, 1, 4, 1])
    for method, term, overrides in (("DKD++", "dkd", ["DKD.WARMUP", "0"]), ("DIST++", "dist", []),
                                    ("REVIEWKD++", "reviewkd", ["REVIEWKD.WARMUP_EPOCHS", "0"])):
        d, _ = make(method, "resnet20", "resnet8", "LOSS_RAMP.EPOCHS", "5", *overrides)
        d.eval()
        d.added_terms["dino"].set_class_means(torch.randn(100, 64), torch.full((100,), 500))
        plain = unramped_terms(d, x, y, 3)
        ramped = d.train_forward(x, y, 3).terms  # epoch 3: factor 2 / 5
        assert ramped[term].value.item() == pytest.approx(0.4 * plain[term].value.item(), rel=1e-5)
        assert ramped["dino"].value.item() == pytest.approx(plain["dino"].value.item(), rel=1e-6)  # not ramped
        assert ramped["ce"].value.item() == pytest.approx(plain["ce"].value.item(), rel=1e-6)
    # DKD++ on ImageNet ramps the dino term too (train_dkd.py:L306,L308)
    d, _ = make("DKD++", "resnet20", "resnet8", "DKD.WARMUP", "0", "LOSS_RAMP.EPOCHS", "5",
                "LOSS_RAMP.TERMS", "['dkd', 'dino']")
    d.eval()
    d.added_terms["dino"].set_class_means(torch.randn(100, 64), torch.full((100,), 500))
    plain = unramped_terms(d, x, y, 2)
    ramped = d.train_forward(x, y, 2).terms
    for term in ("dkd", "dino"):
        assert ramped[term].value.item() == pytest.approx(0.2 * plain[term].value.item(), rel=1e-5)


def test_ramp_configuration_errors():
    with pytest.raises(ConfigError, match="LOSS_RAMP.EPOCHS"):
        make("KD", "resnet20", "resnet8", "LOSS_RAMP.EPOCHS", "-1")
    with pytest.raises(ConfigError, match="DKD.WARMUP"):  # mdistiller's own ramp and this one on the same term
        make("DKD", "resnet20", "resnet8", "LOSS_RAMP.EPOCHS", "20")
    with pytest.raises(ConfigError, match="REVIEWKD.WARMUP_EPOCHS"):
        make("REVIEWKD", "resnet20", "resnet8", "LOSS_RAMP.EPOCHS", "20")
    with pytest.raises(ConfigError, match="LOSS_RAMP.TERMS"):
        load_config(None, ["DISTILLER.TYPE", "NONE", "LOSS_RAMP.EPOCHS", "5"])
    d, _ = make("KD", "resnet20", "resnet8", "LOSS_RAMP.EPOCHS", "5", "LOSS_RAMP.TERMS", "['kd_typo']")
    with pytest.raises(ConfigError, match="kd_typo"):
        d.train_forward(torch.randn(2, 3, 32, 32), torch.tensor([0, 1]), 2)


def test_nesterov_update_equals_the_formula_by_hand():
    """Two SGD steps of the update rule the builder makes for SOLVER.UPDATE_RULE vanilla, against
    v <- mu v + g + wd p; p <- p - lr (g + wd p + mu v)."""
    lr, mu, wd = 0.1, 0.9, 5e-4
    for nesterov in (True, False):
        cfg = load_config(None, ["DISTILLER.TYPE", "NONE", "DISTILLER.STUDENT", "resnet8", "SOLVER.LR", str(lr),
                                 "SOLVER.WEIGHT_DECAY", str(wd), "SOLVER.NESTEROV", str(nesterov)])
        p = torch.nn.Parameter(torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64))
        rule = UPDATE_RULE_REGISTRY.get(cfg.SOLVER.UPDATE_RULE, "SOLVER.UPDATE_RULE").build(cfg, [p], "cpu",
                                                                                          fp16=False)
        assert isinstance(rule, SGDRule) and rule.optimizer.param_groups[0]["nesterov"] is nesterov
        expected, v = [1.0, -2.0, 0.5], [0.0, 0.0, 0.0]
        for step, grad in enumerate(([0.3, -0.1, 0.2], [-0.4, 0.5, 0.05])):
            rule.apply({"total": (p * torch.tensor(grad, dtype=torch.float64)).sum()})  # d total / d p = grad
            g = [gi + wd * pi for gi, pi in zip(grad, expected)]
            v = g if step == 0 else [mu * vi + gi for vi, gi in zip(v, g)]  # torch: the first buffer is g itself
            d = [gi + mu * vi for gi, vi in zip(g, v)] if nesterov else v
            expected = [pi - lr * di for pi, di in zip(expected, d)]
        assert p.detach().tolist() == pytest.approx(expected, rel=1e-12)


def test_nesterov_is_a_config_error_for_dot_and_without_momentum():
    with pytest.raises(ConfigError, match="SOLVER.NESTEROV"):
        load_config(None, ["DISTILLER.TYPE", "KD", "SOLVER.UPDATE_RULE", "dot", "SOLVER.NESTEROV", "True"])
    with pytest.raises(ConfigError, match="SOLVER.NESTEROV"):
        load_config(None, ["DISTILLER.TYPE", "KD", "SOLVER.MOMENTUM", "0.0", "SOLVER.NESTEROV", "True"])


def test_wrapper_linear_init_zero_bias_and_normal():
    ref, _ = make("KD++", "wrn_40_2", "wrn_40_1", "DINO.LINEAR_INIT", "default")
    zero, _ = make("KD++", "wrn_40_2", "wrn_40_1", "DINO.LINEAR_INIT", "zero_bias")
    proj_ref, proj = ref.added_terms["dino"].projector[2], zero.added_terms["dino"].projector[2]
    # the CIFAR wrapper zeroes every Linear bias (projector and the student's classifier), weights untouched
    assert not zero.student.fc.bias.any() and not proj.bias.any()
    assert ref.student.fc.bias.any() or proj_ref.bias.any()
    assert torch.equal(zero.student.fc.weight, ref.student.fc.weight) and torch.equal(proj.weight, proj_ref.weight)
    normal, _ = make("KD++", "wrn_40_2", "wrn_40_1", "DINO.LINEAR_INIT", "normal")
    w = normal.added_terms["dino"].projector[2].weight.detach().double()  # 128 x 64 draws of N(0, 0.01)
    assert abs(w.mean().item()) < 5e-4 and 0.0097 < w.std().item() < 0.0103
    b = torch.cat([normal.added_terms["dino"].projector[2].bias, normal.student.fc.bias]).detach().double()
    assert 0.008 < b.std().item() < 0.012
    with pytest.raises(ConfigError, match="DINO.LINEAR_INIT"):
        make("KD++", "wrn_40_2", "wrn_40_1", "DINO.LINEAR_INIT", "xavier")


# --- the configs against kdpp_recipes.md ------------------------------------------------------------------------
# (file stem, LR, weights): KD++ (kd, nd), DKD++ (alpha, beta, nd), DIST++ (kd, nd), ReviewKD++ (review, nd).
CIFAR = {
    "kdpp": {"resnet56_resnet20": (0.1, 1.0, 2.0), "resnet32x4_resnet8x4": (0.1, 3.5, 2.0),
             "wrn_40_2_wrn_40_1": (0.1, 1.0, 1.5), "ResNet50_MobileNetV2": (0.02, 3.0, 0.5),
             "resnet32x4_ShuffleV1": (0.02, 2.5, 1.5), "resnet32x4_ShuffleV2": (0.02, 4.0, 0.5)},
    "dkdpp": {"resnet56_resnet20": (0.1, 2.5, 4.0, 3.5), "resnet32x4_resnet8x4": (0.1, 2.0, 8.0, 0.5),
              "wrn_40_2_wrn_40_1": (0.1, 1.0, 6.0, 1.0), "ResNet50_MobileNetV2": (0.02, 0.5, 8.0, 1.0),
              "resnet32x4_ShuffleV1": (0.02, 0.5, 8.0, 4.0), "resnet32x4_ShuffleV2": (0.02, 0.5, 6.0, 0.5)},
    "distpp": {"resnet56_resnet20": (0.1, 2.0, 1.0), "resnet32x4_resnet8x4": (0.1, 1.5, 4.0),
               "wrn_40_2_wrn_40_1": (0.1, 2.5, 3.0), "ResNet50_MobileNetV2": (0.02, 7.0, 1.0),
               "resnet32x4_ShuffleV1": (0.02, 2.5, 3.0), "resnet32x4_ShuffleV2": (0.02, 3.0, 4.0)},
    "reviewkdpp": {"resnet56_resnet20": (0.1, 1.2, 1.0), "resnet32x4_resnet8x4": (0.1, 8.0, 1.0),
                   "wrn_40_2_wrn_40_1": (0.1, 5.0, 4.0), "ResNet50_MobileNetV2": (0.02, 6.0, 2.0),
                   "resnet32x4_ShuffleV1": (0.02, 7.0, 1.0), "resnet32x4_ShuffleV2": (0.02, 8.0, 1.5)},
}
IMAGENET = {
    "kdpp": {"ResNet34_ResNet18": (2.5, 1.0), "ResNet50_ResNet18": (4.0, 1.0), "ResNet101_ResNet18": (3.5, 4.0),
             "ResNet152_ResNet18": (4.0, 2.0), "ResNet50_MobileNetV1": (4.0, 1.0),
             # ViT teachers (ImageNet/ViT/train.sh:L4-5)
             "ViT-S_ResNet18": (1.5, 1.0), "ViT-B_ResNet18": (2.0, 1.0)},
    "dkdpp": {"ResNet34_ResNet18": (0.8, 0.5, 1.0), "ResNet50_ResNet18": (0.6, 0.5, 2.0),
              "ResNet101_ResNet18": (0.8, 0.5, 1.0), "ResNet152_ResNet18": (1.0, 1.0, 1.0),
              "ResNet50_MobileNetV1": (0.8, 1.0, 1.0),
              # ViT teachers: ImageNet/ViT/train.sh's command lines and the README (its comment table gives ViT-S
              # alpha 1.0, beta 1.0)
              "ViT-S_ResNet18": (1.4, 0.5, 2.0), "ViT-B_ResNet18": (1.4, 0.5, 2.0)},
    "reviewkdpp": {"ResNet34_ResNet18": (1.0, 3.0), "ResNet50_ResNet18": (3.0, 2.0), "ResNet101_ResNet18": (3.0, 1.0),
                   "ResNet152_ResNet18": (3.0, 1.0), "ResNet50_MobileNetV1": (8.0, 4.0)},
}
PROJECTED_CIFAR_STUDENTS = {"wrn_40_1", "MobileNetV2", "ShuffleV1", "ShuffleV2"}


def _method_weights(cfg, method):
    if method == "kdpp":
        return (cfg.KD.LOSS.KD_WEIGHT, cfg.DINO.WEIGHT), cfg.KD.LOSS.CE_WEIGHT, cfg.KD.TEMPERATURE
    if method == "dkdpp":
        assert cfg.DKD.WARMUP == 0
        return (cfg.DKD.ALPHA, cfg.DKD.BETA, cfg.DINO.WEIGHT), cfg.DKD.CE_WEIGHT, cfg.DKD.T
    if method == "distpp":
        assert cfg.DIST.BETA == cfg.DIST.GAMMA  # their DIST: beta = gamma = 1, times the kd weight
        return (cfg.DIST.BETA, cfg.DINO.WEIGHT), cfg.DIST.CE_WEIGHT, cfg.DIST.TAU
    assert cfg.REVIEWKD.WARMUP_EPOCHS == 0
    return (cfg.REVIEWKD.LOSS.REVIEWKD_WEIGHT, cfg.DINO.WEIGHT), cfg.REVIEWKD.LOSS.CE_WEIGHT, None


def _common(cfg):
    s, d = cfg.SOLVER, cfg.DINO
    assert s.NESTEROV and s.MOMENTUM == 0.9 and s.WARMUP_EPOCHS == 0 and s.UPDATE_RULE == "vanilla"
    assert d.PROJECTOR == "bn_dropout_linear" and d.CLASS_MEANS_AUGMENT and d.CLASS_MEANS_DECIMALS == 4
    assert not d.CLASS_BALANCED


@pytest.mark.parametrize("method,stem", [(m, s) for m, rows in CIFAR.items() for s in rows])
def test_cifar_family_config_is_the_authors_recipe(method, stem):
    cfg = load_config(os.path.join(ROOT, "configs", "cifar100", method, f"{stem}.yaml"))
    lr, *weights = CIFAR[method][stem]
    _common(cfg)
    s = cfg.SOLVER
    assert (s.BATCH_SIZE, s.LR, s.EPOCHS, list(s.LR_DECAY_STAGES), s.WEIGHT_DECAY) == (128, lr, 240, [150, 180, 210],
                                                                                      5e-4)
    got, ce, temperature = _method_weights(cfg, method)
    assert got == tuple(weights) and ce == 1.0 and temperature in (4.0, None)
    assert cfg.LOSS_RAMP.EPOCHS == 20 and list(cfg.LOSS_RAMP.TERMS) == []  # the method's own term, not dino
    projected = cfg.DISTILLER.STUDENT in PROJECTED_CIFAR_STUDENTS
    assert cfg.DINO.LINEAR_INIT == ("zero_bias" if projected else "default")


@pytest.mark.parametrize("method,stem", [(m, s) for m, rows in IMAGENET.items() for s in rows])
def test_imagenet_family_config_is_the_authors_recipe(method, stem):
    cfg = load_config(os.path.join(ROOT, "configs", "imagenet", method, f"{stem}.yaml"))
    _common(cfg)
    s = cfg.SOLVER
    assert (s.BATCH_SIZE, s.LR, s.EPOCHS, list(s.LR_DECAY_STAGES), s.WEIGHT_DECAY) == (512, 0.2, 100, [30, 60, 90],
                                                                                      1e-4)
    got, ce, temperature = _method_weights(cfg, method)
    assert got == IMAGENET[method][stem] and ce == 1.0 and temperature in (1.0, None)
    assert cfg.LOSS_RAMP.EPOCHS == 5
    assert list(cfg.LOSS_RAMP.TERMS) == (["dkd", "dino"] if method == "dkdpp" else [])
    projected = stem != "ResNet34_ResNet18"
    want = "default" if not projected else ("zero_bias" if method == "reviewkdpp" else "normal")
    assert cfg.DINO.LINEAR_INIT == want


@pytest.mark.slow
def test_a_family_run_trains_without_the_term_in_its_first_epoch(tmp_path):
    """Through tools/train.py: KD++ with a 2-epoch ramp and Nesterov SGD logs loss/kd 0 in epoch 1 (factor 0) and
    a positive one in epoch 2; the dino term (not ramped) is positive in both."""
    import json
    import subprocess
    import sys

    from mdistiller.bench.random_teacher import write_random_teacher

    ckpt = tmp_path / "teacher.pth"
    write_random_teacher(ckpt, "resnet20", "fashion_mnist")
    run = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "train.py"), "--cfg",
                          os.path.join(ROOT, "configs", "fashion_mnist", "kdpp", "resnet20_resnet8.yaml"),
                          "SOLVER.EPOCHS", "2", "SOLVER.LR_DECAY_STAGES", "[]", "DATASET.TRAIN_SUBSET", "256",
                          "DATASET.TEST_SUBSET", "64", "LOG.PREFIX", str(tmp_path / "out"), "EXPERIMENT.NAME", "r",
                          "DISTILLER.TEACHER_CKPT", str(ckpt), "EXPERIMENT.DEVICE", "cpu", "LOSS_RAMP.EPOCHS", "2",
                          "SOLVER.NESTEROV", "True"], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    with open(tmp_path / "out" / "r" / "metrics.jsonl") as f:
        first, second = [json.loads(line) for line in f]
    assert first["loss/kd"] == 0.0 and second["loss/kd"] > 0
    assert first["loss/dino"] > 0 and second["loss/dino"] > 0


@pytest.mark.parametrize("method", ["kd", "dkd", "kdpp", "dkdpp"])
def test_table_b2_vit_teachers_are_timms_pretrained_vits(method):
    # KD++ table B2 (ImageNet/ViT/train_kd.py:L469-472): timm's vit_small/base_patch16_224 with pretrained=True.
    from mdistiller.engine.launch import run_name

    for stem, model in (("ViT-S_ResNet18", "timm:vit_small_patch16_224"),
                        ("ViT-B_ResNet18", "timm:vit_base_patch16_224")):
        cfg = load_config(os.path.join(ROOT, "configs", "imagenet", method, f"{stem}.yaml"))
        assert (cfg.DISTILLER.TEACHER, cfg.DISTILLER.STUDENT) == (model, "ResNet18")
        assert cfg.MODEL.TEACHER_PRETRAINED and cfg.DISTILLER.TEACHER_CKPT == ""
        assert ":" not in run_name(cfg) and model.split(":")[1] in run_name(cfg)
