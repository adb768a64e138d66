"""Turning a config into the objects of a run: student, teacher (loaded from its checkpoint) and distiller."""

import os

from ..distillers import DISTILLER_REGISTRY
from ..models import build_model
from ..utils.checkpoint import load_weights
from ..utils.env import REPO_ROOT


def default_teacher_ckpt(cfg):
    """The published location of a CIFAR-100 teacher (download_ckpts.sh puts it there)."""
    name = cfg.DISTILLER.TEACHER
    return os.path.join(REPO_ROOT, "download_ckpts", "cifar_teachers", f"{name}_vanilla", "ckpt_epoch_240.pth")


def build_teacher(cfg, num_classes):
    name, dataset = cfg.DISTILLER.TEACHER, cfg.DATASET.TYPE
    teacher = build_model(name, dataset, num_classes)
    path = cfg.DISTILLER.TEACHER_CKPT or default_teacher_ckpt(cfg)
    hint = (f"get the published teachers with download_ckpts.sh, or train one with "
            f"configs/{dataset}/vanilla/{name}.yaml and set DISTILLER.TEACHER_CKPT to its student_best.pth")
    return load_weights(teacher, path, name, hint)


def build_distiller(cfg, meta, device):
    cls = DISTILLER_REGISTRY.get(cfg.DISTILLER.TYPE, "DISTILLER.TYPE")
    student = build_model(cfg.DISTILLER.STUDENT, cfg.DATASET.TYPE, meta.num_classes)
    teacher = build_teacher(cfg, meta.num_classes) if cls.needs_teacher else None
    return cls(student, teacher, cfg, meta).to(device)
