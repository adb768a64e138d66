"""Training engine: the `Trainer` loop, its hooks, and the trainer registry (SOLVER.TRAINER)."""

from ..utils.autoimport import import_submodules
from .evaluator import evaluate
from .hooks import CheckpointHook, HookBase, MetricsHook, SummaryHook, TensorBoardHook
from .registry import TRAINER_REGISTRY
from .trainer import Trainer

import_submodules(__name__, __path__)

__all__ = ["TRAINER_REGISTRY", "Trainer", "HookBase", "CheckpointHook", "MetricsHook", "SummaryHook",
           "TensorBoardHook", "evaluate"]
