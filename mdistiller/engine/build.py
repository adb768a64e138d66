"""Turning a config into the objects of a run: student, teacher (loaded from its checkpoint) and distiller."""

import logging

from ..distillers import DISTILLER_REGISTRY
from ..models import build_model
from ..utils.errors import CheckpointError
from .teacher import build_teacher

logger = logging.getLogger("mdistiller")


def build_distiller(cfg, meta, device):
    cls = DISTILLER_REGISTRY.get(cfg.DISTILLER.TYPE, "DISTILLER.TYPE")
    student = build_model(cfg.DISTILLER.STUDENT, cfg.DATASET.TYPE, meta.num_classes)
    teacher = None
    if cls.needs_teacher:
        teacher = build_teacher(cfg, meta.num_classes)
    elif cls.wants_teacher(cfg):  # only monitored: a missing checkpoint costs the monitor/kl curve, not the run
        try:
            teacher = build_teacher(cfg, meta.num_classes)
        except CheckpointError as e:
            logger.warning("LOG.MONITOR_TEACHER: %s; training without monitor/kl", e)
    return cls(student, teacher, cfg, meta).to(device)
