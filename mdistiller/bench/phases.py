"""Where a training step's time goes: teacher forward, student forward, losses, backward, optimizer step.

The phases are timed inside the trainer's own `run_step`, not in a re-implementation of it, so whatever the step
does is what gets measured: the DOT trainer's two gradients (two_pass or batched), gradient averaging, and any
autocast, gradient scaling or memory-format handling the engine wraps around the step. `PhaseClock` puts a device
sync and a timestamp at each boundary, through

  - forward pre/post hooks on `trainer.model` (the training forward, i.e. `distiller.train_forward`),
  - forward pre/post hooks on `distiller.student` (every call of the student in a step is summed),
  - forward pre/post hooks on `distiller.teacher`, the FrozenTeacher (every call summed),
  - a wrapper around the optimizer's `step` / `step_with_grads` on the instance (the update rule's optimizer),

and derives, per step:

  teacher   = time in the teacher's forward (FrozenTeacher: with its conversions of the outputs)
  student   = time in the student's forward
  loss      = train_forward - teacher - student, clamped at 0: the loss math and whatever else the training
              forward does (connectors, projectors, memory banks, added terms such as KD++'s, the loss ramp)
  backward  = end of train_forward -> start of the optimizer step: the update rule summing the terms, zero_grad,
              the backward (DOT: its two autograd.grad calls), gradient averaging over ranks
  optimizer = the optimizer step

Everything is removed on exit (hooks, and the instance attributes deleted or put back), so the steps timed
afterwards run exactly as before; the steps timed inside are ordinary updates, as the other timed steps are. On a
GPU the syncs drain the launch queue at every boundary, which makes the phases add up to a little more than an
uninstrumented step: that is why the benchmark's ms/step comes from separate repetitions. What run_step does
before the training forward (a memory-format copy of the batch) or after the optimizer (the loss record, the
rule's statistics) is in no phase. A step the optimizer never makes (an fp16 loss-scale overflow skips it) is not
recorded. The hooks and the wrappers run eagerly around a model whose `forward` is compiled; were they inside a
compiled region, its graph would break at the syncs and the breakdown would describe the broken graph.
"""

import statistics
import time

from .device import sync

PHASES = ("teacher", "student", "loss", "backward", "optimizer")
OPTIMIZER_METHODS = ("step", "step_with_grads")  # torch optimizers / the DOT optimizer


class PhaseClock:
    """Context manager: while open, every `trainer.run_step` appends its phase times (seconds) to `steps`."""

    def __init__(self, trainer):
        self.trainer = trainer
        self.device = trainer.device
        self.steps = []
        self._handles, self._patched = [], []
        self._reset()

    def _reset(self):
        self._marks = {}
        self._spent = {"teacher": 0.0, "student": 0.0}

    def _now(self):
        sync(self.device)
        return time.perf_counter()

    # --- instrumentation ---------------------------------------------------------------------------------------
    def _patch(self, obj, name, make_wrapper):
        """Shadow the method `name` of `obj` with an instance attribute; remembered so __exit__ restores it."""
        had = name in vars(obj)
        old = vars(obj).get(name)
        setattr(obj, name, make_wrapper(getattr(obj, name)))
        self._patched.append((obj, name, had, old))

    def _optimizer_wrapper(self, method):
        def wrapper(*args, **kwargs):
            self._marks["optimizer_start"] = self._now()
            out = method(*args, **kwargs)
            self._marks["optimizer_end"] = self._now()
            self._finish_step()
            return out
        return wrapper

    def _mark(self, name):
        self._marks[name] = self._now()

    def _forward_start(self, module, args):
        """A new step: what an unfinished one left (an update skipped by an fp16 loss scale) is dropped."""
        self._reset()
        self._marks["forward_start"] = self._now()

    def _student_start(self, module, args):
        self._marks["student_start"] = self._now()

    def _teacher_start(self, module, args):
        self._marks["teacher_start"] = self._now()

    def _teacher_end(self, module, args, output):
        self._spent["teacher"] += self._now() - self._marks.pop("teacher_start")

    def _student_end(self, module, args, output):
        self._spent["student"] += self._now() - self._marks.pop("student_start")

    def __enter__(self):
        model, distiller, optimizer = self.trainer.model, self.trainer.distiller, self.trainer.optimizer
        self._handles = [
            model.register_forward_pre_hook(self._forward_start),
            model.register_forward_hook(lambda m, a, o: self._mark("forward_end")),
            distiller.student.register_forward_pre_hook(self._student_start),
            distiller.student.register_forward_hook(self._student_end),
        ]
        if distiller.teacher is not None:
            self._handles += [distiller.teacher.register_forward_pre_hook(self._teacher_start),
                              distiller.teacher.register_forward_hook(self._teacher_end)]
        for name in OPTIMIZER_METHODS:
            if hasattr(optimizer, name):
                self._patch(optimizer, name, self._optimizer_wrapper)
        self._reset()
        return self

    def __exit__(self, *exc):
        for handle in self._handles:
            handle.remove()
        for obj, name, had, old in reversed(self._patched):
            if had:
                setattr(obj, name, old)
            else:
                delattr(obj, name)
        self._handles, self._patched = [], []
        return False

    # --- bookkeeping -------------------------------------------------------------------------------------------
    def _finish_step(self):
        m = self._marks
        if "forward_start" not in m or "forward_end" not in m:
            raise RuntimeError("the optimizer stepped without a training forward through trainer.model; "
                               "PhaseClock cannot split this trainer's step")
        teacher, student = self._spent["teacher"], self._spent["student"]
        forward = m["forward_end"] - m["forward_start"]
        self.steps.append({
            "teacher": teacher,
            "student": student,
            "loss": max(0.0, forward - teacher - student),
            "backward": m["optimizer_start"] - m["forward_end"],
            "optimizer": m["optimizer_end"] - m["optimizer_start"],
        })
        self._reset()

    def mean(self):
        """{phase: mean seconds per step} over the steps recorded so far."""
        if not self.steps:
            raise RuntimeError("no timed step reached the optimizer (an fp16 loss scale skips updates while it "
                               "backs off: give the benchmark more --warmup steps)")
        return {p: statistics.fmean(s[p] for s in self.steps) for p in PHASES}


def time_phases(trainer, batch, steps, epoch=1):
    """Mean seconds per phase over `steps` real updates (trainer.run_step) on one batch."""
    images, labels, index = batch
    with PhaseClock(trainer) as clock:
        for _ in range(steps):
            trainer.run_step(images, labels, index, epoch)
    return clock.mean()


def shares(phase_seconds):
    """{phase: {"ms", "pct"}} with pct the share of the phases' sum, and the sum in ms."""
    total = sum(phase_seconds[p] for p in PHASES)
    out = {p: {"ms": 1e3 * phase_seconds[p], "pct": 100.0 * phase_seconds[p] / total if total else 0.0}
           for p in PHASES}
    return out, 1e3 * total
