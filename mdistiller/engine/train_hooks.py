"""The hooks every task's runs share: learning-rate schedule, finite guard, and the speed plan's record.

Each is built from plain values by a task (classification.py, mdistiller/detection) and talks to the loop only
through the hook points (hooks.HookBase) and the trainer's public state (epoch, global_step, lr, set_lr).
"""

import logging
import os

from ..utils import distributed
from ..utils.errors import TrainingDivergedError
from .finite_guard import CHECK_EVERY, FiniteGuard
from .hooks import HookBase

logger = logging.getLogger("mdistiller")


class LRScheduleHook(HookBase):
    """Sets the learning rate of every step from `schedule(epoch, it, iters)` (lr_schedule.LRSchedule)."""

    def __init__(self, *, schedule):
        self.schedule = schedule

    def before_step(self, epoch, it, iters):
        self.trainer.set_lr(self.schedule(epoch, it, iters))


class FiniteGuardHook(HookBase):
    """Stops a run whose losses, gradients or weights stop being finite (finite_guard.py), before the epoch's
    checkpoints are written. `max_skipped_steps`: bad steps in a row an fp16 loss scale may skip (0 without one)."""

    state_key = "finite_guard"

    def __init__(self, *, device, max_skipped_steps=0, run_dir=None):
        self.guard = FiniteGuard(device)
        self.max_skipped_steps, self.run_dir = max_skipped_steps, run_dir

    @classmethod
    def from_config(cls, cfg, fp16=False):
        """An fp16 loss scale may skip up to SOLVER.MAX_SKIPPED_STEPS overflowing steps in a row; nothing else."""
        return {"max_skipped_steps": cfg.SOLVER.MAX_SKIPPED_STEPS if fp16 else 0}

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


class SpeedPlanHook(HookBase):
    """Records the run's resolved fast paths in its checkpoints ("speed"), so that a resume on a machine whose
    "auto" decides otherwise keeps them (launch.py reads them back before building the run)."""

    state_key = "speed_plan"

    def __init__(self, *, plan):
        self.plan = plan

    def state_dict(self):
        return {"speed": self.plan.as_dict()}
