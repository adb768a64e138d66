"""KDSVD, knowledge distillation via singular value decomposition (Lee et al., ECCV 2018): transfer how the
dominant feature directions of consecutive stages relate, compressed by a truncated SVD.

Per stage, each sample's feature map is read as a matrix and its leading right singular vectors are kept: the
teacher's first K, the student's first K + 3, each student set sign-aligned to the teacher's (for each teacher
vector, the student vector with the largest |cosine| enters with that cosine's sign, the others are dropped) and
both scaled by the teacher's L2-normalised top-K singular values. For each pair of consecutive stages (i-1, i),
the RBF correlation exp(-(v_i[a, k] - v_{i-1}[b, k])^2 / 8) over every entry pair (a, b) and vector k is
computed for both networks, and the loss is the summed squared difference divided by the batch size, summed
over the stage pairs: loss = CE_WEIGHT * CE + FEAT_WEIGHT * that. Defaults are mdistiller's CIFAR-100 settings
(engine/cfg.py: K 1, CE 1, FEAT 1).

As mdistiller's KDSVD.py computes it (ported from the authors' TensorFlow code, sseung0703/SSKD_SVD), except
the two points marked "we":
  - stages: the entries of features["feats"] after the stem, zipped from the shallowest one;
  - the matrix is the NCHW map viewed as (N, C*H, W), so the singular vectors have W entries (the TensorFlow
    original reads NHWC maps as (N, H*W, C), vectors over channels). The SVD runs in float32; NaN or infinite
    entries of its output and of the squared differences are replaced by 0 (the published guard against
    degenerate decompositions);
  - the gradient: PyTorch's SVD gradient divides by differences of squared singular values, infinite where two
    are equal, e.g. the zero ones of maps with constant (black) borders, as every Fashion-MNIST image gives at
    the first stage. mdistiller's port then trains on NaN. We zero the gradient of each sample whose SVD
    gradient is not finite, as the authors' TensorFlow SVD gradient does (its crop_removenan); where the
    gradient is finite it is PyTorch's, i.e. mdistiller's. (The TF gradient also considers only the first 5
    singular vectors; we keep PyTorch's full one.)
  - no pooling: the student-teacher alignment multiplies W-entry vectors, so paired stages need equal widths
    (mdistiller fails with a shape error otherwise; we raise a ConfigError naming the widths).
"""

import torch
import torch.nn.functional as F
from yacs.config import CfgNode as CN

from ..utils.errors import ConfigError
from .at import paired_stages
from .base import Distiller
from .losses import StepOutput, ce_term, distill_loss
from .registry import DISTILLER_REGISTRY

_cfg = CN()
_cfg.K = 1
_cfg.LOSS = CN()
_cfg.LOSS.CE_WEIGHT = 1.0
_cfg.LOSS.FEAT_WEIGHT = 1.0

STUDENT_EXTRA = 3  # the student keeps K + 3 vectors, so the alignment can pick among more candidates


def finite_or_zero(x):
    return torch.where(torch.isfinite(x), x, torch.zeros_like(x))


def finite_samples_only(grad):
    """The gradient with every sample that has a non-finite entry zeroed (the authors' guard on the SVD's
    gradient, which is infinite where singular values repeat)."""
    finite = torch.isfinite(grad)
    whole = finite.flatten(1).all(dim=1).view(-1, *([1] * (grad.dim() - 1)))
    return torch.where(finite & whole, grad, torch.zeros_like(grad))


def leading_right_singular(feat, n):
    """(s, v): the first n singular values (N, n) and right singular vectors (N, W, n) of each sample's
    (C*H, W) matrix, non-finite entries zeroed, each L2-normalised (the values across the n, the vectors
    over their entries)."""
    n_, c, h, w = feat.shape
    x = feat.reshape(n_, c * h, w).float()
    if x.requires_grad:
        x.register_hook(finite_samples_only)
    _, s, vh = torch.linalg.svd(x, full_matrices=False)
    s, v = finite_or_zero(s), finite_or_zero(vh.mH)
    return F.normalize(s[:, :n], dim=1), F.normalize(v[:, :, :n], dim=1)


def align_to(candidates, reference):
    """For each reference vector, the candidate with the largest |cosine|, times that cosine's sign (ties: the
    sum of the tied candidates). candidates (N, W, m), reference (N, W, k) -> (N, W, k)."""
    cosine = candidates.transpose(-2, -1) @ reference  # (N, m, k)
    best = cosine.abs().max(dim=1, keepdim=True).values
    pick = torch.where(best == cosine.abs(), torch.sign(cosine), torch.zeros_like(cosine))
    return candidates @ pick


def rbf(v, v_prev):
    """(N, W_i, W_{i-1}, k): exp(-(v[a, k] - v_prev[b, k])^2 / 8)."""
    return torch.exp(-(v.unsqueeze(2) - v_prev.unsqueeze(1)).pow(2) / 8)


def kdsvd_loss(feats_student, feats_teacher, k=1):
    """Sum over consecutive stage pairs of ||rbf_student - rbf_teacher||^2 / batch size (stem dropped)."""
    pairs = paired_stages(feats_student, feats_teacher)
    for i, (f_s, f_t) in enumerate(pairs):
        if f_s.shape[-1] != f_t.shape[-1]:
            raise ConfigError(
                f"DISTILLER.STUDENT / DISTILLER.TEACHER: KDSVD pairs stage {i + 1} of width {f_s.shape[-1]} with "
                f"one of width {f_t.shape[-1]}; its alignment needs equal widths (a pair whose stages have the "
                f"same spatial sizes, e.g. resnet32x4 -> resnet8x4)")
    total, prev = 0.0, None
    for f_s, f_t in pairs:
        s_t, v_t = leading_right_singular(f_t, k)
        _, v_s = leading_right_singular(f_s, k + STUDENT_EXTRA)
        v_s = align_to(v_s, v_t)
        scale = s_t.unsqueeze(1)
        v_t, v_s = v_t * scale, v_s * scale
        if prev is not None:
            sq = (rbf(v_s, prev[0]) - rbf(v_t, prev[1]).detach()).pow(2)
            total = total + finite_or_zero(sq).sum() / f_s.shape[0]
        prev = (v_s, v_t)
    return total


@DISTILLER_REGISTRY.register("KDSVD", config=_cfg)
class KDSVD(Distiller):
    ramped_terms = ("kdsvd",)

    def __init__(self, *, student, teacher, k=1, ce_weight=1.0, feat_weight=1.0):
        super().__init__(student=student, teacher=teacher)
        self.k, self.ce_weight, self.feat_weight = k, ce_weight, feat_weight

    @classmethod
    def from_config(cls, cfg, data):
        c = cfg.KDSVD
        return {"k": c.K, "ce_weight": c.LOSS.CE_WEIGHT, "feat_weight": c.LOSS.FEAT_WEIGHT}

    @classmethod
    def validate_config(cls, cfg):
        c = cfg.KDSVD
        if c.K < 1:
            raise ConfigError(f"config key KDSVD.K: must be an integer >= 1 (1 is the published setting), got {c.K}")

    def forward_train(self, images, labels, epoch, index=None):
        logits, features = self.student(images)
        logits_t, features_t = self.teacher(images)
        loss = kdsvd_loss(features["feats"], features_t["feats"], self.k)
        return StepOutput(logits, {
            "ce": ce_term(logits, labels, self.ce_weight),
            "kdsvd": distill_loss(self.feat_weight * loss),
        }, features, logits_t, features_t)
