"""RKD, relational knowledge distillation (Park et al., CVPR 2019): match how the samples of a batch relate to
each other (pairwise distances, and angles in triplets) rather than the features themselves, so student and
teacher widths need no connector.

On features["pooled_feat"] of both networks (the classifier inputs, flattened per sample):
  distance: psi_D(i, j) = ||e_i - e_j||, divided by its mean over the off-diagonal pairs with a positive
            distance, each network its own mean; loss_D = smooth-L1 (beta 1) averaged over all N^2 pairs.
  angle:    psi_A(i, j, k) = <unit(e_j - e_i), unit(e_k - e_i)> over all N^3 triplets (0 where an index
            repeats, the zero difference having no direction); loss_A = smooth-L1 averaged over all N^3.
loss = CE_WEIGHT * CE + FEAT_WEIGHT * (DISTANCE_WEIGHT * loss_D + ANGLE_WEIGHT * loss_A).

Exactly the published code's loss (mdistiller's RKD.py, after the authors' lenscv/RKD): distances from the
Gram expansion |a|^2 + |b|^2 - 2<a, b>, clamped at PDIST.EPSILON before the square root (PDIST.SQUARED keeps
the squared distance), the diagonal set to 0; defaults distance 25, angle 50, CE 1, feat 1. The mean
distance needs two distinct samples in the batch: a batch of one, or of identical features, has none and
gives NaN, as the published code does (the run's finite guard then reports it).
"""

import torch
import torch.nn.functional as F
from yacs.config import CfgNode as CN

from ..utils.errors import ConfigError
from .base import Distiller
from .losses import StepOutput, ce_term, distill_loss
from .registry import DISTILLER_REGISTRY

_cfg = CN()
_cfg.DISTANCE_WEIGHT = 25.0
_cfg.ANGLE_WEIGHT = 50.0
_cfg.LOSS = CN()
_cfg.LOSS.CE_WEIGHT = 1.0
_cfg.LOSS.FEAT_WEIGHT = 1.0
_cfg.PDIST = CN()
_cfg.PDIST.EPSILON = 1e-12
_cfg.PDIST.SQUARED = False


def pairwise_distance(e, squared=False, eps=1e-12):
    """(N, N) distances between the rows of `e`, with a zero diagonal."""
    sq_norm = e.pow(2).sum(dim=1)
    dist = (sq_norm[:, None] + sq_norm[None, :] - 2 * e @ e.t()).clamp(min=eps)
    if not squared:
        dist = dist.sqrt()
    off_diagonal = 1 - torch.eye(len(e), dtype=dist.dtype, device=dist.device)
    return dist * off_diagonal


def normalized_distance(e, squared=False, eps=1e-12):
    """Distances divided by their mean over the positive entries (the off-diagonal pairs)."""
    dist = pairwise_distance(e, squared, eps)
    return dist / dist[dist > 0].mean()


def triplet_angles(e):
    """(N*N*N,) cosines: entry (i, j, k) is the cosine between e_j - e_i and e_k - e_i."""
    diff = F.normalize(e[None, :, :] - e[:, None, :], p=2, dim=2)
    return torch.bmm(diff, diff.transpose(1, 2)).flatten()


def rkd_loss(f_s, f_t, squared=False, eps=1e-12, distance_weight=25.0, angle_weight=50.0):
    """distance_weight * loss_D + angle_weight * loss_A on flattened per-sample features; the teacher's side
    carries no gradient."""
    s, t = f_s.flatten(1), f_t.flatten(1)
    with torch.no_grad():
        t_dist, t_angle = normalized_distance(t, squared, eps), triplet_angles(t)
    loss_d = F.smooth_l1_loss(normalized_distance(s, squared, eps), t_dist)
    loss_a = F.smooth_l1_loss(triplet_angles(s), t_angle)
    return distance_weight * loss_d + angle_weight * loss_a


@DISTILLER_REGISTRY.register("RKD", config=_cfg)
class RKD(Distiller):
    ramped_terms = ("rkd",)

    def __init__(self, *, student, teacher, distance_weight=25.0, angle_weight=50.0, ce_weight=1.0, feat_weight=1.0,
                 eps=1e-12, squared=False):
        super().__init__(student=student, teacher=teacher)
        self.distance_weight, self.angle_weight = distance_weight, angle_weight
        self.ce_weight, self.feat_weight, self.eps, self.squared = ce_weight, feat_weight, eps, squared

    @classmethod
    def from_config(cls, cfg, data):
        c = cfg.RKD
        return {"distance_weight": c.DISTANCE_WEIGHT, "angle_weight": c.ANGLE_WEIGHT, "ce_weight": c.LOSS.CE_WEIGHT,
                "feat_weight": c.LOSS.FEAT_WEIGHT, "eps": c.PDIST.EPSILON, "squared": c.PDIST.SQUARED}

    @classmethod
    def validate_config(cls, cfg):
        c = cfg.RKD
        for key, value in (("DISTANCE_WEIGHT", c.DISTANCE_WEIGHT), ("ANGLE_WEIGHT", c.ANGLE_WEIGHT),
                           ("LOSS.CE_WEIGHT", c.LOSS.CE_WEIGHT), ("LOSS.FEAT_WEIGHT", c.LOSS.FEAT_WEIGHT)):
            if value < 0:
                raise ConfigError(f"config key RKD.{key}: must be >= 0, got {value}")
        if c.PDIST.EPSILON <= 0:
            raise ConfigError(f"config key RKD.PDIST.EPSILON: must be > 0 (it keeps the square root's gradient "
                              f"finite at zero distance), got {c.PDIST.EPSILON}")

    def forward_train(self, images, labels, epoch, index=None):
        logits, features = self.student(images)
        logits_t, features_t = self.teacher(images)
        loss = rkd_loss(features["pooled_feat"], features_t["pooled_feat"], self.squared, self.eps,
                        self.distance_weight, self.angle_weight)
        return StepOutput(logits, {
            "ce": ce_term(logits, labels, self.ce_weight),
            "rkd": distill_loss(self.feat_weight * loss),
        }, features, logits_t, features_t)
