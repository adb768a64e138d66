"""DISTILLER.TYPE NONE: the student trained alone with cross-entropy (how teachers and baselines are made).

No teacher is passed in. LOG.MONITOR_TEACHER (the distance to a teacher logged for DOT fig. 3) is the loss
monitor's business (engine/monitor.py), which runs its own teacher without touching the loss.
"""

from .base import Distiller
from .losses import StepOutput, ce_term
from .registry import DISTILLER_REGISTRY


@DISTILLER_REGISTRY.register("NONE")
class StudentOnly(Distiller):
    needs_teacher = False

    def forward_train(self, images, labels, epoch, index=None):
        logits, feats = self.student(images)
        return StepOutput(logits, {"ce": ce_term(logits, labels)}, feats)
