"""A run directory as data: its config, its per-epoch metrics.jsonl records and its per-step TensorBoard scalars.

Figures are drawn from these files only, so a figure can be remade from a finished run on any machine (or from a
copy of its directory) without retraining.
"""

import json
import os

from ..config import load_config
from ..utils.errors import UserError


def run_config(run_dir):
    path = os.path.join(run_dir, "config.yaml")
    if not os.path.isfile(path):
        raise UserError(f"{run_dir} is not a run directory (no config.yaml); give the folder tools/train.py "
                        "printed as `run ...`")
    return load_config(path, validate=False)


def epoch_records(run_dir):
    """metrics.jsonl as a list of dicts, one per epoch; a resumed run's repeated epochs keep their last record."""
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.isfile(path):
        raise UserError(f"{run_dir} has no metrics.jsonl: the run has not finished an epoch yet")
    by_epoch = {}
    with open(path) as f:
        for line in f:
            if line.strip():
                rec = json.loads(line)
                by_epoch[rec["epoch"]] = rec
    return [by_epoch[e] for e in sorted(by_epoch)]


def step_scalars(run_dir, tag):
    """[(step, value)] of a training scalar from the run's TensorBoard events (logged every LOG.TENSORBOARD_FREQ
    steps as train/<tag>); [] when the run has none."""
    log_dir = os.path.join(run_dir, "tensorboard")
    if not os.path.isdir(log_dir):
        return []
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(log_dir, size_guidance={"scalars": 0})
    acc.Reload()
    name = f"train/{tag}"
    if name not in acc.Tags().get("scalars", []):
        return []
    points = {}
    for event in acc.Scalars(name):  # a resumed run may repeat steps: the last write wins
        points[event.step] = event.value
    return sorted(points.items())


def run_label(cfg):
    """A legend label: "student alone", "KD", "KD+DOT (delta 0.075)"."""
    method = "student alone" if cfg.DISTILLER.TYPE == "NONE" else cfg.DISTILLER.TYPE
    if cfg.SOLVER.UPDATE_RULE == "dot":
        return f"{method}+DOT (delta {cfg.SOLVER.DOT.DELTA:g})"
    return method
