"""SP, similarity-preserving distillation (Tung & Mori, ICCV 2019): inputs that the teacher represents alike
should be represented alike by the student. Only batch-by-batch similarities are compared, so widths and
spatial sizes need no connector.

On features["feats"][-1] of both networks (the last stage's post-ReLU output, flattened per sample):
G = F F^T (N x N), each row L2-normalised; loss = ||G_t - G_s||_F^2 / N^2.
loss = CE_WEIGHT * CE + FEAT_WEIGHT * that; CE 1 and feat 3000 are mdistiller's CIFAR-100 defaults (the
paper's gamma, for the last-stage pair only).

Exactly the published code's loss (mdistiller's SP.py, after HobbitLong/RepDistiller): one stage pair, the
last, rows normalised with torch's default eps (1e-12). The published loss is a 1-element vector; ours is the
same value as a scalar, as every loss term here is.
"""

import torch.nn.functional as F
from yacs.config import CfgNode as CN

from .feature_loss import FeatureLossMethod
from .registry import DISTILLER_REGISTRY

_cfg = CN()
_cfg.LOSS = CN()
_cfg.LOSS.CE_WEIGHT = 1.0
_cfg.LOSS.FEAT_WEIGHT = 3000.0


def similarity_matrix(f):
    """(N, N) Gram matrix of the flattened features, rows L2-normalised."""
    f = f.flatten(1)
    return F.normalize(f @ f.t(), p=2, dim=1)


def sp_loss(f_s, f_t):
    """Squared Frobenius distance of the two similarity matrices, divided by N^2."""
    diff = similarity_matrix(f_t) - similarity_matrix(f_s)
    return diff.pow(2).sum() / f_s.shape[0] ** 2


@DISTILLER_REGISTRY.register("SP", config=_cfg)
class SP(FeatureLossMethod):
    section = "SP"
    ramped_terms = ("sp",)
    default_feat_weight = 3000.0

    def feature_loss(self, features, features_t):
        return sp_loss(features["feats"][-1], features_t["feats"][-1])
