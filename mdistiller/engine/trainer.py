"""The training loop: one for every method and update rule, reading no config (the builder wires it, build.py).

`Trainer(distiller, model, train_loader, update_rule, hooks, ...)` in the spirit of detectron2's SimpleTrainer:
it iterates the loader, runs the training forward (`model`: the distiller's train_forward, under DDP when several
processes train), lets the update rule turn the step's losses into an update, and calls the hooks around it. It
owns the run state (epoch, step, counters, RNG) and gathers the rest from the rule and the hooks into one
checkpoint, which is what makes `--resume` bit-identical to an uninterrupted run.
"""

import contextlib
import logging
import time
from dataclasses import dataclass, field

import torch

from ..distillers.losses import DISTILL, TASK, StepOutput, total_loss
from ..utils.checkpoint import load_file
from ..utils.env import rng_state, set_rng_state
from ..utils.errors import CheckpointError
from ..utils import distributed
from .epoch_progress import EpochProgress

logger = logging.getLogger("mdistiller")

CHECKPOINT_FORMAT = "mdistiller-train-v1"


@dataclass
class Step:
    """One update, as the hooks see it: detached losses ("total", per term, per kind), per-step statistics of the
    update (hooks may add their own), the training forward's output, the batch, and the largest |g| applied."""

    losses: dict
    stats: dict
    output: StepOutput
    images: torch.Tensor
    labels: torch.Tensor
    grad_max: dict = field(default_factory=dict)
    it: int = 0
    iters: int = 0

    def scalars(self):
        return {**self.losses, **self.stats}


def loss_record(terms, loss):
    """Detached terms, their total and the per-kind totals ("task_total", "distill_total": the task and
    distillation losses the DOT paper plots per epoch, fig. 3), for every update rule alike."""
    losses = {name: term.value.detach() for name, term in terms.items()}
    for kind in (TASK, DISTILL):
        part = total_loss(terms, kind)
        if part is not None:
            losses[f"{kind}_total"] = part.detach()
    losses["total"] = loss.detach()
    return losses


class Trainer:
    def __init__(self, distiller, model, train_loader, update_rule, hooks=(), speed=None, max_epochs=1,
                 device="cpu", print_freq=0):
        """`distiller`: the method (its learnable state is checkpointed); `model`: what the loop calls for a
        training forward (build.py: the distiller's train_forward, in DDP when several processes train);
        `speed`: the run's SpeedPlan (batch layout and autocast), None for plain float32."""
        self.distiller, self.model, self.train_loader = distiller, model, train_loader
        self.update_rule, self.speed = update_rule, speed
        self.max_epochs, self.device, self.print_freq = max_epochs, torch.device(device), print_freq
        self.rank, self.world_size = distributed.rank(), distributed.world_size()
        self.epoch = 0  # completed epochs
        self.global_step = 0
        self.lr = update_rule.optimizer.param_groups[0]["lr"]  # until the schedule sets the first step's
        self.counters = {"train_images": 0, "train_time_s": 0.0, "wall_time_s": 0.0}
        self.graphed = None  # a GraphedUpdate once the run replays its update as a CUDA graph
        self.hooks = []
        self.register_hooks(hooks)

    @property
    def optimizer(self):
        return self.update_rule.optimizer

    def register_hooks(self, hooks):
        for hook in hooks:
            hook.trainer = self
            self.hooks.append(hook)

    def set_lr(self, lr):
        self.lr = lr
        self.update_rule.set_lr(lr)

    # --- one step --------------------------------------------------------------------------------------------
    def run_step(self, images, labels, index, epoch):
        """One update; returns a Step (losses detached; no device sync)."""
        if self.speed is not None:
            images = self.speed.batch(images)
        update = self.graphed if self.graphed is not None else self.update
        losses, stats, out, grad_max = update(images, labels, index, epoch)
        return Step(losses, stats, out, images, labels, grad_max)

    def update(self, images, labels, index, epoch):
        """The update itself, what a CUDA graph records (cuda_graph.py): training forward, losses, update rule.
        Returns (detached losses, statistics, the forward's output, largest |g| per gradient set)."""
        with self.update_rule.forward_context(self.model):
            with self.speed.autocast() if self.speed is not None else contextlib.nullcontext():
                out = self.model(images, labels, epoch, index)
                losses = self.update_rule.losses(out.terms)
        grad_max = self.update_rule.apply(losses)
        out.logits = out.logits.detach()
        return loss_record(out.terms, losses["total"]), self.update_rule.stats(), out, grad_max

    def replay_updates(self, graphed):
        """Step through `graphed` (a cuda_graph.GraphedUpdate of `self.update`) instead of calling the update."""
        self.graphed = graphed

    def step_with_hooks(self, images, labels, index, epoch, it, iters):
        """Step `it` of `epoch` as the loop takes it: the hooks' before_step, the update, the hooks' after_step."""
        for hook in self.hooks:
            hook.before_step(epoch, it, iters)
        step = self.run_step(images, labels, index, epoch)
        step.it, step.iters = it, iters
        self.global_step += 1
        for hook in self.hooks:
            hook.after_step(step)
        return step

    # --- the loop --------------------------------------------------------------------------------------------
    def train(self):
        for hook in self.hooks:
            hook.before_train()
        while self.epoch < self.max_epochs:
            epoch = self.epoch + 1
            start = time.perf_counter()
            record = {"epoch": epoch, **self.train_one_epoch(epoch)}
            for hook in self.hooks:
                hook.end_of_epoch(record)
            self.counters["wall_time_s"] += time.perf_counter() - start
            self.epoch = epoch
            for hook in self.hooks:
                hook.after_epoch(record)
        for hook in self.hooks:
            hook.after_train()

    def train_one_epoch(self, epoch):
        """The epoch's steps; returns its training statistics, reduced over all ranks."""
        self.distiller.train()
        self.train_loader.set_epoch(epoch - 1)
        iters = len(self.train_loader)
        for hook in self.hooks:
            hook.before_epoch(epoch, iters)
        sums, stat_sums, seen = {}, {}, 0
        # A bar on a terminal; in logs (CI, redirected output) a line every print_freq steps (epoch_progress.py).
        progress = EpochProgress(self.train_loader, epoch, self.max_epochs, iters, self.print_freq, self.rank,
                                 self.world_size, self.device)
        start = time.perf_counter()
        for it, (images, labels, index) in enumerate(progress):
            step = self.step_with_hooks(images, labels, index, epoch, it, iters)
            n = len(labels)
            seen += n
            for name, value in step.losses.items():
                sums[name] = sums.get(name, 0.0) + value * n
            for name, value in step.stats.items():
                stat_sums[name] = stat_sums.get(name, 0.0) + value * n
            progress.step(it, step.losses["total"], self.lr, seen, sums["total"])
            del step  # its output holds the step's activations: free them before the next forward
        names, stat_names = sorted(sums), sorted(stat_sums)
        totals = distributed.all_reduce_sum(torch.stack(
            [torch.as_tensor(sums[k], dtype=torch.float64, device=self.device) for k in names]
            + [torch.as_tensor(stat_sums[k], dtype=torch.float64, device=self.device) for k in stat_names]
            + [torch.tensor(float(seen), dtype=torch.float64, device=self.device)])).tolist()
        loss_totals, stat_totals = totals[:len(names)], totals[len(names):len(names) + len(stat_names)]
        seen = int(totals[-1])  # all ranks: the epoch's global figures
        elapsed = time.perf_counter() - start
        progress.close()
        self.counters["train_images"] += seen
        self.counters["train_time_s"] += elapsed
        sums = dict(zip(names, loss_totals))
        stats = {"lr": self.lr, "train_loss": float(sums.pop("total")) / seen}
        stats.update({f"loss/{name}": float(v) / seen for name, v in sums.items()})
        stats.update({name: float(v) / seen for name, v in zip(stat_names, stat_totals)})
        stats.update({"epoch_time_s": elapsed, "images_per_s": seen / elapsed})
        return stats

    def images_per_s(self):
        c = self.counters
        return c["train_images"] / c["train_time_s"] if c["train_time_s"] else 0.0

    # --- state -----------------------------------------------------------------------------------------------
    def state_dict(self):
        state = {
            "format": CHECKPOINT_FORMAT,
            "epoch": self.epoch,
            "global_step": self.global_step,
            "model": self.distiller.student.state_dict(),  # published format: usable as a teacher checkpoint
            "distiller": self.distiller.learnable_state_dict(),
            **self.update_rule.state_dict(),  # optimizer, fp16 loss scale, rule-specific state
            "counters": dict(self.counters),
            "rng": rng_state(),
        }
        hooks = {}
        for hook in self.hooks:
            own = hook.state_dict()
            if own:
                if hook.state_key in hooks:
                    raise RuntimeError(f"two hooks save their state under '{hook.state_key}': give one another "
                                       f"state_key")
                hooks[hook.state_key] = own
        state["hooks"] = hooks
        return state

    def load_state_dict(self, state):
        self.distiller.load_learnable_state_dict(state["distiller"])
        self.update_rule.load_state_dict(state)
        hooks = state.get("hooks")
        for hook in self.hooks:  # a checkpoint without "hooks" kept each hook's keys at its top level
            hook.load_state_dict(state if hooks is None else hooks.get(hook.state_key, {}))
        self.epoch, self.global_step = state["epoch"], state["global_step"]
        self.counters = dict(state["counters"])
        set_rng_state(state["rng"])

    def resume(self, path):
        """Continue from a training checkpoint. Rank 0 reads it and sends it to the others, so ranks on other
        nodes need no copy of the run directory. Hooks must be registered first: they restore their state."""

        def read():
            if self.rank != 0:
                return None
            state = load_file(path, "resume checkpoint")
            if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
                raise CheckpointError(f"{path} is not an mdistiller training checkpoint (format {CHECKPOINT_FORMAT})")
            return state

        state = distributed.broadcast_object(distributed.agree(read))
        self.load_state_dict(state)
        logger.info("resumed from %s at epoch %d", path, self.epoch)
