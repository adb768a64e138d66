"""The hooks of a classification run: the loss monitor, training accuracy, top-1/top-5 evaluation and the epoch's
log line (engine/classification.py wires them; the hooks every task shares are in train_hooks.py)."""

import contextlib
import logging

import torch
import torch.nn.functional as F

from ..distillers.losses import kd_loss
from ..utils import distributed
from .evaluator import evaluate
from .hooks import EvaluationHook, HookBase

logger = logging.getLogger("mdistiller")


class MonitorHook(HookBase):
    """Unweighted training losses of each step's (pre-update) predictions, the same for every method and loss
    weighting: monitor/ce, and monitor/kl when a teacher ran (T^2 KL at `temperature`). What DOT fig. 3 plots; a
    KD run's loss/task_total is 0.1 x CE and not comparable with the student alone's.

    `teacher`: a FrozenTeacher run on the step's images when the method itself runs none (the student trained
    alone with LOG.MONITOR_TEACHER); it never touches the loss."""

    def __init__(self, *, temperature, teacher=None, speed=None):
        """`speed`: the run's SpeedPlan, whose autocast the monitor's own teacher runs under, as a method's would."""
        self.temperature, self.teacher, self.speed = temperature, teacher, speed

    @classmethod
    def from_config(cls, cfg):
        return {"temperature": cfg.LOG.MONITOR_T}

    def after_step(self, step):
        out = step.output
        step.stats["monitor/ce"] = F.cross_entropy(out.logits.detach().float(), step.labels)
        t_logits = out.teacher_logits
        if t_logits is None and self.teacher is not None:
            with self.speed.autocast() if self.speed is not None else contextlib.nullcontext():
                t_logits = self.teacher(step.images)[0]
        if t_logits is not None:
            step.stats["monitor/kl"] = kd_loss(out.logits.detach().float(), t_logits.float(), self.temperature)


class TrainAccuracyHook(HookBase):
    """train_top1: how often the logits' argmax of each training step matched its labels, over the epoch and every
    rank (for tasks whose labels are classes). Counts stay on the device until the epoch's end: no sync per step."""

    def __init__(self, *, device):
        self.device = device
        self.correct, self.seen = None, 0

    def before_epoch(self, epoch, iters):
        self.correct, self.seen = None, 0

    def after_step(self, step):
        hits = (step.output.logits.argmax(1) == step.labels).sum()
        self.correct = hits if self.correct is None else self.correct + hits
        self.seen += len(step.labels)

    def end_of_epoch(self, record):
        correct = 0 if self.correct is None else self.correct
        totals = distributed.all_reduce_sum(torch.stack([
            torch.as_tensor(correct, dtype=torch.float64, device=self.device),
            torch.tensor(float(self.seen), dtype=torch.float64, device=self.device)])).tolist()
        record["train_top1"] = 100.0 * float(totals[0]) / int(totals[1])


class EvalHook(EvaluationHook):
    """Test accuracy of the student after every epoch, every test sample counted once over all ranks; keeps the
    best and the last result.

    Ranks first take rank 0's BatchNorm statistics (their last training step updated them from their own shard),
    so every rank evaluates the very model rank 0 saves; tools/eval.py on that file agrees."""

    metric = "top1"  # the record's test_<metric> is what best.pth is chosen by

    def __init__(self, *, model, student, loader, speed=None):
        """`model(images)` gives the logits (the distiller's evaluation forward); `student` owns the buffers (the
        student, and the method's modules where its evaluation runs them too)."""
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



class EpochLogHook(HookBase):
    """The epoch's line in the log."""

    def after_epoch(self, record):
        logger.info("epoch %d/%d  lr %.5f  train_loss %.4f  test_top1 %.2f  test_top5 %.2f  best %.2f  %.0f img/s",
                    record["epoch"], self.trainer.max_epochs, record["lr"], record["train_loss"],
                    record["test_top1"], record["test_top5"], record["best_top1"], record["images_per_s"])
