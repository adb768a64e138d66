"""Hooks: everything around the optimisation loop as small pluggable objects, called at fixed points.

The loop (trainer.py) only steps; the learning-rate schedule, evaluation, the loss monitor and the finite guard
(train_hooks.py), and the run directory's files (here: metrics, TensorBoard, checkpoints, summary) are hooks the
builder wires. A hook with state saves it through `state_dict()`, whose keys go into the training checkpoint, so
a resumed run continues exactly. Only the main process (rank 0) gets the hooks that write files.
"""

import json
import logging
import os
import weakref

from ..utils.checkpoint import atomic_save
from ..utils.errors import UserError
from ..utils.run_dir_io import writing

logger = logging.getLogger("mdistiller")


def read_metrics(path):
    """(records, raw lines, torn): the complete records of metrics.jsonl with their lines as written, and the
    half-written last line a kill during an append leaves (None when there is none). A bad line anywhere
    else is not a torn append but a damaged file: one-line error."""
    with writing("read metrics file", path), open(path, "rb") as f:
        lines = f.read().split(b"\n")
    last = max((i for i, line in enumerate(lines) if line.strip()), default=-1)
    records, raw, torn = [], [], None
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            if not isinstance(record, dict) or not isinstance(record.get("epoch"), int):
                raise ValueError("no integer 'epoch'")
        except ValueError as e:
            if i == last:
                torn = line
                continue
            raise UserError(f"{path} line {i + 1} is not a metrics record ({e}); the file is damaged: remove "
                            f"the line (the run's checkpoints are unaffected) or start a new run") from None
        records.append(record)
        raw.append(line + b"\n")
    return records, raw, torn


class HookBase:
    """Every point is optional. In order: before_train, then per epoch before_epoch, per step before_step and
    after_step, then end_of_epoch (measure: fill the epoch's record) and after_epoch (report: write it).

    A hook reaches its trainer through a weak reference (the trainer holds its hooks), so a dropped trainer is
    freed with its hooks and their tensors. A hook with state keeps it under its `state_key` in the checkpoint's
    "hooks" entry."""

    _trainer_ref = None

    @property
    def trainer(self):
        return None if self._trainer_ref is None else self._trainer_ref()

    @trainer.setter
    def trainer(self, trainer):
        self._trainer_ref = None if trainer is None else weakref.ref(trainer)

    @property
    def state_key(self):
        """Where the checkpoint's "hooks" entry keeps this hook's state_dict (default: the class name)."""
        return type(self).__name__

    def before_train(self):
        pass

    def before_epoch(self, epoch, iters):
        """Before the first step of `epoch` (1-based), which has `iters` steps."""

    def before_step(self, epoch, it, iters):
        """Before step `it` (0-based) of `epoch`."""

    def after_step(self, step):
        """`step`: the trainer.Step just taken (losses, stats, output, labels, grad_max); hooks may add stats."""

    def end_of_epoch(self, record):
        """The epoch's steps are done; add measurements (test accuracy) to `record`, the epoch's metrics dict."""

    def after_epoch(self, record):
        """`record`: the epoch's metrics dict, as written to metrics.jsonl."""

    def after_train(self):
        pass

    def state_dict(self):
        """This hook's state for the training checkpoint (none by default)."""
        return {}

    def load_state_dict(self, state):
        """`state`: what state_dict returned (for a checkpoint of the older flat layout: the whole checkpoint, where
        the same keys sat at the top level)."""


class EvaluationHook(HookBase):
    """What the run-directory hooks need of a task's evaluation: the `metric` best.pth is chosen by, `best` (a dict
    with "epoch" and the metric's best value) and `last`, kept across a resume, and `summary_fields()` for
    summary.json. A task's evaluation hook fills them at end_of_epoch."""

    metric = None
    state_key = "evaluation"
    best, last = None, None

    def summary_fields(self):
        raise NotImplementedError

    def state_dict(self):
        return {"best": dict(self.best), "last": dict(self.last)}

    def load_state_dict(self, state):
        self.best, self.last = dict(state["best"]), dict(state["last"])


class MetricsHook(HookBase):
    """metrics.jsonl: one JSON object per epoch; on resume, lines past the checkpoint are dropped first,
    so a crash between writing metrics and writing the checkpoint never duplicates an epoch."""

    def __init__(self, *, path):
        self.path = path

    def before_train(self):
        if not os.path.exists(self.path):
            return
        records, raw, torn = read_metrics(self.path)
        kept = [line for record, line in zip(records, raw) if record["epoch"] <= self.trainer.epoch]
        if torn is not None:
            logger.info("%s: removed a half-written last line (a run stopped while appending to it)", self.path)
        dropped = [r["epoch"] for r in records if r["epoch"] > self.trainer.epoch]
        if dropped:
            logger.info("%s: removed epochs %s, past the checkpoint this run continues from (epoch %d)",
                        self.path, ", ".join(map(str, dropped)), self.trainer.epoch)
        with open(self.path, "rb") as f:
            if b"".join(kept) == f.read():
                return  # nothing to repair (a last line without its newline is completed below)
        with writing("rewrite metrics file", self.path):
            with open(self.path + ".tmp", "wb") as f:
                f.writelines(kept)
            os.replace(self.path + ".tmp", self.path)

    def after_epoch(self, record):
        with writing("append to metrics file", self.path), open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
            f.flush()
            os.fsync(f.fileno())


class TensorBoardHook(HookBase):
    """Training scalars every `freq` iterations and the epoch record's `epoch_keys` (the task's: test accuracy or
    AP, losses, LR, speed) every epoch, under <run>/tensorboard."""

    def __init__(self, *, log_dir, freq, epoch_keys):
        self.log_dir, self.freq, self.epoch_keys, self.writer = log_dir, freq, tuple(epoch_keys), None

    @classmethod
    def from_config(cls, cfg):
        return {"freq": cfg.LOG.TENSORBOARD_FREQ}

    def before_train(self):
        from torch.utils.tensorboard import SummaryWriter

        # purge_step drops events a crashed run wrote after its last checkpoint.
        with writing("write TensorBoard events in", self.log_dir):
            self.writer = SummaryWriter(self.log_dir, purge_step=self.trainer.global_step + 1)

    def after_step(self, step):
        n = self.trainer.global_step
        if self.freq and n % self.freq == 0:
            for name, value in step.scalars().items():
                self.writer.add_scalar(f"train/{name}", float(value), n)
            self.writer.add_scalar("train/lr", self.trainer.lr, n)

    def after_epoch(self, record):
        step = self.trainer.global_step
        for key in self.epoch_keys:
            if key in record:
                self.writer.add_scalar(f"epoch/{key}", record[key], step)
        self.writer.flush()

    def after_train(self):
        if self.writer is not None:
            self.writer.close()


class CheckpointHook(HookBase):
    """latest.pth (to resume), best.pth, student_{best,last}.pth and every `freq` epochs ckpt_epoch_<N>.pth.

    The student files use the published format `{"model": state_dict}`, so any of them can serve directly as a
    DISTILLER.TEACHER_CKPT or be read by tools/eval.py. A method whose predictions also need its own modules
    (`evaluates_student_alone` False: SimKD) adds "method" (its DISTILLER.TYPE) and "method_state" (what its
    evaluation reads), which tools/eval.py evaluates and a teacher's loader refuses. latest.pth is written last, so a
    resume never points past files that are missing."""

    def __init__(self, *, run_dir, freq, evaluation, config_text, method=""):
        """`evaluation`: the task's evaluation hook, which knows the best epoch; `config_text`: the run's config,
        kept in every training checkpoint; `method`: its DISTILLER.TYPE."""
        self.run_dir, self.freq, self.evaluation, self.config_text = run_dir, freq, evaluation, config_text
        self.method = method

    @classmethod
    def from_config(cls, cfg):
        return {"freq": cfg.LOG.SAVE_CHECKPOINT_FREQ, "config_text": cfg.dump(), "method": cfg.DISTILLER.TYPE}

    def _path(self, name):
        return os.path.join(self.run_dir, name)

    def after_epoch(self, record):
        t = self.trainer
        state = {**t.state_dict(), "config": self.config_text}
        metric = f"test_{self.evaluation.metric}"  # the task's metric, what best.pth is chosen by
        student = {"model": t.distiller.student.state_dict(), "epoch": t.epoch, metric: record.get(metric)}
        if not t.distiller.evaluates_student_alone:
            student.update(method=self.method, method_state=t.distiller.inference_state())
        atomic_save(student, self._path("student_last.pth"))
        if self.evaluation.best["epoch"] == t.epoch:
            atomic_save(state, self._path("best.pth"))
            atomic_save(student, self._path("student_best.pth"))
        if t.epoch == t.max_epochs or (self.freq and t.epoch % self.freq == 0):
            atomic_save(student, self._path(f"ckpt_epoch_{t.epoch}.pth"))
        atomic_save(state, self._path("latest.pth"))


class SummaryHook(HookBase):
    """summary.json, written once the last epoch is done: its presence means the run is complete."""

    def __init__(self, *, path, evaluation, extra):
        """`evaluation`: the task's evaluation hook (best and last results); `extra`: what else summary.json
        records."""
        self.path, self.evaluation, self.extra = path, evaluation, extra
        self.summary = None

    def after_train(self):
        t = self.trainer
        if t.epoch < t.max_epochs:
            return
        summary = {
            **self.evaluation.summary_fields(),  # the task's best and last results (best_top1, best_epoch, ...)
            "epochs": t.epoch,
            "images_per_s": t.images_per_s(),
            "train_time_s": t.counters["train_time_s"],
            "wall_time_s": t.counters["wall_time_s"],
            **self.extra,
        }
        tmp = self.path + ".tmp"
        with writing("write summary", self.path):
            with open(tmp, "w") as f:
                json.dump(summary, f, indent=2)
            os.replace(tmp, self.path)
        self.summary = summary
