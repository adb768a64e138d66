"""One benchmark variant: a config built by the real builder (what tools/train.py builds) and the timings of it.

"step" times repeat one batch already on the device (the update alone); "with data" times iterate the real
training loader (augmentation and copies included); the phase breakdown times the same update split into its
phases (phases.py); the epoch time is the real `Trainer.train_one_epoch` (data, LR schedule, per-step loss
monitor; no logging hooks), as the torchvision baseline's epoch is timed.
"""

import statistics
import time

import torch

from ..engine import build_run
from .device import peak_mb, reset_peak, sync
from .phases import PHASES, shares, time_phases


def epoch_result(epochs):
    """Summary of timed epochs [(images, seconds), ...]: images per epoch and the median round's images/s."""
    return {"images": epochs[0][0], "rounds": len(epochs),
            "images_per_s": statistics.median(n / s for n, s in epochs)}


class Variant:
    def __init__(self, label, cfg, bundle=None, teacher_state=None):
        """`bundle`, `teacher_state`: in-memory data and teacher weights instead of files (engine.build_run)."""
        self.label, self.cfg, self.teacher_state = label, cfg, teacher_state
        self.run = build_run(cfg, bundle=bundle, teacher_state=teacher_state)
        self.trainer = self.run.trainer
        self.device = self.run.device
        self.trainer.distiller.train()
        self.trainer.set_lr(cfg.SOLVER.LR)
        loader = self.trainer.train_loader
        loader.set_epoch(0)
        self.batch = next(iter(loader))
        self.batch_size = int(self.batch[1].shape[0])
        self.step_times, self.data_times, self.phase_times, self.epochs = [], [], [], []
        self.peak_cuda = None

    def _step(self, batch):
        images, labels, index = batch
        self.trainer.run_step(images, labels, index, 1)

    def loop_steps(self, steps):
        """`steps` iterations on the fixed batch as the training loop takes them (hooks included), so that what a
        hook does every so many steps (the finite guard's check) is counted at its rate."""
        images, labels, index = self.batch
        iters = max(len(self.trainer.train_loader), steps + 1)  # the steps lie inside one epoch, not at its end
        for it in range(steps):
            self.trainer.step_with_hooks(images, labels, index, 1, it, iters)

    def time_steps(self, steps):
        """Mean seconds per update on the fixed batch."""
        sync(self.device)
        start = time.perf_counter()
        for _ in range(steps):
            self._step(self.batch)
        sync(self.device)
        return (time.perf_counter() - start) / steps

    def time_with_data(self, steps):
        """Mean seconds per update while iterating the training loader (fresh epochs as needed)."""
        loader, done, epoch = self.trainer.train_loader, 0, 1
        sync(self.device)
        start = time.perf_counter()
        while done < steps:
            loader.set_epoch(epoch)
            for batch in loader:
                self._step(batch)
                done += 1
                if done == steps:
                    break
            epoch += 1
        sync(self.device)
        return (time.perf_counter() - start) / steps

    def time_phases(self, steps):
        """{phase: mean seconds} of `steps` updates on the fixed batch, each split at its phase boundaries. A
        replayed CUDA graph has no boundaries to time: the breakdown is of the same update run eagerly."""
        graphed, self.trainer.graphed = self.trainer.graphed, None
        try:
            return time_phases(self.trainer, self.batch, steps)
        finally:
            self.trainer.graphed = graphed

    def time_epoch(self, epoch):
        """(images, seconds) of one real training epoch, data included."""
        before = self.trainer.counters["train_images"]
        sync(self.device)
        start = time.perf_counter()
        self.trainer.train_one_epoch(epoch)
        sync(self.device)
        return self.trainer.counters["train_images"] - before, time.perf_counter() - start

    def epoch_round(self, epoch):
        reset_peak(self.device)
        self.epochs.append(self.time_epoch(epoch))
        self.record_memory()

    def round(self, steps, with_data, breakdown):
        """One timed round (steps, then with data, then the breakdown); the CUDA peak is this variant's own."""
        reset_peak(self.device)
        self.step_times.append(self.time_steps(steps))
        if with_data:
            self.data_times.append(self.time_with_data(steps))
        if breakdown:
            self.phase_times.append(self.time_phases(steps))
        self.record_memory()

    def record_memory(self):
        peak = peak_mb(self.device)
        if peak is not None:
            self.peak_cuda = max(self.peak_cuda or 0.0, peak)

    def result(self):
        step = statistics.median(self.step_times)
        out = {"variant": self.label, "batch_size": self.batch_size, "ms_per_step": 1e3 * step,
               "images_per_s": self.batch_size / step, "rounds": len(self.step_times),
               "device": str(self.device), "threads": torch.get_num_threads()}
        if self.data_times:
            data = statistics.median(self.data_times)
            out.update({"ms_per_step_with_data": 1e3 * data, "images_per_s_with_data": self.batch_size / data})
        if self.phase_times:  # per phase, the median over rounds
            median = {p: statistics.median(r[p] for r in self.phase_times) for p in PHASES}
            out["breakdown"], out["breakdown_sum_ms"] = shares(median)
        if self.epochs:
            out["epoch"] = epoch_result(self.epochs)
        if self.peak_cuda is not None:
            out["peak_cuda_mb"] = self.peak_cuda
        return out
