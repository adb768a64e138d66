"""AB, activation boundaries (Heo et al., AAAI 2019, "Knowledge Transfer via Distillation of Activation Boundaries
Formed by Hidden Neurons"): the student's neurons learn to be active exactly where the teacher's are, through a
hinge-like loss on the pre-activations of each stage.

Taps: features["preact_feats"] after the stem (RepDistiller's feat[1:-1] with preact=True): each stage's output
before its last ReLU (the last block's residual sum for the ResNets; for WRN each stage output through the BN the
next block or the head applies). A connector maps each student tap onto the teacher's (RepDistiller models/util.py
`Connector`): none where the channels and the height agree, else ConvReg without its ReLU (conv, then BatchNorm;
the conv a 3x3 stride-2 when the student map is twice the teacher's height, a 4x4 stride-2 transposed conv when
half, else a (1 + Hs - Ht) x (1 + Ws - Wt) conv). With m = MARGIN (1), s a connected student tap, t the teacher's
(distiller_zoo/AB.py `criterion_alternative_l2`):
    crit(s, t) = sum over elements of (s + m)^2 [s > -m and t <= 0] + (s - m)^2 [s <= m and t > 0]
and for n taps, loss = sum_i 2^(i - n + 1) crit(s_i, t_i) / batch / 1000 * 3 (weights 1/4, 1/2, 1 for three).

How the published code uses it (HobbitLong/RepDistiller, train_student.py `elif opt.distill == 'abound'`):
  - helper/pretrain.py `init`: for opt.init_epochs (30) epochs, loss = the AB sum alone (no cross-entropy), a
    separate SGD over the connectors and `model_s.get_feat_modules()` (momentum 0.9, weight decay 5e-4, LR
    opt.learning_rate held constant: 0.05, 0.01 for MobileNetV2 / ShuffleNet students); `model_s.eval()` then those
    modules `.train()`, so what get_feat_modules leaves out (the classifier; WRN's final BN, which makes the last
    tap; MobileNetV2's last 1x1 conv; ShuffleV2's conv2/bn2) runs in eval mode and is not stepped;
  - then 240 epochs with a fresh SGD over the student: helper/loops.py `train_distill` sets `loss_kd = 0` for
    abound, so loss = CE alone (the script's `-a 0 -b 1`: beta 1 multiplies zero); the connectors are
    unused.

Here the two stages are one run: for epochs 1..AB.INIT_EPOCHS the step returns the AB term alone (unweighted, as
published), with the student's modules outside get_feat_modules (PUBLISHED_HEADS below, for the CIFAR zoo) in eval
mode and without gradients, so the optimizer skips them as the published init optimizer leaves them out (for a WRN
student its final BN normalises the last tap with its running statistics, unchanged, as published). After it,
CE_WEIGHT * CE plus FEAT_WEIGHT * AB when FEAT_WEIGHT > 0 (left out at 0: the published main stage). The configs
that reproduce the published recipe (configs/cifar100/ab/) set INIT_EPOCHS 30, FEAT_WEIGHT 0, SOLVER.EPOCHS 270
and the LR decay shifted by the 30 init epochs (180, 210, 240), so the init epochs run at the constant base LR.
Where that differs from the published two runs: the momentum buffers of the feature layers carry over from the
init into the main stage (published: a fresh optimizer), and the student is evaluated and checkpointed during the
init epochs too. INIT_EPOCHS 0 with FEAT_WEIGHT > 0 is a one-stage variant, AB beside the CE, which no published
number uses.
"""

import contextlib

import torch
import torch.nn as nn
from yacs.config import CfgNode as CN

from ..models.cifar.mobilenetv2 import CifarMobileNetV2
from ..models.cifar.resnet import CifarResNet
from ..models.cifar.resnet_wide_stem import CifarStemResNet
from ..models.cifar.shufflenetv1 import ShuffleNetV1
from ..models.cifar.shufflenetv2 import ShuffleNetV2
from ..models.cifar.vgg import VGG
from ..models.cifar.wrn import WideResNet
from ..utils.errors import ConfigError
from .init_stage import InitStageDistiller
from .fitnet import size_matching_conv
from .losses import StepOutput, ce_term, distill_loss
from .registry import DISTILLER_REGISTRY

_cfg = CN()
# epochs at the start of the run that train the connectors and the student's feature layers with the AB loss alone
# (the published initialisation stage: 30); 0: no such stage
_cfg.INIT_EPOCHS = 30
_cfg.MARGIN = 1.0
_cfg.LOSS = CN()
_cfg.LOSS.CE_WEIGHT = 1.0
# weight of the AB term beside the CE after the init stage; the published main stage has none (0)
_cfg.LOSS.FEAT_WEIGHT = 0.0

# The student's top-level modules that RepDistiller's `get_feat_modules()` leaves out (its models/*.py), by our class:
# in eval mode and untrained during the published init. Other models: none (every module may train).
PUBLISHED_HEADS = ((CifarResNet, ("fc",)), (CifarStemResNet, ("linear",)), (WideResNet, ("bn1", "fc")),
                   (VGG, ("classifier",)), (CifarMobileNetV2, ("conv2", "classifier")), (ShuffleNetV1, ("linear",)),
                   (ShuffleNetV2, ("conv2", "bn2", "linear")))


def published_head(student):
    for cls, names in PUBLISHED_HEADS:
        if type(student) is cls:
            return [getattr(student, name) for name in names]
    return []


@contextlib.contextmanager
def head_frozen(modules):
    """`modules` in eval mode, their parameters out of the autograd graph of what runs inside (restored after)."""
    modes = [m.training for m in modules]
    params = [p for m in modules for p in m.parameters() if p.requires_grad]
    for m in modules:
        m.eval()
    for p in params:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for m, mode in zip(modules, modes):
            m.train(mode)
        for p in params:
            p.requires_grad_(True)


def tap_shapes(model, image_size):
    """[(C, H, W)] of features["preact_feats"] after the stem, for one zero image in eval mode (no BN statistic or
    random draw touched; RepDistiller probes in eval mode too)."""
    was_training = model.training
    model.eval()
    try:
        param = next(model.parameters())
        with torch.no_grad():
            _, feats = model(torch.zeros(1, 3, image_size, image_size, device=param.device, dtype=param.dtype))
    finally:
        model.train(was_training)
    return [tuple(f.shape[1:]) for f in feats["preact_feats"][1:]]


class ConvReg(nn.Module):
    """RepDistiller's ConvReg(s_shape, t_shape, use_relu=False): conv (chosen from the heights), then BatchNorm."""

    def __init__(self, s_shape, t_shape):
        super().__init__()
        (_, s_h, s_w), (t_c, t_h, t_w) = s_shape, t_shape
        self.conv = size_matching_conv(s_shape, t_shape)
        if self.conv is None:
            raise ConfigError(f"config keys DISTILLER.STUDENT / DISTILLER.TEACHER: no AB connector maps the "
                              f"student's {s_h}x{s_w} map onto the teacher's {t_h}x{t_w} (the teacher's may be at most "
                              f"twice, and otherwise no larger than, the student's, as in the published ConvReg); "
                              f"choose another pair")
        self.bn = nn.BatchNorm2d(t_c)

    def forward(self, x):
        return self.bn(self.conv(x))


def connector(s_shape, t_shape):
    """Identity where channels and height agree (RepDistiller checks those two), else ConvReg."""
    if s_shape[0] == t_shape[0] and s_shape[1] == t_shape[1]:
        return nn.Identity()
    return ConvReg(s_shape, t_shape)


def boundary_criterion(source, target, margin=1.0):
    """sum of (s + m)^2 [s > -m, t <= 0] + (s - m)^2 [s <= m, t > 0] (RepDistiller's criterion_alternative_l2)."""
    loss = ((source + margin) ** 2 * ((source > -margin) & (target <= 0)).to(source.dtype)
            + (source - margin) ** 2 * ((source <= margin) & (target > 0)).to(source.dtype))
    return loss.abs().sum()


def ab_loss(taps_student, taps_teacher, margin=1.0):
    """sum_i 2^(i - n + 1) crit(s_i, t_i) / batch / 1000 * 3 over the n (connected) tap pairs."""
    n, batch = len(taps_student), taps_student[0].shape[0]
    total = 0.0
    for i, (s, t) in enumerate(zip(taps_student, taps_teacher)):
        total = total + 2.0 ** (i - n + 1) * boundary_criterion(s, t, margin) / batch / 1000 * 3
    return total


@DISTILLER_REGISTRY.register("AB", config=_cfg)
class AB(InitStageDistiller):
    init_section = "AB"
    ramped_terms = ("ab",)

    def __init__(self, *, student, teacher, image_size=32, init_epochs=30, margin=1.0, ce_weight=1.0,
                 feat_weight=0.0):
        super().__init__(student=student, teacher=teacher)
        shapes_s, shapes_t = tap_shapes(student, image_size), tap_shapes(self.teacher.model, image_size)
        if len(shapes_s) != len(shapes_t):
            raise ConfigError(f"config keys DISTILLER.STUDENT / DISTILLER.TEACHER: AB pairs the stages one to one, "
                              f"but the student has {len(shapes_s)} and the teacher {len(shapes_t)} (the published "
                              f"Connector refuses such a pair too); choose networks with as many stages")
        self.connectors = nn.ModuleList(connector(s, t) for s, t in zip(shapes_s, shapes_t))
        self.init_epochs, self.margin = init_epochs, margin
        self.ce_weight, self.feat_weight = ce_weight, feat_weight

    @classmethod
    def from_config(cls, cfg, data):
        c = cfg.AB
        return {"image_size": data.image_size if data is not None else 32, "init_epochs": c.INIT_EPOCHS,
                "margin": c.MARGIN, "ce_weight": c.LOSS.CE_WEIGHT, "feat_weight": c.LOSS.FEAT_WEIGHT}

    @classmethod
    def validate_config(cls, cfg):
        c = cfg.AB
        cls.validate_init_epochs(cfg)
        for key, value in (("MARGIN", c.MARGIN), ("LOSS.CE_WEIGHT", c.LOSS.CE_WEIGHT),
                           ("LOSS.FEAT_WEIGHT", c.LOSS.FEAT_WEIGHT)):
            if value < 0:
                raise ConfigError(f"config key AB.{key}: must be >= 0, got {value}")
        if c.INIT_EPOCHS == 0 and c.LOSS.FEAT_WEIGHT == 0:
            raise ConfigError("config key AB.LOSS.FEAT_WEIGHT: 0 with AB.INIT_EPOCHS 0 trains with the CE alone (no "
                              "AB anywhere); set AB.INIT_EPOCHS 30 (the published initialisation stage) or a "
                              "positive FEAT_WEIGHT")

    def ab_loss(self, preacts_student, preacts_teacher):
        taps_s = [c(f) for c, f in zip(self.connectors, preacts_student[1:])]
        return ab_loss(taps_s, preacts_teacher[1:], self.margin)

    def forward_train(self, images, labels, epoch, index=None):
        init = self.in_init_stage(epoch)
        with head_frozen(published_head(self.student)) if init else contextlib.nullcontext():
            logits, features = self.student(images)
        logits_t, features_t = self.teacher(images)
        if init:
            # the published init stage: the AB sum alone, unweighted
            terms = {"ab": distill_loss(self.ab_loss(features["preact_feats"], features_t["preact_feats"]))}
        else:
            terms = {"ce": ce_term(logits, labels, self.ce_weight)}
            if self.feat_weight > 0:
                terms["ab"] = distill_loss(
                    self.feat_weight * self.ab_loss(features["preact_feats"], features_t["preact_feats"]))
        return StepOutput(logits, terms, features, logits_t, features_t)
