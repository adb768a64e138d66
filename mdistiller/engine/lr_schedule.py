"""The learning rate as a pure function of the position in training, so that resuming needs no scheduler state."""


class LRSchedule:
    """Step decay with an optional linear warm-up; `schedule(epoch, iteration, iters_per_epoch)` is the LR of
    `iteration` (0-based) of `epoch` (1-based).

    Step decay: multiplied by `decay_rate` once for every stage the epoch is past (epoch 151 is the first decayed
    epoch for stage 150, as in the CRD/DKD recipe). Warm-up: linear per iteration from lr/steps to lr over
    `warmup_epochs` epochs."""

    def __init__(self, *, lr, decay_stages, decay_rate, warmup_epochs=0):
        self.lr, self.decay_stages, self.decay_rate = lr, tuple(decay_stages), decay_rate
        self.warmup_epochs = warmup_epochs

    @classmethod
    def from_config(cls, cfg):
        s = cfg.SOLVER
        return {"lr": s.LR, "decay_stages": s.LR_DECAY_STAGES, "decay_rate": s.LR_DECAY_RATE,
                "warmup_epochs": s.WARMUP_EPOCHS}

    def __call__(self, epoch, iteration, iters_per_epoch):
        lr = self.lr * self.decay_rate ** sum(epoch > stage for stage in self.decay_stages)
        if self.warmup_epochs > 0:
            done = (epoch - 1) * iters_per_epoch + iteration + 1
            lr *= min(1.0, done / (self.warmup_epochs * iters_per_epoch))
        return lr


class StagedLR:
    """`schedule`, except in the epochs for which `stage_lr(epoch)` gives a learning rate of its own (a method's
    initialisation stage, Distiller.stage_lr): still a pure function of the position in training."""

    def __init__(self, schedule, stage_lr):
        self.schedule, self.stage_lr = schedule, stage_lr

    def __call__(self, epoch, iteration, iters_per_epoch):
        lr = self.stage_lr(epoch)
        return self.schedule(epoch, iteration, iters_per_epoch) if lr is None else lr


def learning_rate(solver, epoch, iteration, iters_per_epoch):
    """The LR the SOLVER section `solver` gives `iteration` of `epoch` (LRSchedule)."""
    return LRSchedule(lr=solver.LR, decay_stages=solver.LR_DECAY_STAGES, decay_rate=solver.LR_DECAY_RATE,
                      warmup_epochs=solver.WARMUP_EPOCHS)(epoch, iteration, iters_per_epoch)
