"""AT, attention transfer (Zagoruyko & Komodakis, ICLR 2017): match *where* the networks look.

A stage's spatial attention map is the channel mean of |f|^p, flattened and L2-normalised per sample. Only
its shape matters, not the channel count or the activation scale, so student and teacher stages of any
width compare without a connector. loss = CE_WEIGHT * CE + FEAT_WEIGHT * sum over stages of
mean((a_s - a_t)^2); p = 2 and weight 1000 are the CRD benchmark's settings.

Stages: the stage outputs of features["feats"] (the stem excluded), paired from the deepest one backwards and
truncated to the shorter list, so networks with different stage counts (VGG's 4 stages vs a CIFAR ResNet's 3)
compare their last stages, which are the ones with comparable semantics. Where a pair's spatial sizes
differ, both feature maps are adaptive-average-pooled to the smaller size before the attention is taken
(as the CRD benchmark does); pooling rather than upsampling keeps every attention value an average of real
activations.
"""

import torch.nn.functional as F
from yacs.config import CfgNode as CN

from ..config.defaults import register_config_section
from ..utils.errors import ConfigError
from .base import Distiller
from .losses import distill_loss, task_loss
from .registry import DISTILLER_REGISTRY

_cfg = CN()
_cfg.P = 2.0
_cfg.LOSS = CN()
_cfg.LOSS.CE_WEIGHT = 1.0
_cfg.LOSS.FEAT_WEIGHT = 1000.0
register_config_section("AT", _cfg)


def attention_map(feat, p=2.0):
    """(N, H*W) map: channel mean of |f|^p, L2-normalised per sample."""
    return F.normalize(feat.abs().pow(p).mean(dim=1).flatten(1), dim=1)


def matching_size(f_s, f_t):
    """Both maps pooled to the smaller height and width of the two, where they differ."""
    size = (min(f_s.shape[-2], f_t.shape[-2]), min(f_s.shape[-1], f_t.shape[-1]))
    if f_s.shape[-2:] != size:
        f_s = F.adaptive_avg_pool2d(f_s, size)
    if f_t.shape[-2:] != size:
        f_t = F.adaptive_avg_pool2d(f_t, size)
    return f_s, f_t


def paired_stages(feats_student, feats_teacher):
    """Stage outputs (stem dropped) of both networks, aligned from the deepest stage, as many as both have."""
    s, t = list(feats_student[1:]), list(feats_teacher[1:])
    k = min(len(s), len(t))
    return list(zip(s[len(s) - k:], t[len(t) - k:]))


def at_loss(feats_student, feats_teacher, p=2.0):
    """Sum over the given stage pairs of mean((a_s - a_t)^2)."""
    total = 0.0
    for f_s, f_t in zip(feats_student, feats_teacher):
        f_s, f_t = matching_size(f_s, f_t)
        total = total + (attention_map(f_s, p) - attention_map(f_t, p)).pow(2).mean()
    return total


@DISTILLER_REGISTRY.register("AT")
class AT(Distiller):
    config_section = "AT"
    ramped_terms = ("at",)

    @classmethod
    def validate_config(cls, cfg):
        c = cfg.AT
        if c.P <= 0:
            raise ConfigError(f"config key AT.P: must be > 0, got {c.P}")
        for key in ("CE_WEIGHT", "FEAT_WEIGHT"):
            if c.LOSS[key] < 0:
                raise ConfigError(f"config key AT.LOSS.{key}: must be >= 0, got {c.LOSS[key]}")

    def forward_train(self, images, labels, epoch, index=None):
        logits, features = self.student(images)
        _, features_t = self.teacher_forward(images)
        c = self.cfg.AT
        pairs = paired_stages(features["feats"], features_t["feats"])
        loss = at_loss([s for s, _ in pairs], [t for _, t in pairs], c.P)
        return logits, {
            "ce": task_loss(c.LOSS.CE_WEIGHT * F.cross_entropy(logits, labels)),
            "at": distill_loss(c.LOSS.FEAT_WEIGHT * loss),
        }
