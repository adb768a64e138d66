"""Stop a run whose loss, gradients or weights stop being finite, before a non-finite checkpoint is written.

Without it SGD keeps stepping on a NaN loss, every later weight is NaN, and the epoch's checkpoint hook
overwrites latest.pth / best.pth / the student files with them. The guard raises `TrainingDivergedError`
inside the epoch, before evaluation and the checkpoint hooks, so those files keep the last good epoch.

Design (exact, and no device sync per step):
  - Every step the trainer hands over the step's loss values (detached scalars) and, per gradient set, the
    largest |gradient| the optimizer is about to apply (one fused foreach max-norm: a read of the gradients, no
    sync, and unlike a 2-norm it cannot overflow on large finite gradients). The DOT trainer hands both of its
    sets. A step is bad when any of these values is not finite. The bookkeeping stays on the device, in a
    dozen scalar kernels: the current step number, the length of the current streak of bad steps, the first
    step at which the streak exceeded the limit, and that step's values.
  - The host reads that state only every CHECK_EVERY iterations and at the end of each epoch. One
    all_reduce(MIN) of the failing step number makes every rank decide the same thing at the same point; only
    when some rank failed are the ranks' records gathered (the rare path) and the earliest step reported,
    a rank whose loss went non-finite named before ranks that only received its averaged gradient. The step
    and values reported are those of the failing step itself, although they are read up to CHECK_EVERY steps
    later; the steps trained in between are never saved.
  - The limit: 0 without a loss scale, so the first bad step stops the run. Under SPEED.AMP fp16 the loss
    scaler skips a step whose gradients overflowed and lowers the scale, which is routine; up to
    SOLVER.MAX_SKIPPED_STEPS consecutive bad steps are tolerated and one more stops the run. The streak is
    checkpointed, so a resumed run counts as the uninterrupted one.
  - At the end of each epoch the state about to be saved (learnable weights and buffers) is checked as well,
    once: an update can turn finite gradients into non-finite weights (a huge LR on the epoch's last step),
    and BatchNorm statistics are updated by the forward of a step the scaler skips. Such a failure is reported
    at the epoch's last step, where it was found.
"""

import math

import torch

from ..utils import distributed
from ..utils.errors import TrainingDivergedError

CHECK_EVERY = 50  # iterations between reads of the guard's state: one small sync (and collective) each
GRAD_PREFIX = "grad:"  # names of the gradient maxima among a step's values
_NONE = torch.iinfo(torch.int64).max  # "no failure" in the all_reduce(MIN) of failing steps


def largest_abs(tensors):
    """max |x| over the tensors (None entries skipped) as a 0-dim float32 tensor on their device; NaN if any
    holds NaN, no device sync. None when there is no tensor."""
    tensors = [t.detach() for t in tensors if t is not None]
    if not tensors:
        return None
    return torch.nn.utils.get_total_norm(tensors, norm_type=math.inf).float()


def _fmt(value):
    return f"{value:.4g}"


class FiniteGuard:
    def __init__(self, device, limit=0):
        self.device = torch.device(device)
        self.limit = limit  # bad steps in a row that are tolerated (fp16 loss scaling only)
        new = lambda v: torch.full((), v, dtype=torch.int64, device=self.device)  # noqa: E731
        self._step, self._streak, self._streak_start = new(0), new(0), new(0)
        self._fail, self._fail_start = new(-1), new(0)
        self._names, self._saved_names, self._saved, self._last = (), (), None, None
        self.epoch, self.epoch_start, self.iters = 0, 0, 0

    # --- per step, on the device ----------------------------------------------------------------------------
    def start_epoch(self, epoch, steps_done, iters):
        """Before the epoch's first step; `steps_done` is the global step count so far."""
        self.epoch, self.epoch_start, self.iters = epoch, steps_done, iters
        self._step.fill_(steps_done)

    def observe(self, losses, grad_max):
        """Record one step: `losses` {name: detached scalar}, `grad_max` {gradient set: largest |g| or None}."""
        values = dict(losses)
        values.update({GRAD_PREFIX + k: v for k, v in grad_max.items() if v is not None})
        names = tuple(values)
        vals = torch.stack([v.to(device=self.device, dtype=torch.float32) for v in values.values()])
        if names != self._names:  # the first step, or a method whose loss terms change (none does so far)
            self._names = names
            # Keep the values of a failure already recorded; reading that is a sync, on this rare event alone.
            if self._saved is None or int(self._fail) < 0:
                self._saved, self._saved_names = torch.full_like(vals, math.nan), names
        # In place: a CUDA graph that replays this (cuda_graph.py) reads and writes the same tensors every time.
        self._step += 1
        bad = ~torch.isfinite(vals).all()
        self._streak_start.copy_(torch.where(bad & (self._streak == 0), self._step, self._streak_start))
        self._streak.copy_(torch.where(bad, self._streak + 1, torch.zeros_like(self._streak)))
        new = (self._streak > self.limit) & (self._fail < 0)
        self._fail.copy_(torch.where(new, self._step, self._fail))
        self._fail_start.copy_(torch.where(new, self._streak_start, self._fail_start))
        if self._saved_names == names:
            self._saved.copy_(torch.where(new, vals, self._saved))
        self._last = vals

    # --- at the check points, on the host -------------------------------------------------------------------
    def check(self, last_good, weights=None):
        """Raise TrainingDivergedError on every rank if some rank failed. `last_good` describes the checkpoint
        that stays valid; `weights` {name: tensor}: the state about to be saved (end of epoch only)."""
        fail = self._fail
        bad_weights = None
        if weights is not None:
            wmax = largest_abs([t for t in weights.values() if t.is_floating_point()])
            if wmax is not None:
                bad_weights = ~torch.isfinite(wmax)
                fail = torch.where((fail < 0) & bad_weights, self._step, fail)
        key = torch.where(fail < 0, torch.full_like(fail, _NONE), fail)
        if int(distributed.all_reduce_min(key)) == _NONE:  # the one sync of a check
            return
        record = self._record(int(fail), weights if bad_weights is not None and bool(bad_weights) else None)
        records = distributed.all_gather_objects(record)
        failed = [(r, rec) for r, rec in enumerate(records) if rec is not None]
        step = min(rec["step"] for _, rec in failed)
        order = {"loss": 0, "gradient": 1, "weights": 2}
        rank, rec = min(((r, rec) for r, rec in failed if rec["step"] == step),
                        key=lambda item: (order[item[1]["kind"]], item[0]))
        who = f"rank {rank}: " if len(records) > 1 else ""
        error = TrainingDivergedError(f"{who}{self._describe(rec)}; {last_good}; {self._hint(rec)}")
        distributed.raise_on_every_rank(error)

    def _record(self, step, weights):
        """This rank's failure as plain Python (sent to the other ranks), or None."""
        if step < 0:
            return None
        if weights is not None and int(self._fail) < 0:
            names = [k for k, t in weights.items() if t.is_floating_point() and not bool(torch.isfinite(t).all())]
            values = dict(zip(self._names, self._last.tolist()))
            kind, start = "weights", step
        else:
            names, start = [], int(self._fail_start)
            values = dict(zip(self._saved_names, self._saved.tolist()))
            losses = [v for n, v in values.items() if not n.startswith(GRAD_PREFIX)]
            kind = "loss" if not all(math.isfinite(v) for v in losses) else "gradient"
        return {"step": step, "start": start, "kind": kind, "names": names, "limit": self.limit,
                "values": values, "epoch": self.epoch,
                "iteration": step - self.epoch_start, "iters": self.iters}

    @staticmethod
    def _describe(rec):
        values = rec["values"]
        losses = " ".join(f"{n}={_fmt(v)}" for n, v in values.items()
                          if not n.startswith(GRAD_PREFIX) and not n.endswith("_total"))
        grads = {n[len(GRAD_PREFIX):]: v for n, v in values.items() if n.startswith(GRAD_PREFIX)}
        where = f"step {rec['step']} (epoch {rec['epoch']}, iteration {rec['iteration']}/{rec['iters']})"
        if rec["kind"] == "weights":
            shown = ", ".join(rec["names"][:3]) + (f" and {len(rec['names']) - 3} more" if len(rec["names"]) > 3
                                                    else "")
            return f"{where}, the epoch's last: the updated state holds non-finite values in {shown}"
        if rec["kind"] == "loss":
            what = f"non-finite loss: {losses}"
        else:
            sets = [n for n, v in grads.items() if not math.isfinite(v)]
            named = {"all": "", "task": " of the task loss", "distill": " of the distillation loss"}
            what = "non-finite gradient" + " and".join(named.get(n, f" ({n})") for n in sets) + \
                   f" (largest |g| {', '.join(_fmt(grads[n]) for n in sets)}); losses: {losses}"
        if rec["limit"] > 0:
            return (f"{where}: {rec['step'] - rec['start'] + 1} consecutive bad steps since step {rec['start']}, "
                    f"more than SOLVER.MAX_SKIPPED_STEPS={rec['limit']} the fp16 loss scale may skip; the last: "
                    f"{what}")
        return f"{where}: {what}"

    @staticmethod
    def _hint(rec):
        more = ("raise SOLVER.MAX_SKIPPED_STEPS (--resume accepts a new value) or use SPEED.AMP bf16/off, or "
                if rec["limit"] > 0 else "")
        return (f"{more}lower SOLVER.LR, the loss weights or the temperature and start a new run (another "
                f"EXPERIMENT.TAG); --resume with the same config diverges again")

    # --- checkpointed state -----------------------------------------------------------------------------------
    def state_dict(self):
        return {"streak": int(self._streak), "streak_start": int(self._streak_start)}

    def load_state_dict(self, state):
        if state:
            self._streak.fill_(int(state["streak"]))
            self._streak_start.fill_(int(state["streak_start"]))
