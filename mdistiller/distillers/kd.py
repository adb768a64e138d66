"""KD (Hinton et al., 2015): match the teacher's temperature-softened class distribution.

loss = CE_WEIGHT * CE(student, labels) + KD_WEIGHT * T^2 * KL(softmax(z_t / T) || softmax(z_s / T)),
the KL summed over classes and averaged over the batch; the T^2 keeps gradient magnitudes comparable across
temperatures. Defaults are mdistiller's CIFAR-100 settings (T 4, CE 0.1, KD 0.9).
"""

import torch.nn.functional as F
from yacs.config import CfgNode as CN

from ..config.defaults import register_config_section
from .base import Distiller
from .losses import distill_loss, task_loss
from .registry import DISTILLER_REGISTRY

_cfg = CN()
_cfg.TEMPERATURE = 4.0
_cfg.LOSS = CN()
_cfg.LOSS.CE_WEIGHT = 0.1
_cfg.LOSS.KD_WEIGHT = 0.9
register_config_section("KD", _cfg)


def kd_loss(logits_student, logits_teacher, temperature):
    """T^2 * KL(p_teacher^T || p_student^T), summed over classes, mean over the batch."""
    log_p_s = F.log_softmax(logits_student / temperature, dim=1)
    log_p_t = F.log_softmax(logits_teacher / temperature, dim=1)
    return F.kl_div(log_p_s, log_p_t, reduction="batchmean", log_target=True) * temperature**2


@DISTILLER_REGISTRY.register("KD")
class KD(Distiller):
    config_section = "KD"
    ramped_terms = ("kd",)

    @classmethod
    def validate_config(cls, cfg):
        from ..utils.errors import ConfigError

        if cfg.KD.TEMPERATURE <= 0:
            raise ConfigError(f"config key KD.TEMPERATURE: must be > 0, got {cfg.KD.TEMPERATURE}")

    def forward_train(self, images, labels, epoch, index=None):
        logits, _ = self.student(images)
        logits_t, _ = self.teacher_forward(images)
        c = self.cfg.KD
        return logits, {
            "ce": task_loss(c.LOSS.CE_WEIGHT * F.cross_entropy(logits, labels)),
            "kd": distill_loss(c.LOSS.KD_WEIGHT * kd_loss(logits, logits_t, c.TEMPERATURE)),
        }
