"""What the training loop shows while an epoch runs: a bar on a terminal, log lines elsewhere.

On a terminal (rank 0) the tqdm bar's postfix carries the loss of the latest step and the learning rate. Reading
a loss is a device sync on CUDA (the CPU waits for the GPU's queue to drain) and free on the CPU, so on the CPU
the postfix is updated every step, and on CUDA only when tqdm is about to redraw (its `mininterval` has passed
since the last draw): the value shown is always the latest step's, and the GPU is synced at most once per
redraw instead of once per step.

Without a terminal (CI, redirected output, SLURM), rank 0 logs a line every LOG.PRINT_FREQ steps (0: never),
as torchvision's MetricLogger does, to the console and train.log:

    epoch 1/4  iter 100/156  loss 0.6123 (avg 0.7410)  lr 0.05000  1523 img/s  eta 0:00:02

loss is the step's total loss and avg the epoch's mean so far (rank 0's shard), img/s the epoch's throughput so
far over all ranks, eta the time left in this epoch's training steps at that rate.
"""

import datetime
import logging
import time

from ..utils.progress import bar, show_bars

logger = logging.getLogger("mdistiller")


def format_eta(seconds):
    return str(datetime.timedelta(seconds=int(round(max(seconds, 0.0)))))


class EpochProgress:
    def __init__(self, loader, epoch, max_epochs, iters, print_freq, rank, world_size, device):
        self.epoch, self.max_epochs, self.iters, self.world_size = epoch, max_epochs, iters, world_size
        show = show_bars(rank)
        self.bar = bar(loader, desc=f"epoch {epoch}/{max_epochs}", total=iters, show=show)
        self.every = int(print_freq) if rank == 0 and not show else 0
        self.sync_free = device.type != "cuda"
        self.start = time.perf_counter()

    def __iter__(self):
        return iter(self.bar)

    def _redraw_due(self):
        return time.time() - self.bar.last_print_t >= self.bar.mininterval

    def step(self, it, loss, lr, seen, loss_sum):
        """After step `it` (0-based): `loss` the step's total loss, `seen` the images this rank has trained on this
        epoch and `loss_sum` their summed loss (tensors or numbers; read only when shown)."""
        if not self.bar.disable:
            if self.sync_free or self._redraw_due():
                self.bar.set_postfix(loss=f"{float(loss):.3f}", lr=f"{lr:.4f}", refresh=False)
        elif self.every and (it + 1) % self.every == 0:
            done = it + 1
            elapsed = time.perf_counter() - self.start
            rate = seen * self.world_size / elapsed if elapsed > 0 else 0.0
            eta = elapsed / done * (self.iters - done)
            logger.info("epoch %d/%d  iter %d/%d  loss %.4f (avg %.4f)  lr %.5f  %.0f img/s  eta %s", self.epoch,
                        self.max_epochs, done, self.iters, float(loss), float(loss_sum) / seen, lr, rate,
                        format_eta(eta))

    def close(self):
        self.bar.close()
