"""NST, neuron selectivity transfer (Huang & Wang, 2017): match the distribution of the networks' neuron
selectivity patterns, each channel's spatial activation map being one sample of it.

Per stage pair, every channel's map is flattened over positions and L2-normalised; the squared maximum mean
discrepancy between the student's and the teacher's channel sets under the polynomial kernel k(x, y) = (x.y)^2
(the paper's best kernel: degree 2, c = 0) is mean k(t, t') + mean k(s, s') - 2 mean k(s, t), each mean over the
batch and all channel pairs. loss = CE_WEIGHT * CE + FEAT_WEIGHT * sum over stage pairs of that MMD^2. Defaults are
mdistiller's CIFAR-100 settings (engine/cfg.py: CE 1, FEAT 50).

As mdistiller's NST.py computes it: stages are the entries of features["feats"] after the stem, zipped from the
shallowest one; where a pair's spatial sizes differ the larger map is adaptive-average-pooled to the smaller
(mdistiller pools to a square of the smaller height, we pool height and width separately: the same for square
maps), as AT does. The channel counts may differ: the kernel compares positions, not channels.
"""

from yacs.config import CfgNode as CN

import torch.nn.functional as F

from .at import matching_size, paired_stages
from .feature_loss import FeatureLossMethod
from .registry import DISTILLER_REGISTRY

_cfg = CN()
_cfg.LOSS = CN()
_cfg.LOSS.CE_WEIGHT = 1.0
_cfg.LOSS.FEAT_WEIGHT = 50.0


def poly_kernel(a, b):
    """(N, C_b, C_a): (a_i . b_j)^2 for every channel i of `a` and j of `b` within each sample."""
    return (a.unsqueeze(1) * b.unsqueeze(2)).sum(-1).pow(2)


def stage_mmd(f_s, f_t):
    """Squared MMD between the L2-normalised channel maps of one stage pair (the teacher-only term detached)."""
    f_s, f_t = matching_size(f_s, f_t)
    s = F.normalize(f_s.reshape(f_s.shape[0], f_s.shape[1], -1), dim=2)
    t = F.normalize(f_t.reshape(f_t.shape[0], f_t.shape[1], -1), dim=2)
    return poly_kernel(t, t).mean().detach() + poly_kernel(s, s).mean() - 2 * poly_kernel(s, t).mean()


def nst_loss(feats_student, feats_teacher):
    """Sum of the stage MMDs over the stage pairs (stem dropped, shallowest first)."""
    return sum(stage_mmd(s, t) for s, t in paired_stages(feats_student, feats_teacher))


@DISTILLER_REGISTRY.register("NST", config=_cfg)
class NST(FeatureLossMethod):
    section = "NST"
    ramped_terms = ("nst",)
    default_feat_weight = 50.0

    def feature_loss(self, features, features_t):
        return nst_loss(features["feats"], features_t["feats"])
