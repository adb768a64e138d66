"""AT, attention transfer (Zagoruyko & Komodakis, ICLR 2017): match *where* the networks look.

A stage's spatial attention map is the channel mean of f^p, flattened and L2-normalised per sample. Only its
shape matters, not the channel count or the activation scale, so student and teacher stages of any width
compare without a connector. loss = CE_WEIGHT * CE + FEAT_WEIGHT * sum over stage pairs of
mean((a_s - a_t)^2); p = 2 and weight 1000 are the CRD benchmark's settings.

Exactly the published code's loss (mdistiller's AT.py):
  - stages: the entries of features["feats"] after the stem, zipped from the shallowest one and truncated to
    the shorter list (AT.PAIRING "shallowest"). Networks with different stage counts therefore pair stages
    by position, not by depth: ResNet50 -> MobileNetV1 on ImageNet pairs the student's 3 stages with the
    teacher's layer1..layer3, Tiny-ImageNet ResNet18 -> ShuffleV2 pairs the student's 3 with layer1..layer3,
    and the deepest teacher stage is left out. AT.PAIRING "deepest" aligns the lists at their deepest stage
    instead (last with last), a choice of ours for pairs where that reads better; no published result uses it.
  - the map is f.pow(p), not |f|^p (the paper's definition): the same for even p, signed for odd p, and
    undefined (NaN) for a fractional p on negative activations, which AT refuses with an error (raw
    residual sums and linear-bottleneck outputs are such features);
  - where a pair's spatial sizes differ, the larger map is adaptive-average-pooled to the smaller size before
    the attention is taken. The published code compares heights and pools to a square; we pool height and
    width separately to the smaller of each, the same for the square maps of every shipped config.
"""

import torch.nn.functional as F
from yacs.config import CfgNode as CN

from ..utils.errors import ConfigError
from .base import Distiller
from .losses import StepOutput, ce_term, distill_loss
from .registry import DISTILLER_REGISTRY

PAIRINGS = ("shallowest", "deepest")

_cfg = CN()
_cfg.P = 2.0
_cfg.PAIRING = "shallowest"  # the published pairing; "deepest" aligns the deepest stages instead
_cfg.LOSS = CN()
_cfg.LOSS.CE_WEIGHT = 1.0
_cfg.LOSS.FEAT_WEIGHT = 1000.0


def attention_map(feat, p=2.0):
    """(N, H*W) map: channel mean of feat^p, L2-normalised per sample (the published map)."""
    return F.normalize(feat.pow(p).mean(dim=1).flatten(1), dim=1)


def matching_size(f_s, f_t):
    """Both maps pooled to the smaller height and width of the two, where they differ."""
    size = (min(f_s.shape[-2], f_t.shape[-2]), min(f_s.shape[-1], f_t.shape[-1]))
    if f_s.shape[-2:] != size:
        f_s = F.adaptive_avg_pool2d(f_s, size)
    if f_t.shape[-2:] != size:
        f_t = F.adaptive_avg_pool2d(f_t, size)
    return f_s, f_t


def paired_stages(feats_student, feats_teacher, pairing="shallowest"):
    """(student, teacher) stage outputs, stem dropped, as many pairs as the shorter list has.

    "shallowest" (published): zipped from the first stage, so a longer list loses its deepest stages.
    "deepest": aligned at the last stage, so a longer list loses its shallowest stages.
    """
    if pairing not in PAIRINGS:
        raise ValueError(f"pairing must be one of {PAIRINGS}, got {pairing!r}")
    s, t = list(feats_student[1:]), list(feats_teacher[1:])
    if pairing == "deepest":
        k = min(len(s), len(t))
        s, t = s[len(s) - k:], t[len(t) - k:]
    return list(zip(s, t))


def at_loss(feats_student, feats_teacher, p=2.0):
    """Sum over the given stage pairs of mean((a_s - a_t)^2)."""
    total = 0.0
    for f_s, f_t in zip(feats_student, feats_teacher):
        f_s, f_t = matching_size(f_s, f_t)
        total = total + (attention_map(f_s, p) - attention_map(f_t, p)).pow(2).mean()
    return total


def check_defined(pairs, p):
    """One clear error instead of a NaN loss: a fractional power of a negative activation is undefined."""
    if float(p).is_integer():
        return
    for i, (f_s, f_t) in enumerate(pairs):
        for who, f in (("student", f_s), ("teacher", f_t)):
            if bool((f < 0).any()):
                raise ConfigError(
                    f"config key AT.P: {p} is fractional, but the {who}'s stage {i + 1} has negative "
                    f"activations, where feat.pow(p) is NaN; use an integer AT.P (2 is the published setting)")


@DISTILLER_REGISTRY.register("AT", config=_cfg)
class AT(Distiller):
    ramped_terms = ("at",)

    def __init__(self, *, student, teacher, p=2.0, pairing="shallowest", ce_weight=1.0, feat_weight=1000.0):
        super().__init__(student=student, teacher=teacher)
        self.p, self.pairing, self.ce_weight, self.feat_weight = p, pairing, ce_weight, feat_weight

    @classmethod
    def from_config(cls, cfg, data):
        c = cfg.AT
        return {"p": c.P, "pairing": c.PAIRING, "ce_weight": c.LOSS.CE_WEIGHT, "feat_weight": c.LOSS.FEAT_WEIGHT}

    @classmethod
    def validate_config(cls, cfg):
        c = cfg.AT
        if c.P <= 0:
            raise ConfigError(f"config key AT.P: must be > 0, got {c.P}")
        if c.PAIRING not in PAIRINGS:
            raise ConfigError(f"config key AT.PAIRING: must be one of {', '.join(PAIRINGS)}, got {c.PAIRING!r}")

    def forward_train(self, images, labels, epoch, index=None):
        logits, features = self.student(images)
        logits_t, features_t = self.teacher(images)
        pairs = paired_stages(features["feats"], features_t["feats"], self.pairing)
        check_defined(pairs, self.p)
        loss = at_loss([s for s, _ in pairs], [t for _, t in pairs], self.p)
        return StepOutput(logits, {
            "ce": ce_term(logits, labels, self.ce_weight),
            "at": distill_loss(self.feat_weight * loss),
        }, features, logits_t, features_t)
