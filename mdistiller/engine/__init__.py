"""Training engine: the builder (build.py), the loop (trainer.py), its hooks and the update rules (SOLVER.TRAINER)."""

from ..utils.autoimport import import_submodules
from .build import Run, build_run
from .evaluator import evaluate
from .hooks import CheckpointHook, HookBase, MetricsHook, SummaryHook, TensorBoardHook
from .trainer import Trainer
from .update_rule import UPDATE_RULE_REGISTRY, UpdateRule

import_submodules(__name__, __path__)

__all__ = ["UPDATE_RULE_REGISTRY", "UpdateRule", "Run", "build_run", "Trainer", "HookBase", "CheckpointHook",
           "MetricsHook", "SummaryHook", "TensorBoardHook", "evaluate"]
