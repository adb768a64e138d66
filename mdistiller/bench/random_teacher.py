"""A teacher with random weights: as a state dict (engine.build_run's `teacher_state`) or a checkpoint file in the
published {"model": state_dict} layout.

Timings, loss monitors and plumbing tests do not depend on what a teacher has learned, only on its architecture
(and, for the file, on the checkpoint loading path). The global RNG is left as it was, so a caller's own seeding
is undisturbed.
"""

import torch

from ..models import build_model
from ..utils.checkpoint import atomic_save


def random_teacher_state(name, dataset, seed=0, num_classes=None):
    """The state dict of model `name` for `dataset`, initialised from `seed`."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build_model(name, dataset, num_classes).state_dict()


def write_random_teacher(path, name, dataset, seed=0):
    """Save random_teacher_state(...) at `path` (parents created); returns str(path)."""
    path = str(path)
    atomic_save({"model": random_teacher_state(name, dataset, seed)}, path)
    return path
