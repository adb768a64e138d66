"""DISTILLER.TYPE NONE: the student trained alone with cross-entropy (how teachers and baselines are made)."""

from .base import Distiller, cross_entropy_term
from .registry import DISTILLER_REGISTRY


@DISTILLER_REGISTRY.register("NONE")
class Vanilla(Distiller):
    needs_teacher = False

    def forward_train(self, images, labels, epoch, index=None):
        logits, _ = self.student(images)
        return logits, {"ce": cross_entropy_term(logits, labels)}
