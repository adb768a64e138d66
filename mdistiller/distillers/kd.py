"""KD (Hinton et al., 2015): match the teacher's temperature-softened class distribution.

loss = CE_WEIGHT * CE(student, labels) + KD_WEIGHT * T^2 * KL(softmax(z_t / T) || softmax(z_s / T)),
the KL summed over classes and averaged over the batch; the T^2 keeps gradient magnitudes comparable across
temperatures. Defaults are mdistiller's CIFAR-100 settings (T 4, CE 0.1, KD 0.9).

KD.LOGIT_STANDARDIZE switches on LSKD (Sun et al., CVPR 2024): both models' logits are z-scored per sample
(losses.standardize_logits) before the temperature, in the KD term only (the CE term sees the raw logits). The
paper's CIFAR-100 setting pairs it with T 2, KD weight 9 and CE weight 1 (configs/cifar100/kd_ls/).
"""

from yacs.config import CfgNode as CN

from ..utils.errors import ConfigError
from .base import Distiller
from .losses import StepOutput, ce_term, distill_loss, kd_loss, standardize_logits
from .registry import DISTILLER_REGISTRY

_cfg = CN()
_cfg.TEMPERATURE = 4.0
_cfg.LOSS = CN()
_cfg.LOSS.CE_WEIGHT = 0.1
_cfg.LOSS.KD_WEIGHT = 0.9
_cfg.LOGIT_STANDARDIZE = False  # LSKD: z-score both models' logits before the temperature


@DISTILLER_REGISTRY.register("KD", config=_cfg)
class KD(Distiller):
    ramped_terms = ("kd",)

    def __init__(self, *, student, teacher, temperature=4.0, ce_weight=0.1, kd_weight=0.9, logit_standardize=False):
        super().__init__(student=student, teacher=teacher)
        self.temperature, self.ce_weight, self.kd_weight = temperature, ce_weight, kd_weight
        self.logit_standardize = logit_standardize

    @classmethod
    def from_config(cls, cfg, data):
        c = cfg.KD
        return {"temperature": c.TEMPERATURE, "ce_weight": c.LOSS.CE_WEIGHT, "kd_weight": c.LOSS.KD_WEIGHT,
                "logit_standardize": c.LOGIT_STANDARDIZE}

    @classmethod
    def validate_config(cls, cfg):
        if cfg.KD.TEMPERATURE <= 0:
            raise ConfigError(f"config key KD.TEMPERATURE: must be > 0, got {cfg.KD.TEMPERATURE}")

    def forward_train(self, images, labels, epoch, index=None):
        logits, feats = self.student(images)
        logits_t, feats_t = self.teacher(images)
        zs, zt = (standardize_logits(logits), standardize_logits(logits_t)) if self.logit_standardize \
            else (logits, logits_t)
        return StepOutput(logits, {
            "ce": ce_term(logits, labels, self.ce_weight),
            "kd": distill_loss(self.kd_weight * kd_loss(zs, zt, self.temperature)),
        }, feats, logits_t, feats_t)
