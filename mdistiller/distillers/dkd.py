"""DKD, Decoupled Knowledge Distillation (Zhao et al., CVPR 2022).

KD splits exactly into a target-class part and a non-target part (DKD appendix, eq. 12):
    KL(p^T || p^S) = KL(b^T || b^S) + (1 - p_t^T) KL(p_hat^T || p_hat^S)
with b = (p_t, 1 - p_t) the binary target/non-target distribution and p_hat the distribution among the
non-target classes. DKD weights the two parts independently (alpha TCKD + beta NCKD) instead of letting the
teacher's confidence (1 - p_t^T) suppress NCKD, and ramps the term up linearly over WARMUP epochs.

p_hat is computed by dropping the target column (a softmax over the C - 1 other logits), not by subtracting a
large constant from the target logit as one reference does: that version returns inf/NaN for two classes,
where p_hat is a point mass and NCKD is exactly 0.

DKD.LOGIT_STANDARDIZE switches on LSKD (Sun et al., CVPR 2024): both models' logits are z-scored per sample
(losses.standardize_logits) before the temperature, in the DKD term only. The paper's CIFAR-100 setting scales
ALPHA and BETA by 9 and uses T 2 (configs/cifar100/dkd_ls/).
"""

import torch
import torch.nn.functional as F
from yacs.config import CfgNode as CN

from ..utils.errors import ConfigError
from .base import Distiller
from .loss_ramp import warmup_factor
from .losses import StepOutput, ce_term, distill_loss, standardize_logits
from .registry import DISTILLER_REGISTRY

_cfg = CN()
_cfg.CE_WEIGHT = 1.0
_cfg.ALPHA = 1.0
_cfg.BETA = 8.0  # by teacher on CIFAR-100: resnet56/110 2, wrn_40_2/vgg13 6, ResNet50/resnet32x4 8
_cfg.T = 4.0
_cfg.WARMUP = 20  # epochs of linear ramp of the DKD term
_cfg.LOGIT_STANDARDIZE = False  # LSKD: z-score both models' logits before the temperature


# The target and non-target logits are picked with gather and index tensors, not boolean masks: a boolean index
# has a data-dependent size, which makes a CUDA host wait for the device at every step (tools/benchmark.py --ops).


def _binary_log_probs(logits, target, target_mask):
    """log (p_t, 1 - p_t) per sample, computed with logsumexp so neither side underflows to log(0)."""
    lse = torch.logsumexp(logits, dim=1)
    log_pt = logits.gather(1, target[:, None]).squeeze(1) - lse
    log_pnt = torch.logsumexp(logits.masked_fill(target_mask, float("-inf")), dim=1) - lse
    return torch.stack([log_pt, log_pnt], dim=1)


def _non_target_columns(target, num_classes):
    """(N, C - 1) column indices of each row's non-target classes, in increasing order."""
    columns = torch.arange(num_classes - 1, device=target.device).expand(len(target), -1)
    return columns + (columns >= target[:, None]).long()


def decoupled_kl(logits_student, logits_teacher, target, temperature=1.0):
    """Per-sample (TCKD, NCKD) = (KL(b^T || b^S), KL(p_hat^T || p_hat^S)) at `temperature`, without the T^2."""
    num_classes = logits_student.shape[1]
    mask = torch.zeros_like(logits_student, dtype=torch.bool).scatter_(1, target[:, None], True)
    zs, zt = logits_student / temperature, logits_teacher / temperature
    log_bs, log_bt = _binary_log_probs(zs, target, mask), _binary_log_probs(zt, target, mask)
    tckd = (log_bt.exp() * (log_bt - log_bs)).sum(1)
    others = _non_target_columns(target, num_classes)
    log_ps_hat = F.log_softmax(zs.gather(1, others), dim=1)
    log_pt_hat = F.log_softmax(zt.gather(1, others), dim=1)
    nckd = (log_pt_hat.exp() * (log_pt_hat - log_ps_hat)).sum(1)
    return tckd, nckd


def dkd_loss(logits_student, logits_teacher, target, alpha, beta, temperature):
    tckd, nckd = decoupled_kl(logits_student, logits_teacher, target, temperature)
    return (alpha * tckd.mean() + beta * nckd.mean()) * temperature**2


@DISTILLER_REGISTRY.register("DKD", config=_cfg, loss_weights=("ALPHA", "BETA"))  # TCKD, NCKD
class DKD(Distiller):
    ramped_terms = ("dkd",)
    own_ramp_keys = {"DKD.WARMUP": "dkd"}

    def __init__(self, *, student, teacher, ce_weight=1.0, alpha=1.0, beta=8.0, temperature=4.0, warmup=20,
                 logit_standardize=False):
        super().__init__(student=student, teacher=teacher)
        self.ce_weight, self.alpha, self.beta, self.temperature = ce_weight, alpha, beta, temperature
        self.warmup, self.logit_standardize = warmup, logit_standardize

    @classmethod
    def from_config(cls, cfg, data):
        c = cfg.DKD
        return {"ce_weight": c.CE_WEIGHT, "alpha": c.ALPHA, "beta": c.BETA, "temperature": c.T, "warmup": c.WARMUP,
                "logit_standardize": c.LOGIT_STANDARDIZE}

    @classmethod
    def validate_config(cls, cfg):
        if cfg.DKD.T <= 0:
            raise ConfigError(f"config key DKD.T: must be > 0, got {cfg.DKD.T}")
        if cfg.DKD.WARMUP < 0:
            raise ConfigError(f"config key DKD.WARMUP: must be >= 0 epochs, got {cfg.DKD.WARMUP}")

    def forward_train(self, images, labels, epoch, index=None):
        logits, feats = self.student(images)
        logits_t, feats_t = self.teacher(images)
        ramp = warmup_factor(epoch, self.warmup)
        zs, zt = (standardize_logits(logits), standardize_logits(logits_t)) if self.logit_standardize \
            else (logits, logits_t)
        return StepOutput(logits, {
            "ce": ce_term(logits, labels, self.ce_weight),
            "dkd": distill_loss(ramp * dkd_loss(zs, zt, labels, self.alpha, self.beta, self.temperature)),
        }, feats, logits_t, feats_t)
