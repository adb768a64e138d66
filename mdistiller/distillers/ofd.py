"""OFD, "A Comprehensive Overhaul of Feature Distillation" (Heo et al., ICCV 2019): distil the features *before*
the teacher's last ReLU, where its negative responses are, but only as far as the ReLU would tell them apart.

Per stage: the student's pre-ReLU stage output goes through a connector (1x1 conv + BN, to the teacher's width);
the teacher's pre-ReLU output is "margin ReLU"-ed: negative values only say "off", so they are replaced by the
per-channel margin m = E[x | x < 0] for x ~ N(beta, gamma^2), beta/gamma being the bias/weight of the teacher BN
that produces that output (models' `bn_before_relu()`). The partial L2 distance then skips positions where the
student is already below the target and the target is not positive:
    d = (s - m)^2  where s > m and t <= m;   (s - t)^2  where s > t and m < t <= 0;   (s - t)^2  where t > 0,
summed over channels and positions, averaged over the batch, and stage i of n weighted 1 / 2^(n - i - 1) (the
deepest counts fully). loss = CE_WEIGHT * CE + FEAT_WEIGHT * sum over stages.

Exactly the published code (mdistiller's OFD.py), op for op:
  - stages: the entries of features["preact_feats"] after the stem, student and teacher lists aligned at their
    deepest stage (the shorter length kept); the teacher's map is adaptive-average-pooled to the student's size;
  - the margin uses |gamma| and falls back to -3|gamma| where P(x < 0) <= 0.001; the three masks are the
    paper's margin ReLU max(t, m) followed by its partial distance (zero where s <= max(t, m) <= 0);
  - the BN is the one the published models name: for a residual stage its last block's branch BN (the
    shortcut is added after it, so the margin is that of the branch, not of the sum), for WRN the next block's
    (or the head's) BN, for VGG each block's last BN, for MobileNetV2 the tapped groups' projection BNs.
Ours where the published code leaves it open: the margins are aligned with the stages the same way as the
features (the published code pairs the first margins with the last stages, which differs only when the teacher
has more stages than the student: no published config does); a BN with gamma == 0 (constant output beta) gets
margin min(beta, 0) instead of a division by zero. ShuffleNet teachers have no BN before their last ReLU
(published: not supported); they are refused.

The teacher's mode, OFD.TEACHER_MODE. mdistiller's OFD overrides `train(mode)` so that every child, the teacher
included, follows the distiller's mode: while distilling, the teacher runs in training mode, under torch.no_grad.
Its BatchNorms normalise each batch with that batch's own statistics (so the pre-ReLU features, and the targets,
depend on the batch: per GPU under their nn.DataParallel, per process under our DDP) and update their running
statistics as they go; its parameters never train. "train" is that, and is what the configs reproducing
mdistiller's OFD numbers set; "eval" (the key's default, and what every other method does) runs the teacher with its
stored statistics. The margins are computed once, at construction, from the BN affine weights and biases, which
training mode does not touch, so they are the same either way. In "train" the teacher's moving statistics are part of
the checkpoint (`learnable_state_dict`), so a resumed run continues them exactly. SPEED.TEACHER_INT8 (BatchNorm
folded into the int8 convolutions) cannot run a teacher in training mode and is refused with it.
"""

import logging
import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from yacs.config import CfgNode as CN

from ..utils.errors import ConfigError
from .base import Distiller
from .losses import StepOutput, ce_term, distill_loss
from .registry import DISTILLER_REGISTRY

logger = logging.getLogger("mdistiller")

TEACHER_MODES = ("eval", "train")

_cfg = CN()
# "train": the teacher follows the distiller's train()/eval() as in mdistiller's OFD.py (BatchNorm on batch statistics,
# running statistics updated; configs/<dataset>/ofd/ for CIFAR-100 and ImageNet set it); "eval": stored statistics
_cfg.TEACHER_MODE = "eval"
_cfg.CONNECTOR = CN()
_cfg.CONNECTOR.KERNEL_SIZE = 1
_cfg.LOSS = CN()
_cfg.LOSS.CE_WEIGHT = 1.0
_cfg.LOSS.FEAT_WEIGHT = 0.001


def _normal_cdf(z):
    return 0.5 * math.erfc(-z / math.sqrt(2.0))


def channel_margin(gamma, beta):
    """E[x | x < 0] for x ~ N(beta, gamma^2), the published way (-3|gamma| where P(x < 0) <= 0.001)."""
    s, m = abs(float(gamma)), float(beta)
    if s == 0.0:
        return min(m, 0.0)
    p_neg = _normal_cdf(-m / s)
    if p_neg > 0.001:
        return -s * math.exp(-((m / s) ** 2) / 2) / math.sqrt(2 * math.pi) / p_neg + m
    return -3 * s


def bn_margin(bn):
    """(1, C, 1, 1) margins of a BatchNorm2d's channels, from its affine weight (std) and bias (mean)."""
    values = [channel_margin(g, b) for g, b in zip(bn.weight.detach().cpu().tolist(), bn.bias.detach().cpu().tolist())]
    return torch.tensor(values, dtype=torch.float32).view(1, -1, 1, 1)


def partial_l2(source, target, margin):
    """The partial L2 distance: sum over (C, H, W) of the batch mean of the masked squared differences."""
    margin = margin.to(source)
    loss = ((source - margin) ** 2 * ((source > margin) & (target <= margin)).float()
            + (source - target) ** 2 * ((source > target) & (target > margin) & (target <= 0)).float()
            + (source - target) ** 2 * (target > 0).float())
    return loss.abs().mean(dim=0).sum()


def connector(s_channels, t_channels, kernel_size=1):
    """conv (no bias) + BN, conv init N(0, 2 / (k * k * out_channels)) as published."""
    conv = nn.Conv2d(s_channels, t_channels, kernel_size, stride=1, padding=(kernel_size - 1) // 2, bias=False)
    nn.init.normal_(conv.weight, 0.0, math.sqrt(2.0 / (kernel_size * kernel_size * t_channels)))
    bn = nn.BatchNorm2d(t_channels)
    return nn.Sequential(conv, bn)


def deepest(items, n):
    """The last n entries: lists of different lengths are aligned at the deepest stage."""
    return list(items)[len(items) - n:]


@DISTILLER_REGISTRY.register("OFD", config=_cfg)
class OFD(Distiller):
    ramped_terms = ("ofd",)

    def __init__(self, *, student, teacher, kernel_size=1, ce_weight=1.0, feat_weight=0.001, teacher_mode="eval"):
        super().__init__(student=student, teacher=teacher)
        if teacher_mode not in TEACHER_MODES:
            raise ConfigError(f"config key OFD.TEACHER_MODE: one of {', '.join(TEACHER_MODES)}, got {teacher_mode!r}")
        self.ce_weight, self.feat_weight, self.teacher_mode = ce_weight, feat_weight, teacher_mode
        s_channels, t_channels = student.stage_channels()[1:], self.teacher.stage_channels()[1:]
        try:
            bns = list(self.teacher.model.bn_before_relu())
        except NotImplementedError as e:
            raise ConfigError(f"config key DISTILLER.TEACHER: OFD needs the teacher's BatchNorm before each stage's "
                              f"last ReLU, and {e}; use a ResNet, WRN, VGG or MobileNetV2 teacher") from None
        if len(bns) != len(t_channels):
            raise ValueError(f"{type(self.teacher.model).__name__}.bn_before_relu() gives {len(bns)} BNs for "
                             f"{len(t_channels)} stages")
        self.num_stages = n = min(len(s_channels), len(t_channels))
        self.connectors = nn.ModuleList(
            connector(s, t, kernel_size) for s, t in zip(deepest(s_channels, n), deepest(t_channels, n)))
        for i, bn in enumerate(deepest(bns, n)):
            # Fixed by the teacher; not checkpointed (rebuilt from it), moved with the distiller.
            self.register_buffer(f"margin_{i}", bn_margin(bn), persistent=False)
        if teacher_mode == "train":
            self.teacher.follow_train_mode()
            logger.info("OFD.TEACHER_MODE train: the teacher runs in training mode while distilling (BatchNorm on "
                        "batch statistics, running statistics updated and checkpointed), as mdistiller's OFD does")

    @classmethod
    def from_config(cls, cfg, data):
        c = cfg.OFD
        return {"kernel_size": c.CONNECTOR.KERNEL_SIZE, "ce_weight": c.LOSS.CE_WEIGHT,
                "feat_weight": c.LOSS.FEAT_WEIGHT, "teacher_mode": c.TEACHER_MODE}

    @classmethod
    def validate_config(cls, cfg):
        c = cfg.OFD
        k = c.CONNECTOR.KERNEL_SIZE
        if not isinstance(k, int) or k < 1 or k % 2 == 0:
            raise ConfigError(f"config key OFD.CONNECTOR.KERNEL_SIZE: must be an odd integer >= 1 (the connector "
                              f"keeps the spatial size), got {k!r}")
        if c.TEACHER_MODE not in TEACHER_MODES:
            raise ConfigError(f"config key OFD.TEACHER_MODE: one of {', '.join(TEACHER_MODES)} (train: mdistiller's "
                              f"teacher in training mode), got {c.TEACHER_MODE!r}")
        if c.TEACHER_MODE == "train" and cfg.SPEED.TEACHER_INT8:
            raise ConfigError("config key SPEED.TEACHER_INT8: the int8 teacher has its BatchNorm folded into its "
                              "convolutions and cannot run in training mode, which OFD.TEACHER_MODE train asks for; "
                              "set SPEED.TEACHER_INT8 False or OFD.TEACHER_MODE eval")

    def learnable_state_dict(self):
        """The method's state; with the teacher in training mode also the teacher's moving BatchNorm statistics."""
        state = super().learnable_state_dict()
        if self.teacher_mode == "train":
            state.update({f"teacher.{k}": v for k, v in self.teacher.buffer_state().items()})
        return state

    def margins(self):
        return [getattr(self, f"margin_{i}") for i in range(self.num_stages)]

    def ofd_loss(self, preacts_student, preacts_teacher):
        """Sum over the aligned stages of partial_l2 / 2^(n - i - 1); inputs are preact_feats without the stem."""
        n = self.num_stages
        total = 0.0
        for i, (f_s, f_t, conn, margin) in enumerate(
                zip(deepest(preacts_student, n), deepest(preacts_teacher, n), self.connectors, self.margins())):
            f_s = conn(f_s)
            f_t = F.adaptive_avg_pool2d(f_t, f_s.shape[-2:]).detach()
            total = total + partial_l2(f_s, f_t, margin) / 2 ** (n - i - 1)
        return total

    def forward_train(self, images, labels, epoch, index=None):
        logits, features = self.student(images)
        logits_t, features_t = self.teacher(images)
        loss = self.ofd_loss(features["preact_feats"][1:], features_t["preact_feats"][1:])
        return StepOutput(logits, {
            "ce": ce_term(logits, labels, self.ce_weight),
            "ofd": distill_loss(self.feat_weight * loss),
        }, features, logits_t, features_t)
