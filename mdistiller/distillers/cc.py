"""CC, correlation congruence (Peng et al., ICCV 2019): besides matching instances, match the correlations between
the instances of a batch.

Both networks' features["pooled_feat"] (the classifier inputs) go through their own linear embedding to FEAT_DIM
(128) dimensions, e_s = W_s f_s + b_s and e_t = W_t f_t + b_t - both embeddings trained by the loss (the teacher's
features carry no gradient, its embedding does). loss = CE_WEIGHT * CE + FEAT_WEIGHT * L_cc, CE 1 and feat 0.02.

CC.KERNEL "repdistiller" (the default) is exactly what HobbitLong/RepDistiller computes - the code the CC authors
sent to the CRD authors, whose runs give the CRD-table CC numbers (distiller_zoo/CC.py `Correlation`):
    d = |e_s - e_t| (N x D);  L_cc = mean over i = 0..N-2 of sum over k of d[i, k] * d[i + 1, k],
the products of consecutive samples of the batch (in the loader's order) only, no kernel and no normalisation.
Wiring (train_student.py `elif opt.distill == 'correlation'`, helper/loops.py): embed_s = LinearEmbed(feat_s[-1]
dim, opt.feat_dim 128), embed_t = LinearEmbed(feat_t[-1] dim, 128) (models/util.py: nn.Linear with torch's default
init, no normalisation), both in the optimizer; scripts/run_cifar_distill.sh: -r 1 -a 0 -b 0.02 (CE 1, no KD,
beta 0.02).

CC.KERNEL "gaussian_rbf" is the paper's correlation matrix instead, as AberHu/Knowledge-Distillation-Zoo
(kd_losses/cc.py) writes it: rows of e L2-normalised, S = e e^T, C = sum over p = 0..P_ORDER of
exp(-2 GAMMA) (2 GAMMA)^p / p! * S^p (elementwise powers: the P-order Taylor expansion of the Gaussian RBF kernel
exp(-GAMMA ||x - y||^2) = exp(-2 GAMMA) exp(2 GAMMA x.y) for unit vectors), L_cc = mean over the N^2 entries of
(C_s - C_t)^2; GAMMA 0.4, P_ORDER 2 as there. No published CIFAR-100 number uses it; with it the weight 0.02 is
not tuned.
"""

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from yacs.config import CfgNode as CN

from ..utils.errors import ConfigError
from .base import Distiller
from .losses import StepOutput, ce_term, distill_loss
from .registry import DISTILLER_REGISTRY

KERNELS = ("repdistiller", "gaussian_rbf")

_cfg = CN()
_cfg.FEAT_DIM = 128  # the embedding size (RepDistiller's --feat_dim)
_cfg.KERNEL = "repdistiller"  # the CRD-table code; "gaussian_rbf": the paper's Taylor-expanded RBF correlation
_cfg.GAMMA = 0.4  # gaussian_rbf only
_cfg.P_ORDER = 2  # gaussian_rbf only
_cfg.LOSS = CN()
_cfg.LOSS.CE_WEIGHT = 1.0
_cfg.LOSS.FEAT_WEIGHT = 0.02


def cc_loss_repdistiller(e_s, e_t):
    """Mean over consecutive sample pairs (i, i + 1) of sum_k |e_s - e_t|[i, k] * |e_s - e_t|[i + 1, k]."""
    delta = (e_s - e_t).abs()
    return (delta[:-1] * delta[1:]).sum(dim=1).mean()


def rbf_correlation(e, gamma=0.4, p_order=2):
    """(N, N) Taylor expansion (orders 0..p_order) of the Gaussian RBF kernel between the L2-normalised rows."""
    e = F.normalize(e, p=2, dim=-1)
    sim = e @ e.t()
    corr = torch.zeros_like(sim)
    for p in range(p_order + 1):
        corr = corr + math.exp(-2 * gamma) * (2 * gamma) ** p / math.factorial(p) * sim.pow(p)
    return corr


def cc_loss_rbf(e_s, e_t, gamma=0.4, p_order=2):
    """Mean squared difference of the two (N, N) RBF correlation matrices."""
    return F.mse_loss(rbf_correlation(e_s, gamma, p_order), rbf_correlation(e_t, gamma, p_order))


@DISTILLER_REGISTRY.register("CC", config=_cfg)
class CC(Distiller):
    ramped_terms = ("cc",)

    def __init__(self, *, student, teacher, feat_dim=128, kernel="repdistiller", gamma=0.4, p_order=2,
                 ce_weight=1.0, feat_weight=0.02):
        super().__init__(student=student, teacher=teacher)
        if kernel not in KERNELS:
            raise ConfigError(f"config key CC.KERNEL: one of {', '.join(KERNELS)}, got {kernel!r}")
        self.embed_s = nn.Linear(student.feat_dim, feat_dim)
        self.embed_t = nn.Linear(self.teacher.feat_dim, feat_dim)
        self.kernel, self.gamma, self.p_order = kernel, gamma, p_order
        self.ce_weight, self.feat_weight = ce_weight, feat_weight

    @classmethod
    def from_config(cls, cfg, data):
        c = cfg.CC
        return {"feat_dim": c.FEAT_DIM, "kernel": c.KERNEL, "gamma": c.GAMMA, "p_order": c.P_ORDER,
                "ce_weight": c.LOSS.CE_WEIGHT, "feat_weight": c.LOSS.FEAT_WEIGHT}

    @classmethod
    def validate_config(cls, cfg):
        c = cfg.CC
        if c.FEAT_DIM < 1:
            raise ConfigError(f"config key CC.FEAT_DIM: must be >= 1, got {c.FEAT_DIM} (128 is the published size)")
        if c.KERNEL not in KERNELS:
            raise ConfigError(f"config key CC.KERNEL: one of {', '.join(KERNELS)} (repdistiller: the code behind the "
                              f"CRD-table numbers), got {c.KERNEL!r}")
        if c.GAMMA <= 0:
            raise ConfigError(f"config key CC.GAMMA: must be > 0, got {c.GAMMA} (0.4 is the usual setting)")
        if c.P_ORDER < 0:
            raise ConfigError(f"config key CC.P_ORDER: must be >= 0, got {c.P_ORDER} (2 is the usual setting)")
        for key, value in (("LOSS.CE_WEIGHT", c.LOSS.CE_WEIGHT), ("LOSS.FEAT_WEIGHT", c.LOSS.FEAT_WEIGHT)):
            if value < 0:
                raise ConfigError(f"config key CC.{key}: must be >= 0, got {value}")

    def cc_loss(self, pooled_s, pooled_t):
        e_s, e_t = self.embed_s(pooled_s.flatten(1)), self.embed_t(pooled_t.flatten(1))
        if self.kernel == "repdistiller":
            return cc_loss_repdistiller(e_s, e_t)
        return cc_loss_rbf(e_s, e_t, self.gamma, self.p_order)

    def forward_train(self, images, labels, epoch, index=None):
        logits, features = self.student(images)
        logits_t, features_t = self.teacher(images)
        loss = self.cc_loss(features["pooled_feat"], features_t["pooled_feat"])
        return StepOutput(logits, {
            "ce": ce_term(logits, labels, self.ce_weight),
            "cc": distill_loss(self.feat_weight * loss),
        }, features, logits_t, features_t)
