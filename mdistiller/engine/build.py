"""The assembler: the one place a config becomes the objects of a run, for every task.

`build_run(cfg)` resolves the task (TASK: classification, detection), its speed plan, seeds, and asks the task for
its data, its method (student, frozen teacher, added terms, loss ramp) and what it prepares before the optimizer
(class means, fast paths); then it wraps the method for DDP, builds the update rule, takes the task's standard
hooks and returns them in a `Run` with the `Trainer` that loops over them. Everything below it takes plain values
(components are built `from_config`); nothing after it reads the config. Tests and the benchmark pass their own
`bundle` (in-memory data) and `teacher_state` (random weights) instead of files.
"""

import dataclasses
import logging
from dataclasses import dataclass
from typing import Optional

import torch

from ..distillers import Distiller
from ..models.frozen import FrozenTeacher
from ..utils import distributed
from ..utils.env import resolve_device, seed_everything
from ..utils.errors import ConfigError
from .ddp_wrap import wrap_for_training
from .hooks import EvaluationHook
from .cuda_graph import GraphedUpdate
from .speed import SpeedPlan
from .task import Task, build_task
from .trainer import Trainer
from .update_rule import UPDATE_RULE_REGISTRY, UpdateRule

logger = logging.getLogger("mdistiller")


@dataclass
class Run:
    """What build_run made; `trainer.train()` runs it."""

    trainer: Trainer
    distiller: Distiller
    update_rule: UpdateRule
    evaluation: EvaluationHook  # the task's hook that evaluates (knows the best and last result)
    train_loader: object
    test_loader: object
    data: object  # the task's data record (name, num_train, num_test, classes, sources)
    speed: SpeedPlan
    device: torch.device
    monitor_teacher: Optional[FrozenTeacher] = None
    task: Optional[Task] = None


def graphs_for_method(speed, distiller):
    """The plan with CUDA graphs off where the method's update cannot be captured (SPEED.CUDA_GRAPHS auto: one
    line saying why; on: an error)."""
    if not speed.cuda_graphs:
        return speed
    why = distiller.prepare_capture()
    if why is None:
        return speed
    if speed.cuda_graphs_required:
        raise ConfigError(f"config key SPEED.CUDA_GRAPHS on: {type(distiller).__name__}'s update cannot be "
                          f"captured: {why}; set SPEED.CUDA_GRAPHS auto or off")
    note = f"SPEED.CUDA_GRAPHS auto -> off: {type(distiller).__name__}'s update cannot be captured: {why}"
    return dataclasses.replace(speed, cuda_graphs=False, notes=speed.notes + (note,))


def find_unused_parameters(cfg, distiller):
    """DISTRIBUTED.FIND_UNUSED_PARAMETERS, turned on (and said so) under several processes when the method leaves
    parameters without a gradient in some steps: without it DDP stops the run at the next step."""
    why = distiller.unused_parameters()
    if cfg.DISTRIBUTED.FIND_UNUSED_PARAMETERS or why is None or not distributed.active():
        return cfg.DISTRIBUTED.FIND_UNUSED_PARAMETERS
    logger.info("DISTRIBUTED.FIND_UNUSED_PARAMETERS False -> True: %s", why)
    return True


def build_run(cfg, device=None, run_dir=None, bundle=None, teacher_state=None, recorded_speed=None):
    """The run `cfg` describes. `device`: this process's device (launch.py has joined the process group and
    chosen it), else resolved here; `run_dir`: where caches of the run live (detection's class means); `bundle`:
    a DatasetBundle (in-memory data) to train on instead of DATASET.TYPE's files; `teacher_state`: the teacher's
    weights instead of DISTILLER.TEACHER's checkpoint; `recorded_speed`: the fast paths a resumed run recorded
    (its "auto" choices are kept)."""
    task = build_task(cfg)
    if device is None:
        _, device = distributed.setup(resolve_device(cfg.EXPERIMENT.DEVICE), cfg.DISTRIBUTED.TIMEOUT_MIN)
    speed = task.speed_plan(cfg, device, recorded_speed)  # SPEED's "auto" decided once, before any data is read
    seed_everything(cfg.EXPERIMENT.SEED, cfg.EXPERIMENT.DETERMINISTIC)
    # Steps that can fail on one rank only go through agree(): every rank stops, with one message.
    train_loader, test_loader, data = distributed.agree(task.build_data, cfg, device, bundle=bundle)
    distiller, monitor_teacher = distributed.agree(task.build_distiller, cfg, data, device, teacher_state)
    # Before the optimizer (a term may add learnable state) and not under agree(): it may run collectives itself.
    speed = task.prepare(cfg, distiller, data, device, speed=speed, run_dir=run_dir, bundle=bundle,
                         teacher_state=teacher_state, monitor_teacher=monitor_teacher) or speed
    model = wrap_for_training(distiller, device, cfg.DISTRIBUTED.SYNC_BN, find_unused_parameters(cfg, distiller))
    rule = UPDATE_RULE_REGISTRY.get(cfg.SOLVER.UPDATE_RULE, "SOLVER.UPDATE_RULE").build(
        cfg, distiller.learnable_parameters(), device, fp16=speed.needs_scaler)
    speed = graphs_for_method(speed, distiller)
    hooks, evaluation = task.hooks(cfg, distiller, test_loader, data=data, speed=speed, device=device,
                                   run_dir=run_dir, monitor_teacher=monitor_teacher)
    trainer = Trainer(distiller, model, train_loader, rule, hooks, speed=speed, max_epochs=cfg.SOLVER.EPOCHS,
                      device=device, print_freq=cfg.LOG.PRINT_FREQ)
    if speed.cuda_graphs:
        rule.use_device_lr(device)
        trainer.replay_updates(GraphedUpdate(trainer.update, device, label=f"the {cfg.DISTILLER.TYPE} update"))
    return Run(trainer, distiller, rule, evaluation, train_loader, test_loader, data, speed, torch.device(device),
               monitor_teacher, task)
