"""KD++'s ablations (paper tables 4 and 5) as switches of the dino term: DINO.FORM's parts against plain float64
implementations of eq. 1-4 and table 5's L2 written here, DINO.CENTRES against the teacher's classifier rows, the
configuration errors, and every Fashion-MNIST ablation config trained through the CLI, logging its named terms.
Also DKD appendix table A.3's "TCKD only" (configs/cifar100/tckd/): the config's loss against the binary KL by hand,
and the same switch (DKD.BETA 0) through the CLI."""

import glob
import json
import math
import os

import pytest
import torch
import torch.nn as nn

from mdistiller.config import load_config
from mdistiller.distillers import DISTILLER_REGISTRY
from mdistiller.distillers.losses import DISTILL, StepOutput
from mdistiller.distillers.plus_plus import DinoTerm, classifier_weight
from mdistiller.models import build_model
from mdistiller.utils.errors import ConfigError
from cli_runs import FM_CONFIGS, SMALL, train_main as _train_main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _inputs(n=6, d=5, c=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    fs = torch.randn(n, d, generator=g, dtype=torch.float64) * 3
    ft = torch.randn(n, d, generator=g, dtype=torch.float64) * 2
    centres = torch.randn(c, d, generator=g, dtype=torch.float64)
    labels = torch.tensor([0, 1, 2, 3, 1, 1])[:n]
    return fs, ft, centres, labels


# --- plain formulas (the paper's, per sample, in Python floats) --------------------------------------------------
def _norm(v):
    return math.sqrt(sum(x * x for x in v))


def _cos(a, b):
    na, nb = _norm(a), _norm(b)
    return 0.0 if na == 0 or nb == 0 else sum(x * y for x, y in zip(a, b)) / (na * nb)


def plain_cosine(fs, centres, labels):  # eq. 1
    return sum(1 - _cos(f, centres[y]) for f, y in zip(fs, labels)) / len(fs)


def plain_infonce(fs, centres, labels):  # eq. 2
    total = 0.0
    for f, y in zip(fs, labels):
        exps = [math.exp(_cos(f, c)) for c in centres]
        total += -math.log(exps[y] / sum(exps))
    return total / len(fs)


def plain_l2(fs, targets):  # eq. 3 (targets: teacher features) or table 5 (targets: centres of the labels)
    return sum(sum((a - b) ** 2 for a, b in zip(f, t)) for f, t in zip(fs, targets)) / len(fs)


def plain_dino(fs, ft, centres, labels):  # eq. 7 as the batch mean
    total = 0.0
    for f, t, y in zip(fs, ft, labels):
        e = [x / _norm(centres[y]) for x in centres[y]]
        total += 1 - sum(a * b for a, b in zip(f, e)) / max(_norm(f), _norm(t))
    return total / len(fs)


def _term(form, weight=1.5, form_weights=(), sifn_step=1.0, d=5, c=4):
    term = DinoTerm(student_dim=d, teacher_dim=d, num_classes=c, weight=weight, form=form,
                    form_weights=form_weights, sifn_step=sifn_step).double()
    return term


def _run(term, fs, ft, centres, labels):
    term.set_centres(centres)
    out = StepOutput(None, {}, {"pooled_feat": fs}, None, {"pooled_feat": ft})
    return term(out, None, labels, None)


@pytest.mark.parametrize("form", ["cosine", "infonce", "l2", "l2_centre", "dino+l2"])
def test_each_part_equals_its_formula(form):
    fs, ft, centres, labels = _inputs()
    L = fs.tolist(), ft.tolist(), centres.tolist(), labels.tolist()
    expected = {"cosine": plain_cosine(L[0], L[2], L[3]), "infonce": plain_infonce(L[0], L[2], L[3]),
                "l2": plain_l2(L[0], L[1]), "l2_centre": plain_l2(L[0], [L[2][y] for y in L[3]]),
                "dino": plain_dino(*L)}
    terms = _run(_term(form), fs, ft, centres, labels)
    assert set(terms) == set(form.split("+"))
    for name, t in terms.items():
        assert t.kind == DISTILL
        assert t.value.item() == pytest.approx(1.5 * expected[name], rel=1e-12)


def test_sifn_value_is_r_squared_and_its_gradient_grows_every_norm_by_r():
    # eq. 4 as AFN computes it: (|f| - (sg(|f|) + r))^2, so d/df = -2 r f / |f| per sample (/ N for the mean)
    fs, ft, centres, labels = _inputs()
    fs.requires_grad_(True)
    r, w = 0.7, 0.5
    terms = _run(_term("sifn", weight=w, sifn_step=r), fs, ft, centres, labels)
    assert terms["sifn"].value.item() == pytest.approx(w * r * r, rel=1e-12)
    terms["sifn"].value.backward()
    n = fs.shape[0]
    for i in range(n):
        f = fs[i].detach().tolist()
        expect = [-2 * r * w * x / _norm(f) / n for x in f]
        assert fs.grad[i].tolist() == pytest.approx(expect, rel=1e-10)


def test_form_weights_weight_each_part_and_dino_alone_is_the_single_term():
    fs, ft, centres, labels = _inputs()
    terms = _run(_term("cosine+sifn", form_weights=(2.0, 0.25), sifn_step=2.0), fs, ft, centres, labels)
    assert terms["sifn"].value.item() == pytest.approx(0.25 * 4.0, rel=1e-12)
    assert terms["cosine"].value.item() == pytest.approx(2.0 * plain_cosine(fs.tolist(), centres.tolist(),
                                                                              labels.tolist()), rel=1e-12)
    single = _run(_term("dino"), fs, ft, centres, labels)  # the KD++ term is one LossTerm, logged as "dino"
    assert single.kind == DISTILL
    assert single.value.item() == pytest.approx(1.5 * plain_dino(fs.tolist(), ft.tolist(), centres.tolist(),
                                                                 labels.tolist()), rel=1e-12)


def test_classifier_weight_centres_are_the_teacher_classifier_rows():
    teacher = build_model("resnet8", num_classes=10, image_size=28)
    fc = [m for m in teacher.modules() if isinstance(m, nn.Linear)][-1]
    assert torch.equal(classifier_weight(teacher, teacher.feat_dim, 10), fc.weight)
    cfg = load_config(os.path.join(FM_CONFIGS, "kdpp_clsweight", "resnet20_resnet8.yaml"), validate=False)
    student = build_model("resnet8", num_classes=10, image_size=28)
    term = DinoTerm.build(cfg, student, teacher, 10)
    assert torch.equal(term.class_means, fc.weight) and bool(term.ready)
    assert not DinoTerm.needs_class_means(cfg)  # no teacher pass over the training set
    with pytest.raises(ConfigError, match="DINO.CENTRES classifier_weights"):
        classifier_weight(teacher, teacher.feat_dim, 11)


def test_forms_without_centres_need_no_class_means():
    cfg = load_config(os.path.join(FM_CONFIGS, "kdpp_l2", "resnet20_resnet8.yaml"), validate=False)
    assert not DinoTerm.needs_class_means(cfg)
    assert bool(_term("l2+sifn").ready) and not bool(_term("cosine").ready)
    cfg = load_config(os.path.join(FM_CONFIGS, "kdpp_cos", "resnet20_resnet8.yaml"), validate=False)
    assert DinoTerm.needs_class_means(cfg)


@pytest.mark.parametrize("opts, key", [
    (["DINO.FORM", "cosine+cosine"], "DINO.FORM"), (["DINO.FORM", "cos"], "DINO.FORM"),
    (["DINO.FORM", "cosine+l2", "DINO.FORM_WEIGHTS", "[1.0]"], "DINO.FORM_WEIGHTS"),
    (["DINO.CENTRES", "weights"], "DINO.CENTRES"), (["DINO.SIFN_STEP", "-1.0"], "DINO.SIFN_STEP"),
    (["DINO.FORM", "l2", "DINO.CLASS_BALANCED", "True"], "DINO.CLASS_BALANCED")])
def test_configuration_errors_name_the_key(opts, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(os.path.join(FM_CONFIGS, "kdpp", "resnet20_resnet8.yaml"), opts)


# The Fashion-MNIST ablation configs -> the loss terms their runs log (written out, not read from the configs).
ABLATION_TERMS = {
    "kdpp_cos": {"ce", "kd", "cosine"}, "kdpp_infonce": {"ce", "kd", "infonce"}, "kdpp_l2": {"ce", "kd", "l2"},
    "kdpp_sifn": {"ce", "kd", "sifn"}, "kdpp_cos_l2": {"ce", "kd", "cosine", "l2"},
    "kdpp_cos_sifn": {"ce", "kd", "cosine", "sifn"}, "kdpp_infonce_l2": {"ce", "kd", "infonce", "l2"},
    "kdpp_infonce_sifn": {"ce", "kd", "infonce", "sifn"}, "kdpp_ce_dino": {"ce", "kd", "dino"},
    "kdpp_kl_dino": {"ce", "kd", "dino"}, "kdpp_clsweight": {"ce", "kd", "dino"},
    "kdpp_l2_clsweight": {"ce", "kd", "l2_centre"},
}
ZERO_TERM = {"kdpp_ce_dino": "kd", "kdpp_kl_dino": "ce"}  # the term the variant leaves out (weight 0)
# DKD appendix table A.3's switch on the Fashion-MNIST DKD config: (config folder, overrides, terms)
OTHER_VARIANTS = {"tckd": ("dkd", ["DKD.BETA", "0.0", "DKD.T", "1.0", "DKD.WARMUP", "0"], {"ce", "dkd"})}


def test_every_ablation_config_is_listed():
    found = {os.path.basename(os.path.dirname(p)) for p in glob.glob(os.path.join(FM_CONFIGS, "kdpp_*", "*.yaml"))}
    assert found == set(ABLATION_TERMS)


class _Fixed(nn.Module):
    """A model whose logits are fixed rows (the distiller's contract: (logits, features))."""

    def __init__(self, logits):
        super().__init__()
        self.logits = logits

    def forward(self, images):
        return self.logits, {"pooled_feat": self.logits}


def test_tckd_only_config_is_ce_plus_the_binary_kl_at_its_temperature():
    cfg = load_config(os.path.join(ROOT, "configs", "cifar100", "tckd", "wrn_40_2_wrn_16_2.yaml"),
                      ["DKD.T", "2.0"], validate=False)
    g = torch.Generator().manual_seed(3)
    zs, zt = torch.randn(4, 5, generator=g, dtype=torch.float64), torch.randn(4, 5, generator=g, dtype=torch.float64)
    labels = torch.tensor([0, 3, 3, 1])
    method = DISTILLER_REGISTRY.get("DKD")
    dkd = method(student=_Fixed(zs), teacher=_Fixed(zt), **method.from_config(cfg, None))
    epoch = cfg.DKD.WARMUP  # the ramp at 1: the term itself
    out = dkd.forward_train(None, labels, epoch)
    T, expect_tckd, expect_ce = 2.0, 0.0, 0.0
    for s_row, t_row, y in zip(zs.tolist(), zt.tolist(), labels.tolist()):
        ps = [math.exp(v / T) for v in s_row]
        pt = [math.exp(v / T) for v in t_row]
        bs, bt = ps[y] / sum(ps), pt[y] / sum(pt)  # the target's probability; the rest is 1 - it
        expect_tckd += bt * math.log(bt / bs) + (1 - bt) * math.log((1 - bt) / (1 - bs))
        expect_ce += -s_row[y] + math.log(sum(math.exp(v) for v in s_row))
    n = len(labels)
    assert out.terms["dkd"].value.item() == pytest.approx(T * T * expect_tckd / n, rel=1e-10)  # alpha 1, NCKD 0
    assert out.terms["ce"].value.item() == pytest.approx(expect_ce / n, rel=1e-10)  # CE weight 1


@pytest.mark.parametrize("variant", sorted(ABLATION_TERMS) + sorted(OTHER_VARIANTS))
def test_ablation_trains_two_epochs_through_the_cli_and_logs_its_terms(variant, small_teacher_ckpt,
                                                                        tmp_path):
    small = list(SMALL)
    small[small.index("SOLVER.EPOCHS") + 1] = "2"
    folder, overrides, _ = OTHER_VARIANTS.get(variant, (variant, [], None))
    _train_main()(["--cfg", os.path.join(FM_CONFIGS, folder, "resnet20_resnet8.yaml"), "LOG.PREFIX",
                   str(tmp_path), "EXPERIMENT.NAME", "run", "DISTILLER.TEACHER_CKPT", small_teacher_ckpt, *small,
                   "DATASET.TRAIN_SUBSET", "96", "DATASET.TEST_SUBSET", "32", *overrides])
    with open(tmp_path / "run" / "metrics.jsonl") as f:
        records = [json.loads(line) for line in f]
    assert [r["epoch"] for r in records] == [1, 2]
    for record in records:
        terms = {k[len("loss/"):]: v for k, v in record.items()
                 if k.startswith("loss/") and k not in ("loss/task_total", "loss/distill_total")}
        assert set(terms) == set(ABLATION_TERMS.get(variant) or OTHER_VARIANTS[variant][2])
        for name, value in terms.items():
            assert math.isfinite(value)
            assert (value == 0) == (ZERO_TERM.get(variant) == name), (name, value)
