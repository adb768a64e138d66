"""MLKD, Multi-Level Logit Distillation (Jin, Wang, Lin, CVPR 2023), as its published code computes it.

Published code: `KD_ours.forward_train` in mdistiller/distillers/KD_ours.py of Jin-Ying/Multi-Level-Logit-Distillation
(configs/cifar100/ours/*.yaml, SOLVER.TRAINER "ours"). Each image comes as a weak view (crop + flip) and a strong one
(crop + flip + RandAugment + Cutout): `train_views = "weak_strong"` (data/views.py). The student runs on each view
separately (two forward passes, so BatchNorm sees each view as its own batch), the teacher on both.

With P = softmax(z / T) and temperatures (T, 3, 5, 2, 6), T = KD.TEMPERATURE (4):
  kd(s, t, T) = T^2 KL(P_t || P_s), summed over classes, mean over the batch   (`kd_loss`)
  cc(s, t, T) = ||P_t^T P_t - P_s^T P_s||^2 / C   class correlation, C x C Gram matrices, no T^2   (`cc_loss`)
  bc(s, t, T) = ||P_t P_t^T - P_s P_s^T||^2 / B   batch correlation, B x B, no T^2   (`bc_loss`)
and the logged terms
  ce = CE_WEIGHT (CE(s_weak, y) + CE(s_strong, y))
  kd = sum_T w m kd(weak, T) + w [kd(strong, T) + kd(strong, 3) + kd(strong, 5) + kd(weak, 2) + kd(weak, 6)]
  cc = sum_T w m_c cc(weak, T);   bc = sum_T w m bc(weak, T)          (w = KD_WEIGHT)
Quirks of the published code, kept:
  - m, m_c: the code multiplies each *scalar* loss by a boolean mask and takes .mean(), so the "confidence mask"
    only scales the loss by the fraction of True entries: m = mean(conf <= median(conf)), conf the teacher's top
    weak-view probability per sample (T = 1); m_c = mean(class_conf <= median(class_conf)), class_conf the
    teacher's weak-view probabilities summed over the batch, per class. Medians as np.percentile(x, 50) (linear
    interpolation; torch.quantile), so m is 1/2 for an even batch without ties.
  - the strong kd sum's T = 2 and T = 6 terms use the weak logits (copy-paste in the published code).
  - strong-view cc and bc are computed there but not returned: left out here.
The student's weak-view logits are the step's logits (training accuracy, the loss monitor, the "++" dino term's
features), as the published code returns them.
"""

import torch
import torch.nn.functional as F

from ..utils.errors import ConfigError
from .base import Distiller
from .losses import StepOutput, distill_loss, kd_loss, task_loss
from .registry import DISTILLER_REGISTRY

EXTRA_TEMPERATURES = (3.0, 5.0, 2.0, 6.0)  # after KD.TEMPERATURE, fixed in the published code
STRONG_VIEW_TERMS = 3  # the strong kd sum uses the strong logits for its first 3 temperatures, the weak for the rest


def cc_loss(logits_student, logits_teacher, temperature):
    """Class correlation: sum of squared differences of the C x C matrices P^T P, divided by C."""
    p_s = F.softmax(logits_student / temperature, dim=1)
    p_t = F.softmax(logits_teacher / temperature, dim=1)
    return ((p_t.t() @ p_t - p_s.t() @ p_s) ** 2).sum() / logits_teacher.shape[1]


def bc_loss(logits_student, logits_teacher, temperature):
    """Batch correlation: sum of squared differences of the B x B matrices P P^T, divided by B."""
    p_s = F.softmax(logits_student / temperature, dim=1)
    p_t = F.softmax(logits_teacher / temperature, dim=1)
    return ((p_t @ p_t.t() - p_s @ p_s.t()) ** 2).sum() / logits_teacher.shape[0]


def below_median_fraction(values):
    """mean(values <= np.percentile(values, 50)): what `(scalar * mask).mean()` multiplies the scalar by; in the
    dtype of `values` (float32 at least)."""
    values = values.detach()
    values = values.to(torch.promote_types(values.dtype, torch.float32))
    return (values <= torch.quantile(values, 0.5)).to(values.dtype).mean()


@DISTILLER_REGISTRY.register("MLKD")
class MLKD(Distiller):
    ramped_terms = ("kd", "cc", "bc")
    train_views = "weak_strong"

    def __init__(self, *, student, teacher, temperature=4.0, ce_weight=0.1, kd_weight=0.9):
        super().__init__(student=student, teacher=teacher)
        self.temperatures = (float(temperature),) + EXTRA_TEMPERATURES
        self.ce_weight, self.kd_weight = ce_weight, kd_weight

    @classmethod
    def from_config(cls, cfg, data):
        """The KD section, as the published code reads cfg.KD (TEMPERATURE, LOSS.CE_WEIGHT, LOSS.KD_WEIGHT)."""
        c = cfg.KD
        return {"temperature": c.TEMPERATURE, "ce_weight": c.LOSS.CE_WEIGHT, "kd_weight": c.LOSS.KD_WEIGHT}

    @classmethod
    def validate_config(cls, cfg):
        if cfg.KD.TEMPERATURE <= 0:
            raise ConfigError(f"config key KD.TEMPERATURE: must be > 0, got {cfg.KD.TEMPERATURE}")
        if cfg.KD.LOGIT_STANDARDIZE:
            raise ConfigError("config key KD.LOGIT_STANDARDIZE: MLKD has no logit-standardised variant; set it False")

    def forward_train(self, images, labels, epoch, index=None):
        if images.dim() != 5 or images.shape[1] != 2:
            raise ValueError(f"MLKD trains on (weak, strong) views, images B x 2 x C x H x W (train_views "
                             f"'weak_strong'), got shape {tuple(images.shape)}")
        weak, strong = images[:, 0], images[:, 1]
        logits_w, feats_w = self.student(weak)
        logits_s, _ = self.student(strong)
        t_w, feats_t = self.teacher(weak)
        t_s, _ = self.teacher(strong)
        conf = F.softmax(t_w.detach().to(torch.promote_types(t_w.dtype, torch.float32)), dim=1)
        m, m_class = below_median_fraction(conf.max(dim=1).values), below_median_fraction(conf.sum(dim=0))
        w, temps = self.kd_weight, self.temperatures
        strong_pairs = [(logits_s, t_s)] * STRONG_VIEW_TERMS + [(logits_w, t_w)] * (len(temps) - STRONG_VIEW_TERMS)
        kd = sum(w * m * kd_loss(logits_w, t_w, T) for T in temps) \
            + sum(w * kd_loss(s, t, T) for (s, t), T in zip(strong_pairs, temps))
        cc = sum(w * m_class * cc_loss(logits_w, t_w, T) for T in temps)
        bc = sum(w * m * bc_loss(logits_w, t_w, T) for T in temps)
        ce = self.ce_weight * (F.cross_entropy(logits_w, labels) + F.cross_entropy(logits_s, labels))
        return StepOutput(logits_w, {"ce": task_loss(ce), "kd": distill_loss(kd), "cc": distill_loss(cc),
                                     "bc": distill_loss(bc)}, feats_w, t_w, feats_t)
