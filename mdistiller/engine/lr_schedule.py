"""The learning rate as a pure function of the position in training, so that resuming needs no scheduler state."""


def learning_rate(solver, epoch, iteration, iters_per_epoch):
    """LR for `iteration` (0-based) of `epoch` (1-based).

    Step decay: multiplied by LR_DECAY_RATE once for every stage the epoch is past (epoch 151 is the first
    decayed epoch for stage 150, as in the CRD/DKD recipe). Warm-up: linear per iteration from LR/steps to LR
    over WARMUP_EPOCHS epochs.
    """
    lr = solver.LR * solver.LR_DECAY_RATE ** sum(epoch > stage for stage in solver.LR_DECAY_STAGES)
    if solver.WARMUP_EPOCHS > 0:
        done = (epoch - 1) * iters_per_epoch + iteration + 1
        lr *= min(1.0, done / (solver.WARMUP_EPOCHS * iters_per_epoch))
    return lr
