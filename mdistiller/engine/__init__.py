"""Training engine: the assembler (build.py), the tasks' common interface (task.py) and classification's
(classification.py), the loop (trainer.py), its hooks and the update rules (SOLVER.UPDATE_RULE)."""

from .build import Run, build_run
from .evaluator import evaluate
from .hooks import CheckpointHook, HookBase, MetricsHook, SummaryHook, TensorBoardHook
from .trainer import Trainer
from .update_rule import UPDATE_RULE_REGISTRY, UpdateRule

# The classification task and the update rules (SOLVER.UPDATE_RULE), each registering itself.
from . import classification, dot  # noqa: E402,F401

__all__ = ["UPDATE_RULE_REGISTRY", "UpdateRule", "Run", "build_run", "Trainer", "HookBase", "CheckpointHook",
           "MetricsHook", "SummaryHook", "TensorBoardHook", "evaluate"]
