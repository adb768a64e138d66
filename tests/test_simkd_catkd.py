"""SimKD and CAT-KD: each loss recomputed in float64 by explicit loops from the authors' definitions (never calling
the library's losses), SimKD's evaluation logits (the teacher's own classifier on the pooled projected student map,
computed here from the teacher model's module), CAT-KD's CAMs from the classifier weights, which parameters each
term trains, and config errors."""

import math

import pytest
import torch
import torch.nn.functional as F

from mdistiller.config import load_config
from mdistiller.distillers import DISTILLER_REGISTRY
from mdistiller.distillers.catkd import CATKD
from mdistiller.distillers.simkd import SimKD
from mdistiller.models import build_model
from mdistiller.utils.errors import ConfigError


def make(method, teacher, student, *overrides):
    cfg = load_config(None, ["DISTILLER.TYPE", method, "DISTILLER.TEACHER", teacher, "DISTILLER.STUDENT", student,
                             *overrides])
    cls = {"SIMKD": SimKD, "CATKD": CATKD}[method]
    return cls.build(cfg, build_model(student, "cifar100"), build_model(teacher, "cifar100"), None)


# ---- plain formulas (float64, loops) ----

def plain_block_mean(x, out_h, out_w):
    """Adaptive average pooling where the size divides evenly: the mean of each (H/out_h) x (W/out_w) block."""
    n, c, h, w = x.shape
    bh, bw = h // out_h, w // out_w
    out = torch.zeros(n, c, out_h, out_w, dtype=torch.float64)
    for i in range(n):
        for j in range(c):
            for a in range(out_h):
                for b in range(out_w):
                    s = 0.0
                    for y in range(a * bh, (a + 1) * bh):
                        for x_ in range(b * bw, (b + 1) * bw):
                            s += float(x[i, j, y, x_])
                    out[i, j, a, b] = s / (bh * bw)
    return out


def plain_mse(a, b):
    total, count = 0.0, 0
    for u, v in zip(a.reshape(-1).tolist(), b.reshape(-1).tolist()):
        total += (u - v) ** 2
        count += 1
    return total / count


def plain_cams(fmap, weight):
    """CAM[i, k, y, x] = sum_c weight[k, c] * fmap[i, c, y, x] (the classifier as a bias-free 1x1 conv)."""
    fmap, weight = fmap.detach().double(), weight.detach().double()
    n, c, h, w = fmap.shape
    k = weight.shape[0]
    out = torch.zeros(n, k, h, w, dtype=torch.float64)
    for i in range(n):
        for y in range(h):
            for x in range(w):
                v = fmap[i, :, y, x]
                for cls in range(k):
                    out[i, cls, y, x] = sum(float(weight[cls, j]) * float(v[j]) for j in range(c))
    return out


def plain_normalize_positions(x):
    """Each (sample, class) map divided by its L2 norm over positions (torch's eps 1e-12 floor)."""
    out = x.clone()
    n, c = x.shape[:2]
    for i in range(n):
        for j in range(c):
            norm = math.sqrt(sum(float(v) ** 2 for v in x[i, j].reshape(-1)))
            out[i, j] = x[i, j] / max(norm, 1e-12)
    return out


def plain_cat(cams_s, cams_t, resolution, normalize):
    s, t = plain_block_mean(cams_s, resolution, resolution), plain_block_mean(cams_t, resolution, resolution)
    if normalize:
        s, t = plain_normalize_positions(s), plain_normalize_positions(t)
    return plain_mse(s, t)


# ---- SimKD ----

def test_simkd_projector_is_the_published_transfer():
    d = make("SIMKD", "resnet32x4", "resnet8", "SIMKD.FACTOR", "2")
    layers = list(d.projector)
    kinds = [type(m).__name__ for m in layers]
    assert kinds == ["Conv2d", "BatchNorm2d", "ReLU"] * 3
    c1, c2, c3 = layers[0], layers[3], layers[6]
    assert (c1.in_channels, c1.out_channels, c1.kernel_size) == (64, 128, (1, 1))  # student 64 -> teacher 256 / 2
    assert (c2.in_channels, c2.out_channels, c2.kernel_size, c2.padding, c2.groups) == (128, 128, (3, 3), (1, 1), 1)
    assert (c3.in_channels, c3.out_channels, c3.kernel_size) == (128, 256, (1, 1))
    assert all(c.bias is None for c in (c1, c2, c3))


def test_simkd_loss_and_prediction_by_loops():
    torch.manual_seed(0)
    d = make("SIMKD", "resnet20", "resnet8")
    d.eval()  # fixed BN: the projector gives the same map in every call
    images, labels = torch.randn(2, 3, 32, 32), torch.tensor([3, 7])
    out = d.train_forward(images, labels, epoch=1)
    assert set(out.terms) == {"simkd"}  # the published run has no CE (-c 0 -d 0)
    _, feats_s = d.student(images)
    _, feats_t = d.teacher.model(images)
    with torch.no_grad():
        projected = d.projector(feats_s["feats"][-1]).double()  # same 8x8 size: no pooling
    ref = plain_mse(projected, feats_t["feats"][-1].double())
    assert out.terms["simkd"].value.item() == pytest.approx(ref, rel=1e-6)
    assert out.terms["simkd"].kind == "distill"
    # the prediction: the teacher model's own fc on the spatial mean of the projected map
    fc = d.teacher.model.fc
    n, c, h, w = projected.shape
    logits_ref = torch.zeros(n, fc.out_features, dtype=torch.float64)
    for i in range(n):
        pooled = [sum(float(projected[i, j].reshape(-1)[p]) for p in range(h * w)) / (h * w) for j in range(c)]
        for k in range(fc.out_features):
            logits_ref[i, k] = sum(float(fc.weight[k, j]) * pooled[j] for j in range(c)) + float(fc.bias[k])
    torch.testing.assert_close(out.logits.double(), logits_ref, rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        torch.testing.assert_close(d(images).double(), logits_ref, rtol=1e-5, atol=1e-5)


def test_simkd_pools_the_larger_map_to_the_smaller():
    torch.manual_seed(0)
    d = make("SIMKD", "resnet20", "vgg8")  # vgg8's last map is smaller than resnet20's 8x8
    d.eval()
    images = torch.randn(2, 3, 32, 32)
    out = d.train_forward(images, torch.tensor([0, 1]), epoch=1)
    _, feats_s = d.student(images)
    _, feats_t = d.teacher.model(images)
    fs, ft = feats_s["feats"][-1], feats_t["feats"][-1]
    assert fs.shape[-1] < ft.shape[-1]
    target = plain_block_mean(ft, fs.shape[-2], fs.shape[-1])
    with torch.no_grad():
        projected = d.projector(fs).double()
    assert out.terms["simkd"].value.item() == pytest.approx(plain_mse(projected, target), rel=1e-6)
    with torch.no_grad():  # evaluation without the teacher gives the same prediction
        torch.testing.assert_close(d(images), out.logits, rtol=1e-5, atol=1e-6)


def test_simkd_wrn_taps_are_the_maps_the_classifiers_pool():
    d = make("SIMKD", "wrn_40_2", "wrn_16_2")
    assert (d.tap_s, d.tap_t) == ("relu_preact", "relu_preact")  # relu(bn1(block3)): what fc pools


def test_simkd_trains_student_and_projector_never_the_classifiers():
    torch.manual_seed(0)
    d = make("SIMKD", "resnet20", "resnet8")
    d.train()
    out = d.train_forward(torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 3]), epoch=1)
    out.terms["simkd"].value.backward()
    for name, p in d.projector.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    student = dict(d.student.named_parameters())
    assert student["conv1.weight"].grad.abs().sum() > 0
    assert not student["fc.weight"].requires_grad and student["fc.weight"].grad is None  # unused, frozen
    assert all(p.grad is None and not p.requires_grad for p in d.teacher.parameters())
    learnable = {id(p) for p in d.learnable_parameters()}
    assert id(student["fc.weight"]) not in learnable
    assert "classifier_weight" in d.learnable_state_dict()  # the checkpoint carries SimKD's whole inference path
    assert not any(n.startswith("classifier") for n, _ in d.named_parameters())
    assert DISTILLER_REGISTRY.get("SIMKD").ramped_terms == ("simkd",)


def test_simkd_ce_option_is_on_the_students_own_logits():
    torch.manual_seed(0)
    d = make("SIMKD", "resnet20", "resnet8", "SIMKD.LOSS.CE_WEIGHT", "0.5", "SIMKD.LOSS.FEAT_WEIGHT", "2.0")
    d.eval()
    images, labels = torch.randn(2, 3, 32, 32), torch.tensor([1, 2])
    out = d.train_forward(images, labels, epoch=1)
    logits_s, _ = d.student(images)
    assert out.terms["ce"].kind == "task"
    assert out.terms["ce"].value.item() == pytest.approx(0.5 * F.cross_entropy(logits_s, labels).item(), rel=1e-6)
    assert d.student.fc.weight.requires_grad


@pytest.mark.parametrize("key,value,match", [
    ("SIMKD.FACTOR", "0", "SIMKD.FACTOR"),
    ("SIMKD.LOSS.CE_WEIGHT", "-1.0", "SIMKD.LOSS.CE_WEIGHT"),
    ("SIMKD.LOSS.FEAT_WEIGHT", "0.0", "SIMKD.LOSS.FEAT_WEIGHT"),
])
def test_simkd_config_errors(key, value, match):
    with pytest.raises(ConfigError, match=match):
        load_config(None, ["DISTILLER.TYPE", "SIMKD", key, value])


def test_simkd_refuses_a_teacher_whose_classifier_pools_no_tap():
    with pytest.raises(ConfigError, match="DISTILLER.TEACHER"):
        make("SIMKD", "MobileNetV2", "resnet8")


# ---- CAT-KD ----

@pytest.mark.parametrize("resolution,normalize", [(2, False), (2, True), (4, True)])
def test_cat_loss_by_loops(resolution, normalize):
    from mdistiller.distillers.catkd import cat_loss
    g = torch.Generator().manual_seed(1)
    cams_s, cams_t = torch.randn(2, 3, 8, 8, generator=g), torch.randn(2, 3, 8, 8, generator=g)
    got = cat_loss(cams_s.double(), cams_t.double(), resolution, normalize).item()
    assert got == pytest.approx(plain_cat(cams_s, cams_t, resolution, normalize), rel=1e-9)


@pytest.mark.parametrize("student", ["resnet8", "MobileNetV2"])  # a feature tap; the avgpool-hook path
def test_catkd_term_and_cams_by_loops(student):
    torch.manual_seed(0)
    d = make("CATKD", "resnet20", student, "CATKD.LOSS.CAT_WEIGHT", "3.0", "CATKD.CAM_RESOLUTION", "2",
             "CATKD.NORMALIZE", "True")
    d.eval()
    images, labels = torch.randn(2, 3, 32, 32), torch.tensor([4, 9])
    out = d.train_forward(images, labels, epoch=1)
    logits_s, feats_s = d.student(images)
    d.forward(images)  # drops the hooked map of the forward above
    _, feats_t = d.teacher.model(images)
    with torch.no_grad():
        map_s = feats_s["feats"][-1] if student == "resnet8" else d.student.conv2(feats_s["feats"][-1])
    fc_s = d.student.fc if student == "resnet8" else d.student.classifier[0]
    cams_s = plain_cams(map_s, fc_s.weight.detach())
    cams_t = plain_cams(feats_t["feats"][-1], d.teacher.model.fc.weight)  # the teacher's own fc, no bias
    ref = 3.0 * plain_cat(cams_s, cams_t, 2, True)
    assert out.terms["cat"].value.item() == pytest.approx(ref, rel=1e-5)
    assert out.terms["cat"].kind == "distill"
    assert out.terms["ce"].value.item() == pytest.approx(F.cross_entropy(logits_s, labels).item(), rel=1e-6)
    # the published student's logits are the spatial mean of its CAMs (bias-free classifier)
    torch.testing.assert_close(logits_s.double().detach(), cams_s.mean(dim=(2, 3)), rtol=1e-5, atol=1e-5)


def test_catkd_trains_student_never_teacher_nor_the_bias():
    torch.manual_seed(0)
    d = make("CATKD", "resnet20", "resnet8")
    d.train()
    out = d.train_forward(torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 3]), epoch=1)
    out.terms["cat"].value.backward()
    student = dict(d.student.named_parameters())
    assert student["conv1.weight"].grad.abs().sum() > 0
    assert student["fc.weight"].grad.abs().sum() > 0  # the student's CAMs are made with its classifier
    assert not student["fc.bias"].requires_grad and float(student["fc.bias"].abs().sum()) == 0.0
    assert all(p.grad is None and not p.requires_grad for p in d.teacher.parameters())
    assert not d.teacher_weight.requires_grad and "teacher_weight" not in d.learnable_state_dict()
    assert DISTILLER_REGISTRY.get("CATKD").ramped_terms == ("cat",)


def test_catkd_head_init_and_options():
    torch.manual_seed(0)
    d = make("CATKD", "resnet32x4", "resnet8x4")
    assert d.student.fc.weight.std().item() == pytest.approx(math.sqrt(2.0 / 100), rel=0.05)  # N(0, 2 / classes)
    d = make("CATKD", "resnet20", "resnet8", "CATKD.ONLY_CAT", "True", "CATKD.BINARIZE", "True")
    d.eval()
    out = d.train_forward(torch.randn(2, 3, 32, 32), torch.tensor([0, 1]), epoch=1)
    assert set(out.terms) == {"cat"}
    cams = torch.randn(2, 3, 4, 4, dtype=torch.float64)
    from mdistiller.distillers.catkd import binarize
    ref = torch.zeros_like(cams)
    for i in range(2):
        for j in range(3):
            thr = sum(abs(float(v)) for v in cams[i, j].reshape(-1)) / 16
            for y in range(4):
                for x in range(4):
                    ref[i, j, y, x] = 1.0 if float(cams[i, j, y, x]) - thr > 0 else 0.0
    torch.testing.assert_close(binarize(cams), ref)


@pytest.mark.parametrize("overrides,match", [
    (["CATKD.CAM_RESOLUTION", "0"], "CATKD.CAM_RESOLUTION"),
    (["CATKD.LOSS.CAT_WEIGHT", "0.0"], "CATKD.LOSS.CAT_WEIGHT"),
    (["CATKD.LOSS.CE_WEIGHT", "-1.0"], "CATKD.LOSS.CE_WEIGHT"),
    (["CATKD.HEAD_INIT", "xavier"], "CATKD.HEAD_INIT"),
    (["CATKD.ONLY_CAT", "True", "CATKD.LOSS.CE_WEIGHT", "0.5"], "CATKD.ONLY_CAT"),
])
def test_catkd_config_errors(overrides, match):
    with pytest.raises(ConfigError, match=match):
        load_config(None, ["DISTILLER.TYPE", "CATKD", *overrides])


def test_simkd_student_file_evaluates_through_the_method_and_cannot_be_a_teacher(small_teacher_ckpt, tmp_path):
    """A SimKD run's student_*.pth carries the method's state: tools/eval.py --run-config reproduces the run's own
    top-1 (projector and teacher classifier included, computed here a second way from the file), without
    --run-config it says what to add, and as a teacher checkpoint it is refused in one line."""
    import json
    import os
    import subprocess
    import sys

    from cli_runs import FM_CONFIGS, ROOT, SMALL, train_main
    from mdistiller.data import build_dataloaders
    from mdistiller.utils.checkpoint import load_weights
    from mdistiller.utils.errors import CheckpointError

    cfg_path = os.path.join(FM_CONFIGS, "simkd", "resnet20_resnet8.yaml")
    train_main()(["--cfg", cfg_path, "LOG.PREFIX", str(tmp_path), "EXPERIMENT.NAME", "run",
                  "DISTILLER.TEACHER_CKPT", small_teacher_ckpt, *SMALL])
    run = tmp_path / "run"
    summary = json.loads((run / "summary.json").read_text())
    saved = torch.load(run / "student_last.pth", weights_only=True)
    assert saved["method"] == "SIMKD" and any(k.startswith("projector.") for k in saved["method_state"])

    # the run's accuracy recounted here: the student's last map, projector, spatial mean, teacher classifier
    cfg = load_config(str(run / "config.yaml"), validate=False)
    _, loader, meta = build_dataloaders(cfg, torch.device("cpu"), only_test=True)
    student = build_model("resnet8", num_classes=meta.num_classes, image_size=meta.image_size)
    student.load_state_dict({k[len("student."):]: v for k, v in saved["method_state"].items()
                             if k.startswith("student.")})
    projector = __import__("mdistiller.distillers.simkd", fromlist=["x"]).simkd_projector(64, 64, 2)
    projector.load_state_dict({k[len("projector."):]: v for k, v in saved["method_state"].items()
                               if k.startswith("projector.")})
    layout = torch.channels_last if summary["speed"]["channels_last"] else torch.contiguous_format  # the run's
    student.eval().to(memory_format=layout), projector.eval().to(memory_format=layout)
    w, b = saved["method_state"]["classifier_weight"], saved["method_state"]["classifier_bias"]
    correct = total = 0
    with torch.no_grad():
        for images, labels, _ in loader:
            _, feats = student(images.contiguous(memory_format=layout))
            logits = projector(feats["feats"][-1]).mean(dim=(2, 3)) @ w.t() + b
            correct += int((logits.argmax(1) == labels).sum())
            total += labels.numel()
    assert summary["last_top1"] == pytest.approx(100.0 * correct / total, abs=1e-9)

    env = {**os.environ, "PYTHONPATH": ROOT}
    ev = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "eval.py"), "-c", str(run / "student_last.pth"),
                         "--run-config", str(run / "config.yaml"), "--json"], capture_output=True, text=True,
                        env=env, cwd=ROOT)
    assert ev.returncode == 0, ev.stderr
    assert json.loads(ev.stdout.strip().splitlines()[-1])["top1"] == pytest.approx(summary["last_top1"], abs=1e-9)
    bare = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "eval.py"), "-m", "resnet8", "-c",
                           str(run / "student_last.pth")], capture_output=True, text=True, env=env, cwd=ROOT)
    assert bare.returncode != 0 and "--run-config" in bare.stderr and "Traceback" not in bare.stderr
    with pytest.raises(CheckpointError, match="cannot be a teacher"):
        load_weights(build_model("resnet8", num_classes=10, image_size=28), str(run / "student_last.pth"), "resnet8")
