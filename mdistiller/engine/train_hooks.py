"""The hooks every run has: learning-rate schedule, loss monitor, finite guard, evaluation and the epoch's log line.

Each is built from plain values by the builder (build.py) and talks to the loop only through the hook points
(hooks.HookBase) and the trainer's public state (epoch, global_step, lr, set_lr).
"""

import contextlib
import logging
import os

import torch.nn.functional as F

from ..distillers.losses import kd_loss
from ..utils import distributed
from ..utils.errors import TrainingDivergedError
from .evaluator import evaluate
from .finite_guard import CHECK_EVERY, FiniteGuard
from .hooks import HookBase

logger = logging.getLogger("mdistiller")


class LRScheduleHook(HookBase):
    """Sets the learning rate of every step from `schedule(epoch, it, iters)` (lr_schedule.LRSchedule)."""

    def __init__(self, schedule):
        self.schedule = schedule

    def before_step(self, epoch, it, iters):
        self.trainer.set_lr(self.schedule(epoch, it, iters))


class MonitorHook(HookBase):
    """Unweighted training losses of each step's (pre-update) predictions, the same for every method and loss
    weighting: monitor/ce, and monitor/kl when a teacher ran (T^2 KL at `temperature`). What DOT fig. 3 plots; a
    KD run's loss/task_total is 0.1 x CE and not comparable with the student alone's.

    `teacher`: a FrozenTeacher run on the step's images when the method itself runs none (the student trained
    alone with LOG.MONITOR_TEACHER); it never touches the loss."""

    def __init__(self, temperature, teacher=None, speed=None):
        """`speed`: the run's SpeedPlan, whose autocast the monitor's own teacher runs under, as a method's would."""
        self.temperature, self.teacher, self.speed = temperature, teacher, speed

    def after_step(self, step):
        out = step.output
        step.stats["monitor/ce"] = F.cross_entropy(out.logits.detach().float(), step.labels)
        t_logits = out.teacher_logits
        if t_logits is None and self.teacher is not None:
            with self.speed.autocast() if self.speed is not None else contextlib.nullcontext():
                t_logits = self.teacher(step.images)[0]
        if t_logits is not None:
            step.stats["monitor/kl"] = kd_loss(out.logits.detach().float(), t_logits.float(), self.temperature)


class FiniteGuardHook(HookBase):
    """Stops a run whose losses, gradients or weights stop being finite (finite_guard.py), before the epoch's
    checkpoints are written. `max_skipped_steps`: bad steps in a row an fp16 loss scale may skip (0 without one)."""

    def __init__(self, device, max_skipped_steps=0, run_dir=None):
        self.guard = FiniteGuard(device)
        self.max_skipped_steps, self.run_dir = max_skipped_steps, run_dir

    def before_epoch(self, epoch, iters):
        self.guard.limit = self.max_skipped_steps
        self.guard.start_epoch(epoch, self.trainer.global_step, iters)

    def after_step(self, step):
        self.guard.observe(step.losses, step.grad_max)
        if (step.it + 1) % CHECK_EVERY == 0 and step.it + 1 < step.iters:
            self.check()

    def end_of_epoch(self, record):
        # Before evaluation and long before the checkpoint hooks: what they would save.
        self.check(weights=self.trainer.distiller.learnable_state_dict())

    def last_good_checkpoint(self):
        """Where the run can be taken up again after a failure in the current epoch (for the error message)."""
        epoch = self.trainer.epoch
        latest = os.path.join(self.run_dir, "latest.pth") if self.run_dir else None
        if latest and epoch > 0 and os.path.exists(latest):
            return f"the last good checkpoint is {latest} (epoch {epoch}), left untouched"
        return "no checkpoint was written" if epoch == 0 else f"the last good state is epoch {epoch}'s"

    def check(self, weights=None):
        """The guard's check (a sync, and a collective under DDP): raises TrainingDivergedError on every rank."""
        try:
            self.guard.check(self.last_good_checkpoint(), weights)
        except TrainingDivergedError as e:
            if distributed.rank() == 0:
                logger.error("training stopped: %s", e)
            raise

    def state_dict(self):
        return {"finite_guard": self.guard.state_dict()}  # the streak of skipped fp16 steps

    def load_state_dict(self, state):
        self.guard.load_state_dict(state.get("finite_guard"))


class EvalHook(HookBase):
    """Test accuracy of the student after every epoch, every test sample counted once over all ranks; keeps the
    best and the last result.

    Ranks first take rank 0's BatchNorm statistics (their last training step updated them from their own shard),
    so every rank evaluates the very model rank 0 saves; tools/eval.py on that file agrees."""

    metric = "top1"  # the record's test_<metric> is what best.pth is chosen by

    def __init__(self, model, student, loader, speed=None):
        """`model(images)` gives the logits (the distiller's evaluation forward); `student` owns the buffers."""
        self.model, self.student, self.loader, self.speed = model, student, loader, speed
        self.best = {"top1": -1.0, "top5": -1.0, "epoch": 0}
        self.last = {"top1": None, "top5": None}

    def evaluate(self):
        distributed.broadcast_(self.student.buffers())
        return evaluate(self.model, self.loader, reduce_fn=distributed.all_reduce_sum, speed=self.speed)

    def end_of_epoch(self, record):
        test = self.evaluate()
        epoch = record["epoch"]
        self.last = {"top1": test["top1"], "top5": test["top5"]}
        if test["top1"] > self.best["top1"]:
            self.best = {"top1": test["top1"], "top5": test["top5"], "epoch": epoch}
        record.update({"test_top1": test["top1"], "test_top5": test["top5"], "test_loss": test["loss"],
                       "best_top1": self.best["top1"]})

    def summary_fields(self):
        """The result as summary.json has it."""
        return {"best_top1": self.best["top1"], "best_top5": self.best["top5"], "best_epoch": self.best["epoch"],
                "last_top1": self.last["top1"], "last_top5": self.last["top5"]}

    def state_dict(self):
        return {"best": dict(self.best), "last": dict(self.last)}

    def load_state_dict(self, state):
        self.best, self.last = dict(state["best"]), dict(state["last"])


class EpochLogHook(HookBase):
    """The epoch's line in the log."""

    def after_epoch(self, record):
        logger.info("epoch %d/%d  lr %.5f  train_loss %.4f  test_top1 %.2f  test_top5 %.2f  best %.2f  %.0f img/s",
                    record["epoch"], self.trainer.max_epochs, record["lr"], record["train_loss"],
                    record["test_top1"], record["test_top5"], record["best_top1"], record["images_per_s"])


class SpeedPlanHook(HookBase):
    """Records the run's resolved fast paths in its checkpoints ("speed"), so that a resume on a machine whose
    "auto" decides otherwise keeps them (launch.py reads them back before building the run)."""

    def __init__(self, plan):
        self.plan = plan

    def state_dict(self):
        return {"speed": self.plan.as_dict()}
