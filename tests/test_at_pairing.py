"""AT and ReviewKD see exactly the tensors the published code pairs, for every shipped config.

Independent of our feature lists and pairing code: each model's published "feats" are read off its modules
with forward hooks (module names are the published checkpoints'), paired as mdistiller's AT.py pairs them
(zip(student feats[1:], teacher feats[1:]), truncated by the shorter list), and the published AT loss is
recomputed here from its definition (feat.pow(p).mean(1), flattened, L2-normalised; the larger map
adaptive-average-pooled to the smaller one's height, square). ReviewKD's ResNet50 -> MobileNetV1 levels are
checked the same way: which tensor enters which ABF, and which teacher tensor each ABF output is compared with.
Models have random weights; BN statistics are calibrated on a random batch first, so eval-mode teachers keep
activations of order one, as a trained teacher's are.
"""

import glob
import os

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from mdistiller.config import load_config
from mdistiller.distillers import DISTILLER_REGISTRY
from mdistiller.models import build_model, num_classes_for
from mdistiller.utils.errors import ConfigError
from test_wrn_taps import hand_hcl

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
INPUT = {"cifar100": 32, "fashion_mnist": 32, "tiny_imagenet": 64, "imagenet": 224}

# The published models' features["feats"], in order, as (module, how its output becomes the entry):
# "out" the output itself, "first" the first of an (out, preact) pair, "relu"/"relu6" the output through it.
_CIFAR_RESNET = (("bn1", "relu"), ("layer1", "first"), ("layer2", "first"), ("layer3", "first"))
_VGG = tuple((f"block{i}", "relu") for i in range(5))
_SHUFFLEV2 = (("bn1", "relu"), ("layer1", "first"), ("layer2", "first"), ("layer3", "first"))
_WIDE_STEM_RESNET = (("bn1", "relu"),) + tuple((f"layer{i}", "first") for i in range(1, 5))
PUBLISHED_FEATS = {
    "resnet8": _CIFAR_RESNET, "resnet20": _CIFAR_RESNET, "resnet8x4": _CIFAR_RESNET, "resnet32x4": _CIFAR_RESNET,
    "vgg8": _VGG, "vgg13": _VGG,
    "ShuffleV2": _SHUFFLEV2,
    ("tiny_imagenet", "ResNet18"): _WIDE_STEM_RESNET,  # the CIFAR-stem ResNet18 (published resnetv2.py)
    ("tiny_imagenet", "MobileNetV2"): (("pre", "out"), ("stage2", "out"), ("stage3", "out"), ("stage4", "out"),
                                       ("conv1.1", "relu6")),
    # published imagenet/resnet.py: the stem entry is relu(bn1) before the max-pool; AT never uses it
    ("imagenet", "ResNet18"): _WIDE_STEM_RESNET, ("imagenet", "ResNet34"): _WIDE_STEM_RESNET,
    ("imagenet", "ResNet50"): _WIDE_STEM_RESNET,
    # published imagenet/mobilenetv1.py: four entries, relu of model.3 / .5 / .11 / .13 (the stacks' last ReLU)
    ("imagenet", "MobileNetV1"): tuple((f"model.{i}.5", "out") for i in (3, 5, 11, 13)),
}

# What the published code pairs for each shipped AT config: (student module, teacher module) per stage pair.
PUBLISHED_AT_PAIRS = {
    "cifar100/at/resnet32x4_resnet8x4.yaml": [("layer1", "layer1"), ("layer2", "layer2"), ("layer3", "layer3")],
    "cifar100/at/resnet32x4_ShuffleV2.yaml": [("layer1", "layer1"), ("layer2", "layer2"), ("layer3", "layer3")],
    "cifar100/at/vgg13_vgg8.yaml": [(f"block{i}", f"block{i}") for i in range(1, 5)],
    "fashion_mnist/at/resnet20_resnet8.yaml": [("layer1", "layer1"), ("layer2", "layer2"), ("layer3", "layer3")],
    "tiny_imagenet/at/ResNet18_MobileNetV2.yaml": [("stage2", "layer1"), ("stage3", "layer2"),
                                                    ("stage4", "layer3"), ("conv1.1", "layer4")],
    # the student has one stage fewer: the teacher's layer4 is left out, and each pair is one resolution apart
    "tiny_imagenet/at/ResNet18_ShuffleV2.yaml": [("layer1", "layer1"), ("layer2", "layer2"), ("layer3", "layer3")],
    "imagenet/at/ResNet34_ResNet18.yaml": [(f"layer{i}", f"layer{i}") for i in range(1, 5)],
    "imagenet/at/ResNet50_MobileNetV1.yaml": [("model.5.5", "layer1"), ("model.11.5", "layer2"),
                                               ("model.13.5", "layer3")],
}
# the configs where aligning the deepest stages instead (our former pairing) gives another loss
DIFFERS_FROM_DEEPEST = {"tiny_imagenet/at/ResNet18_ShuffleV2.yaml", "imagenet/at/ResNet50_MobileNetV1.yaml"}


def _configs(types):
    found = {}
    for path in sorted(glob.glob(os.path.join(ROOT, "configs", "**", "*.yaml"), recursive=True)):
        if os.path.basename(path).startswith("_"):
            continue
        cfg = load_config(path)
        if cfg.DISTILLER.TYPE in types:
            found[os.path.relpath(path, os.path.join(ROOT, "configs"))] = cfg
    return found


AT_CONFIGS = _configs({"AT"})


def _taps(dataset, name):
    return PUBLISHED_FEATS.get((dataset, name)) or PUBLISHED_FEATS[name]


def _entry(output, how):
    if how == "first":
        output = output[0]
    if how == "relu":
        output = F.relu(output)
    if how == "relu6":
        output = F.relu6(output)
    return output.detach().clone()  # a copy: a later in-place change of the tensor would show as a mismatch


class Recorder:
    """Forward hooks that keep a copy of named modules' outputs (or inputs) of the last forward pass."""

    def __init__(self):
        self.values, self.handles = {}, []

    def output(self, model, name, how="out", key=None):
        module = dict(model.named_modules())[name]
        self.handles.append(module.register_forward_hook(
            lambda m, i, o: self.values.__setitem__(key or name, _entry(o, how))))

    def input(self, module, key):
        self.handles.append(module.register_forward_pre_hook(
            lambda m, args: self.values.__setitem__(key, args[0].detach().clone())))

    def close(self):
        for h in self.handles:
            h.remove()


def calibrate(model, size, seed):
    """BN running statistics of one random batch (cumulative average), so eval mode keeps activations O(1)."""
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    for m in bns:
        m.momentum = None
    torch.manual_seed(seed)
    with torch.no_grad():
        model.train()(torch.randn(4, 3, size, size))
    for m in bns:
        m.momentum = 0.1
    return model


def published_at_loss(student_feats, teacher_feats, p):
    """mdistiller's at_loss, from its definition: sum over zip(student, teacher) of mean((a_s - a_t)^2)."""
    def attention(f):
        return F.normalize(f.pow(p).mean(1).reshape(f.size(0), -1))

    total = 0.0
    for f_s, f_t in zip(student_feats, teacher_feats):
        s_h, t_h = f_s.shape[2], f_t.shape[2]
        if s_h > t_h:
            f_s = F.adaptive_avg_pool2d(f_s, (t_h, t_h))
        elif s_h < t_h:
            f_t = F.adaptive_avg_pool2d(f_t, (s_h, s_h))
        total = total + (attention(f_s) - attention(f_t)).pow(2).mean()
    return total


def _build(cfg, seed=0):
    dataset, size = cfg.DATASET.TYPE, INPUT[cfg.DATASET.TYPE]
    torch.manual_seed(seed)
    student = calibrate(build_model(cfg.DISTILLER.STUDENT, dataset), size, seed + 1)
    teacher = calibrate(build_model(cfg.DISTILLER.TEACHER, dataset), size, seed + 2)
    distiller = DISTILLER_REGISTRY.get(cfg.DISTILLER.TYPE).build(cfg, student, teacher, None)
    torch.manual_seed(seed + 3)
    x = torch.randn(2, 3, size, size)
    y = torch.randint(0, num_classes_for(dataset), (2,))
    return distiller.train(), x, y


def test_every_shipped_at_config_is_in_the_table():
    assert sorted(AT_CONFIGS) == sorted(PUBLISHED_AT_PAIRS)


@pytest.mark.parametrize("name", sorted(PUBLISHED_AT_PAIRS))
def test_at_term_is_the_published_loss_over_the_published_pairs(name):
    cfg = AT_CONFIGS[name]
    dataset = cfg.DATASET.TYPE
    s_taps, t_taps = _taps(dataset, cfg.DISTILLER.STUDENT), _taps(dataset, cfg.DISTILLER.TEACHER)
    # the published pairing: feats[1:] of both, zipped from the shallowest entry
    pairs = list(zip(s_taps[1:], t_taps[1:]))
    assert [(s[0], t[0]) for s, t in pairs] == PUBLISHED_AT_PAIRS[name]

    distiller, x, y = _build(cfg)
    rec = Recorder()
    for module, how in s_taps:
        rec.output(distiller.student, module, how, key=("s", module))
    for module, how in t_taps:
        rec.output(distiller.teacher.model, module, how, key=("t", module))
    try:
        terms = distiller.forward_train(x, y, epoch=1).terms
    finally:
        rec.close()
    student = [rec.values[("s", s[0])] for s, _ in pairs]
    teacher = [rec.values[("t", t[0])] for _, t in pairs]
    expected = cfg.AT.LOSS.FEAT_WEIGHT * published_at_loss(student, teacher, cfg.AT.P)
    assert terms["at"].value.item() == pytest.approx(expected.item(), rel=1e-5, abs=1e-9)
    assert expected.item() > 0

    # our former pairing (deepest stages aligned) is a different loss exactly where the stage counts differ
    s_all = [rec.values[("s", m)] for m, _ in s_taps[1:]]
    t_all = [rec.values[("t", m)] for m, _ in t_taps[1:]]
    k = min(len(s_all), len(t_all))
    deepest = cfg.AT.LOSS.FEAT_WEIGHT * published_at_loss(s_all[-k:], t_all[-k:], cfg.AT.P)
    if name in DIFFERS_FROM_DEEPEST:
        assert abs(deepest.item() - expected.item()) > 1e-3 * expected.item()
    else:
        assert deepest.item() == pytest.approx(expected.item(), rel=1e-6)


def test_at_map_is_the_signed_power_and_a_fractional_power_of_negatives_is_refused():
    cfg = load_config(None, ["DISTILLER.TYPE", "AT", "DISTILLER.TEACHER", "resnet20", "DISTILLER.STUDENT",
                             "resnet8", "AT.P", "3"])
    distiller, x, y = _build(cfg)
    rec = Recorder()
    for module, how in _CIFAR_RESNET:
        rec.output(distiller.student, module, how, key=("s", module))
        rec.output(distiller.teacher.model, module, how, key=("t", module))
    try:
        terms = distiller.forward_train(x, y, epoch=1).terms
    finally:
        rec.close()
    s = [rec.values[("s", m)] for m, _ in _CIFAR_RESNET[1:]]
    t = [rec.values[("t", m)] for m, _ in _CIFAR_RESNET[1:]]
    assert terms["at"].value.item() == pytest.approx(1000 * published_at_loss(s, t, 3).item(), rel=1e-5)
    # an odd power of a signed feature: the published f^3 map, not |f|^3
    f = torch.tensor([[[[2.0, -1.0]], [[0.0, -1.0]]]])  # (1, 2, 1, 2): channel means of cubes 4, -1
    from mdistiller.distillers.at import attention_map
    torch.testing.assert_close(attention_map(f, 3), torch.tensor([[4.0, -1.0]]) / 17 ** 0.5)
    # a fractional p on raw residual sums (the tiny-ImageNet MobileNetV2's stage outputs are linear) is refused
    cfg = load_config(None, ["DATASET.TYPE", "tiny_imagenet", "DISTILLER.TYPE", "AT", "DISTILLER.TEACHER",
                             "ResNet18", "DISTILLER.STUDENT", "MobileNetV2", "AT.P", "1.5"])
    distiller, x, y = _build(cfg)
    with pytest.raises(ConfigError, match="AT.P: 1.5 is fractional.*student's stage 1 has negative"):
        distiller.forward_train(x, y, epoch=1)
    with pytest.raises(ConfigError, match="AT.PAIRING"):
        load_config(None, ["DISTILLER.TYPE", "AT", "AT.PAIRING", "middle"])


# ---------------------------------------------------------------- ReviewKD, ResNet50 -> MobileNetV1

REVIEW_CONFIGS = {k: v for k, v in _configs({"REVIEWKD", "REVIEWKD++"}).items()
                  if v.DISTILLER.STUDENT == "MobileNetV1"}
# the published config (configs/imagenet/r50_mv1/reviewkd.yaml): IN_CHANNELS, OUT_CHANNELS, SHAPES per ABF,
# shallowest first; the student levels are preact_feats + [pooled] (STU_PREACT), the teacher's
# preact_feats[1:] + [pooled]
PUBLISHED_IN, PUBLISHED_OUT, PUBLISHED_SHAPES = (128, 256, 512, 1024, 1024), (256, 512, 1024, 2048, 2048), \
    (56, 28, 14, 7, 1)
# published MobileNetV1 preact_feats: the last BN of model.3, .5, .11, .13; then the pooled feature
STUDENT_LEVELS = tuple(f"model.{i}.4" for i in (3, 5, 11, 13)) + ("avgpool",)
_R50_LAST_BLOCK = {1: 2, 2: 3, 3: 5, 4: 2}  # index of each stage's last Bottleneck (3, 4, 6, 3 blocks)


def test_both_r50_mv1_review_configs_are_checked():
    assert sorted(REVIEW_CONFIGS) == ["imagenet/reviewkd/ResNet50_MobileNetV1.yaml",
                                      "imagenet/reviewkdpp/ResNet50_MobileNetV1.yaml"]


@pytest.mark.filterwarnings("ignore:.*class means were never set")  # REVIEWKD++'s dino term, unused here
@pytest.mark.parametrize("name", sorted(REVIEW_CONFIGS))
def test_reviewkd_r50_mv1_feeds_the_published_levels(name):
    cfg = REVIEW_CONFIGS[name]
    assert cfg.REVIEWKD.STU_PREACT
    distiller, x, y = _build(cfg)
    abfs = distiller.fusion.abfs
    assert len(abfs) == 5
    assert [abf.reduce[0].in_channels for abf in abfs] == list(PUBLISHED_IN)
    assert [abf.output[0].out_channels for abf in abfs] == list(PUBLISHED_OUT)
    assert [abf.attention is not None for abf in abfs] == [True] * 4 + [False]  # the deepest fuses nothing

    rec = Recorder()
    for name_ in STUDENT_LEVELS:
        rec.output(distiller.student, name_, key=("s", name_))
    t_modules = dict(distiller.teacher.model.named_modules())
    for stage, last in _R50_LAST_BLOCK.items():
        block = f"layer{stage}.{last}"
        rec.input(t_modules[block], ("t_in", stage))  # identity shortcut: the block's input is added back
        rec.output(distiller.teacher.model, f"{block}.bn3", key=("t_bn3", stage))
    rec.output(distiller.teacher.model, "avgpool", key=("t_pool", 0))
    for i, abf in enumerate(abfs):
        rec.input(abf, ("abf_in", i))
        rec.handles.append(abf.register_forward_hook(
            lambda m, args, out, i=i: rec.values.__setitem__(("abf_out", i), out[0].detach().clone())))
    try:
        terms = distiller.forward_train(x, y, epoch=5).terms
    finally:
        rec.close()

    for i, level in enumerate(STUDENT_LEVELS):  # ABF i takes the published student level i
        torch.testing.assert_close(rec.values[("abf_in", i)], rec.values[("s", level)], rtol=0, atol=0)
        assert rec.values[("abf_in", i)].shape[-1] == PUBLISHED_SHAPES[i]
    teacher = [rec.values[("t_bn3", k)] + rec.values[("t_in", k)] for k in range(1, 5)]
    teacher.append(rec.values[("t_pool", 0)])
    outputs = [rec.values[("abf_out", i)] for i in range(5)]
    assert [tuple(o.shape[1:]) for o in outputs] == [(c, s, s) for c, s in zip(PUBLISHED_OUT, PUBLISHED_SHAPES)]
    assert [tuple(t.shape) for t in teacher] == [tuple(o.shape) for o in outputs]
    if cfg.DISTILLER.TYPE != "REVIEWKD":
        return
    # the ReviewKD term is the published HCL of ABF output i against teacher level i (ramp 1 at epoch 5)
    expected = cfg.REVIEWKD.LOSS.REVIEWKD_WEIGHT * published_hcl(outputs, teacher)
    assert terms["reviewkd"].value.item() == pytest.approx(expected.item(), rel=1e-5)


def published_hcl(student, teacher):
    """ReviewKD's hierarchical context loss from its definition, summed over levels (test_wrn_taps.hand_hcl: one
    level, written from the published code)."""
    return sum(hand_hcl(fs, ft) for fs, ft in zip(student, teacher))
