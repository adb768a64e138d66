"""The published code's BatchNorm behaviours, as switches (issue 30):

- OFD.TEACHER_MODE train: mdistiller's OFD keeps the teacher in training mode while distilling. After a step the
  teacher's first BN has running_mean = (1 - momentum) * old + momentum * batch mean, the batch mean computed here
  from the stem convolution written out; "eval" leaves every teacher buffer alone; the OFD term equals a plain
  implementation whose teacher features come from a training-mode forward of a copy of the teacher; the moving
  statistics are checkpointed, and a run resumed after an epoch ends with the teacher statistics (and student) of
  an uninterrupted one; DDP broadcasts them; the int8 teacher is refused with it.
- FITNET.PROBE / VID.PROBE published: mdistiller's get_feat_shapes, one torch.randn(1, 3, 32, 32) image through the
  student and the teacher in training mode under no_grad: every BN buffer of both equals that of a plain forward of
  that image written here; "clean" touches none.
- Which configs set the published behaviour, and each switch trained for 2 epochs through tools/train.py.

Models are float64 here wherever numbers are compared, so no bound depends on the CPU's float32 kernels.
"""

import copy
import json
import math
import os
import subprocess
import sys

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from mdistiller.bench.random_teacher import write_random_teacher
from mdistiller.config import load_config
from mdistiller.distillers.fitnet import FitNet
from mdistiller.distillers.ofd import OFD
from mdistiller.distillers.vid import VID
from mdistiller.engine.ddp_wrap import TrainForward, _ignored_state
from mdistiller.engine.launch import train_from_config
from mdistiller.models import build_model
from mdistiller.utils.errors import ConfigError
from test_engine import CrashAfterEpoch  # a run killed right after an epoch's checkpoint

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FM = os.path.join(ROOT, "configs", "fashion_mnist")


def models(teacher="resnet20", student="resnet8"):
    """(teacher, student) in float64; the teacher's BNs away from their init (stored statistics and affine), so
    that a moved statistic and the margins are not trivially 0 / 1."""
    torch.manual_seed(0)
    t, s = build_model(teacher, "cifar100"), build_model(student, "cifar100")
    with torch.no_grad():
        for m in t.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.3, 0.3)
    return t.double(), s.double()


def batch(n=6, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 32, 32, generator=g, dtype=torch.float64), torch.randint(0, 100, (n,), generator=g)


def buffers(model):
    return {k: v.clone() for k, v in model.named_buffers()}


# --- OFD.TEACHER_MODE ----------------------------------------------------------------------------------------------

def test_train_mode_teacher_bn_moves_by_torchs_rule_and_stays_frozen():
    t, s = models()
    d = OFD(student=s, teacher=t, teacher_mode="train").double()
    d.train()
    teacher = d.teacher.model
    assert teacher.training and all(not p.requires_grad for p in d.teacher.parameters())
    bn = teacher.bn1
    old_mean, old_var = bn.running_mean.clone(), bn.running_var.clone()
    x, y = batch()
    out = d.train_forward(x, y, epoch=1)
    # by hand: the stem convolution (3x3, padding 1, no bias), its per-channel batch mean and unbiased variance
    w = teacher.conv1.weight
    z = torch.zeros(x.shape[0], w.shape[0], 32, 32, dtype=torch.float64)
    padded = F.pad(x, (1, 1, 1, 1))
    for dy in range(3):
        for dx in range(3):
            z += torch.einsum("oc,nchw->nohw", w[:, :, dy, dx], padded[:, :, dy:dy + 32, dx:dx + 32])
    count = z.shape[0] * z.shape[2] * z.shape[3]
    mean = z.sum(dim=(0, 2, 3)) / count
    var = ((z - mean[None, :, None, None]) ** 2).sum(dim=(0, 2, 3)) / (count - 1)
    m = bn.momentum
    assert torch.allclose(bn.running_mean, (1 - m) * old_mean + m * mean, rtol=1e-10, atol=1e-12)
    assert torch.allclose(bn.running_var, (1 - m) * old_var + m * var, rtol=1e-10, atol=1e-12)
    assert int(bn.num_batches_tracked) == 1
    assert not torch.allclose(bn.running_mean, old_mean)  # the check above tells a moved statistic apart
    out.terms["ofd"].value.backward()
    assert all(p.grad is None for p in d.teacher.parameters())
    d.eval()
    assert not teacher.training  # evaluation: the teacher follows the distiller back to eval


def test_eval_mode_teacher_buffers_do_not_move():
    t, s = models()
    d = OFD(student=s, teacher=t).double()  # the key's default
    assert d.teacher_mode == "eval"
    d.train()
    assert not d.teacher.model.training
    before = buffers(d.teacher)
    x, y = batch()
    d.train_forward(x, y, epoch=1)
    after = buffers(d.teacher)
    assert all(torch.equal(before[k], after[k]) for k in before)


def gaussian_margin(gamma, beta):
    """E[x | x < 0] for x ~ N(beta, gamma^2), -3|gamma| where P(x < 0) <= 0.001 (the published fallback)."""
    s, mu = abs(gamma), beta
    p = 0.5 * math.erfc(mu / s / math.sqrt(2))
    if p > 0.001:
        return mu - s * math.exp(-(mu / s) ** 2 / 2) / math.sqrt(2 * math.pi) / p
    return -3 * s


def plain_connector(f, conv, bn):
    """1x1 conv, then training-mode BN (batch mean, biased variance) with the BN's affine."""
    r = torch.einsum("oc,nchw->nohw", conv.weight[:, :, 0, 0], f)
    count = r.shape[0] * r.shape[2] * r.shape[3]
    mean = r.sum(dim=(0, 2, 3)) / count
    var = ((r - mean[None, :, None, None]) ** 2).sum(dim=(0, 2, 3)) / count
    r = (r - mean[None, :, None, None]) / torch.sqrt(var[None, :, None, None] + bn.eps)
    return r * bn.weight[None, :, None, None] + bn.bias[None, :, None, None]


def plain_partial_l2(s, t, margin):
    """The paper's margin ReLU target max(t, m), distance 0 where s <= target <= 0; batch mean of the sum."""
    target = torch.maximum(t, margin)
    skip = (s <= target) & (target <= 0)
    return torch.where(skip, torch.zeros_like(s), (s - target) ** 2).sum() / s.shape[0]


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_ofd_term_equals_a_plain_implementation_with_the_teacher_run_by_hand(mode):
    t, s = models()
    t_copy = copy.deepcopy(t)
    d = OFD(student=s, teacher=t, teacher_mode=mode, feat_weight=0.001).double()
    d.train()
    x, y = batch()
    out = d.train_forward(x, y, epoch=1)
    # the teacher run by hand: a copy in the mode asked for, under no_grad
    t_copy.train(mode == "train")
    with torch.no_grad():
        _, ft = t_copy(x)
    pre_t = ft["preact_feats"][1:]
    pre_s = [f.detach() for f in out.student_features["preact_feats"][1:]]
    bns = t_copy.bn_before_relu()
    expected = 0.0
    for i, (f_s, f_t, bn) in enumerate(zip(pre_s, pre_t, bns)):  # resnet20 / resnet8: 3 stages, equal sizes
        margin = torch.tensor([gaussian_margin(g, b) for g, b in zip(bn.weight.tolist(), bn.bias.tolist())],
                              dtype=torch.float64).view(1, -1, 1, 1)
        conv, cbn = d.connectors[i]
        expected += plain_partial_l2(plain_connector(f_s, conv, cbn), f_t, margin.expand_as(f_t)) / 2 ** (2 - i)
    assert out.terms["ofd"].value.item() == pytest.approx(0.001 * expected.item(), rel=1e-9)
    # the distiller's teacher features are the ones run by hand (batch statistics in train mode)
    assert all(torch.allclose(a, b, rtol=1e-12, atol=1e-12)
               for a, b in zip(out.teacher_features["preact_feats"], ft["preact_feats"]))


def test_train_mode_features_use_batch_statistics():
    """The two modes give different teacher features on the same batch (the stored statistics are not the batch's)."""
    x, y = batch()
    outs = {}
    for mode in ("train", "eval"):
        t, s = models()
        d = OFD(student=s, teacher=t, teacher_mode=mode).double().train()
        outs[mode] = d.train_forward(x, y, epoch=1).teacher_features["preact_feats"][-1]
    assert not torch.allclose(outs["train"], outs["eval"])


def test_inference_mode_teacher_updates_the_same_statistics():
    """SPEED.TEACHER_INFERENCE_MODE (on by default): the running statistics move as under no_grad and stay
    ordinary tensors, and the loss is the same."""
    x, y = batch()
    results = []
    for inference in (False, True):
        t, s = models()
        d = OFD(student=s, teacher=t, teacher_mode="train").double()
        d.teacher.run_in(inference)
        d.train()
        loss = d.train_forward(x, y, epoch=1).terms["ofd"].value
        loss.backward()
        results.append((loss.item(), buffers(d.teacher)))
    (loss_a, buf_a), (loss_b, buf_b) = results
    assert loss_a == loss_b
    assert all(torch.equal(buf_a[k], buf_b[k]) and not buf_b[k].is_inference() for k in buf_a)


def test_train_mode_checkpoints_the_teachers_statistics():
    t, s = models()
    d = OFD(student=s, teacher=t, teacher_mode="train").double().train()
    x, y = batch()
    d.train_forward(x, y, epoch=1)
    state = d.learnable_state_dict()
    assert "teacher.model.bn1.running_mean" in state and "teacher.model.bn1.num_batches_tracked" in state
    assert not any(k.startswith("teacher.") and k.endswith((".weight", ".bias")) for k in state)
    t2, s2 = models()
    fresh = OFD(student=s2, teacher=t2, teacher_mode="train").double()
    fresh.load_learnable_state_dict(state)
    assert all(torch.equal(v, buffers(fresh.teacher)[k]) for k, v in buffers(d.teacher).items())
    t3, s3 = models()
    assert not any(k.startswith("teacher.") for k in OFD(student=s3, teacher=t3).learnable_state_dict())


def test_ddp_broadcasts_a_moving_teachers_bn_statistics_only():
    for mode, broadcast in (("train", True), ("eval", False)):
        t, s = models()
        ignored = set(_ignored_state(TrainForward(OFD(student=s, teacher=t, teacher_mode=mode))))
        assert ("distiller.teacher.model.bn1.running_mean" not in ignored) == broadcast
        assert "distiller.teacher.model.conv1.weight" in ignored
        assert "distiller.student.bn1.running_mean" not in ignored


def test_config_values_and_the_int8_teacher():
    for key, value in (("OFD.TEACHER_MODE", "training"), ("FITNET.PROBE", "mdistiller"), ("VID.PROBE", "yes")):
        with pytest.raises(ConfigError, match=key):
            load_config(None, ["DISTILLER.TYPE", key.split(".")[0], key, value])
    with pytest.raises(ConfigError, match="SPEED.TEACHER_INT8"):
        load_config(None, ["DISTILLER.TYPE", "OFD", "OFD.TEACHER_MODE", "train", "SPEED.TEACHER_INT8", "True",
                           "EXPERIMENT.DEVICE", "cpu"])
    load_config(None, ["DISTILLER.TYPE", "OFD", "SPEED.TEACHER_INT8", "True", "EXPERIMENT.DEVICE", "cpu"])


def _small(config, prefix, name, *extra):
    return load_config(config, ["LOG.PREFIX", str(prefix), "EXPERIMENT.NAME", name, "EXPERIMENT.DEVICE", "cpu",
                                "DATASET.TRAIN_SUBSET", "192", "DATASET.TEST_SUBSET", "64", "SOLVER.EPOCHS", "2",
                                "SOLVER.LR_DECAY_STAGES", "[]", *extra])


@pytest.mark.slow
@pytest.mark.kernels
def test_train_mode_resume_continues_the_teachers_statistics_exactly(tmp_path):
    ckpt = write_random_teacher(tmp_path / "teacher.pth", "resnet20", "fashion_mnist")
    extra = ("DISTILLER.TEACHER_CKPT", ckpt, "OFD.TEACHER_MODE", "train")
    config = os.path.join(FM, "ofd", "resnet20_resnet8.yaml")
    train_from_config(_small(config, tmp_path, "straight", *extra))
    with pytest.raises(KeyboardInterrupt):
        train_from_config(_small(config, tmp_path, "crashed", *extra), extra_hooks=[CrashAfterEpoch(1)])
    train_from_config(_small(config, tmp_path, "crashed", *extra), resume=True)
    a = torch.load(tmp_path / "straight" / "latest.pth", weights_only=False)
    b = torch.load(tmp_path / "crashed" / "latest.pth", weights_only=False)
    teacher_keys = [k for k in a["distiller"] if k.startswith("teacher.")]
    assert "teacher.model.bn1.running_mean" in teacher_keys
    assert set(a["distiller"]) == set(b["distiller"])
    for key in a["distiller"]:
        assert torch.equal(a["distiller"][key], b["distiller"][key]), key
    loaded = torch.load(ckpt)["model"]
    assert not torch.equal(a["distiller"]["teacher.model.bn1.running_mean"], loaded["bn1.running_mean"])
    assert int(a["distiller"]["teacher.model.bn1.num_batches_tracked"]) == 2 * 3  # 2 epochs of 192 / 64 steps


# --- FITNET.PROBE / VID.PROBE ----------------------------------------------------------------------------------------

def build(method, student, teacher, probe):
    if method == "FITNET":
        return FitNet(student=student, teacher=teacher, image_size=32, probe=probe)
    return VID(student=student, teacher=teacher, probe=probe, image_size=32)


@pytest.mark.parametrize("method", ["FITNET", "VID"])
def test_published_probe_moves_bn_statistics_as_one_training_forward_of_its_image(method):
    t, s = models()
    t_ref, s_ref = copy.deepcopy(t), copy.deepcopy(s)
    old_mean, old_var = t.bn1.running_mean.clone(), t.bn1.running_var.clone()
    torch.manual_seed(5)
    d = build(method, s, t, "published")
    # the plain expectation: mdistiller's probe image, through the student, then the teacher, in training mode
    torch.manual_seed(5)
    x = torch.randn(1, 3, 32, 32).double()
    with torch.no_grad():
        s_ref.train()(x)
        t_ref.train()(x)
    for mine, ref in ((d.teacher.model, t_ref), (d.student, s_ref)):
        got, want = buffers(mine), buffers(ref)
        assert got.keys() == want.keys()
        assert all(torch.equal(got[k], want[k]) for k in want)
    # the teacher's first BN by torch's rule, its batch statistics computed here from the stem convolution
    z = F.conv2d(x, t_ref.conv1.weight, padding=1)
    mean, var = z.mean(dim=(0, 2, 3)), z.var(dim=(0, 2, 3), unbiased=True)
    bn = d.teacher.model.bn1
    assert torch.allclose(bn.running_mean, 0.9 * old_mean + 0.1 * mean, rtol=1e-10, atol=1e-12)
    assert torch.allclose(bn.running_var, 0.9 * old_var + 0.1 * var, rtol=1e-10, atol=1e-12)
    assert int(bn.num_batches_tracked) == 1 and int(d.student.bn1.num_batches_tracked) == 1
    # each model back in its mode: the teacher distils in eval mode with the moved statistics
    assert not d.teacher.model.training and d.student.training
    d.train()
    assert not d.teacher.model.training


@pytest.mark.parametrize("method", ["FITNET", "VID"])
def test_clean_probe_touches_no_statistic(method):
    t, s = models()
    before_t, before_s = buffers(t), buffers(s)
    d = build(method, s, t, "clean")
    assert all(torch.equal(before_t[k], v) for k, v in buffers(d.teacher.model).items())
    assert all(torch.equal(before_s[k], v) for k, v in buffers(d.student).items())


def test_published_probe_sizes_the_same_regressor():
    shapes = {}
    for probe in ("clean", "published"):
        t, s = models()
        r = build("FITNET", s, t, probe).regressor
        shapes[probe] = (type(r.conv), r.conv.weight.shape)
    assert shapes["clean"] == shapes["published"]


# --- configs ---------------------------------------------------------------------------------------------------------

def _configs(dataset, method):
    folder = os.path.join(ROOT, "configs", dataset, method)
    return [os.path.join(folder, f) for f in sorted(os.listdir(folder)) if f.endswith(".yaml")]


def test_configs_reproducing_mdistiller_set_the_published_behaviour():
    # mdistiller's OFD (CIFAR-100 and its ImageNet settings) and FitNet: published
    for path in _configs("cifar100", "ofd") + _configs("imagenet", "ofd"):
        assert load_config(path).OFD.TEACHER_MODE == "train", path
    for path in _configs("cifar100", "fitnet"):
        assert load_config(path).FITNET.PROBE == "published", path
    # VID's configs follow RepDistiller (learned variances; its probe runs in eval mode): clean
    for path in _configs("cifar100", "vid"):
        assert load_config(path).VID.PROBE == "clean", path
    # the Fashion-MNIST proxy configs keep what their recorded numbers were trained with
    assert load_config(os.path.join(FM, "ofd", "resnet20_resnet8.yaml")).OFD.TEACHER_MODE == "eval"
    assert load_config(os.path.join(FM, "fitnet", "resnet20_resnet8.yaml")).FITNET.PROBE == "clean"
    assert load_config(os.path.join(FM, "vid", "resnet20_resnet8.yaml")).VID.PROBE == "clean"


# --- through tools/train.py ------------------------------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("method,switch,terms,line", [
    ("ofd", ("OFD.TEACHER_MODE", "train"), ("ce", "ofd"), "OFD.TEACHER_MODE train"),
    ("fitnet", ("FITNET.PROBE", "published"), ("ce", "fitnet"), "FITNET.PROBE published"),
    ("vid", ("VID.PROBE", "published"), ("ce", "vid"), "VID.PROBE published"),
])
def test_switch_trains_two_epochs_through_the_cli(method, switch, terms, line, tmp_path):
    ckpt = write_random_teacher(tmp_path / "teacher.pth", "resnet20", "fashion_mnist")
    run = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "train.py"), "--cfg",
                          os.path.join(FM, method, "resnet20_resnet8.yaml"), "SOLVER.EPOCHS", "2",
                          "SOLVER.LR_DECAY_STAGES", "[]", "DATASET.TRAIN_SUBSET", "128", "DATASET.TEST_SUBSET", "64",
                          "LOG.PREFIX", str(tmp_path / "out"), "EXPERIMENT.NAME", "r", "DISTILLER.TEACHER_CKPT", ckpt,
                          "EXPERIMENT.DEVICE", "cpu", *switch], capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert run.returncode == 0, run.stderr[-2000:]
    with open(tmp_path / "out" / "r" / "metrics.jsonl") as f:
        records = [json.loads(r) for r in f]
    assert len(records) == 2
    for record in records:
        assert all(math.isfinite(record[f"loss/{name}"]) and record[f"loss/{name}"] > 0 for name in terms)
    log = (tmp_path / "out" / "r" / "train.log").read_text()
    assert line in log
