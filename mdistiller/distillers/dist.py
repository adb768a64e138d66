"""DIST (Huang et al., NeurIPS 2022): distil the teacher's class *relations*, not its exact probabilities.

A stronger teacher's softmax is hard to match exactly (KL asks the student to copy every probability), so DIST
asks only for a linear relation: Pearson correlation between student and teacher probabilities, which is
blind to any positive scale and shift. Two views of the (batch x classes) probability matrix are matched:
  - inter-class: each row (one sample across the classes), 1 - mean row correlation;
  - intra-class: each column (one class across the batch), 1 - mean column correlation.
loss = CE_WEIGHT * CE + tau^2 * (BETA * inter + GAMMA * intra), with probabilities softmax(z / tau).
Defaults are the paper's CIFAR-100 settings (beta 2, gamma 2, tau 4); ImageNet uses 1, 1, 1.
"""

import torch.nn.functional as F
from yacs.config import CfgNode as CN

from ..utils.errors import ConfigError
from .base import Distiller
from .losses import StepOutput, ce_term, distill_loss
from .registry import DISTILLER_REGISTRY

_cfg = CN()
_cfg.CE_WEIGHT = 1.0
_cfg.BETA = 2.0  # inter-class weight
_cfg.GAMMA = 2.0  # intra-class weight
_cfg.TAU = 4.0

_EPS = 1e-8  # keeps a constant row/column (zero variance) at correlation 0 instead of NaN


def pearson_rows(a, b, eps=_EPS):
    """Pearson correlation of each row of `a` with the same row of `b` (shape (N,))."""
    a = a - a.mean(dim=1, keepdim=True)
    b = b - b.mean(dim=1, keepdim=True)
    return (a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1) + eps)


def inter_class_relation(p_s, p_t):
    """1 - mean over samples of the correlation across classes."""
    return 1.0 - pearson_rows(p_s, p_t).mean()


def intra_class_relation(p_s, p_t):
    """1 - mean over classes of the correlation across the batch."""
    return inter_class_relation(p_s.t(), p_t.t())


def dist_loss(logits_student, logits_teacher, beta, gamma, tau):
    p_s = F.softmax(logits_student / tau, dim=1)
    p_t = F.softmax(logits_teacher / tau, dim=1)
    return tau**2 * (beta * inter_class_relation(p_s, p_t) + gamma * intra_class_relation(p_s, p_t))


@DISTILLER_REGISTRY.register("DIST", config=_cfg, loss_weights=("BETA", "GAMMA"))  # inter, intra
class DIST(Distiller):
    ramped_terms = ("dist",)

    def __init__(self, *, student, teacher, ce_weight=1.0, beta=2.0, gamma=2.0, tau=4.0):
        super().__init__(student=student, teacher=teacher)
        self.ce_weight, self.beta, self.gamma, self.tau = ce_weight, beta, gamma, tau

    @classmethod
    def from_config(cls, cfg, data):
        c = cfg.DIST
        return {"ce_weight": c.CE_WEIGHT, "beta": c.BETA, "gamma": c.GAMMA, "tau": c.TAU}

    @classmethod
    def validate_config(cls, cfg):
        c = cfg.DIST
        if c.TAU <= 0:
            raise ConfigError(f"config key DIST.TAU: must be > 0, got {c.TAU}")

    def forward_train(self, images, labels, epoch, index=None):
        logits, feats = self.student(images)
        logits_t, feats_t = self.teacher(images)
        return StepOutput(logits, {
            "ce": ce_term(logits, labels, self.ce_weight),
            "dist": distill_loss(dist_loss(logits, logits_t, self.beta, self.gamma, self.tau)),
        }, feats, logits_t, feats_t)
