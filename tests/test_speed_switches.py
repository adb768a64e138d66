"""SPEED (mdistiller/engine/speed.py): each fast path is really in effect, and a few steps of a tiny KD run
(resnet20 teacher with random weights -> resnet8, real Fashion-MNIST images) compute exactly what the plain models
compute with that fast path applied to them by hand.

The reference (kd_reference): the test's own resnet8 and resnet20, loaded with the run's starting weights and fed
the run's batches, with the KD loss (Hinton et al.) and the update (torch's SGD, or the DOT paper's Algorithm 2)
written out in plain torch, and the fast path applied directly: torch.autocast("cpu", bfloat16), NHWC weights and
batches, a bf16 copy of the teacher. The run must equal it bit for bit at each of 3 steps (loss, student logits,
teacher logits), in its final weights and in its evaluation loss. The same operations on the same inputs give
the same bits on any machine, whatever a particular kernel set rounds to, so these verdicts do not depend on it.

How far a fast path moves the numbers from float32 NCHW is torch's rounding, not the product's logic, and it
differs between kernel sets (AVX2, AVX512-BF16, AMX) and grows with training (test_dot.py measured ~50x per
step). It is checked only as an order-of-magnitude sanity bound on one forward (the loss of step 1, before any
update), where a wrong path (float32 where bf16 was asked, a transposed layout) would be off by far more:
  - TEACHER_INFERENCE_MODE, COMPILE with dynamo's "eager" backend: bit-identical to the plain run (the same
    operations, run under another grad mode / replayed from a captured graph).
  - CHANNELS_LAST: 1e-4 (measured 4e-7): float32 convolutions that sum in another order.
  - AMP bf16: 5% (measured 0.4-0.5% with AVX512-BF16 and with AVX2 kernels): bf16 keeps 8 significant bits.
  - TEACHER_HALF: the teacher's logits within 10% of their largest magnitude (measured 0.6-0.8%).
  - COMPILE with inductor: 1e-4, student logits and loss (inductor's fused float32 kernels sum in another order).
The fp16 loss-scale code runs on CUDA only (fp16 on the CPU is a ConfigError); its logic is tested here on the
CPU with a scaler injected into the update rule: a power-of-two scale leaves the update bit-identical, an
overflow skips it. Runs are built by engine.build_run with the random teacher in memory (`teacher_state`); the
tests that go through tools (train_from_config, tools/eval.py) read the same weights from a checkpoint file.
"""

import contextlib
import os

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import yaml

from mdistiller.bench.random_teacher import random_teacher_state, write_random_teacher
from mdistiller.config import load_config
from mdistiller.data.bundle import DatasetMeta
from mdistiller.distillers import total_loss
from mdistiller.engine import build_run
from mdistiller.engine import speed as speed_module
from mdistiller.engine.classification import build_distiller
from mdistiller.engine.hooks import HookBase
from mdistiller.engine.launch import train_from_config
from mdistiller.engine.loss_scaler import LossScaler
from mdistiller.engine.speed import resolve_speed
from mdistiller.models import build_model
from mdistiller.utils.errors import ConfigError

from test_engine import ROOT

KD_CFG = os.path.join(ROOT, "configs", "fashion_mnist", "kd", "resnet20_resnet8.yaml")
PLAIN = ["SPEED.AMP", "off", "SPEED.CHANNELS_LAST", "off", "SPEED.COMPILE", "False",
         "SPEED.TEACHER_INFERENCE_MODE", "False", "SPEED.TEACHER_HALF", "off"]
SMALL = ["EXPERIMENT.DEVICE", "cpu", "DATASET.TRAIN_SUBSET", "96", "DATASET.TEST_SUBSET", "50",
         "SOLVER.BATCH_SIZE", "32", "SOLVER.EPOCHS", "1", "SOLVER.LR_DECAY_STAGES", "[]", "LOG.TENSORBOARD_FREQ", "0"]
STEPS = 3
LR = 0.05  # every step's learning rate (run_steps sets it, kd_reference uses it)
TEACHER_SEED = 1


@pytest.fixture(scope="module")
def teacher_state():
    """The random resnet20 teacher's weights, in memory (build_run's `teacher_state`)."""
    return random_teacher_state("resnet20", "fashion_mnist", seed=TEACHER_SEED)


@pytest.fixture(scope="module")
def teacher_ckpt(tmp_path_factory):
    """The same weights as a checkpoint file, for what reads the teacher from disk (launch, tools/eval.py)."""
    return write_random_teacher(tmp_path_factory.mktemp("teacher") / "resnet20.pth", "resnet20", "fashion_mnist",
                                seed=TEACHER_SEED)


def cfg_for(tmp_path, *extra, trainer="vanilla", cfg_file=KD_CFG, teacher_ckpt=None):
    ckpt = ["DISTILLER.TEACHER_CKPT", teacher_ckpt] if teacher_ckpt else []
    return load_config(cfg_file, [*SMALL, "SOLVER.UPDATE_RULE", trainer, "LOG.PREFIX", str(tmp_path), *ckpt, *PLAIN,
                                  *extra])


def make_run(teacher_state, tmp_path, *extra, trainer="vanilla"):
    """The run (engine.build_run) of the tiny KD config with `extra` KEY VALUE pairs, on the in-memory teacher."""
    return build_run(cfg_for(tmp_path, *extra, trainer=trainer), teacher_state=teacher_state)


def run_steps(run, steps=STEPS):
    """`steps` updates on the first batches of epoch 1, then the test evaluation. Returns each step's total loss,
    student logits and teacher logits, the batches (as the loader gave them), the student's weights before the
    first step ("init") and the learnable state after the last ("state"), and the evaluation's result."""
    trainer = run.trainer
    trainer.distiller.train()
    trainer.train_loader.set_epoch(0)
    init = {k: v.clone() for k, v in trainer.distiller.student.state_dict().items()}
    losses, logits, teacher_logits, batches = [], [], [], []
    for it, (images, labels, index) in enumerate(trainer.train_loader):
        if it == steps:
            break
        trainer.set_lr(LR)
        step = trainer.run_step(images, labels, index, 1)
        losses.append(float(step.losses["total"]))
        logits.append(step.output.logits)
        teacher_logits.append(step.output.teacher_logits)
        batches.append((images, labels))
    return {"losses": losses, "logits": logits, "teacher_logits": teacher_logits, "batches": batches, "init": init,
            "state": trainer.distiller.learnable_state_dict(), "eval": run.evaluation.evaluate()}


def reference_teacher(teacher_state, channels_last=False, dtype=None):
    """The test's own resnet20 with the run's teacher weights: images -> its logits, under no_grad; NHWC weights
    with `channels_last`; with `dtype`, weights and input in that dtype and the logits back in float32 (what a
    TEACHER_HALF run's FrozenTeacher must compute)."""
    model = build_model("resnet20", "fashion_mnist").eval()
    model.load_state_dict(teacher_state)
    if channels_last:
        model.to(memory_format=torch.channels_last)
    if dtype is not None:
        model.to(dtype)

    @torch.no_grad()
    def logits(images):
        out = model(images if dtype is None else images.to(dtype))[0]
        return out if dtype is None else out.float()

    logits.model = model
    return logits


def kd_reference(run, teacher, test_loader, trainer="vanilla", amp=None, channels_last=False):
    """What run_steps' `run` must have computed, recomputed here in plain torch: a fresh resnet8 with the run's
    starting weights ("init"), trained on the run's batches with KD's loss (KD_CFG's temperature and weights:
    0.1 CE + 0.9 T^2 KL) against `teacher` (images -> logits), updated by torch's SGD (vanilla) or by DOT's
    two-momentum rule (DOT appendix, Algorithm 2: v_task <- (g_task + wd theta) + (mu - delta) v_task,
    v_distill <- g_distill + (mu + delta) v_distill, theta <- theta - lr (v_task + v_distill)), then evaluated on
    `test_loader` (summed cross-entropy over the test images / their number). `amp`: the forward and losses under
    torch.autocast("cpu", amp) (not the backward, not the update); `channels_last`: NHWC weights and batches."""
    cfg = load_config(KD_CFG)
    temperature, ce_weight, kd_weight = cfg.KD.TEMPERATURE, cfg.KD.LOSS.CE_WEIGHT, cfg.KD.LOSS.KD_WEIGHT
    s = cfg.SOLVER
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    autocast = (lambda: torch.autocast("cpu", dtype=amp)) if amp is not None else contextlib.nullcontext
    student = build_model(cfg.DISTILLER.STUDENT, "fashion_mnist")
    student.load_state_dict(run["init"])
    student.to(memory_format=fmt).train()
    params = list(student.parameters())
    if trainer == "vanilla":
        sgd = torch.optim.SGD(params, lr=LR, momentum=s.MOMENTUM, weight_decay=s.WEIGHT_DECAY, nesterov=s.NESTEROV)
    else:
        assert trainer == "dot" and s.DOT.GRAD_MODE == "two_pass"  # the two gradients from two backwards
        mu, delta, wd = s.MOMENTUM, s.DOT.DELTA, s.WEIGHT_DECAY
        v_task, v_distill = [torch.zeros_like(p) for p in params], [torch.zeros_like(p) for p in params]
    out = {"losses": [], "logits": [], "teacher_logits": []}
    for images, labels in run["batches"]:
        images = images.contiguous(memory_format=fmt)
        with autocast():
            logits, _ = student(images)
            logits_t = teacher(images)
            ce = ce_weight * F.cross_entropy(logits, labels)
            kl = F.kl_div(F.log_softmax(logits / temperature, dim=1), F.log_softmax(logits_t / temperature, dim=1),
                          reduction="batchmean", log_target=True)
            kd = kd_weight * (kl * temperature**2)
            total = ce + kd
        if trainer == "vanilla":
            sgd.zero_grad(set_to_none=True)
            total.backward()
            sgd.step()
        else:
            g_task = torch.autograd.grad(ce, params, retain_graph=True)
            g_distill = torch.autograd.grad(kd, params)
            with torch.no_grad():
                for p, gt, gd, vt, vd in zip(params, g_task, g_distill, v_task, v_distill):
                    vt.mul_(mu - delta).add_(gt.add(p, alpha=wd))
                    vd.mul_(mu + delta).add_(gd)
                    p.add_(vt + vd, alpha=-LR)
        out["losses"].append(float(total.detach()))
        out["logits"].append(logits.detach())
        out["teacher_logits"].append(logits_t)
    student.eval()
    loss_sum, count = 0.0, 0
    with torch.no_grad():
        for images, labels, *_ in test_loader:
            with autocast():
                logits = student(images.contiguous(memory_format=fmt))[0]
            loss_sum += float(F.cross_entropy(logits.float(), labels, reduction="sum").double())
            count += labels.numel()
    out["state"] = {f"student.{k}": v for k, v in student.state_dict().items()}
    out["eval_loss"] = loss_sum / count
    return out


def assert_same_as_reference(run, ref):
    """Bit for bit: every step's loss, student and teacher logits, the final weights, the evaluation loss."""
    assert len(run["losses"]) == STEPS and run["losses"] == ref["losses"], (run["losses"], ref["losses"])
    for name in ("logits", "teacher_logits"):
        assert all(torch.equal(a, b) for a, b in zip(run[name], ref[name], strict=True)), name
    assert run["state"].keys() == ref["state"].keys()
    for key, value in ref["state"].items():
        assert torch.equal(run["state"][key], value), key
    assert run["eval"]["loss"] == ref["eval_loss"]


def step1_rel(run, want):
    """Relative distance of the step-1 losses of two runs from the same weights and batch (one forward each)."""
    assert torch.equal(run["batches"][0][0], want["batches"][0][0]) and run["init"].keys() == want["init"].keys()
    assert all(torch.equal(v, want["init"][k]) for k, v in run["init"].items())
    return abs(run["losses"][0] - want["losses"][0]) / abs(want["losses"][0])


_PLAIN_RUNS = {}


@pytest.fixture
def plain_run(teacher_state, tmp_path):
    """The plain float32 run of a trainer kind (computed once per kind and module)."""

    def get(trainer="vanilla"):
        if trainer not in _PLAIN_RUNS:
            _PLAIN_RUNS[trainer] = run_steps(make_run(teacher_state, tmp_path, trainer=trainer))
        return _PLAIN_RUNS[trainer]

    return get


def first_conv(module):
    return next(m for m in module.modules() if isinstance(m, nn.Conv2d))


# --- config ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("key,value,match", [
    ("SPEED.AMP", "fp32", r"SPEED.AMP: must be one of auto, off, bf16, fp16, got 'fp32'"),
    ("SPEED.CHANNELS_LAST", "nhwc", r"SPEED.CHANNELS_LAST: must be one of auto, on, off"),
    ("SPEED.TEACHER_HALF", "bf16", r"SPEED.TEACHER_HALF: must be one of auto, on, off"),
    ("SPEED.COMPILE", "max", r"SPEED.COMPILE: expected true or false"),
    ("SPEED.TEACHER_INFERENCE_MODE", "2", r"SPEED.TEACHER_INFERENCE_MODE: expected true or false"),
])
def test_invalid_values_are_one_line_config_errors(key, value, match):
    with pytest.raises(ConfigError, match=match) as e:
        load_config(KD_CFG, [key, value])
    assert "\n" not in str(e.value)


def test_fp16_on_the_cpu_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="SPEED.AMP: fp16 autocast is for CUDA GPUs; on the CPU use bf16 or off"):
        load_config(KD_CFG, ["EXPERIMENT.DEVICE", "cpu", "SPEED.AMP", "fp16"])
    # EXPERIMENT.DEVICE auto is resolved when the trainer is built: the same error, before any data is read.
    cfg = load_config(KD_CFG, ["SPEED.AMP", "fp16", "LOG.PREFIX", str(tmp_path)])
    with pytest.raises(ConfigError, match="on the CPU use bf16 or off"):
        resolve_speed(cfg, torch.device("cpu"))


def test_yaml_on_off_words_are_read_as_switch_values(tmp_path):
    # YAML 1.1 reads unquoted on/off as booleans; the switches take them back as the words.
    path = tmp_path / "speed.yaml"
    path.write_text(f"_BASE_: {KD_CFG}\nSPEED:\n  AMP: off\n  CHANNELS_LAST: on\n  TEACHER_HALF: off\n")
    cfg = load_config(str(path))
    assert (cfg.SPEED.AMP, cfg.SPEED.CHANNELS_LAST, cfg.SPEED.TEACHER_HALF) == ("off", "on", "off")
    assert yaml.safe_load(path.read_text())["SPEED"]["AMP"] is False  # what the loader had to undo


def test_auto_resolution_on_the_cpu():
    cpu = torch.device("cpu")
    # the Fashion-MNIST recipe pins CHANNELS_LAST off (its measured tables are NCHW); auto is what is tested here
    plan = resolve_speed(load_config(KD_CFG, ["SPEED.CHANNELS_LAST", "auto"]), cpu)
    assert plan.amp is None and plan.teacher_dtype is None and plan.teacher_inference_mode and not plan.compile
    assert plan.channels_last == speed_module.CPU_CHANNELS_LAST
    plan = resolve_speed(load_config(KD_CFG, ["SPEED.AMP", "bf16"]), cpu)
    assert plan.amp == torch.bfloat16 and plan.teacher_dtype == torch.bfloat16  # TEACHER_HALF auto follows AMP
    assert plan.autocast().fast_dtype == torch.bfloat16
    plan = resolve_speed(load_config(KD_CFG, ["SPEED.TEACHER_HALF", "on", "SPEED.CHANNELS_LAST", "off"]), cpu)
    assert plan.amp is None and plan.teacher_dtype == torch.bfloat16 and not plan.channels_last
    assert plan.as_dict() == {"amp": "off", "channels_last": False, "compile": False,
                              "teacher_inference_mode": True, "teacher_half": "bf16", "teacher_int8": False,
                              "cuda_graphs": False}


# --- the switches against the plain float32 run ----------------------------------------------------------------
def test_teacher_inference_mode_is_bit_identical(teacher_state, tmp_path, plain_run):
    built = make_run(teacher_state, tmp_path, "SPEED.TEACHER_INFERENCE_MODE", "True")
    teacher = built.distiller.teacher  # the FrozenTeacher; its model is what runs in inference mode
    seen = []
    teacher.model.register_forward_hook(lambda m, a, out: seen.append(out[0].is_inference()))
    run = run_steps(built)
    assert seen == [True] * STEPS  # the teacher ran in inference mode ...
    assert all(t is not None and not t.is_inference() for t in run["teacher_logits"])  # ... its outputs did not
    _, features = teacher(next(iter(built.test_loader))[0])  # leak out to the losses
    assert seen[-1] and not any(f.is_inference() for f in features["preact_feats"] + [features["pooled_feat"]])
    want = plain_run()
    # the plain run is the reference computation (which the fast paths below are compared with) ...
    assert_same_as_reference(want, kd_reference(want, reference_teacher(teacher_state), built.test_loader))
    # ... and inference mode changes bookkeeping, not arithmetic
    assert run["losses"] == want["losses"]
    for key, value in want["state"].items():
        assert torch.equal(run["state"][key], value), key


@pytest.mark.parametrize("method", ["KD", "DKD", "CRD", "REVIEWKD", "AT", "DIST", "KD++", "REVIEWKD++"])
def test_teacher_inference_mode_every_method_same_gradients(method, teacher_state, tmp_path):
    """One training forward (the method's terms and any added term, as the loop calls it) + backward of each
    method, teacher under no_grad vs inference_mode, from the same state and RNG: identical losses and gradients
    (an inference tensor saved for backward, e.g. by ReviewKD's MSE or CRD's head, would raise instead)."""
    cfg = cfg_for(tmp_path, "DISTILLER.TYPE", method)
    targets = torch.arange(40) % 10
    meta = DatasetMeta(name="fashion_mnist", num_classes=10, image_size=32, num_train=40, num_test=0,
                       mean=(0.5,) * 3, std=(0.25,) * 3, train_targets=targets)
    torch.manual_seed(0)
    distiller, _ = build_distiller(cfg, meta, torch.device("cpu"), teacher_state=teacher_state)
    distiller.train()
    images, index = torch.randn(8, 3, 32, 32), torch.arange(0, 40, 5)
    labels = targets[index]
    start = {k: v.clone() for k, v in distiller.state_dict().items()}

    def step(inference_mode):
        distiller.load_state_dict(start)
        distiller.teacher.run_in(inference_mode)
        distiller.zero_grad(set_to_none=True)
        torch.manual_seed(1)  # CRD draws negatives
        terms = distiller.train_forward(images, labels, 1, index).terms
        assert not any(t.value.is_inference() for t in terms.values())
        total_loss(terms).backward()
        return ({k: t.value.detach() for k, t in terms.items()},
                {n: p.grad.clone() for n, p in distiller.named_parameters() if p.grad is not None})

    with pytest.warns(UserWarning, match="class means were never set") if "++" in method else contextlib.nullcontext():
        terms_a, grads_a = step(False)
        terms_b, grads_b = step(True)
    assert terms_a.keys() == terms_b.keys() and grads_a.keys() == grads_b.keys() and grads_a
    assert all(torch.equal(terms_a[k], terms_b[k]) for k in terms_a)
    assert all(torch.equal(grads_a[k], grads_b[k]) for k in grads_a)


def test_channels_last(teacher_state, tmp_path, plain_run):
    built = make_run(teacher_state, tmp_path, "SPEED.CHANNELS_LAST", "on")
    d = built.distiller
    for model in (d.student, d.teacher):
        weights = [p for p in model.parameters() if p.dim() == 4]
        assert weights and all(p.is_contiguous(memory_format=torch.channels_last) for p in weights)
        assert not all(p.is_contiguous() for p in weights)  # really NHWC, not a 1x1 kernel that is both
    layouts = []
    first_conv(d.student).register_forward_pre_hook(
        lambda m, args: layouts.append(args[0].is_contiguous(memory_format=torch.channels_last)))
    run = run_steps(built)
    assert layouts == [True] * (STEPS + 1)  # 3 training batches and the one test batch
    # exactly the plain models with NHWC weights and batches, at every step and in evaluation
    ref = kd_reference(run, reference_teacher(teacher_state, channels_last=True), built.test_loader,
                       channels_last=True)
    assert_same_as_reference(run, ref)
    # sanity, one forward: NHWC float32 convolutions sum in another order (measured 4e-7); a layout mix-up
    # (NHWC memory read as NCHW) would change the loss by O(1)
    assert step1_rel(run, plain_run()) <= 1e-4


def test_amp_bf16(teacher_state, tmp_path, plain_run):
    built = make_run(teacher_state, tmp_path, "SPEED.AMP", "bf16")
    seen = []

    def hook(module, args, out):
        seen.append((torch.is_autocast_enabled("cpu"), torch.get_autocast_dtype("cpu"), out.dtype, module.training))

    first_conv(built.distiller.student).register_forward_hook(hook)
    run = run_steps(built)
    bf16 = (True, torch.bfloat16, torch.bfloat16)
    assert seen == [(*bf16, True)] * STEPS + [(*bf16, False)]  # training steps, then evaluation
    assert all(p.dtype == torch.float32 for p in built.distiller.parameters())  # TEACHER_HALF off: fp32 weights
    # exactly the plain models' forward and losses under torch.autocast (backward and update outside it), at
    # every step and in evaluation
    ref = kd_reference(run, reference_teacher(teacher_state), built.test_loader, amp=torch.bfloat16)
    assert_same_as_reference(run, ref)
    # sanity, one forward: bf16 keeps 8 significant bits (measured 0.4-0.5% with AVX512-BF16 and with AVX2
    # kernels); 5% is an order of magnitude above, and far below what a broken forward would give
    assert step1_rel(run, plain_run()) <= 0.05


def test_teacher_half(teacher_state, tmp_path, plain_run):
    built = make_run(teacher_state, tmp_path, "SPEED.TEACHER_HALF", "on")
    d = built.distiller
    assert all(p.dtype == torch.bfloat16 for p in d.teacher.parameters())
    assert all(p.dtype == torch.float32 for p in d.student.parameters())
    images = next(iter(built.test_loader))[0]
    logits, features = d.teacher(images)
    # exactly the float32 teacher cast to bf16, run on the bf16 images, every output cast back to float32
    half = reference_teacher(teacher_state, dtype=torch.bfloat16)
    with torch.no_grad():
        want_logits, want_features = half.model(images.to(torch.bfloat16))
    assert logits.dtype == torch.float32 and torch.equal(logits, want_logits.float())
    assert features.keys() == want_features.keys()
    for key, want in want_features.items():
        got = features[key]
        for g, w in zip(*((x if isinstance(x, list) else [x]) for x in (got, want)), strict=True):
            assert g.dtype == torch.float32 and torch.equal(g, w.float()), key
    # sanity: not the float32 teacher, and close to it (bf16 keeps 8 significant bits, compounding through 20
    # layers; measured 0.6-0.8% of the largest logit; a broken cast would be off by O(1))
    fp32_logits = reference_teacher(teacher_state)(images)
    assert not torch.equal(logits, fp32_logits)
    assert float((logits - fp32_logits).abs().max() / fp32_logits.abs().max()) < 0.10
    # the KD run trains against that bf16 teacher: exactly the reference with it, at every step
    run = run_steps(built)
    assert_same_as_reference(run, kd_reference(run, half, built.test_loader))


def test_compile_wiring_and_plain_checkpoint_keys(teacher_state, tmp_path, plain_run, monkeypatch):
    """torch.compile with dynamo's "eager" backend: the graph capture and the module wiring, without inductor's
    compile time (test_compile_inductor below runs the real backend)."""
    from torch._dynamo.utils import counters

    monkeypatch.setattr(speed_module, "COMPILE_BACKEND", "eager")
    torch._dynamo.reset()
    counters.clear()
    built = make_run(teacher_state, tmp_path, "SPEED.COMPILE", "True")
    d = built.distiller
    for model in (d.student, d.teacher.model):
        assert hasattr(model.forward, "_torchdynamo_orig_callable")  # forward replaced by dynamo's wrapper
    run = run_steps(built)
    assert counters["stats"]["unique_graphs"] >= 2  # student and teacher really went through dynamo
    # the eager backend replays the captured torch operations, unchanged: the plain run's numbers, bit for bit
    want = plain_run()
    assert run["losses"] == want["losses"]
    for key, value in want["state"].items():
        assert torch.equal(run["state"][key], value), key
    state = built.trainer.state_dict()
    plain_keys = list(build_model("resnet8", "fashion_mnist").state_dict())
    assert list(state["model"]) == plain_keys
    assert not any("_orig_mod" in k for k in list(state["distiller"]) + list(state["model"]))
    torch._dynamo.reset()


class StepRecorder(HookBase):
    """Each step's batch, total loss and student logits, as the loop computed them."""

    def __init__(self):
        self.steps = []

    def after_step(self, step):
        self.steps.append((step.labels, float(step.losses["total"]), step.output.logits))


@pytest.mark.slow
def test_compile_inductor_end_to_end(teacher_ckpt, tmp_path):
    """A whole (tiny) run with the real backend: it trains, its files hold plain keys, and its first step (one
    forward of the compiled student and teacher, from the same weights and batch as the plain run) matches."""
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir, temporary_cache_dir

    # Inductor generates code for the ISA ATEN_CPU_CAPABILITY names, but its on-disk cache is not keyed on it:
    # graphs cached under one kernel set and reused under another gave NaN losses (cache from a native AVX512 run,
    # run with ATEN_CPU_CAPABILITY=avx2) or a segfault (the reverse), torch 2.14. One cache per capability.
    cache = os.environ.get("TORCHINDUCTOR_CACHE_DIR") or default_cache_dir()
    torch._dynamo.reset()
    summaries, recorded = {}, {}
    with temporary_cache_dir(f"{cache}-{torch.backends.cpu.get_cpu_capability()}"):
        for name, extra in (("plain", []), ("compiled", ["SPEED.COMPILE", "True"])):
            cfg = cfg_for(tmp_path, "EXPERIMENT.NAME", name, *extra, teacher_ckpt=teacher_ckpt)
            recorded[name] = StepRecorder()
            summaries[name] = train_from_config(cfg, extra_hooks=[recorded[name]])
    assert summaries["compiled"]["speed"]["compile"] is True
    plain_keys = list(build_model("resnet8", "fashion_mnist").state_dict())
    for file in ("student_last.pth", "latest.pth"):
        state = torch.load(tmp_path / "compiled" / file, weights_only=False)
        assert list(state["model"]) == plain_keys, file
    assert len(recorded["plain"].steps) == len(recorded["compiled"].steps) == STEPS
    (labels, loss, logits), (want_labels, want_loss, want_logits) = (recorded[n].steps[0]
                                                                     for n in ("compiled", "plain"))
    assert torch.equal(labels, want_labels)  # the same batch (and, from the same seed, the same weights)
    # Inductor runs the same float32 forward as generated, fused C++ (its own reductions, e.g. BatchNorm's
    # batch statistics, vectorised for the CPU's ISA): only the order of float32 sums differs (measured, with
    # AVX512 and with AVX2 code: loss 9e-8, logits 8e-7 of the largest). 1e-4 is far above that on any ISA, and far
    # below what a wrong graph (a missing layer, eval-mode BatchNorm, a stale weight) would give. Only step 1:
    # later steps amplify the difference.
    assert abs(loss - want_loss) <= 1e-4 * abs(want_loss), (loss, want_loss)
    assert float((logits - want_logits).abs().max()) <= 1e-4 * float(want_logits.abs().max())
    torch._dynamo.reset()


@pytest.mark.parametrize("extra,amp,channels_last", [(["SPEED.AMP", "bf16"], torch.bfloat16, False),
                                                     (["SPEED.CHANNELS_LAST", "on"], None, True)],
                         ids=["bf16", "channels_last"])
def test_dot_trainer_fast_paths(extra, amp, channels_last, teacher_state, tmp_path):
    """DOT's two gradients and two momentum buffers under each fast path: exactly the reference's DOT update of the
    plain models with that fast path applied by hand (its step-1 forward is the vanilla test's)."""
    built = make_run(teacher_state, tmp_path, *extra, trainer="dot")
    run = run_steps(built)
    ref = kd_reference(run, reference_teacher(teacher_state, channels_last=channels_last), built.test_loader,
                       trainer="dot", amp=amp, channels_last=channels_last)
    assert_same_as_reference(run, ref)


def test_run_logs_and_records_the_resolved_fast_paths(teacher_ckpt, tmp_path):
    cfg = load_config(KD_CFG, [*SMALL, "DATASET.TRAIN_SUBSET", "64", "LOG.PREFIX", str(tmp_path),
                               "EXPERIMENT.NAME", "run", "DISTILLER.TEACHER_CKPT", teacher_ckpt])  # SPEED defaults
    summary = train_from_config(cfg)
    want = resolve_speed(cfg, torch.device("cpu")).as_dict()
    assert summary["speed"] == want and want["amp"] == "off" and want["teacher_inference_mode"] is True
    log = (tmp_path / "run" / "train.log").read_text()
    on = "on" if want["channels_last"] else "off"
    assert (f"fast paths: amp off, channels_last {on}, compile off, teacher inference_mode on, teacher half off"
            in log)


# --- fp16 loss scaling, checked on the CPU with an injected scaler ---------------------------------------------
def _snapshot(trainer):
    params = [p.detach().clone() for p in trainer.optimizer.params()] if hasattr(trainer.optimizer, "params") \
        else [p.detach().clone() for g in trainer.optimizer.param_groups for p in g["params"]]
    buffers = {k: {n: b.clone() for n, b in s.items()} for k, s in trainer.optimizer.state_dict()["state"].items()}
    return params, buffers


def _assert_same(a, b):
    assert all(torch.equal(x, y) for x, y in zip(a[0], b[0]))
    assert a[1].keys() == b[1].keys() and a[1]
    assert all(torch.equal(a[1][k][n], b[1][k][n]) for k in a[1] for n in a[1][k])


def test_loss_scaler_updates_the_scale_like_grad_scaler():
    """The same sequence of finite / overflowing steps gives LossScaler and torch's GradScaler the same scales."""
    p = nn.Parameter(torch.zeros(3))
    opt = torch.optim.SGD([p], lr=0.1)
    ref = torch.amp.GradScaler("cpu", init_scale=8.0, growth_interval=2)
    ours = LossScaler("cpu", init_scale=8.0, growth_interval=2)
    for overflow in (False, False, False, True, False, True, True, False, False, False):
        bad = float("inf") if overflow else 1.0
        opt.zero_grad()
        ref.scale((p * torch.tensor([1.0, bad, 2.0])).sum()).backward()
        ref.step(opt)
        ref.update()
        g = (torch.tensor([1.0, bad, 2.0]) * ours.get_scale(),)
        found = ours.unscale_(list(g))
        assert bool(found) == overflow
        ours.update(found)
        assert ours.get_scale() == ref.get_scale()
        assert ours.state_dict() == ref.state_dict()


def test_dot_loss_scale_power_of_two_is_exact_and_overflow_skips(teacher_state, tmp_path, plain_run):
    built = make_run(teacher_state, tmp_path, trainer="dot")
    trainer, rule = built.trainer, built.update_rule
    rule.scaler = LossScaler("cpu", init_scale=2.0**12)  # what SPEED.AMP fp16 installs on CUDA
    run = run_steps(built)
    want = plain_run("dot")
    assert run["losses"] == want["losses"]  # a power-of-two scale and its inverse are exact
    for key, value in want["state"].items():
        assert torch.equal(run["state"][key], value), key

    # An overflow in one gradient: no update at all, momentum buffers included; the scale backs off.
    grads = rule._grads

    def overflowing(task, distill, params):
        task_grads, distill_grads = grads(task, distill, params)
        distill_grads[0] = distill_grads[0].clone()
        distill_grads[0].view(-1)[0] = float("inf")
        return task_grads, distill_grads

    before = _snapshot(trainer)
    rule._grads = overflowing
    images, labels, index = next(iter(trainer.train_loader))
    trainer.run_step(images, labels, index, 1)
    _assert_same(_snapshot(trainer), before)
    assert rule.scaler.get_scale() == 2.0**11 and rule.scaler.state_dict()["_growth_tracker"] == 0
    rule._grads = grads
    trainer.run_step(images, labels, index, 1)  # finite again: the update happens
    assert not all(torch.equal(a, b) for a, b in zip(_snapshot(trainer)[0], before[0]))

    state = trainer.state_dict()  # the scale travels in checkpoints, so a resumed run scales the same
    assert state["scaler"]["scale"] == 2.0**11 and state["scaler"]["_growth_tracker"] == 1
    rule.scaler = LossScaler("cpu")
    trainer.load_state_dict(state)
    assert rule.scaler.state_dict() == state["scaler"]


def test_vanilla_grad_scaler_path(teacher_state, tmp_path, plain_run):
    built = make_run(teacher_state, tmp_path)
    trainer, rule = built.trainer, built.update_rule
    rule.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12)
    run = run_steps(built)
    want = plain_run()
    assert run["losses"] == want["losses"]
    for key, value in want["state"].items():
        assert torch.equal(run["state"][key], value), key
    before = _snapshot(trainer)
    weight = first_conv(trainer.distiller.student).weight
    handle = weight.register_hook(lambda g: g * float("inf"))
    images, labels, index = next(iter(trainer.train_loader))
    trainer.run_step(images, labels, index, 1)
    handle.remove()
    _assert_same(_snapshot(trainer), before)
    assert rule.scaler.get_scale() == 2.0**11
    state = trainer.state_dict()
    rule.scaler = torch.amp.GradScaler("cpu")
    trainer.load_state_dict(state)
    assert rule.scaler.get_scale() == 2.0**11
