"""TASK classification: image classifiers distilled on CIFAR-100, Tiny-ImageNet, ImageNet, Fashion-MNIST or an
image folder. What the assembler (build.py) asks of a task: the data, the method with its added terms and loss
ramp, the teacher class means of "X++" and the fast paths before the optimizer, and the hooks that evaluate top-1.
"""

import logging

import torch
import torch.nn as nn

from ..config.registry import TASK_REGISTRY
from ..data import build_dataloaders
from ..data.unaugmented import unaugmented_train_loader
from ..distillers import DISTILLER_REGISTRY
from ..distillers.loss_ramp import LossRamp
from ..distillers.plus_plus import DinoTerm
from ..models import build_model, is_library_model
from ..models.frozen import FrozenTeacher
from ..models.teacher_ckpt import build_teacher, teacher_record
from ..utils import distributed
from ..utils.errors import CheckpointError
from .class_means import class_means_for_run
from .classification_hooks import EpochLogHook, EvalHook, MonitorHook, TrainAccuracyHook
from .lr_schedule import LRSchedule, StagedLR
from .speed import apply_speed, resolve_speed
from .speed_probe import probe_run_speed
from .task import Task
from .train_hooks import FiniteGuardHook, LRScheduleHook, SpeedPlanHook
from .wkd_cost import prepare_wkd_cost

logger = logging.getLogger("mdistiller")


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
    distiller = method.build(cfg, student, frozen, data)
    if plus_plus:
        distiller.add_term("dino", DinoTerm.build(cfg, student, distiller.teacher, data.num_classes))
    distiller.loss_ramp = LossRamp.build(cfg, method)
    return distiller.to(device), monitor


def set_class_means(cfg, term, teacher, data, device, bundle=None, cache=True):
    """The dino term's teacher class means, from one pass of the float32 `teacher` model (or its cache). With
    several processes rank 0 alone reads or computes them (and writes the cache) and the others receive them.
    `bundle`, `cache`: see class_means.class_means_for_run."""
    means = term.class_means.new_zeros(term.class_means.shape)
    counts = torch.zeros(means.shape[0], dtype=torch.int64, device=means.device)

    def on_rank_0():
        if distributed.rank() == 0:
            m, c, _ = class_means_for_run(cfg, teacher, data, device, bundle=bundle, cache=cache)
            means.copy_(m)
            counts.copy_(c)

    distributed.agree(on_rank_0)  # a failure on rank 0 stops every rank, before they wait for its means
    distributed.broadcast_([means, counts])
    term.set_class_means(means, counts)


def standard_hooks(cfg, run_dir, distiller, test_loader, speed, device, monitor_teacher=None):
    """The hooks of every classification run, in the order they must run: LR schedule, loss monitor, training
    accuracy, finite guard, evaluation (fills the epoch's record), the epoch's log line."""
    evaluated = nn.ModuleList(distiller.evaluation_modules())  # a view: owns nothing, holds the same modules
    evaluation = EvalHook(model=distiller, student=evaluated, loader=test_loader, speed=speed)
    schedule = StagedLR(LRSchedule(**LRSchedule.from_config(cfg)), distiller.stage_lr)
    return [LRScheduleHook(schedule=schedule),
            MonitorHook(teacher=monitor_teacher, speed=speed, **MonitorHook.from_config(cfg)),
            TrainAccuracyHook(device=device),
            FiniteGuardHook(device=device, run_dir=run_dir, **FiniteGuardHook.from_config(cfg, speed.needs_scaler)),
            evaluation, EpochLogHook(), SpeedPlanHook(plan=speed)], evaluation


@TASK_REGISTRY.register("classification")
class ClassificationTask(Task):
    metric = "top1"
    epoch_scalars = ("test_top1", "test_top5", "test_loss", "train_loss", "train_top1", "lr", "images_per_s")

    def speed_plan(self, cfg, device, recorded_speed=None):
        return resolve_speed(cfg, device, recorded_speed)

    def build_data(self, cfg, device, bundle=None):
        views = DISTILLER_REGISTRY.get(cfg.DISTILLER.TYPE, "DISTILLER.TYPE").train_views  # "X++": X's views
        return build_dataloaders(cfg, device, distributed.rank(), distributed.world_size(), bundle=bundle,
                                 train_views=views)

    def build_distiller(self, cfg, data, device, teacher_state=None):
        return build_distiller(cfg, data, device, teacher_state)

    def prepare(self, cfg, distiller, data, device, *, speed, run_dir=None, bundle=None, teacher_state=None,
                monitor_teacher=None):
        """KD++'s class means with the plain float32 teacher (so caches never depend on SPEED), the probe of the
        "auto" fast paths on a GPU (speed_probe.py), then the fast paths. Not under agree(): they may run
        collectives themselves. Returns the plan the run trains with."""
        added = getattr(distiller, "added_terms", {})
        if "dino" in added and DinoTerm.needs_class_means(cfg):
            set_class_means(cfg, added["dino"], distiller.teacher.model, data, device, bundle=bundle,
                            cache=teacher_state is None)
        prepare_wkd_cost(cfg, distiller, data, device, bundle=bundle, cache=teacher_state is None)
        if speed.probe:
            speed = probe_run_speed(cfg, speed, distiller, data, device)
        apply_speed(speed, distiller, [monitor_teacher] if monitor_teacher is not None else [],
                    calibration_batches=lambda: unaugmented_train_loader(cfg, device, bundle=bundle))
        return speed

    def hooks(self, cfg, distiller, test_loader, *, data, speed, device, run_dir=None, monitor_teacher=None):
        return standard_hooks(cfg, run_dir, distiller, test_loader, speed, device, monitor_teacher)

    def teacher_record(self, cfg):
        return {**teacher_record(cfg), "metric": self.metric}

    def result_line(self, summary):
        return (f"best top-1 {summary['best_top1']:.2f} (epoch {summary['best_epoch']})  "
                f"last top-1 {summary['last_top1']:.2f}")
