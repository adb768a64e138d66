"""A teacher checkpoint with random weights, in the published {"model": state_dict} layout.

Timings, loss monitors and plumbing tests do not depend on what a teacher has learned, only on its architecture
and on the checkpoint loading path; this writes one without training. The global RNG is left as it was, so a
caller's own seeding is undisturbed.
"""

import torch

from mdistiller.models import build_model
from mdistiller.utils.checkpoint import atomic_save


def write_random_teacher(path, name, dataset, seed=0):
    """Save model `name` for `dataset`, initialised from `seed`, at `path` (parents created); returns str(path)."""
    path = str(path)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        state = build_model(name, dataset).state_dict()
    atomic_save({"model": state}, path)
    return path
