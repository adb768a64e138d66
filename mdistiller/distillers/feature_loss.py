"""The shape NST, PKT and SP share: the task CE plus FEAT_WEIGHT times one loss between student and teacher
features, each method's section holding LOSS.CE_WEIGHT and LOSS.FEAT_WEIGHT."""

from .base import Distiller
from .losses import StepOutput, ce_term, distill_loss


class FeatureLossMethod(Distiller):
    """Subclasses set `section` (their config section), `ramped_terms` (one name: their loss term's) and
    `default_feat_weight`, and implement `feature_loss(features, features_t)`."""

    section = ""
    default_feat_weight = 1.0

    def __init__(self, *, student, teacher, ce_weight=1.0, feat_weight=None):
        super().__init__(student=student, teacher=teacher)
        self.ce_weight = ce_weight
        self.feat_weight = self.default_feat_weight if feat_weight is None else feat_weight

    @classmethod
    def from_config(cls, cfg, data):
        c = cfg[cls.section]
        return {"ce_weight": c.LOSS.CE_WEIGHT, "feat_weight": c.LOSS.FEAT_WEIGHT}

    def feature_loss(self, features, features_t):
        raise NotImplementedError

    def forward_train(self, images, labels, epoch, index=None):
        logits, features = self.student(images)
        logits_t, features_t = self.teacher(images)
        loss = self.feature_loss(features, features_t)
        return StepOutput(logits, {
            "ce": ce_term(logits, labels, self.ce_weight),
            self.ramped_terms[0]: distill_loss(self.feat_weight * loss),
        }, features, logits_t, features_t)
