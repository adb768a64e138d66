"""Distillation methods. Each module here registers one `Distiller` subclass under its DISTILLER.TYPE, with its own
config section; a new method is a new file in this folder and its name in the list below."""

from .base import Distiller
from .losses import DISTILL, TASK, LossTerm, StepOutput, ce_term, distill_loss, kd_loss, task_loss, total_loss
from .registry import DISTILLER_REGISTRY
from .term_registry import TERM_REGISTRY

# The methods (DISTILLER.TYPE) and the added loss terms, each registering itself.
from . import (at, catkd, cc, crd, ctkd, dist, dkd, fitnet, fsp, ickd, kd, kdsvd, nst, ofd,  # noqa: E402,F401
               pkt, plus_plus, reviewkd, rkd, simkd, sp, srrl, student_only, vid, ab, ft,
               wkd, wkd_feature, sskd, mlkd)

__all__ = ["DISTILLER_REGISTRY", "TERM_REGISTRY",
           "Distiller", "LossTerm", "StepOutput", "TASK", "DISTILL", "ce_term", "kd_loss",
           "task_loss", "distill_loss", "total_loss"]
