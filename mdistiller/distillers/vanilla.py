"""DISTILLER.TYPE NONE: the student trained alone with cross-entropy (how teachers and baselines are made).

With LOG.MONITOR_TEACHER the run also loads DISTILLER.TEACHER and runs it on every batch, only so that the
trainer can log how far the student's predictions are from the teacher's (DOT fig. 3 plots that distillation loss
for the baseline, computed "on the fly, without back-propagation"); the teacher never touches the loss.
"""

from .base import Distiller, cross_entropy_term
from .registry import DISTILLER_REGISTRY


@DISTILLER_REGISTRY.register("NONE")
class Vanilla(Distiller):
    needs_teacher = False

    @classmethod
    def wants_teacher(cls, cfg):
        return bool(cfg.LOG.MONITOR_TEACHER)

    def forward_train(self, images, labels, epoch, index=None):
        logits, _ = self.student(images)
        if self.teacher is not None:
            self.teacher_forward(images)
        return logits, {"ce": cross_entropy_term(logits, labels)}
