"""WRN feature taps against the published model (megvii-research/mdistiller models/cifar/wrn.py), recomputed here
by hand: every conv, BN and ReLU written out in the published order from the model's own weights, so AT and
ReviewKD on a WRN pair see the published tensors. Float64 throughout, so agreement is to rounding."""

import copy
import os

import pytest
import torch
import torch.nn.functional as F

from mdistiller.config import load_config
from mdistiller.distillers import DISTILLER_REGISTRY
from mdistiller.models import build_model

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EPS, MOMENTUM = 1e-5, 0.1  # nn.BatchNorm2d's defaults, which the published model keeps
TOL = dict(rtol=1e-10, atol=1e-10)


def randomized(name, seed):
    """A float64 WRN with random weights and non-trivial BN affine parameters and running statistics."""
    g = torch.Generator().manual_seed(seed)
    model = build_model(name, "cifar100").double()
    with torch.no_grad():
        for key, t in model.state_dict().items():
            if key.endswith("num_batches_tracked"):
                continue
            if key.endswith("running_var"):
                t.copy_(torch.rand(t.shape, generator=g, dtype=t.dtype) + 0.5)
            elif key.endswith(("bn1.weight", "bn2.weight")):
                t.copy_(torch.rand(t.shape, generator=g, dtype=t.dtype) + 0.5)
            elif t.dim() == 4:  # conv: fan-in scaled, so activations stay O(1) through 40 layers
                t.copy_(torch.randn(t.shape, generator=g, dtype=t.dtype) / (t[0].numel() ** 0.5))
            else:
                t.copy_(torch.randn(t.shape, generator=g, dtype=t.dtype) * 0.3)
    return model


class HandBN:
    """BatchNorm2d written out: batch statistics and a momentum update of copies of the running ones when
    training (variance biased for normalising, unbiased for the update), running statistics otherwise."""

    def __init__(self, state, prefix, training):
        self.w, self.b = state[prefix + "weight"], state[prefix + "bias"]
        self.mean, self.var = state[prefix + "running_mean"].clone(), state[prefix + "running_var"].clone()
        self.training, self.calls = training, 0

    def __call__(self, x):
        self.calls += 1
        if self.training:
            mean = x.mean(dim=(0, 2, 3))
            var = ((x - mean[None, :, None, None]) ** 2).mean(dim=(0, 2, 3))
            n = x.numel() / x.shape[1]
            self.mean = (1 - MOMENTUM) * self.mean + MOMENTUM * mean
            self.var = (1 - MOMENTUM) * self.var + MOMENTUM * var * n / (n - 1)
        else:
            mean, var = self.mean, self.var
        scale = self.w / torch.sqrt(var + EPS)
        return x * scale[None, :, None, None] + (self.b - mean * scale)[None, :, None, None]


def published_forward(state, depth, k, x, training):
    """The published WideResNet.forward from a state_dict, and every BN it used (by key prefix)."""
    n = (depth - 4) // 6
    widths = [16, 16 * k, 32 * k, 64 * k]
    bns = {}

    def bn(prefix):
        if prefix not in bns:
            bns[prefix] = HandBN(state, prefix, training)
        return bns[prefix]

    relu = torch.relu
    out = F.conv2d(x, state["conv1.weight"], padding=1)
    taps = [out]
    for stage in (1, 2, 3):
        for i in range(n):
            p = f"block{stage}.layer.{i}."
            c_in = widths[stage - 1] if i == 0 else widths[stage]
            stride = 2 if stage > 1 and i == 0 else 1
            act = relu(bn(p + "bn1.")(out))
            h = relu(bn(p + "bn2.")(F.conv2d(act, state[p + "conv1.weight"], stride=stride, padding=1)))
            h = F.conv2d(h, state[p + "conv2.weight"], padding=1)
            # published: equalInOut = (in_planes == out_planes); otherwise a 1x1 conv of the activated input
            shortcut = out if c_in == widths[stage] else F.conv2d(act, state[p + "convShortcut.weight"],
                                                                  stride=stride)
            out = shortcut + h
        taps.append(out)
    f0, f1, f2, f3 = taps
    pooled = relu(bn("bn1.")(f3)).mean(dim=(2, 3))
    logits = pooled @ state["fc.weight"].t() + state["fc.bias"]
    # published: the pre-activation taps come after the forward, calling the same BNs again
    preacts = [f0, bn("block2.layer.0.bn1.")(f1), bn("block3.layer.0.bn1.")(f2), bn("bn1.")(f3)]
    return logits, {"feats": [f0, f1, f2, f3], "preact_feats": preacts, "pooled_feat": pooled}, bns


def assert_close(ours, ref):
    assert ours.shape == ref.shape
    torch.testing.assert_close(ours, ref, **TOL)


@pytest.mark.kernels
@pytest.mark.parametrize("name,depth,k", [("wrn_16_1", 16, 1), ("wrn_40_2", 40, 2)])
@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
def test_taps_equal_the_published_model(name, depth, k, training):
    model = randomized(name, seed=depth + k).train(training)
    state = copy.deepcopy(model.state_dict())
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    ref_logits, ref, bns = published_forward(state, depth, k, x, training)
    logits, ours = model(x)
    assert_close(logits, ref_logits)
    assert_close(ours["pooled_feat"], ref["pooled_feat"])
    for key in ("feats", "preact_feats"):
        assert len(ours[key]) == 4
        for a, b in zip(ours[key], ref[key]):
            assert_close(a, b)
    # the last stage is block3's raw output: BN-ReLU comes after it, so it has negative values
    assert (ours["feats"][-1] < 0).any()
    # running statistics: one update per BN call; the three tap BNs are called twice, as published
    assert {p for p, b in bns.items() if b.calls == 2} == {"block2.layer.0.bn1.", "block3.layer.0.bn1.", "bn1."}
    after = model.state_dict()
    for prefix, b in bns.items():
        assert_close(after[prefix + "running_mean"], b.mean)
        assert_close(after[prefix + "running_var"], b.var)
        if training:
            assert after[prefix + "num_batches_tracked"] == state[prefix + "num_batches_tracked"] + b.calls


def hand_attention(f):
    """Published AT map for p = 2: channel mean of f^2, flattened, divided by its L2 norm."""
    a = f.pow(2).mean(dim=1).flatten(1)
    return a / a.norm(dim=1, keepdim=True).clamp_min(1e-12)


def distiller_pair(distiller_type, teacher, student, cfg_file=None, overrides=()):
    """A float64 distiller whose student trains (batch statistics) and whose teacher is frozen (running ones),
    plus the state_dicts of both before any forward."""
    depth_k = {name: (int(name.split("_")[1]), int(name.split("_")[2])) for name in (teacher, student)}
    cfg = load_config(cfg_file, ["DISTILLER.TYPE", distiller_type, "DISTILLER.TEACHER", teacher,
                                 "DISTILLER.STUDENT", student, *overrides])
    s, t = randomized(student, seed=1), randomized(teacher, seed=2)
    distiller = DISTILLER_REGISTRY.get(distiller_type).build(cfg, s, t, None).double()
    distiller.train()
    return distiller, cfg, depth_k, copy.deepcopy(s.state_dict()), copy.deepcopy(t.state_dict())


@pytest.mark.parametrize("student", ["wrn_16_2", "wrn_40_1"])
def test_at_loss_is_the_published_one(student):
    distiller, cfg, dk, s_state, t_state = distiller_pair("AT", "wrn_40_2", student)
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    y = torch.tensor([0, 5, 17, 99])
    logits_s, fs, _ = published_forward(s_state, *dk[student], x, training=True)
    _, ft, _ = published_forward(t_state, *dk["wrn_40_2"], x, training=False)
    # published AT.forward_train: feats[1:] of both, zipped stage by stage (same spatial sizes in a WRN pair)
    at = sum((hand_attention(a) - hand_attention(b)).pow(2).mean() for a, b in zip(fs["feats"][1:], ft["feats"][1:]))
    terms = distiller.forward_train(x, y, epoch=1).terms
    torch.testing.assert_close(terms["at"].value, cfg.AT.LOSS.FEAT_WEIGHT * at, **TOL)
    torch.testing.assert_close(terms["ce"].value, F.cross_entropy(logits_s, y), **TOL)


@pytest.mark.parametrize("student,cfg_file", [
    ("wrn_40_1", os.path.join(ROOT, "configs", "cifar100", "reviewkd", "wrn_40_2_wrn_40_1.yaml")),
    ("wrn_16_2", None),
])
def test_reviewkd_loss_and_gradients_use_the_published_taps(student, cfg_file):
    distiller, cfg, dk, s_state, t_state = distiller_pair("REVIEWKD", "wrn_40_2", student, cfg_file)
    assert not cfg.REVIEWKD.STU_PREACT
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    y = torch.tensor([1, 2, 3, 4])
    epoch = cfg.REVIEWKD.WARMUP_EPOCHS + 1  # past the ramp
    # published ReviewKD.forward_train: the student's post-ReLU feats (stem dropped) and pooled feature, the
    # teacher's preact_feats[1:] and pooled feature, each pooled feature as a 1x1 map
    _, fs, _ = published_forward(s_state, *dk[student], x, training=True)
    _, ft, _ = published_forward(t_state, *dk["wrn_40_2"], x, training=False)
    s_levels = fs["feats"][1:] + [fs["pooled_feat"][:, :, None, None]]
    t_levels = ft["preact_feats"][1:] + [ft["pooled_feat"][:, :, None, None]]
    s_levels = [t.detach().requires_grad_() for t in s_levels]
    fused = distiller.fusion(s_levels, [t.shape[-2:] for t in t_levels])
    expected = cfg.REVIEWKD.LOSS.REVIEWKD_WEIGHT * sum(hand_hcl(a, b) for a, b in zip(fused, t_levels))
    expected.backward()
    ref_grads = {n: p.grad.clone() for n, p in distiller.fusion.named_parameters()}
    distiller.zero_grad(set_to_none=True)

    terms = distiller.forward_train(x, y, epoch=epoch).terms
    torch.testing.assert_close(terms["reviewkd"].value, expected.detach(), **TOL)
    terms["reviewkd"].value.backward()
    for n, p in distiller.fusion.named_parameters():
        torch.testing.assert_close(p.grad, ref_grads[n], **TOL, msg=n)


def hand_hcl(fs, ft):
    """Published hcl_loss for one level: full-size MSE plus MSE at 4, 2, 1 where smaller than the map,
    weights 1, 1/2, 1/4, 1/8, over their sum."""
    loss, weight, total = F.mse_loss(fs, ft), 1.0, 1.0
    for size in (4, 2, 1):
        if size >= fs.shape[2]:
            continue
        weight /= 2
        loss = loss + weight * F.mse_loss(F.adaptive_avg_pool2d(fs, size), F.adaptive_avg_pool2d(ft, size))
        total += weight
    return loss / total


def test_int8_teacher_keeps_the_pre_activation_taps():
    # SPEED.TEACHER_INT8 fuses a BN with the ReLU after it; a BN module called at a second site for a tap would
    # get the fused BN-ReLU there too, and ReviewKD's teacher targets would lose their negative half.
    from mdistiller.engine.teacher_int8 import quantize_int8

    g = torch.Generator().manual_seed(5)
    model = randomized("wrn_16_1", seed=5).float().eval()
    calibration = [torch.randn(16, 3, 32, 32, generator=g)]
    x = torch.randn(4, 3, 32, 32, generator=g)
    with torch.no_grad():
        _, ref = model(x)
        _, q = quantize_int8(model, calibration, 16)(x)
    for a, b in zip(ref["preact_feats"], q["preact_feats"]):
        assert (a < 0).any() and (b < 0).any()
        # int8 rounding moves these random-weight taps by under 10%; a ReLU'd tap is 57-76% off them
        assert float((a - b).norm() / a.norm()) < 0.25
