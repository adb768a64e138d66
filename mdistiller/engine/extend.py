"""Changing SOLVER.EPOCHS on --resume: extending a finished run, or re-planning an interrupted one.

Continuing from latest.pth with more epochs gives exactly the run a config with those epochs would have trained
from the start, provided the epochs already trained would have been trained identically under the new config:
every key but SOLVER.EPOCHS equal, and the learning rate of every iteration of epochs 1..done the same (so
LR_DECAY_STAGES may gain stages past the trained epochs, nothing else of the schedule may change). The
epoch-dependent loss ramps (LOSS_RAMP.EPOCHS, a method's own warm-up) depend on the epoch and their own keys
only, never on SOLVER.EPOCHS, so equal keys keep them identical.
"""

from types import SimpleNamespace

from ..utils.errors import UserError
from .lr_schedule import learning_rate

# The keys learning_rate() reads: they may differ as long as the trained epochs' learning rates do not.
SCHEDULE_KEYS = ("SOLVER.LR", "SOLVER.LR_DECAY_STAGES", "SOLVER.LR_DECAY_RATE", "SOLVER.WARMUP_EPOCHS")


def _solver(values):
    """A stand-in for cfg.SOLVER with the schedule keys only, from {"SOLVER.LR": ..., ...}."""
    return SimpleNamespace(**{key.split(".", 1)[1]: values[key] for key in SCHEDULE_KEYS})


def first_lr_difference(old, new, done, iters_per_epoch):
    """(epoch, iteration, old lr, new lr) of the first iteration of epochs 1..done whose learning rate differs
    between the schedules `old` and `new` ({key: value} over SCHEDULE_KEYS), or None when all are equal."""
    a, b = _solver(old), _solver(new)
    for epoch in range(1, done + 1):
        for it in range(iters_per_epoch):
            lr_a, lr_b = learning_rate(a, epoch, it, iters_per_epoch), learning_rate(b, epoch, it, iters_per_epoch)
            if lr_a != lr_b:
                return epoch, it, lr_a, lr_b
    return None


def check_epochs_change(saved, now, changes, done, iters_per_epoch, path):
    """Raise UserError (one line naming the key) unless the run in `path` may continue under the new config.

    `saved`, `now`: the two configs as flat {key: value}; `changes`: {key: (saved value, new value)} for every
    key that differs, SOLVER.EPOCHS among them; `done`: the epochs latest.pth holds; `iters_per_epoch`: that
    run's iterations per epoch (unused when done is 0)."""
    old_epochs, new_epochs = changes["SOLVER.EPOCHS"]
    if new_epochs <= done:
        raise UserError(f"--resume: SOLVER.EPOCHS {new_epochs} is not more than the {done} epochs {path} has "
                        f"already trained (it was started with SOLVER.EPOCHS {old_epochs}); give a larger "
                        f"SOLVER.EPOCHS to extend it, or start a new run")
    other = [k for k in sorted(changes) if k != "SOLVER.EPOCHS" and k not in SCHEDULE_KEYS]
    if other:
        named = "; ".join(f"{k} {changes[k][0]!r} -> {changes[k][1]!r}" for k in other)
        raise UserError(f"--resume with SOLVER.EPOCHS {old_epochs} -> {new_epochs}: the config of {path} also "
                        f"differs in {named}; only SOLVER.EPOCHS (and LR keys that leave the {done} trained epochs "
                        f"unchanged) may change - resume with the original values or start a new run")
    schedule = [k for k in SCHEDULE_KEYS if k in changes]
    diff = first_lr_difference(saved, now, done, iters_per_epoch) if schedule and done else None
    if diff:
        epoch, it, lr_old, lr_new = diff
        named = "; ".join(f"{k} {changes[k][0]!r} -> {changes[k][1]!r}" for k in schedule)
        raise UserError(f"--resume with SOLVER.EPOCHS {old_epochs} -> {new_epochs}: {named} changes the learning "
                        f"rate of epoch {epoch} (iteration {it}), already trained in {path} ({lr_old:g} -> "
                        f"{lr_new:g}); keep the schedule of epochs 1..{done} (decay stages past {done} may be "
                        f"added) or start a new run")


def check_same_teacher(recorded, checkpoint, sha256, old_epochs, new_epochs, path):
    """Refuse to extend a run whose teacher checkpoint changed since it was trained: the extra epochs would distil
    from other weights than the trained ones (e.g. the teacher run was itself extended in between).

    `recorded`: the "teacher" entry of the run's summary.json (None for runs without one, or from versions that
    did not record it: nothing to compare); `checkpoint`, `sha256`: the file the new config resolves to, its hash."""
    if not isinstance(recorded, dict) or not recorded.get("sha256") or recorded["sha256"] == sha256:
        return
    raise UserError(f"--resume with SOLVER.EPOCHS {old_epochs} -> {new_epochs}: the teacher checkpoint {checkpoint} "
                    f"is not the one {path} was trained with (sha256 {recorded['sha256'][:16]}... then, "
                    f"{sha256[:16]}... now; it was {recorded.get('checkpoint')}); extend with the original teacher "
                    f"(DISTILLER.TEACHER_CKPT) or start a new run")
