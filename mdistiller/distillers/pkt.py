"""PKT, probabilistic knowledge transfer (Passalis & Tefas, ECCV 2018): match the distribution of cosine
similarities within the batch, so student and teacher widths need no connector.

On features["pooled_feat"] of both networks: each row is divided by (its L2 norm + 1e-7); the cosine
similarities K(i, j) are mapped to [0, 1] by (K + 1) / 2 and each row divided by its sum, giving a conditional
distribution p(j | i) per network (the self-similarity j == i included). The loss is
mean over all N^2 entries of p_t * log((p_t + 1e-7) / (p_s + 1e-7)).
loss = CE_WEIGHT * CE + FEAT_WEIGHT * that; CE 1 and feat 30000 are mdistiller's CIFAR-100 defaults.

Exactly the published code's loss (mdistiller's PKT.py, from the authors' passalis/probabilistic_kt). Note it
takes the mean over all N^2 entries where the paper's KL sums over j: the KL per row divided by N, which the
large weight compensates for; the weight is therefore tied to this reduction and to the batch size.
"""

import torch
from yacs.config import CfgNode as CN

from .feature_loss import FeatureLossMethod
from .registry import DISTILLER_REGISTRY

_cfg = CN()
_cfg.LOSS = CN()
_cfg.LOSS.CE_WEIGHT = 1.0
_cfg.LOSS.FEAT_WEIGHT = 30000.0


def similarity_distribution(f, eps=1e-7):
    """(N, N) rows p(j | i) from cosine similarities shifted to [0, 1]."""
    f = f.flatten(1)
    f = f / (f.pow(2).sum(dim=1, keepdim=True).sqrt() + eps)
    f = torch.where(torch.isnan(f), torch.zeros_like(f), f)  # the published guard; eps keeps it from firing
    sim = (f @ f.t() + 1.0) / 2.0
    return sim / sim.sum(dim=1, keepdim=True)


def pkt_loss(f_s, f_t, eps=1e-7):
    """Mean over the N^2 entries of p_t * log((p_t + eps) / (p_s + eps))."""
    p_s, p_t = similarity_distribution(f_s, eps), similarity_distribution(f_t, eps)
    return (p_t * torch.log((p_t + eps) / (p_s + eps))).mean()


@DISTILLER_REGISTRY.register("PKT", config=_cfg)
class PKT(FeatureLossMethod):
    section = "PKT"
    ramped_terms = ("pkt",)
    default_feat_weight = 30000.0

    def feature_loss(self, features, features_t):
        return pkt_loss(features["pooled_feat"], features_t["pooled_feat"])
