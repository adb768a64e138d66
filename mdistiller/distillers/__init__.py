"""Distillation methods. Each module here registers one `Distiller` subclass under its DISTILLER.TYPE, with its own
config section; a new method is a new file in this folder (imported automatically)."""

from ..utils.autoimport import import_submodules
from .base import Distiller
from .losses import DISTILL, TASK, LossTerm, StepOutput, ce_term, distill_loss, kd_loss, task_loss, total_loss
from .registry import DISTILLER_REGISTRY

import_submodules(__name__, __path__)

__all__ = ["DISTILLER_REGISTRY", "Distiller", "LossTerm", "StepOutput", "TASK", "DISTILL", "ce_term", "kd_loss",
           "task_loss", "distill_loss", "total_loss"]
