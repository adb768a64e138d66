"""The training engine: one loop for every method, specialised by trainers (how an update is made) and hooks
(what happens around it).

`Trainer` owns the run state - weights, optimizer, epoch, best-so-far, RNG, counters - and can save and restore
all of it, which is what makes `--resume` bit-identical to an uninterrupted run. A subclass changes only
`build_optimizer` / `run_step` (the DOT trainer keeps two momentum buffers) and, through `extra_state`, what it
adds to checkpoints.

A step whose loss or gradients are not finite stops the run (finite_guard.py) before the epoch's checkpoints
are written; `run_step` reports the largest |gradient| it applies in `self.grad_max` for that check.
"""

import logging
import os
import time

import torch
import torch.nn.functional as F

from ..data import build_dataloaders
from ..data.unaugmented import unaugmented_train_loader
from ..distillers import DISTILL, TASK, total_loss
from ..distillers.kd import kd_loss
from ..utils.checkpoint import load_file
from ..utils.env import describe_device, resolve_device, rng_state, seed_everything, set_rng_state
from ..utils.errors import CheckpointError, TrainingDivergedError
from ..utils import distributed
from .build import build_distiller
from .ddp_wrap import wrap_for_training
from .epoch_progress import EpochProgress
from .evaluator import evaluate
from .finite_guard import CHECK_EVERY, FiniteGuard, largest_abs
from .lr_schedule import learning_rate
from .registry import TRAINER_REGISTRY
from .speed import apply_speed, resolve_speed

logger = logging.getLogger("mdistiller")

CHECKPOINT_FORMAT = "mdistiller-train-v1"


class Trainer:
    def __init__(self, cfg, run_dir=None):
        self.cfg = cfg
        self.run_dir = run_dir
        self.dist, self.device = distributed.setup(resolve_device(cfg.EXPERIMENT.DEVICE),
                                                   cfg.DISTRIBUTED.TIMEOUT_MIN)
        self.rank, self.world_size = self.dist.rank, self.dist.world_size
        self.speed = resolve_speed(cfg, self.device)  # SPEED's "auto" decided once, before any data is read
        seed_everything(cfg.EXPERIMENT.SEED, cfg.EXPERIMENT.DETERMINISTIC)
        # Steps that can fail on one rank only go through agree(): every rank stops, with one message.
        self.train_loader, self.test_loader, self.meta = distributed.agree(
            build_dataloaders, cfg, self.device, self.rank, self.world_size)
        self.distiller = distributed.agree(build_distiller, cfg, self.meta, self.device)
        # Before the optimizer: prepare may add learnable state. Not under agree(): prepare may run collectives
        # itself (KD++ shares rank 0's class means), so it uses agree() around its own rank-specific work.
        self.distiller.prepare(self)
        # The fast paths convert the models before DDP sees them, and after prepare: KD++'s class means come from
        # the plain float32 teacher, so their cache does not depend on SPEED.
        apply_speed(self.speed, self.distiller,
                    calibration_batches=lambda: unaugmented_train_loader(cfg, self.device))
        self.model = wrap_for_training(self.distiller, cfg, self.dist, self.device)
        self.optimizer = self.build_optimizer()
        self.scaler = self.build_scaler()
        self.max_epochs = cfg.SOLVER.EPOCHS
        self.epoch = 0  # completed epochs
        self.global_step = 0
        self.lr = cfg.SOLVER.LR
        self.best = {"top1": -1.0, "top5": -1.0, "epoch": 0}
        self.last = {"top1": None, "top5": None}
        self.counters = {"train_images": 0, "train_time_s": 0.0, "wall_time_s": 0.0}
        self.hooks = []
        self.summary = None
        self.guard = FiniteGuard(self.device)
        self.grad_max = {}  # {gradient set: largest |g| of the last step} (0-dim tensors), set by run_step

    @classmethod
    def validate_config(cls, cfg):
        """Raise ConfigError for settings this trainer cannot run; nothing to check by default."""

    # --- the update rule -------------------------------------------------------------------------------------
    def build_optimizer(self):
        s = self.cfg.SOLVER
        return torch.optim.SGD(self.distiller.learnable_parameters(), lr=s.LR, momentum=s.MOMENTUM,
                               weight_decay=s.WEIGHT_DECAY, nesterov=s.NESTEROV)

    def build_scaler(self):
        """The fp16 loss scale (SPEED.AMP fp16), or None: torch's GradScaler, which drives optimizer.step()."""
        return torch.amp.GradScaler(self.device.type) if self.speed.needs_scaler else None

    def set_lr(self, lr):
        self.lr = lr
        for group in self.optimizer.param_groups:
            group["lr"] = lr

    def run_step(self, images, labels, index, epoch):
        """One update; returns the step's loss terms as detached tensors (no device sync).

        `self.model` is the distiller's training forward, wrapped in DDP when several processes train: the
        backward then averages the gradients over ranks. Forward and losses run under SPEED's autocast; with an
        fp16 loss scale the step is skipped (and the scale backed off) when a gradient overflowed."""
        images = self.speed.batch(images)
        with self.speed.autocast():
            logits, terms = self.model(images, labels, epoch, index)
            loss = total_loss(terms)
        self.optimizer.zero_grad(set_to_none=True)
        params = [p for group in self.optimizer.param_groups for p in group["params"]]
        if self.scaler is None:
            loss.backward()
            self.grad_max = {"all": largest_abs(p.grad for p in params)}
            self.optimizer.step()
        else:
            self.scaler.scale(loss).backward()
            self.scaler.unscale_(self.optimizer)  # what scaler.step would do first; the check sees true gradients
            self.grad_max = {"all": largest_abs(p.grad for p in params)}
            self.scaler.step(self.optimizer)
            self.scaler.update()
        return self.loss_record(terms, loss), logits.detach()

    @staticmethod
    def loss_record(terms, loss):
        """Detached terms, their total and the per-kind totals ("task_total", "distill_total": the task and
        distillation losses the DOT paper plots per epoch, fig. 3), for every trainer alike."""
        losses = {name: term.value.detach() for name, term in terms.items()}
        for kind in (TASK, DISTILL):
            part = total_loss(terms, kind)
            if part is not None:
                losses[f"{kind}_total"] = part.detach()
        losses["total"] = loss.detach()
        return losses

    def step_stats(self):
        """Extra per-step diagnostics of the update (e.g. DOT's gradient cosines): {name: scalar tensor}, averaged
        per epoch into metrics.jsonl under their own names and sent to the hooks with the losses."""
        return {}

    def monitor(self, logits, labels):
        """Unweighted training losses of the step's (pre-update) predictions, the same for every method and loss
        weighting: monitor/ce, and monitor/kl when a teacher ran (T^2 KL at LOG.MONITOR_T). What DOT fig. 3 plots;
        a KD run's loss/task_total is 0.1 x CE and not comparable with the student alone's."""
        out = {"monitor/ce": F.cross_entropy(logits.float(), labels)}
        t_logits = getattr(self.distiller, "last_teacher_logits", None)
        if t_logits is not None:
            out["monitor/kl"] = kd_loss(logits.float(), t_logits.float(), self.cfg.LOG.MONITOR_T)
        return out

    # --- the loop --------------------------------------------------------------------------------------------
    def register_hooks(self, hooks):
        for hook in hooks:
            hook.trainer = self
            self.hooks.append(hook)

    def train(self):
        for hook in self.hooks:
            hook.before_train()
        logger.info("training %s on %s, %d train / %d test images, device %s", self.cfg.DISTILLER.STUDENT,
                    self.meta.name, self.meta.num_train, self.meta.num_test, describe_device(self.device))
        logger.info("fast paths: %s", self.speed.describe())
        while self.epoch < self.max_epochs:
            epoch = self.epoch + 1
            start = time.perf_counter()
            train_stats = self.train_one_epoch(epoch)
            test = self.evaluate()
            self.counters["wall_time_s"] += time.perf_counter() - start
            self.epoch = epoch
            self.last = {"top1": test["top1"], "top5": test["top5"]}
            if test["top1"] > self.best["top1"]:
                self.best = {"top1": test["top1"], "top5": test["top5"], "epoch": epoch}
            record = {"epoch": epoch, **train_stats, "test_top1": test["top1"], "test_top5": test["top5"],
                      "test_loss": test["loss"], "best_top1": self.best["top1"]}
            logger.info("epoch %d/%d  lr %.5f  train_loss %.4f  test_top1 %.2f  test_top5 %.2f  best %.2f  "
                        "%.0f img/s", epoch, self.max_epochs, record["lr"], record["train_loss"],
                        test["top1"], test["top5"], self.best["top1"], record["images_per_s"])
            for hook in self.hooks:
                hook.after_epoch(record)
        for hook in self.hooks:
            hook.after_train()
        return self.summary

    def evaluate(self):
        """Test accuracy of the student, every test sample counted once over all ranks.

        Ranks first take rank 0's BatchNorm statistics (their last training step updated them from their own
        shard), so every rank evaluates the very model rank 0 saves; tools/eval.py on that file agrees."""
        distributed.broadcast_(self.distiller.student.buffers())
        return evaluate(self.distiller, self.test_loader, reduce_fn=distributed.all_reduce_sum, speed=self.speed)

    def last_good_checkpoint(self):
        """Where the run can be taken up again after a failure in the current epoch (for the error message)."""
        latest = os.path.join(self.run_dir, "latest.pth") if self.run_dir else None
        if latest and self.epoch > 0 and os.path.exists(latest):
            return f"the last good checkpoint is {latest} (epoch {self.epoch}), left untouched"
        return "no checkpoint was written" if self.epoch == 0 else f"the last good state is epoch {self.epoch}'s"

    def check_finite(self, weights=None):
        """The guard's check (a sync, and a collective under DDP): raises TrainingDivergedError on every rank."""
        try:
            self.guard.check(self.last_good_checkpoint(), weights)
        except TrainingDivergedError as e:
            if self.rank == 0:
                logger.error("training stopped: %s", e)
            raise

    def train_one_epoch(self, epoch):
        self.distiller.train()
        self.train_loader.set_epoch(epoch - 1)
        iters = len(self.train_loader)
        # Bad steps in a row that are tolerated: only those an fp16 loss scale skips (and then backs off).
        self.guard.limit = self.cfg.SOLVER.MAX_SKIPPED_STEPS if self.scaler is not None else 0
        self.guard.start_epoch(epoch, self.global_step, iters)
        sums, stat_sums, seen, correct = {}, {}, 0, None
        # A bar on a terminal; in logs (CI, redirected output) a line every LOG.PRINT_FREQ steps (epoch_progress.py).
        progress = EpochProgress(self.train_loader, epoch, self.max_epochs, iters, self.cfg.LOG.PRINT_FREQ,
                                 self.rank, self.world_size, self.device)
        start = time.perf_counter()
        for it, (images, labels, index) in enumerate(progress):
            self.set_lr(learning_rate(self.cfg.SOLVER, epoch, it, iters))
            self.distiller.last_teacher_logits = None
            losses, logits = self.run_step(images, labels, index, epoch)
            self.guard.observe(losses, self.grad_max)
            stats = {**self.step_stats(), **self.monitor(logits, labels)}
            self.global_step += 1
            n = labels.shape[0]
            seen += n
            for name, value in losses.items():
                sums[name] = sums.get(name, 0.0) + value * n
            for name, value in stats.items():
                stat_sums[name] = stat_sums.get(name, 0.0) + value * n
            hits = (logits.argmax(1) == labels).sum()
            correct = hits if correct is None else correct + hits
            for hook in self.hooks:
                hook.after_step({**losses, **stats} if stats else losses)
            progress.step(it, losses["total"], self.lr, seen, sums["total"])
            if (it + 1) % CHECK_EVERY == 0 and it + 1 < iters:
                self.check_finite()
        # Before the epoch's numbers are reduced and long before the checkpoint hooks: what they would save.
        self.check_finite(weights=self.distiller.learnable_state_dict())
        names, stat_names = sorted(sums), sorted(stat_sums)
        totals = distributed.all_reduce_sum(torch.stack(
            [torch.as_tensor(sums[k], dtype=torch.float64, device=self.device) for k in names]
            + [torch.as_tensor(stat_sums[k], dtype=torch.float64, device=self.device) for k in stat_names]
            + [torch.as_tensor(correct, dtype=torch.float64, device=self.device),
               torch.tensor(float(seen), dtype=torch.float64, device=self.device)])).tolist()
        sums = dict(zip(names, totals[:len(names)]))
        stat_sums = dict(zip(stat_names, totals[len(names):-2]))
        correct, seen = totals[-2], int(totals[-1])  # all ranks: the epoch's global figures
        elapsed = time.perf_counter() - start
        progress.close()
        self.counters["train_images"] += seen
        self.counters["train_time_s"] += elapsed
        stats = {"lr": self.lr, "train_loss": float(sums.pop("total")) / seen,
                 "train_top1": 100.0 * float(correct) / seen}
        stats.update({f"loss/{name}": float(v) / seen for name, v in sums.items()})
        stats.update({name: float(v) / seen for name, v in stat_sums.items()})
        stats.update({"epoch_time_s": elapsed, "images_per_s": seen / elapsed})
        return stats

    def images_per_s(self):
        c = self.counters
        return c["train_images"] / c["train_time_s"] if c["train_time_s"] else 0.0

    # --- state -----------------------------------------------------------------------------------------------
    def extra_state(self):
        """Trainer-specific state to checkpoint (e.g. DOT's momentum buffers)."""
        return {}

    def load_extra_state(self, state):
        pass

    def state_dict(self):
        return {
            "format": CHECKPOINT_FORMAT,
            "epoch": self.epoch,
            "global_step": self.global_step,
            "model": self.distiller.student.state_dict(),  # published format: usable as a teacher checkpoint
            "distiller": self.distiller.learnable_state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "trainer": self.extra_state(),
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,  # fp16 loss scale
            "finite_guard": self.guard.state_dict(),  # the streak of skipped fp16 steps
            "best": dict(self.best),
            "last": dict(self.last),
            "counters": dict(self.counters),
            "rng": rng_state(),
            "config": self.cfg.dump(),
        }

    def load_state_dict(self, state):
        self.distiller.load_learnable_state_dict(state["distiller"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.load_extra_state(state["trainer"])
        if self.scaler is not None and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        self.guard.load_state_dict(state.get("finite_guard"))
        self.epoch, self.global_step = state["epoch"], state["global_step"]
        self.best, self.last, self.counters = dict(state["best"]), dict(state["last"]), dict(state["counters"])
        set_rng_state(state["rng"])

    def resume(self, path):
        """Continue from a training checkpoint. Rank 0 reads it and sends it to the others, so ranks on other
        nodes need no copy of the run directory."""

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


@TRAINER_REGISTRY.register("vanilla")
class VanillaTrainer(Trainer):
    """SGD with momentum on the sum of all loss terms."""
