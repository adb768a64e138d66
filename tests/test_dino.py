"""KD++'s dino term and the "X++" mechanism: the loss against hand computations of eq. 5-7, teacher class means
against a direct computation, their checkpoint-hash cache, the projector, the registry, and a CLI run."""

import hashlib
import json
import math
import os
import subprocess
import sys

import pytest
import torch
import torch.nn as nn

from data_fixtures import write_cifar100
from mdistiller.bench.random_teacher import random_teacher_state, write_random_teacher
from mdistiller.config import load_config
from mdistiller.data.bundle import DatasetMeta
from mdistiller.data.views import view_recipe
from mdistiller.distillers import DISTILL, DISTILLER_REGISTRY, Distiller, distill_loss, task_loss
from mdistiller.engine import class_means as cm
from mdistiller.distillers.dkd import DKD
from mdistiller.distillers.kd import KD
from mdistiller.distillers.losses import StepOutput
from mdistiller.distillers.plus_plus import DinoTerm, class_weights, dino_loss
from mdistiller.distillers.registry import DistillerRegistry
from mdistiller.engine import build_run
from mdistiller.engine.classification import build_distiller
from mdistiller.models import build_model
from mdistiller.utils.errors import ConfigError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# --- the loss (eq. 5-7) ------------------------------------------------------------------------------------
def test_dino_student_norm_below_teacher_eq5():
    # |f_s| = 5 < |f_t| = 10, e = (1, 0): 1 - f_s.e / |f_t| = 1 - 3/10; gradient -e / |f_t|
    f_s = torch.tensor([[3.0, 4.0]], requires_grad=True)
    loss = dino_loss(f_s, torch.tensor([[0.0, 10.0]]), torch.tensor([[2.0, 0.0]]), torch.tensor([0]))
    assert loss.item() == pytest.approx(0.7)
    loss.backward()
    torch.testing.assert_close(f_s.grad, torch.tensor([[-0.1, 0.0]]))


def test_dino_student_norm_above_teacher_eq6():
    # |f_s| = 10 >= |f_t| = 3: 1 - cos = 1 - 6/10; gradient -(e/|f_s| - (f_s.e) f_s / |f_s|^3)
    f_s = torch.tensor([[6.0, 8.0]], requires_grad=True)
    loss = dino_loss(f_s, torch.tensor([[3.0, 0.0]]), torch.tensor([[0.5, 0.0]]), torch.tensor([0]))
    assert loss.item() == pytest.approx(0.4)
    loss.backward()
    torch.testing.assert_close(f_s.grad, torch.tensor([[-(0.1 - 0.036), 0.048]]))


def test_dino_batch_uses_each_label_norm_margin_and_zero_mean():
    means = torch.tensor([[2.0, 0.0], [0.0, -1.0], [0.0, 0.0]])
    f_s = torch.tensor([[3.0, 4.0], [6.0, -8.0], [1.0, 1.0]])
    f_t = torch.tensor([[0.0, 10.0], [3.0, 0.0], [1.0, 0.0]])
    labels = torch.tensor([0, 1, 2])
    # class 1: e = (0, -1), f_s.e = 8, max(10, 3) = 10 -> 0.2; class 2 has a zero mean -> constant 1
    assert dino_loss(f_s, f_t, means, labels).item() == pytest.approx((0.7 + 0.2 + 1.0) / 3)
    assert dino_loss(f_s, f_t, means, labels, torch.tensor([2.0, 1.0, 0.0])).item() == pytest.approx(1.6 / 3)
    # appendix B.4: the teacher norm is scaled by (1 + m): sample 1 now divides by max(10, 3 * 4) = 12
    assert dino_loss(f_s[1:2], f_t[1:2], means, labels[1:2], norm_margin=3.0).item() == pytest.approx(1 - 8 / 12)


def test_class_weighted_batch_mean_is_eq7_per_class_average():
    g = torch.Generator().manual_seed(0)
    labels = torch.tensor([0] * 7 + [1] * 2 + [3] * 3)  # imbalanced, class 2 empty
    f_s, f_t = torch.randn(12, 5, generator=g), torch.randn(12, 5, generator=g) * 2
    means = torch.randn(4, 5, generator=g)
    counts = torch.bincount(labels, minlength=4)
    per_sample = [dino_loss(f_s[i:i + 1], f_t[i:i + 1], means, labels[i:i + 1]).item() for i in range(12)]
    eq7 = sum(sum(per_sample[i] for i in range(12) if labels[i] == k) / counts[k].item() for k in (0, 1, 3)) / 3
    weighted = dino_loss(f_s, f_t, means, labels, class_weights(counts)[labels])
    assert weighted.item() == pytest.approx(eq7, rel=1e-6)
    torch.testing.assert_close(class_weights(counts), torch.tensor([12 / 21, 12 / 6, 1.0, 12 / 9]))
    torch.testing.assert_close(class_weights(torch.tensor([5, 5, 5])), torch.ones(3))  # balanced: batch mean


# --- class means and their cache ----------------------------------------------------------------------------
class FlatTeacher(nn.Module):
    """pooled_feat = the first 3 pixel values of each image: class means are easy to compute by hand."""

    feat_dim = 3

    def forward(self, x):
        feat = x.flatten(1)[:, :3]
        return feat @ torch.ones(3, 4), {"pooled_feat": feat}


def small_dataset():
    g = torch.Generator().manual_seed(1)
    images = torch.randn(10, 1, 2, 2, generator=g)
    labels = torch.tensor([0, 2, 2, 0, 1, 2, 0, 0, 2, 2])  # class 3 has no image
    return images, labels


def batches(images, labels, size=3):
    return [(images[i:i + size], labels[i:i + size], torch.arange(i, min(i + size, 10))) for i in range(0, 10, size)]


def test_class_means_by_hand():
    images, labels = small_dataset()
    means, counts = cm.compute_class_means(FlatTeacher(), batches(images, labels), num_classes=4)
    flat = images.flatten(1)[:, :3].tolist()
    for k in range(3):
        rows = [flat[i] for i in range(10) if labels[i] == k]
        expected = [sum(r[j] for r in rows) / len(rows) for j in range(3)]
        assert means[k].tolist() == pytest.approx(expected, rel=1e-6, abs=1e-7)
    assert means[3].tolist() == [0.0, 0.0, 0.0]
    assert counts.tolist() == [4, 1, 5, 0]


def test_class_means_cache_keyed_by_checkpoint_hash(tmp_path):
    images, labels = small_dataset()
    ckpt = tmp_path / "teacher.pth"
    ckpt.write_bytes(b"weights version 1")
    calls = []

    def batches_fn():
        calls.append(1)
        return batches(images, labels)

    def run(**kw):
        return cm.load_or_compute_class_means(str(ckpt), FlatTeacher(), 4, batches_fn, "toy-n10", num_train=10, **kw)

    means, counts, path = run()
    sha = hashlib.sha256(b"weights version 1").hexdigest()
    assert path == f"{ckpt}.class_means.toy-n10.{sha[:16]}.pt" and os.path.isfile(path) and len(calls) == 1
    saved = torch.load(path, weights_only=True)
    assert (saved["num_classes"], saved["dim"], saved["num_train"], saved["checkpoint_sha256"]) == (4, 3, 10, sha)
    torch.testing.assert_close(saved["class_means"], means)
    mtime = os.stat(path).st_mtime_ns

    means2, counts2, path2 = run()  # reused, not recomputed
    assert len(calls) == 1 and path2 == path and os.stat(path).st_mtime_ns == mtime
    assert torch.equal(means2, means) and torch.equal(counts2, counts)

    ckpt.write_bytes(b"weights version 2")  # a re-trained teacher at the same path
    _, _, path3 = run()
    assert len(calls) == 2 and path3 != path and path3.endswith(hashlib.sha256(b"weights version 2").hexdigest()[:16]
                                                                + ".pt")
    assert not os.path.exists(path)  # the stale cache of the old weights is gone

    with pytest.raises(RuntimeError, match="training set has 12"):  # a cache for other data is not trusted
        cm.load_or_compute_class_means(str(ckpt), FlatTeacher(), 4, batches_fn, "toy-n10", num_train=12)
    torch.save({**torch.load(path3, weights_only=True), "dim": 7}, path3)  # a mismatching cache: recomputed
    run()
    assert len(calls) == 4 and torch.load(path3, weights_only=True)["dim"] == 3
    run(force=True)
    assert len(calls) == 5


# --- the distillers -----------------------------------------------------------------------------------------
def toy_meta(num_train=8):
    """A CIFAR-100 DatasetMeta without files: what the builder needs (classes; CRD: the training labels)."""
    return DatasetMeta(name="cifar100", num_classes=100, image_size=32, num_train=num_train, num_test=0,
                       mean=(0.5,) * 3, std=(0.25,) * 3, train_targets=torch.arange(num_train) % 100)


def make(distiller_type, teacher="resnet20", student="resnet8", *overrides):
    """The distiller exactly as a run builds it (engine.build.build_distiller), with a random teacher."""
    cfg = load_config(None, ["DATASET.TYPE", "cifar100", "DISTILLER.TYPE", distiller_type, "DISTILLER.TEACHER",
                             teacher, "DISTILLER.STUDENT", student, *overrides])
    torch.manual_seed(0)
    d, _ = build_distiller(cfg, toy_meta(), torch.device("cpu"), random_teacher_state(teacher, "cifar100"))
    return d, cfg


def dino_term(distiller):
    return distiller.added_terms["dino"]


def count_calls(calls, **modules):
    """Forward hooks that count each module's calls into `calls` (name -> count); returns the handles."""
    for k in modules:
        calls.setdefault(k, 0)
    return [m.register_forward_hook(lambda *a, k=k: calls.__setitem__(k, calls[k] + 1)) for k, m in modules.items()]


def test_projector_only_when_dims_differ_and_learnable():
    same, _ = make("KD++")  # resnet20 and resnet8: both 64-d
    assert isinstance(dino_term(same).projector, nn.Identity)
    assert len(same.learnable_parameters()) == len(list(same.student.parameters()))

    diff, _ = make("KD++", "resnet8x4", "resnet8")  # 256-d teacher, 64-d student
    proj = dino_term(diff).projector  # the authors' code: BatchNorm1d -> Dropout(0.5) -> Linear
    assert [type(m) for m in proj] == [nn.BatchNorm1d, nn.Dropout, nn.Linear]
    assert proj[0].num_features == 64 and proj[1].p == 0.5
    assert (proj[2].in_features, proj[2].out_features) == (64, 256)
    assert torch.equal(proj[0].weight, torch.ones(64)) and torch.equal(proj[0].bias, torch.zeros(64))
    ids = {id(p) for p in diff.learnable_parameters()}
    assert all(id(p) in ids for p in proj.parameters())
    assert not any(id(p) in ids for p in diff.teacher.parameters())
    dino_term(diff).set_class_means(torch.randn(100, 256), torch.full((100,), 5))
    diff.train()
    out = diff.train_forward(torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 3]), 1)
    out.terms["dino"].value.backward()
    assert proj[2].weight.grad is not None and proj[2].weight.grad.abs().sum() > 0

    paper, _ = make("KD++", "resnet8x4", "resnet8", "DINO.PROJECTOR", "linear_bn")
    assert [type(m) for m in dino_term(paper).projector] == [nn.Linear, nn.BatchNorm1d]
    plain, _ = make("KD++", "resnet8x4", "resnet8", "DINO.PROJECTOR", "linear")
    assert len(dino_term(plain).projector) == 1
    with pytest.raises(ConfigError, match="DINO.PROJECTOR"):
        make("KD++", "resnet20", "resnet8", "DINO.PROJECTOR", "mlp")


@pytest.mark.parametrize("name,base", [("KD++", KD), ("DKD++", DKD)])
def test_plus_plus_adds_dino_to_the_base_terms_with_one_forward(name, base):
    # "X++" is X itself plus a term the builder adds: no derived class
    assert DISTILLER_REGISTRY.resolve(name) == (base, True) and DISTILLER_REGISTRY.get(name) is base
    assert DISTILLER_REGISTRY.resolve(name[:-2]) == (base, False)
    pp, cfg = make(name, "resnet20", "resnet8", "DINO.WEIGHT", "3.0")
    assert type(pp) is base and list(pp.added_terms) == ["dino"]
    plain = base.build(cfg, pp.student, pp.teacher, toy_meta())
    assert not hasattr(plain, "added_terms")
    pp.eval(), plain.eval()  # BatchNorm in eval: both distillers see identical student outputs
    means = torch.randn(100, 64)
    dino_term(pp).set_class_means(means, torch.full((100,), 500))
    images, labels = torch.randn(4, 3, 32, 32), torch.tensor([3, 1, 4, 1])
    calls = {}
    hooks = count_calls(calls, student=pp.student, teacher=pp.teacher)
    out = pp.train_forward(images, labels, 30)
    assert calls == {"student": 1, "teacher": 1}  # no second forward
    for h in hooks:
        h.remove()
    out_b = plain.train_forward(images, labels, 30)
    terms, terms_b = out.terms, out_b.terms
    assert list(terms) == list(terms_b) + ["dino"] and terms["dino"].kind == DISTILL
    for k in terms_b:
        torch.testing.assert_close(terms[k].value, terms_b[k].value)
    torch.testing.assert_close(out.logits, out_b.logits)
    with torch.no_grad():
        _, fs = pp.student(images)
        _, ft = pp.teacher(images)
    expected = 3.0 * dino_loss(fs["pooled_feat"], ft["pooled_feat"], means, labels)
    torch.testing.assert_close(terms["dino"].value, expected)


def test_dino_term_reads_the_step_output_and_runs_the_teacher_only_when_it_is_missing():
    """The term takes f_s and f_t from X's StepOutput (the features of X's own forward): with hand-chosen features
    its value is eq. 5 by hand and the teacher is not run; without teacher features it runs the teacher once."""
    d, cfg = make("KD++", "resnet20", "resnet8", "DINO.WEIGHT", "3.0")
    term = dino_term(d)
    means = torch.zeros(100, 64)
    means[0, 0] = 2.0  # e_0 = (1, 0, ..., 0)
    term.set_class_means(means, torch.ones(100))
    f_s, f_t = torch.zeros(1, 64), torch.zeros(1, 64)
    f_s[0, :2] = torch.tensor([3.0, 4.0])  # |f_s| = 5, f_s.e = 3
    f_t[0, 1] = 10.0  # |f_t| = 10
    images, labels = torch.randn(1, 3, 32, 32), torch.tensor([0])
    calls = {}
    hooks = count_calls(calls, student=d.student, teacher=d.teacher)
    out = StepOutput(torch.zeros(1, 100), {}, {"pooled_feat": f_s}, torch.zeros(1, 100), {"pooled_feat": f_t})
    value = term(out, images, labels, d.teacher)
    assert value.kind == DISTILL and value.value.item() == pytest.approx(3.0 * (1 - 3 / 10))  # eq. 5
    assert calls == {"student": 0, "teacher": 0}

    out = StepOutput(torch.zeros(1, 100), {}, {"pooled_feat": f_s})  # X never ran the teacher
    value = term(out, images, labels, d.teacher)
    assert calls == {"student": 0, "teacher": 1}
    for h in hooks:
        h.remove()
    with torch.no_grad():
        logits_t, feats_t = d.teacher.model(images)
    assert torch.equal(out.teacher_logits, logits_t) and torch.equal(out.teacher_features["pooled_feat"],
                                                                     feats_t["pooled_feat"])
    t_norm = math.sqrt(sum(v * v for v in feats_t["pooled_feat"][0].tolist()))
    assert value.value.item() == pytest.approx(3.0 * (1 - 3 / max(5.0, t_norm)), rel=1e-6)


def test_registry_names_errors_and_validation():
    names = DISTILLER_REGISTRY.names()
    assert {"KD", "KD++", "DKD", "DKD++"} <= set(names) and "NONE++" not in names
    # every method that loads a teacher, and only those, answers to "X++"
    bases = [n for n in names if not n.endswith("++")]
    assert {n for n in names if n.endswith("++")} == {n + "++" for n in bases
                                                      if DISTILLER_REGISTRY.get(n).needs_teacher}
    assert "KD++" in DISTILLER_REGISTRY and "FOO++" not in DISTILLER_REGISTRY
    for bad in ("FOO++", "NONE++", "KD++++"):
        with pytest.raises(ConfigError) as e:
            DISTILLER_REGISTRY.get(bad, "DISTILLER.TYPE")
        assert "\n" not in str(e.value) and f"'{bad}'" in str(e.value) and "KD++" in str(e.value)
    with pytest.raises(ConfigError, match="DISTILLER.TYPE"):
        load_config(None, ["DISTILLER.TYPE", "FOO++"])
    cfg = load_config(None, ["DISTILLER.TYPE", "DKD++", "DISTILLER.TEACHER", "resnet20", "DINO.WEIGHT", "0.5"])
    assert cfg.DINO.WEIGHT == 0.5
    with pytest.raises(ConfigError, match="DINO.WEIGHT"):
        load_config(None, ["DISTILLER.TYPE", "KD++", "DISTILLER.TEACHER", "resnet20", "DINO.WEIGHT", "-1"])
    with pytest.raises(ConfigError, match="KD.TEMPERATURE"):  # the base method's own checks still run
        load_config(None, ["DISTILLER.TYPE", "KD++", "DISTILLER.TEACHER", "resnet20", "KD.TEMPERATURE", "0"])


def _with_dino(distiller, cfg):
    """What the builder does for "X++" (engine.build.build_distiller), for a method outside DISTILLER_REGISTRY."""
    distiller.add_term("dino", DinoTerm.build(cfg, distiller.student, distiller.teacher, 100))
    return distiller


def test_any_registered_method_gets_a_plus_plus():
    """A method written without KD++ in mind (student called twice, the teacher never run) returns its StepOutput;
    the term reads the student's features of the call on the batch and runs the teacher itself."""
    reg = DistillerRegistry("distiller")

    @reg.register("TOY")
    class Toy(Distiller):
        def forward_train(self, images, labels, epoch, index=None):
            self.student(images.flip(0))  # an extra call on other inputs: not the one the dino term uses
            logits, feats = self.student(images)
            return StepOutput(logits, {"ce": task_loss(nn.functional.cross_entropy(logits, labels))}, feats)

    assert reg.names() == ["TOY", "TOY++"]
    assert reg.resolve("TOY++") == (Toy, True) and reg.get("TOY++") is Toy and reg.resolve("TOY") == (Toy, False)
    with pytest.raises(ConfigError, match="DISTILLER.TYPE"):  # a second registry does not replace the real one
        load_config(None, ["DISTILLER.TYPE", "TOY"])
    cfg = load_config(None, ["DATASET.TYPE", "cifar100", "DISTILLER.TEACHER", "resnet20"])
    d = Toy.build(cfg, build_model("resnet8", "cifar100"), build_model("resnet20", "cifar100"), toy_meta())
    d = _with_dino(d, cfg).eval()
    means = torch.randn(100, 64)
    dino_term(d).set_class_means(means, torch.ones(100))
    images, labels = torch.randn(3, 3, 32, 32), torch.tensor([5, 6, 7])
    out = d.train_forward(images, labels, 1)
    assert list(out.terms) == ["ce", "dino"]
    with torch.no_grad():
        fs, ft = d.student(images)[1]["pooled_feat"], d.teacher(images)[1]["pooled_feat"]
    torch.testing.assert_close(out.terms["dino"].value, cfg.DINO.WEIGHT * dino_loss(fs, ft, means, labels))


def test_plus_plus_refuses_a_method_without_features_or_with_its_own_dino():
    cfg = load_config(None, ["DATASET.TYPE", "cifar100", "DISTILLER.TEACHER", "resnet20"])
    images, labels = torch.randn(2, 3, 32, 32), torch.tensor([0, 1])

    class Bare(Distiller):  # the plain (logits, terms) tuple a user method may still return
        def forward_train(self, images, labels, epoch, index=None):
            logits, _ = self.student(images)
            return logits, {"ce": task_loss(nn.functional.cross_entropy(logits, labels))}

    class OwnDino(Distiller):
        def forward_train(self, images, labels, epoch, index=None):
            logits, feats = self.student(images)
            logits_t, feats_t = self.teacher(images)
            return StepOutput(logits, {"dino": distill_loss((logits - logits_t).square().mean())}, feats, logits_t,
                              feats_t)

    bare = Bare(student=build_model("resnet8", "cifar100"), teacher=build_model("resnet20", "cifar100"))
    assert list(bare.train_forward(images, labels, 1).terms) == ["ce"]  # the tuple trains without the term
    _with_dino(bare, cfg)
    with pytest.raises(RuntimeError, match="returned no student features.*StepOutput"):
        bare.train_forward(images, labels, 1)
    own = _with_dino(OwnDino(student=build_model("resnet8", "cifar100"),
                             teacher=build_model("resnet20", "cifar100")), cfg)
    with pytest.raises(RuntimeError, match="OwnDino already returns a loss term named 'dino'"):
        own.train_forward(images, labels, 1)


ONE_STAGE = {"SSKD": ["SSKD.INIT_EPOCHS", "0"], "FT": ["FT.INIT_EPOCHS", "0"]}


@pytest.mark.parametrize("name", [n for n in DISTILLER_REGISTRY.names() if n.endswith("++")])
def test_every_registered_plus_plus_takes_a_step_with_one_forward(name):
    """Whatever the other methods' files do, X++ returns X's terms, untouched, plus "dino" from X's single
    forward; built as a run builds it, side by side with X from the same seed."""
    meta = toy_meta()
    teacher_state = random_teacher_state("resnet20", "cifar100")
    built = []
    # SSKD's and FT's first epochs train their own module alone (the teacher's SS head, the paraphraser; the student
    # gets no gradient): their distillation stage
    extra = ONE_STAGE.get(name[:-2], [])
    for method in (name, name[:-2]):
        cfg = load_config(None, ["DATASET.TYPE", "cifar100", "DISTILLER.TYPE", method, "DISTILLER.TEACHER",
                                 "resnet20", "DISTILLER.STUDENT", "resnet8", *extra])
        torch.manual_seed(0)
        built.append(build_distiller(cfg, meta, torch.device("cpu"), teacher_state)[0].train())
    d, x = built
    assert type(d) is type(x) and list(d.added_terms) == ["dino"] and not hasattr(x, "added_terms")
    dino_term(d).set_class_means(torch.randn(100, 64), torch.ones(100))
    views = view_recipe(d.train_views)  # a method fed several views per image (MLKD, SSKD): B x V x C x H x W
    shape = (4,) + ((views.num_views,) if views else ()) + (3, 32, 32)
    images, labels, index = torch.randn(*shape), meta.train_targets[:4], torch.arange(4)
    calls, calls_x = {}, {}
    count_calls(calls, student=d.student, teacher=d.teacher)
    count_calls(calls_x, student=x.student, teacher=x.teacher)
    torch.manual_seed(1)  # CRD draws negatives
    terms = d.train_forward(images, labels, 1, index).terms
    torch.manual_seed(1)
    terms_x = x.train_forward(images, labels, 1, index).terms
    # the dino term reads X's own forward: no extra one (one each, or X's per-view passes: MLKD runs two)
    assert calls == calls_x and calls["student"] >= 1 and calls["teacher"] >= 1
    assert calls == {"student": 1, "teacher": 1} or views is not None
    assert list(terms) == list(terms_x) + ["dino"] and terms["dino"].kind == DISTILL and len(terms) >= 2
    for k, term in terms_x.items():
        assert terms[k].kind == term.kind and torch.equal(terms[k].value, term.value), k
    before = [p.detach().clone() for p in d.student.parameters()]
    loss = sum(t.value for t in terms.values())
    assert torch.isfinite(loss)
    loss.backward()
    torch.optim.SGD(d.learnable_parameters(), lr=0.1).step()
    assert any(not torch.equal(a, b) for a, b in zip(before, d.student.parameters()))


def test_class_means_travel_with_the_learnable_state():
    a, cfg = make("KD++")
    dino_term(a).set_class_means(torch.randn(100, 64), torch.arange(100) + 1)
    b, _ = make("KD++")
    assert not bool(dino_term(b).ready)
    b.load_learnable_state_dict(a.learnable_state_dict())
    assert bool(dino_term(b).ready)
    assert torch.equal(dino_term(b).class_means, dino_term(a).class_means)
    assert torch.equal(dino_term(b).class_weights, dino_term(a).class_weights)


def _class_means_run(tmp_path, *overrides):
    """A 60-image CIFAR-100 set (labels 0..59 once each), a random resnet8 teacher checkpoint and a DKD++ config."""
    data = write_cifar100(str(tmp_path), n_train=60, n_test=20)
    torch.manual_seed(0)
    teacher = build_model("resnet8", "cifar100")
    ckpt = tmp_path / "teacher.pth"
    torch.save({"model": teacher.state_dict()}, ckpt)
    cfg = load_config(None, [
        "DATASET.TYPE", "cifar100", "DATASET.ROOT", str(tmp_path), "DATASET.DOWNLOAD", "False",
        "DISTILLER.TYPE", "DKD++", "DISTILLER.TEACHER", "resnet8", "DISTILLER.STUDENT", "resnet8",
        "DISTILLER.TEACHER_CKPT", str(ckpt), "EXPERIMENT.DEVICE", "cpu", "SOLVER.BATCH_SIZE", "16",
        "SOLVER.EPOCHS", "1", "SOLVER.LR_DECAY_STAGES", "[]", "DATASET.TEST.BATCH_SIZE", "7", *overrides])
    return data, teacher, ckpt, cfg


def _normalised(uint8_images):
    from mdistiller.data.cifar100 import MEAN, STD

    x = torch.as_tensor(uint8_images, dtype=torch.float32) / 255
    return (x - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)


def test_trainer_prepares_real_class_means_and_caches_them(tmp_path):
    """Through the builder (build_run), un-augmented recipe: the means are the teacher's features of the training
    images."""
    data, teacher, ckpt, cfg = _class_means_run(tmp_path, "DINO.CLASS_MEANS_AUGMENT", "False",
                                                "DINO.CLASS_MEANS_DECIMALS", "-1")
    run = build_run(cfg)
    d = dino_term(run.distiller)
    assert bool(d.ready)
    images, labels = data["train"]
    teacher.eval()
    with torch.no_grad():
        feats = teacher(_normalised(images))[1]["pooled_feat"]
    expected = torch.zeros(100, feats.shape[1])
    for i, k in enumerate(labels.tolist()):  # 60 images, labels 0..59 once each
        expected[k] = feats[i]
    torch.testing.assert_close(d.class_means, expected, rtol=1e-4, atol=1e-5)
    sha = hashlib.sha256(ckpt.read_bytes()).hexdigest()[:16]
    assert os.path.isfile(f"{ckpt}.class_means.cifar100-n60.{sha}.pt")
    losses = run.trainer.run_step(*next(iter(run.train_loader)), 1).losses
    assert torch.isfinite(losses["dino"]) and losses["dino"] > 0

    computed = []
    real = cm.compute_class_means
    cm.compute_class_means = lambda *a, **k: computed.append(1) or real(*a, **k)
    try:
        again = dino_term(build_run(cfg).distiller)  # a second run on the same teacher: loaded from the cache
    finally:
        cm.compute_class_means = real
    assert computed == [] and torch.equal(again.class_means, d.class_means)


def test_authors_class_means_use_augmented_images_rounded_and_a_fixed_seed(tmp_path):
    """The default recipe (the authors' script): each class mean is the teacher's (eval-mode) feature of one of the
    162 training augmentations of the image - zero-pad 4, a 32x32 crop at one of 9 x 9 offsets, flipped or not -
    with each value rounded to 4 decimals; the pass does not depend on EXPERIMENT.SEED; its cache name differs."""
    data, teacher, ckpt, cfg = _class_means_run(tmp_path)
    means = dino_term(build_run(cfg).distiller).class_means
    images, labels = data["train"]
    padded = torch.nn.functional.pad(torch.as_tensor(images), (4, 4, 4, 4))
    teacher.eval()
    augmented_somewhere = 0
    for i, k in enumerate(labels.tolist()):
        variants = [padded[i, :, dy:dy + 32, dx:dx + 32] for dy in range(9) for dx in range(9)]
        variants += [v.flip(-1) for v in variants]
        with torch.no_grad():
            feats = teacher(_normalised(torch.stack(variants)))[1]["pooled_feat"].double()
        rounded = torch.round(feats * 1e4) / 1e4
        gap = (rounded - means[k].double()).abs().max(dim=1).values
        assert gap.min() < 2e-4, f"class {k}: the mean is none of the image's 162 augmentations"
        augmented_somewhere += int(gap.argmin()) != 4 * 9 + 4  # (4, 4) unflipped is the image itself
    assert augmented_somewhere >= 50
    scaled = means.double() * 1e4
    assert (scaled - scaled.round()).abs().max() < 5e-3  # rounded to 4 decimals (float32 storage)
    sha = hashlib.sha256(ckpt.read_bytes()).hexdigest()[:16]
    cache = f"{ckpt}.class_means.cifar100-n60-aug-r4.{sha}.pt"
    assert os.path.isfile(cache) and not os.path.exists(f"{ckpt}.class_means.cifar100-n60.{sha}.pt")
    os.remove(cache)
    cfg.defrost()
    cfg.EXPERIMENT.SEED = 7
    assert torch.equal(dino_term(build_run(cfg).distiller).class_means, means)


@pytest.mark.slow
def test_train_cli_kdpp_one_epoch_on_fashion_mnist(tmp_path):
    ckpt = tmp_path / "teacher" / "resnet20.pth"
    write_random_teacher(ckpt, "resnet20", "fashion_mnist")
    args = ["--cfg", os.path.join(ROOT, "configs", "fashion_mnist", "kdpp", "resnet20_resnet8.yaml"),
            "SOLVER.EPOCHS", "1", "SOLVER.LR_DECAY_STAGES", "[]", "DATASET.TRAIN_SUBSET", "256",
            "DATASET.TEST_SUBSET", "64", "LOG.PREFIX", str(tmp_path / "out"), "DISTILLER.TEACHER_CKPT", str(ckpt),
            "EXPERIMENT.DEVICE", "cpu", "EXPERIMENT.NAME", "kdpp"]
    run = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "train.py"), *args], capture_output=True,
                         text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "computing them" in (tmp_path / "out" / "kdpp" / "train.log").read_text()  # the run's log (issue 16)
    with open(tmp_path / "out" / "kdpp" / "metrics.jsonl") as f:
        record = json.loads(f.readline())
    assert record["loss/dino"] > 0 and {"loss/ce", "loss/kd"} <= set(record)
    sha = hashlib.sha256(ckpt.read_bytes()).hexdigest()[:16]
    cache = f"{ckpt}.class_means.fashion_mnist-n256.{sha}.pt"  # the proxy recipe: un-augmented means
    assert os.path.isfile(cache)
    tool = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "compute_class_means.py"), *args],
                          capture_output=True, text=True, timeout=600)
    assert tool.returncode == 0, tool.stderr[-2000:]
    assert "loaded from" in tool.stdout + tool.stderr and cache in tool.stdout
