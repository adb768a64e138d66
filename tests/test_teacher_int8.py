"""SPEED.TEACHER_INT8 (engine/teacher_int8.py): the teacher's forward becomes a calibrated int8 graph, and only
its forward: the same module, the same state_dict, float32 outputs from the int8 model the documented recipe makes.

The reference (int8_reference): the test's own int8 resnet20, made by the recipe teacher_int8.py documents (FX
graph-mode post-training static quantization, torch's default x86 qconfig mapping, calibrated on the first
SPEED.TEACHER_INT8_CALIBRATION un-augmented training images in index order). The run's teacher, the KD run
trained against it and tools/eval.py --int8's figures must equal what that model gives, bit for bit: two int8
models made by the same recipe from the same weights and images compute the same bits on any machine, whichever
kernels (FBGEMM, oneDNN; VNNI, AMX) the x86 backend picks there. Calibration is deterministic, so two runs built
from one config get bit-identical int8 teachers; that is what makes a resumed run continue exactly. The int8
graph replaces the forward of the teacher model inside the FrozenTeacher (`distiller.teacher.model`).

How far int8 moves a teacher from float32 depends on the weights and on the kernels; on this test's random
resnet20 the logits moved 5.4%, the feature maps up to 9%, the KD run's step-1 loss 2.6% (on the proxy study's
trained resnet20: logits 3.2%, 98.8% of the argmaxes agreed, top-1 86.73 -> 86.58; README, "Speed"). Those
distances are checked only as "not garbage" bounds (50%).
"""

import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from mdistiller.config import load_config
from mdistiller.data import build_dataloaders
from mdistiller.data.unaugmented import unaugmented_train_loader
from mdistiller.engine.teacher_int8 import install_int8_forward, quantize_int8
from mdistiller.models import build_model
from mdistiller.utils.errors import ConfigError

from test_speed_switches import (KD_CFG, SMALL, assert_same_as_reference, kd_reference, make_run,  # noqa: F401
                                 plain_run, run_steps, step1_rel)
from test_speed_switches import teacher_ckpt, teacher_state  # noqa: F401  (fixtures)

INT8 = ["SPEED.TEACHER_INT8", "True"]
NOT_GARBAGE = 0.5  # the bound on int8's distance from float32 (see the module docstring)


def rel_l2(a, b):
    return float((a.float() - b.float()).norm() / b.float().norm())


def int8_reference(teacher_state, cfg):
    """The int8 resnet20 made here by teacher_int8.py's documented recipe, without its code (the images come from
    data/unaugmented.py, which the recipe names): the float32 teacher in eval mode, torch.ao's prepare_fx with
    get_default_qconfig_mapping("x86") (per-channel int8 weights, histogram-observed uint8 activations, conv + BN
    + ReLU fused), calibrated under no_grad on the first cfg.SPEED.TEACHER_INT8_CALIBRATION un-augmented training
    images in index order, batched as the un-augmented loader batches them (DATASET.TEST.BATCH_SIZE: histogram
    observers depend on the batching), then convert_fx."""
    from torch.ao.quantization import get_default_qconfig_mapping
    from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx

    model = build_model("resnet20", "fashion_mnist").eval()
    model.load_state_dict(teacher_state)
    n, batches, seen = cfg.SPEED.TEACHER_INT8_CALIBRATION, [], 0
    for images, _, index in unaugmented_train_loader(cfg, "cpu"):
        assert torch.equal(index, torch.arange(seen, seen + len(index)))  # index order
        batches.append(images[: n - seen])
        seen += len(batches[-1])
        if seen == n:
            break
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.ao's deprecation notice
        prepared = prepare_fx(model, get_default_qconfig_mapping("x86"), (batches[0],))
        with torch.no_grad():
            for images in batches:
                prepared(images)
        graph = convert_fx(prepared)
    return torch.no_grad()(graph)


@pytest.fixture(scope="module")
def int8_teacher(teacher_state):
    """int8_reference for the tiny run's config (its 96 training images)."""
    return int8_reference(teacher_state, load_config(KD_CFG, [*SMALL, *INT8]))


def outputs(out):
    """[(name, tensor)] of a model's (logits, features), feature lists flattened."""
    logits, features = out
    flat = [("logits", logits)]
    for key in features:
        value = features[key]
        flat += [(f"{key}[{i}]", v) for i, v in enumerate(value)] if isinstance(value, list) else [(key, value)]
    return flat


def _test_batch(run):
    images, _, *_ = next(iter(run.test_loader))
    return images


def test_int8_teacher_is_in_effect_and_leaves_the_module_alone(teacher_state, tmp_path, int8_teacher):
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
    assert not torch.equal(got_logits, want_logits)  # it really is another computation ...
    got, want, ref = (outputs(o) for o in ((got_logits, got_feats), (want_logits, want_feats), int8_teacher(images)))
    assert [k for k, _ in got] == [k for k, _ in want] == [k for k, _ in ref] and len(got) > 2
    for (key, g), (_, w), (_, r) in zip(got, want, ref):
        assert g.dtype == torch.float32 and g.shape == w.shape, key
        assert torch.equal(g, r), key  # ... exactly the recipe's int8 model, every output
        assert rel_l2(g, w) < NOT_GARBAGE, (key, rel_l2(g, w))


def test_int8_kd_run_trains_against_the_recipes_int8_teacher(teacher_state, tmp_path, plain_run, int8_teacher):
    built = make_run(teacher_state, tmp_path, *INT8)
    got = run_steps(built)
    # every step, the final weights and the evaluation: exactly the reference KD steps against the reference
    # int8 teacher
    assert_same_as_reference(got, kd_reference(got, lambda x: int8_teacher(x)[0], built.test_loader))
    assert step1_rel(got, plain_run()) < NOT_GARBAGE  # sanity, one forward: measured 2.6% from float32


def test_int8_calibration_is_deterministic(teacher_state, tmp_path):
    a = make_run(teacher_state, tmp_path, *INT8)
    b = make_run(teacher_state, tmp_path, *INT8)
    images = _test_batch(a)
    assert torch.equal(a.distiller.teacher(images)[0], b.distiller.teacher(images)[0])
    c = make_run(teacher_state, tmp_path, *INT8, "SPEED.TEACHER_INT8_CALIBRATION", "32")
    assert not torch.equal(a.distiller.teacher(images)[0], c.distiller.teacher(images)[0])


def test_int8_with_channels_last_batches(teacher_state, tmp_path, int8_teacher):
    nchw = make_run(teacher_state, tmp_path, *INT8)
    nhwc = make_run(teacher_state, tmp_path, *INT8, "SPEED.CHANNELS_LAST", "on")
    images = _test_batch(nchw)
    batch = nhwc.speed.batch(images)
    assert batch.is_contiguous(memory_format=torch.channels_last) and not batch.is_contiguous()
    want = nchw.distiller.teacher(images)[0]
    got = nhwc.distiller.teacher(batch)[0]
    # the NHWC run's teacher is the same int8 model (calibrated on the NCHW float32 teacher): exactly the
    # reference's outputs for that batch
    assert torch.equal(want, int8_teacher(images)[0]) and torch.equal(got, int8_teacher(batch)[0])
    # The layouts only change which int8 kernels run (integer sums are exact; measured identical). Sanity only: a
    # requantization that rounds one value the other way moves the logits by ~1e-3; a layout mix-up by O(1).
    assert rel_l2(got, want) < 0.05


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


def test_eval_tool_reports_what_int8_costs_a_teacher(teacher_ckpt, teacher_state, tmp_path):
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
    assert "argmax agreement" in proc.stdout and "quantized_resize" not in proc.stderr

    # The same figures computed here from the float32 teacher and the recipe's int8 model on the same 100 test
    # images: they must be exactly what the tool printed. Top-1/top-5 as accuracy is defined (the label among the
    # k largest logits; ties broken by the same topk call as the evaluator), agreement as the share of equal
    # argmaxes, the distance as ||int8 - float|| / ||float|| over all logits.
    cfg = load_config(None, ["DISTILLER.TYPE", "NONE", "DISTILLER.STUDENT", "resnet20", "EXPERIMENT.DEVICE", "cpu",
                             "DATASET.TYPE", "fashion_mnist", "DATASET.TEST_SUBSET", "100"])  # as the tool's
    int8 = int8_reference(teacher_state, cfg)
    float_model = build_model("resnet20", "fashion_mnist").eval()
    float_model.load_state_dict(teacher_state)
    _, test_loader, _ = build_dataloaders(cfg, "cpu", only_test=True)
    (images, labels, _), = list(test_loader)  # the 100 images in one batch (DATASET.TEST.BATCH_SIZE 256)
    with torch.no_grad():
        want, got = float_model(images)[0], int8(images)[0]

    def top(logits, k):
        return 100.0 * float(logits.topk(5, dim=1).indices[:, :k].eq(labels[:, None]).any(1).sum()) / len(labels)

    assert i8["calibration_images"] == cfg.SPEED.TEACHER_INT8_CALIBRATION == 512
    assert both["top1"] == top(want, 1)  # the float32 figure is the float32 teacher's
    assert (i8["top1"], i8["top5"]) == (top(got, 1), top(got, 5))
    assert i8["loss"] == float(F.cross_entropy(got, labels, reduction="sum").double()) / len(labels)
    assert i8["argmax_agreement"] == int((got.argmax(1) == want.argmax(1)).sum()) / len(labels)
    assert i8["logits_rel_l2"] == (float((got - want).pow(2).sum()) / float(want.pow(2).sum())) ** 0.5
    assert 0.0 < i8["logits_rel_l2"] < NOT_GARBAGE  # sanity: measured 5.3%
