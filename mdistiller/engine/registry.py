from ..utils.registry import Registry

# SOLVER.TRAINER -> Trainer subclass
TRAINER_REGISTRY = Registry("trainer")
