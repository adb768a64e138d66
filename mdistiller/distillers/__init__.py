"""Distillation methods. Each module here registers one `Distiller` subclass under its DISTILLER.TYPE;
a new method is a new file in this folder (imported automatically) with its own config section."""

from ..utils.autoimport import import_submodules
from .base import Distiller
from .losses import DISTILL, TASK, LossTerm, distill_loss, task_loss, total_loss
from .registry import DISTILLER_REGISTRY

import_submodules(__name__, __path__)

__all__ = ["DISTILLER_REGISTRY", "Distiller", "LossTerm", "TASK", "DISTILL", "task_loss", "distill_loss",
           "total_loss"]
