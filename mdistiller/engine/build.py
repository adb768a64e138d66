"""The builder: the one place a config becomes the objects of a run.

`build_run(cfg)` resolves the speed plan, seeds, reads the data, builds the method (student, FrozenTeacher, the
dino term of "X++", the loss ramp), prepares it, applies the fast paths, wraps it for DDP, builds the update rule
and the run's standard hooks, and returns them in a `Run` with the `Trainer` that loops over them. Everything
below it takes plain values (components are built `from_config`); nothing after it reads the config. Tests and the
benchmark pass their own `bundle` (in-memory data) and `teacher_state` (random weights) instead of files.
"""

import logging
from dataclasses import dataclass
from typing import Optional

import torch

from ..data import build_dataloaders
from ..data.bundle import DatasetMeta
from ..data.unaugmented import unaugmented_train_loader
from ..distillers import DISTILLER_REGISTRY, Distiller
from ..distillers.loss_ramp import LossRamp
from ..distillers.plus_plus import DinoTerm
from ..models import build_model, is_library_model
from ..models.frozen import FrozenTeacher
from ..models.teacher_ckpt import build_teacher
from ..utils import distributed
from ..utils.env import resolve_device, seed_everything
from ..utils.errors import CheckpointError
from .ddp_wrap import wrap_for_training
from .lr_schedule import LRSchedule
from .speed import SpeedPlan, apply_speed, resolve_speed
from .train_hooks import EpochLogHook, EvalHook, FiniteGuardHook, LRScheduleHook, MonitorHook, SpeedPlanHook
from .trainer import Trainer
from .update_rule import UPDATE_RULE_REGISTRY, UpdateRule

logger = logging.getLogger("mdistiller")


@dataclass
class Run:
    """What build_run made; `trainer.train()` runs it."""

    trainer: Trainer
    distiller: Distiller
    update_rule: UpdateRule
    evaluation: EvalHook
    train_loader: object
    test_loader: object
    data: DatasetMeta
    speed: SpeedPlan
    device: torch.device
    monitor_teacher: Optional[FrozenTeacher] = None


def _load_teacher(cfg, data, teacher_state):
    """DISTILLER.TEACHER with the weights of its checkpoint, or of `teacher_state` (a state dict) when given: built
    the same way either way, so that a run with an in-memory teacher equals one with that teacher's file."""
    if teacher_state is None:
        return build_teacher(cfg, data.num_classes, data.image_size)
    model = build_model(cfg.DISTILLER.TEACHER, num_classes=data.num_classes, image_size=data.image_size)
    model.load_state_dict(teacher_state)
    return model


def build_distiller(cfg, data, device, teacher_state=None):
    """(the method with its added terms and loss ramp, on `device`; the loss monitor's own FrozenTeacher or None).

    `teacher_state`: the teacher's weights instead of DISTILLER.TEACHER's checkpoint. The models are built in a
    fixed order (student, teacher, the method's modules, the dino term's projector): their random initialisations
    depend on it."""
    method, plus_plus = DISTILLER_REGISTRY.resolve(cfg.DISTILLER.TYPE, "DISTILLER.TYPE")
    student = build_model(cfg.DISTILLER.STUDENT, num_classes=data.num_classes, image_size=data.image_size,
                          pretrained=cfg.MODEL.STUDENT_PRETRAINED and is_library_model(cfg.DISTILLER.STUDENT))
    frozen = monitor = None
    if method.needs_teacher:
        frozen = FrozenTeacher(_load_teacher(cfg, data, teacher_state))
    elif cfg.LOG.MONITOR_TEACHER:  # only monitored: a missing checkpoint costs the monitor/kl curve, not the run
        try:
            monitor = FrozenTeacher(_load_teacher(cfg, data, teacher_state)).to(device)
        except CheckpointError as e:
            logger.warning("LOG.MONITOR_TEACHER: %s; training without monitor/kl", e)
    distiller = method.from_config(cfg, student, frozen, data)
    if plus_plus:
        distiller.add_term("dino", DinoTerm.from_config(cfg, student, distiller.teacher, data.num_classes))
    distiller.loss_ramp = LossRamp.from_config(cfg, method)
    return distiller.to(device), monitor


def prepare(cfg, distiller, data, device, bundle=None, teacher_from_file=True):
    """Work the added terms need from the data before the first step (KD++'s teacher class means), done with the
    plain float32 teacher, so that caches never depend on SPEED."""
    for term in getattr(distiller, "added_terms", {}).values():
        if hasattr(term, "prepare"):
            term.prepare(cfg, distiller.teacher.model, data, device, bundle=bundle, cache=teacher_from_file)


def standard_hooks(cfg, run_dir, distiller, test_loader, speed, device, monitor_teacher=None):
    """The hooks of every run, in the order they must run: LR schedule, loss monitor, finite guard, evaluation
    (fills the epoch's record), the epoch's log line."""
    evaluation = EvalHook(distiller, distiller.student, test_loader, speed)
    skipped = cfg.SOLVER.MAX_SKIPPED_STEPS if speed.needs_scaler else 0
    return [LRScheduleHook(LRSchedule.from_config(cfg)), MonitorHook(cfg.LOG.MONITOR_T, monitor_teacher, speed),
            FiniteGuardHook(device, skipped, run_dir), evaluation, EpochLogHook(), SpeedPlanHook(speed)], evaluation


def build_run(cfg, device=None, run_dir=None, bundle=None, teacher_state=None, recorded_speed=None):
    """The run `cfg` describes. `device`: this process's device (launch.py has joined the process group and
    chosen it), else resolved here; `bundle`: a DatasetBundle (in-memory data) to train on instead of
    DATASET.TYPE's files; `teacher_state`: the teacher's weights instead of DISTILLER.TEACHER's checkpoint;
    `recorded_speed`: the fast paths a resumed run recorded (its "auto" choices are kept)."""
    if device is None:
        _, device = distributed.setup(resolve_device(cfg.EXPERIMENT.DEVICE), cfg.DISTRIBUTED.TIMEOUT_MIN)
    rank, world_size = distributed.rank(), distributed.world_size()
    speed = resolve_speed(cfg, device, recorded_speed)  # SPEED's "auto" decided once, before any data is read
    seed_everything(cfg.EXPERIMENT.SEED, cfg.EXPERIMENT.DETERMINISTIC)
    # Steps that can fail on one rank only go through agree(): every rank stops, with one message.
    train_loader, test_loader, data = distributed.agree(build_dataloaders, cfg, device, rank, world_size,
                                                        bundle=bundle)
    distiller, monitor_teacher = distributed.agree(build_distiller, cfg, data, device, teacher_state)
    # Before the optimizer (a term may add learnable state) and not under agree(): it may run collectives itself.
    prepare(cfg, distiller, data, device, bundle, teacher_from_file=teacher_state is None)
    apply_speed(speed, distiller, [monitor_teacher] if monitor_teacher is not None else [],
                calibration_batches=lambda: unaugmented_train_loader(cfg, device, bundle=bundle))
    model = wrap_for_training(distiller, device, cfg.DISTRIBUTED.SYNC_BN, cfg.DISTRIBUTED.FIND_UNUSED_PARAMETERS)
    rule = UPDATE_RULE_REGISTRY.get(cfg.SOLVER.TRAINER, "SOLVER.TRAINER").from_config(
        cfg, distiller.learnable_parameters(), device, fp16=speed.needs_scaler)
    hooks, evaluation = standard_hooks(cfg, run_dir, distiller, test_loader, speed, device, monitor_teacher)
    trainer = Trainer(distiller, model, train_loader, rule, hooks, speed=speed, max_epochs=cfg.SOLVER.EPOCHS,
                      device=device, print_freq=cfg.LOG.PRINT_FREQ)
    return Run(trainer, distiller, rule, evaluation, train_loader, test_loader, data, speed, torch.device(device),
               monitor_teacher)
