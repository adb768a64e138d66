"""ICKD, inter-channel correlation (Liu et al., ICCV 2021, "Exploring Inter-Channel Correlation for
Diversity-Preserved Knowledge Distillation"): the student matches, in an embedding of the teacher's width, how the
teacher's channels correlate with each other (the ICKD-C variant, the paper's CIFAR-100 setting).

On features["feats"][-1] of both networks (the last stage's map before pooling: post-ReLU for the ResNets, VGG and
the light students; WRN's raw last residual sum - RepDistiller's feat[-2], which the authors' CIFAR code reads):
  - the student map goes through a 1x1 convolution C_s -> C_t without bias, then BatchNorm2d(C_t) (the authors'
    `Embed`: conv2d + a BN named l2norm), both with torch's default initialisation and trained by the loss;
  - per sample, the inter-channel correlation G = F F^T (C_t x C_t) of the map flattened to (C_t, H*W), each row
    L2-normalised (torch.nn.functional.normalize, eps 1e-12) - the spatial sizes of the two maps may differ;
  - L_icc = sum over samples and entries of (G_s - G_t)^2, divided by C_t * N.
loss = CE_WEIGHT * CE + KD_WEIGHT * KD(T) + FEAT_WEIGHT * L_icc.

Exactly the authors' CIFAR-100 code (ADLab-AutoDrive/ICKD, Cifar100/, on the RepDistiller codebase):
distiller_zoo/ICKD.py `ICKDLoss.batch_loss` and `Embed`; train_student.py `elif opt.distill == 'ickd'`:
s_dim = feat_s[-2] channels, feat_dim = t_dim = feat_t[-2] channels, only embed_s in the optimizer (a later
version also builds an embed_t that the loss never uses); helper/loops.py: g_s = [feat_s[-2]], g_t = [feat_t[-2]],
loss = gamma * CE + alpha * KL + beta * sum(ICKD). Cifar100/README.md: "ICKD-C (Ours)" is -a 1 -b 2.5 (with
Hinton's KD, RepDistiller's DistillKL, T = 4), "ICKD-C (w/o KL)" -a 0 -b 2.5; defaults here: CE 1, KD 1 (T 4),
feat 2.5 (one version of Cifar100/train_student.sh passes -b 4 instead). KD_WEIGHT 0 drops the KD term (w/o KL).
"""

import torch.nn as nn
import torch.nn.functional as F
from yacs.config import CfgNode as CN

from ..utils.errors import ConfigError
from .base import Distiller
from .losses import StepOutput, ce_term, distill_loss, kd_loss
from .registry import DISTILLER_REGISTRY

_cfg = CN()
_cfg.TEMPERATURE = 4.0
_cfg.LOSS = CN()
_cfg.LOSS.CE_WEIGHT = 1.0
_cfg.LOSS.KD_WEIGHT = 1.0  # "ICKD-C (Ours)"; 0 is "ICKD-C (w/o KL)"
_cfg.LOSS.FEAT_WEIGHT = 2.5


class ChannelEmbed(nn.Sequential):
    """1x1 conv (no bias) C_s -> C_t, then BatchNorm2d(C_t): the authors' `Embed`, default initialisation."""

    def __init__(self, in_channels, out_channels):
        super().__init__(nn.Conv2d(in_channels, out_channels, kernel_size=1, bias=False), nn.BatchNorm2d(out_channels))


def channel_correlation(f):
    """(N, C, C): per sample F F^T of the (C, H*W) flattened map, each row L2-normalised."""
    f = f.flatten(2)
    return F.normalize(f @ f.transpose(1, 2), dim=2)


def ickd_loss(f_s, f_t):
    """Sum of the squared differences of the two correlation matrices, divided by channels * batch."""
    n, c = f_s.shape[0], f_s.shape[1]
    return (channel_correlation(f_s) - channel_correlation(f_t)).pow(2).sum() / (c * n)


@DISTILLER_REGISTRY.register("ICKD", config=_cfg)
class ICKD(Distiller):
    ramped_terms = ("ickd",)

    def __init__(self, *, student, teacher, temperature=4.0, ce_weight=1.0, kd_weight=1.0, feat_weight=2.5):
        super().__init__(student=student, teacher=teacher)
        self.embed = ChannelEmbed(student.stage_channels()[-1], self.teacher.stage_channels()[-1])
        self.temperature, self.ce_weight = temperature, ce_weight
        self.kd_weight, self.feat_weight = kd_weight, feat_weight

    @classmethod
    def from_config(cls, cfg, data):
        c = cfg.ICKD
        return {"temperature": c.TEMPERATURE, "ce_weight": c.LOSS.CE_WEIGHT, "kd_weight": c.LOSS.KD_WEIGHT,
                "feat_weight": c.LOSS.FEAT_WEIGHT}

    @classmethod
    def validate_config(cls, cfg):
        c = cfg.ICKD
        if c.TEMPERATURE <= 0:
            raise ConfigError(f"config key ICKD.TEMPERATURE: must be > 0, got {c.TEMPERATURE} (4 is the published "
                              f"setting)")
        for key, value in (("LOSS.CE_WEIGHT", c.LOSS.CE_WEIGHT), ("LOSS.KD_WEIGHT", c.LOSS.KD_WEIGHT),
                           ("LOSS.FEAT_WEIGHT", c.LOSS.FEAT_WEIGHT)):
            if value < 0:
                raise ConfigError(f"config key ICKD.{key}: must be >= 0, got {value}")
        if c.LOSS.FEAT_WEIGHT == 0:
            raise ConfigError("config key ICKD.LOSS.FEAT_WEIGHT: 0 leaves no inter-channel term (that is KD, "
                              "DISTILLER.TYPE KD); 2.5 is the published setting")

    def forward_train(self, images, labels, epoch, index=None):
        logits, features = self.student(images)
        logits_t, features_t = self.teacher(images)
        loss = ickd_loss(self.embed(features["feats"][-1]), features_t["feats"][-1])
        terms = {"ce": ce_term(logits, labels, self.ce_weight)}
        if self.kd_weight > 0:
            terms["kd"] = distill_loss(self.kd_weight * kd_loss(logits, logits_t, self.temperature))
        terms["ickd"] = distill_loss(self.feat_weight * loss)
        return StepOutput(logits, terms, features, logits_t, features_t)
