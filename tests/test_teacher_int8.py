"""SPEED.TEACHER_INT8 (engine/teacher_int8.py): the teacher's forward becomes a calibrated int8 graph, and only
its forward: the same module, the same state_dict, float32 outputs near the float32 teacher's.

Tolerances, for the tiny run of test_speed_switches (resnet20 with random weights, real Fashion-MNIST images):
  - teacher logits within 10% relative L2 of the float32 teacher's (measured 5.4%), every feature map within 15%
    (measured at most 9.0%): int8 keeps 256 levels per tensor, and a random teacher's activations are badly
    spread over them. On the proxy study's trained resnet20 the test-set logits moved 3.2%, 98.8% of the argmaxes
    agreed and top-1 went 86.73 -> 86.58 (README, "Speed").
  - the KD run's total loss within 5% of the float32 run's at each of 3 steps (measured 2.7%, 1.8%, 1.3%).
Calibration reads the un-augmented training images in index order, so two runs built from one config get
bit-identical int8 teachers; that is what makes a resumed run continue exactly. The int8 graph replaces the
forward of the teacher model inside the FrozenTeacher (`distiller.teacher.model`).
"""

import pytest
import torch
import torch.nn as nn

from mdistiller.config import load_config
from mdistiller.engine.teacher_int8 import install_int8_forward, quantize_int8
from mdistiller.utils.errors import ConfigError

from test_speed_switches import KD_CFG, assert_losses_close, make_run, plain_run, run_steps  # noqa: F401
from test_speed_switches import teacher_ckpt, teacher_state  # noqa: F401  (fixtures)

INT8 = ["SPEED.TEACHER_INT8", "True"]


def rel_l2(a, b):
    return float((a.float() - b.float()).norm() / b.float().norm())


def _test_batch(run):
    images, _, *_ = next(iter(run.test_loader))
    return images


def test_int8_teacher_is_in_effect_and_leaves_the_module_alone(teacher_state, tmp_path):
    plain = make_run(teacher_state, tmp_path)
    fast = make_run(teacher_state, tmp_path, *INT8)
    teacher = fast.distiller.teacher.model
    graph = teacher.__dict__["int8_graph"]
    assert "quantize_per_tensor" in graph.code
    # every convolution of the teacher runs as an int8 kernel (BN folded in, ReLU fused where it follows)
    quantized_convs = [m for m in graph.modules() if ".quantized" in type(m).__module__ and "Conv" in type(m).__name__]
    assert len(quantized_convs) == sum(isinstance(m, nn.Conv2d) for m in teacher.modules()) > 0
    assert fast.speed.as_dict()["teacher_int8"] is True
    # the state (teacher included) and its keys are untouched: checkpoints do not know about int8
    assert list(fast.distiller.state_dict()) == list(plain.distiller.state_dict())
    assert all(torch.equal(a, b) for a, b in zip(teacher.state_dict().values(),
                                                  plain.distiller.teacher.model.state_dict().values()))

    images = _test_batch(plain)
    want_logits, want_feats = plain.distiller.teacher(images)
    seen = []  # forward hooks on the teacher module see the int8 graph's output
    handle = teacher.register_forward_hook(lambda m, args, out: seen.append(out[0]))
    got_logits, got_feats = fast.distiller.teacher(images)
    handle.remove()
    assert len(seen) == 1 and torch.equal(seen[0], got_logits)
    assert got_logits.dtype == torch.float32 and not got_logits.is_inference()
    assert not torch.equal(got_logits, want_logits)  # it really is another computation
    assert rel_l2(got_logits, want_logits) < 0.10, rel_l2(got_logits, want_logits)
    for key, want in want_feats.items():
        got = got_feats[key]
        for g, w in zip(got if isinstance(got, list) else [got], want if isinstance(want, list) else [want]):
            assert g.dtype == torch.float32 and g.shape == w.shape, key
            assert rel_l2(g, w) < 0.15, (key, rel_l2(g, w))


def test_int8_kd_trains_within_tolerance(teacher_state, tmp_path, plain_run):
    got = run_steps(make_run(teacher_state, tmp_path, *INT8))
    assert_losses_close(got["losses"], plain_run()["losses"], 0.05, 0.05)
    assert all(torch.isfinite(v).all() for v in got["state"].values() if v.is_floating_point())


def test_int8_calibration_is_deterministic(teacher_state, tmp_path):
    a = make_run(teacher_state, tmp_path, *INT8)
    b = make_run(teacher_state, tmp_path, *INT8)
    images = _test_batch(a)
    assert torch.equal(a.distiller.teacher(images)[0], b.distiller.teacher(images)[0])
    c = make_run(teacher_state, tmp_path, *INT8, "SPEED.TEACHER_INT8_CALIBRATION", "32")
    assert not torch.equal(a.distiller.teacher(images)[0], c.distiller.teacher(images)[0])


def test_int8_with_channels_last_batches(teacher_state, tmp_path):
    nchw = make_run(teacher_state, tmp_path, *INT8)
    nhwc = make_run(teacher_state, tmp_path, *INT8, "SPEED.CHANNELS_LAST", "on")
    images = _test_batch(nchw)
    want = nchw.distiller.teacher(images)[0]
    got = nhwc.distiller.teacher(nhwc.speed.batch(images))[0]
    assert rel_l2(got, want) < 1e-3


@pytest.mark.parametrize("opts,match", [
    (["EXPERIMENT.DEVICE", "cuda"], "SPEED.TEACHER_INT8: the int8 teacher runs on the CPU"),
    (["SPEED.TEACHER_HALF", "on"], "SPEED.TEACHER_INT8: and SPEED.TEACHER_HALF on: choose one teacher precision"),
    (["SPEED.TEACHER_INT8_CALIBRATION", "0"], "SPEED.TEACHER_INT8_CALIBRATION: must be > 0 images, got 0"),
])
def test_int8_config_errors(opts, match):
    with pytest.raises(ConfigError, match=match):
        load_config(KD_CFG, [*INT8, *opts])


class _DataDependent(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)

    def forward(self, x):
        if x.sum() > 0:  # control flow on a value: FX cannot trace it
            return self.conv(x), {}
        return self.conv(-x), {}


def test_untraceable_teacher_is_a_config_error():
    with pytest.raises(ConfigError, match=r"cannot be traced into a graph .* set SPEED.TEACHER_INT8 False"):
        quantize_int8(_DataDependent().eval(), [torch.randn(2, 3, 8, 8)], 2)


def test_no_calibration_images_is_a_config_error():
    with pytest.raises(ConfigError, match="no training images to calibrate"):
        install_int8_forward(_DataDependent().eval(), [], 16)


def test_int8_forward_is_quiet_under_deterministic_mode(teacher_state, tmp_path, capfd):
    fast = make_run(teacher_state, tmp_path, *INT8)
    images = _test_batch(fast)
    before = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled())
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        capfd.readouterr()
        fast.distiller.teacher(images)
        assert "quantized_resize" not in capfd.readouterr().err
        assert torch.are_deterministic_algorithms_enabled() and torch.is_deterministic_algorithms_warn_only_enabled()
    finally:
        torch.use_deterministic_algorithms(before[0], warn_only=before[1])


def test_eval_tool_reports_what_int8_costs_a_teacher(teacher_ckpt, tmp_path):
    """tools/eval.py --int8: the float accuracy unchanged, the int8 one beside it, and how far its logits moved."""
    import json
    import os
    import subprocess
    import sys

    from test_engine import ROOT

    def run(*extra):
        proc = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "eval.py"), "-m", "resnet20", "-c",
                               teacher_ckpt, "-d", "fashion_mnist", "--test-subset", "100", "--device", "cpu",
                               "--json", *extra], capture_output=True, text=True, cwd=ROOT)
        assert proc.returncode == 0, proc.stderr
        return json.loads(proc.stdout.strip().splitlines()[-1]), proc

    plain, _ = run()
    both, proc = run("--int8")
    assert both["top1"] == plain["top1"] and "int8" not in plain
    i8 = both["int8"]
    assert i8["calibration_images"] == 512 and 0.0 <= i8["top1"] <= 100.0
    assert 0.5 <= i8["argmax_agreement"] <= 1.0 and 0.0 < i8["logits_rel_l2"] < 0.10
    assert "argmax agreement" in proc.stdout and "quantized_resize" not in proc.stderr
