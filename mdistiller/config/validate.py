"""Checks of config values that types alone cannot catch, each failing with the key and what is allowed.

Two checks cover the whole tree, distiller sections included, so a new method gets them without code: every
float must be finite (YAML reads `.inf` / `.nan` and the command line `inf` / `nan` as floats, and one of them
in a loss weight or a learning rate would only show up as a NaN loss), and every loss weight must be >= 0 (a
negative weight maximises its term: the loss is unbounded below and the run diverges). Loss weights are the keys
whose name ends in WEIGHT (KD.LOSS.KD_WEIGHT, DINO.WEIGHT, ...) and the per-term weights named otherwise in
their papers, which each component declares with its section (`loss_weights=`: DKD's ALPHA and BETA).
"""

import importlib.util
import math

from yacs.config import CfgNode as CN

from ..utils.errors import ConfigError
from .registry import REGISTRIES, declared_sections

#: what is wrong with LOG.WANDB True without the package (config key LOG.WANDB: ...), here and in the W&B hook
WANDB_MISSING = ("True needs the wandb package, which is not installed; run `pip install .[wandb]` (or "
                 "`pip install wandb`), or set LOG.WANDB False")


def loss_weight_keys():
    """The full keys of the loss weights the registered components declare (DKD.ALPHA, DIST.GAMMA, ...)."""
    return {f"{section}.{key}" for section, (_, keys, _) in declared_sections().items() for key in keys}


def _check(ok, key, message):
    if not ok:
        raise ConfigError(f"config key {key}: {message}")


def _leaves(node, prefix=""):
    """(full key, value) of every key of a config tree, lists expanded to KEY[i]."""
    for name, value in node.items():
        key = f"{prefix}{name}"
        if isinstance(value, CN):
            yield from _leaves(value, key + ".")
        elif isinstance(value, (list, tuple)):
            yield from ((f"{key}[{i}]", v) for i, v in enumerate(value))
        else:
            yield key, value


def is_loss_weight(key, declared=None):
    return key.endswith("WEIGHT") or key in (loss_weight_keys() if declared is None else declared)


def validate_tree(cfg):
    """The checks that apply to every key alike: finite floats, non-negative loss weights."""
    declared = loss_weight_keys()
    for key, value in _leaves(cfg):
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"config key {key}: must be a finite number, got {value}")
        number = isinstance(value, (int, float)) and not isinstance(value, bool)
        if number and value < 0 and is_loss_weight(key, declared):
            raise ConfigError(f"config key {key}: a loss weight must be >= 0 (0 turns the term off), got {value}")


AMP_MODES = ("auto", "off", "bf16", "fp16")
SWITCH_MODES = ("auto", "on", "off")



def validate_config(cfg):
    """Every check, in order: the whole tree, the names the registries select (dataset, method and its models,
    update rule), the core sections, then each chosen component's own checks."""
    validate_tree(cfg)
    registries = [r for r in REGISTRIES.values() if r.applies_to(cfg)]  # TASK's registry first: it is made first
    for registry in registries:
        registry.check_name(cfg)
    s, d = cfg.SOLVER, cfg.DATASET
    _check(d.NUM_WORKERS >= 0, "DATASET.NUM_WORKERS", f"must be >= 0, got {d.NUM_WORKERS}")
    _check(d.TRAIN_SUBSET >= 0, "DATASET.TRAIN_SUBSET", f"must be >= 0 (0 = all), got {d.TRAIN_SUBSET}")
    _check(d.TEST_SUBSET >= 0, "DATASET.TEST_SUBSET", f"must be >= 0 (0 = all), got {d.TEST_SUBSET}")
    _check(d.TEST.BATCH_SIZE > 0, "DATASET.TEST.BATCH_SIZE", f"must be > 0, got {d.TEST.BATCH_SIZE}")
    _check(s.BATCH_SIZE > 0, "SOLVER.BATCH_SIZE", f"must be > 0, got {s.BATCH_SIZE}")
    _check(s.EPOCHS > 0, "SOLVER.EPOCHS", f"must be > 0, got {s.EPOCHS}")
    _check(s.LR > 0, "SOLVER.LR", f"must be > 0, got {s.LR}")
    _check(0 < s.LR_DECAY_RATE <= 1, "SOLVER.LR_DECAY_RATE", f"must be in (0, 1], got {s.LR_DECAY_RATE}")
    stages = list(s.LR_DECAY_STAGES)
    _check(stages == sorted(stages), "SOLVER.LR_DECAY_STAGES", f"must be increasing, got {stages}")
    for e in stages:
        _check(0 < e <= s.EPOCHS, "SOLVER.LR_DECAY_STAGES",
               f"stage {e} is outside 1..SOLVER.EPOCHS ({s.EPOCHS}); lower it or raise SOLVER.EPOCHS")
    _check(0 <= s.WARMUP_EPOCHS < s.EPOCHS or s.WARMUP_EPOCHS == 0, "SOLVER.WARMUP_EPOCHS",
           f"must be in [0, SOLVER.EPOCHS) = [0, {s.EPOCHS}), got {s.WARMUP_EPOCHS}")
    _check(s.WEIGHT_DECAY >= 0, "SOLVER.WEIGHT_DECAY", f"must be >= 0, got {s.WEIGHT_DECAY}")
    _check(0 <= s.MOMENTUM < 1, "SOLVER.MOMENTUM", f"must be in [0, 1), got {s.MOMENTUM}")
    _check(not s.NESTEROV or s.MOMENTUM > 0, "SOLVER.NESTEROV", "needs SOLVER.MOMENTUM > 0")
    _check(s.MAX_SKIPPED_STEPS >= 0, "SOLVER.MAX_SKIPPED_STEPS", f"must be >= 0, got {s.MAX_SKIPPED_STEPS}")
    _check(cfg.DISTRIBUTED.TIMEOUT_MIN > 0, "DISTRIBUTED.TIMEOUT_MIN",
           f"must be > 0 minutes, got {cfg.DISTRIBUTED.TIMEOUT_MIN}")

    _check(cfg.LOG.SAVE_CHECKPOINT_FREQ >= 0, "LOG.SAVE_CHECKPOINT_FREQ", "must be >= 0 (0 = last epoch only)")
    _check(cfg.LOG.TENSORBOARD_FREQ >= 0, "LOG.TENSORBOARD_FREQ", "must be >= 0 (0 = off)")
    _check(cfg.LOG.PRINT_FREQ >= 0, "LOG.PRINT_FREQ", "must be >= 0 (0 = off)")
    _check(cfg.LOG.MONITOR_T > 0, "LOG.MONITOR_T", f"must be > 0, got {cfg.LOG.MONITOR_T}")
    dev = cfg.EXPERIMENT.DEVICE
    _check(dev in ("auto", "cpu", "cuda") or dev.startswith("cuda:"), "EXPERIMENT.DEVICE",
           f"must be auto, cpu, cuda or cuda:N, got '{dev}'")
    _check(cfg.EXPERIMENT.SEED >= 0, "EXPERIMENT.SEED", f"must be >= 0, got {cfg.EXPERIMENT.SEED}")
    _check("/" not in cfg.EXPERIMENT.NAME, "EXPERIMENT.NAME", "must be a plain directory name without '/'")

    sp = cfg.SPEED
    _check(sp.AMP in AMP_MODES, "SPEED.AMP", f"must be one of {', '.join(AMP_MODES)}, got '{sp.AMP}'")
    _check(not (sp.AMP == "fp16" and dev == "cpu"), "SPEED.AMP",
           "fp16 autocast is for CUDA GPUs; on the CPU use bf16 or off")
    for key in ("CHANNELS_LAST", "TEACHER_HALF", "CUDA_GRAPHS"):
        _check(sp[key] in SWITCH_MODES, f"SPEED.{key}",
               f"must be one of {', '.join(SWITCH_MODES)}, got '{sp[key]}'")
    _check(not (sp.CUDA_GRAPHS == "on" and dev == "cpu"), "SPEED.CUDA_GRAPHS",
           "CUDA graphs replay GPU work; on the CPU set it to auto or off")
    _check(not (sp.TEACHER_INT8 and dev.startswith("cuda")), "SPEED.TEACHER_INT8",
           "the int8 teacher runs on the CPU; on a GPU use SPEED.TEACHER_HALF")
    _check(not (sp.TEACHER_INT8 and sp.TEACHER_HALF == "on"), "SPEED.TEACHER_INT8",
           "and SPEED.TEACHER_HALF on: choose one teacher precision")
    _check(sp.TEACHER_INT8_CALIBRATION > 0, "SPEED.TEACHER_INT8_CALIBRATION",
           f"must be > 0 images, got {sp.TEACHER_INT8_CALIBRATION}")

    if cfg.LOG.WANDB:  # fail before anything is written when the W&B hook cannot work
        _check(importlib.util.find_spec("wandb") is not None, "LOG.WANDB", WANDB_MISSING)
        _check(str(cfg.LOG.WANDB_PROJECT).strip(), "LOG.WANDB_PROJECT", "empty; name the wandb project, e.g. "
               "mdistiller")
    for registry in registries:
        registry.validate(cfg)
