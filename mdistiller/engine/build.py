"""Turning a config into the objects of a run: student, teacher (loaded from its checkpoint) and distiller."""

from ..distillers import DISTILLER_REGISTRY
from ..models import build_model
from .teacher import build_teacher


def build_distiller(cfg, meta, device):
    cls = DISTILLER_REGISTRY.get(cfg.DISTILLER.TYPE, "DISTILLER.TYPE")
    student = build_model(cfg.DISTILLER.STUDENT, cfg.DATASET.TYPE, meta.num_classes)
    teacher = build_teacher(cfg, meta.num_classes) if cls.needs_teacher else None
    return cls(student, teacher, cfg, meta).to(device)
