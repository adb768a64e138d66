"""SOLVER.UPDATE_RULE dot: the Distillation-Oriented Trainer (Zhao et al., ICCV 2023) as an update rule, for every
distiller.

DOT keeps one momentum buffer for the task-loss gradient (momentum mu - Delta) and one for the distillation-loss
gradient (mu + Delta), so distillation dominates the optimisation while the task loss still steers it
(dot_optimizer.py has the update). The loop needs the two gradients separately from one forward pass; the
distillers already mark every loss term as task or distill, which is all this rule needs to know about a
method, so it works for KD, DKD, CRD, ReviewKD, DIST, AT and every "++" variant alike.

The two gradients (SOLVER.DOT.GRAD_MODE):
  - two_pass: one backward of the task loss keeping the graph, one of the distillation loss. The forward and
    the teacher are shared; the cost over the vanilla trainer is one extra student backward.
  - batched: one call to autograd with both losses stacked and an identity of cotangents
    (`is_grads_batched`), which vmaps the backward over the two losses. Which parameters each loss reaches is
    read from the autograd graph.
Both give the same gradients; docs/dot.md says which is faster where.

With SPEED.AMP fp16 both losses are scaled, both gradient sets unscaled and checked together, and an overflow
skips the whole update, decided on the device (loss_scaler.py, dot_optimizer.py); SPEED's autocast covers the
forward and the losses only. Both losses and the largest |g| of each gradient set go to the finite guard
(finite_guard.py), which stops a diverged run.
"""

import contextlib

import torch
from torch.nn.parallel import DistributedDataParallel as DDP

from ..distillers.losses import DISTILL, TASK, total_loss
from ..utils.errors import ConfigError
from ..utils import distributed
from .dot_optimizer import DOTOptimizer
from .finite_guard import largest_abs
from .loss_scaler import LossScaler
from .update_rule import UPDATE_RULE_REGISTRY, UpdateRule

GRAD_MODES = ("two_pass", "batched")


def reachable_leaves(loss):
    """ids of the leaf tensors whose gradient `loss` depends on (the AccumulateGrad nodes of its graph)."""
    seen, found, stack = set(), set(), [loss.grad_fn] if loss.grad_fn is not None else []
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        variable = getattr(node, "variable", None)
        if variable is not None:
            found.add(id(variable))
        stack.extend(next_node for next_node, _ in node.next_functions)
    return found


def two_pass_grads(task, distill, params):
    """(task grads, distill grads), None where a loss does not reach a parameter."""

    def grads(loss, retain):
        if loss is None or not loss.requires_grad:
            return [None] * len(params)
        return list(torch.autograd.grad(loss, params, retain_graph=retain, allow_unused=True))

    return grads(task, retain=True), grads(distill, retain=False)


def batched_grads(task, distill, params):
    """The same gradients from one vmapped backward over the two stacked losses."""
    if task is None or distill is None or not (task.requires_grad and distill.requires_grad):
        return two_pass_grads(task, distill, params)
    by_task, by_distill = reachable_leaves(task), reachable_leaves(distill)
    used = [p for p in params if id(p) in by_task or id(p) in by_distill]
    out = torch.autograd.grad(torch.stack([task, distill]), used, grad_outputs=torch.eye(2, device=task.device,
                              dtype=task.dtype), is_grads_batched=True, allow_unused=True)
    got = {id(p): g for p, g in zip(used, out)}
    task_grads = [got[id(p)][0] if id(p) in by_task and got.get(id(p)) is not None else None for p in params]
    distill_grads = [got[id(p)][1] if id(p) in by_distill and got.get(id(p)) is not None else None for p in params]
    return task_grads, distill_grads


@UPDATE_RULE_REGISTRY.register("dot")
class DOTRule(UpdateRule):
    def __init__(self, *, params, lr, momentum, delta, weight_decay, grad_mode="two_pass", log_cosine=False,
                 scaler=None):
        self.optimizer = DOTOptimizer(params, lr=lr, momentum=momentum, delta=delta, weight_decay=weight_decay)
        self._grads = two_pass_grads if grad_mode == "two_pass" else batched_grads
        self._track_cosine = log_cosine
        self.scaler = scaler

    @classmethod
    def from_config(cls, cfg, device, fp16):
        s = cfg.SOLVER
        return {"lr": s.LR, "momentum": s.MOMENTUM, "delta": s.DOT.DELTA, "weight_decay": s.WEIGHT_DECAY,
                "grad_mode": s.DOT.GRAD_MODE, "log_cosine": s.DOT.LOG_COSINE,
                "scaler": LossScaler(device) if fp16 else None}

    @classmethod
    def validate_config(cls, cfg):
        s = cfg.SOLVER
        mu, delta = s.MOMENTUM, s.DOT.DELTA
        for name, sign, value in (("task", "-", mu - delta), ("distillation", "+", mu + delta)):
            if not 0.0 <= value < 1.0:
                raise ConfigError(
                    f"config key SOLVER.DOT.DELTA: the {name} momentum SOLVER.MOMENTUM {sign} DELTA = {mu} {sign} "
                    f"{delta} = {value:g} is outside [0, 1); choose |DELTA| <= {min(mu, 1 - mu):g} (negative DELTA "
                    f"is the task-oriented ablation)")
        if s.NESTEROV:
            raise ConfigError("config key SOLVER.NESTEROV: the DOT trainer's update (two momentum buffers, DOT "
                              "appendix Algorithm 2) is defined for plain momentum only; set SOLVER.NESTEROV False")
        if s.DOT.GRAD_MODE not in GRAD_MODES:
            raise ConfigError(f"config key SOLVER.DOT.GRAD_MODE: must be one of {', '.join(GRAD_MODES)}, "
                              f"got '{s.DOT.GRAD_MODE}'")

    def forward_context(self, model):
        # DDP's reducer averages .grad during .backward(), but the two gradients here come from autograd.grad, so
        # the forward runs in no_sync() and they are averaged over the ranks explicitly instead.
        return model.no_sync() if isinstance(model, DDP) else contextlib.nullcontext()

    def losses(self, terms):
        return {"task": total_loss(terms, TASK), "distill": total_loss(terms, DISTILL), "total": total_loss(terms)}

    def apply(self, losses):
        task, distill = losses["task"], losses["distill"]
        if self.scaler is not None:
            task, distill = self.scaler.scale(task), self.scaler.scale(distill)
        task_grads, distill_grads = self._grads(task, distill, self.optimizer.params())
        distributed.mean_grads_(task_grads + distill_grads)  # both gradients in one message
        if self.scaler is None:
            grad_max = {"task": largest_abs(task_grads), "distill": largest_abs(distill_grads)}
            self.optimizer.step_with_grads(task_grads, distill_grads, track_cosine=self._track_cosine)
        else:
            # Averaged before the check, so every rank sees the same overflow and skips the same steps.
            found_inf = self.scaler.unscale_(task_grads + distill_grads)
            grad_max = {"task": largest_abs(task_grads), "distill": largest_abs(distill_grads)}
            # An overflowing step is undone on the device (no host wait), as GradScaler lets a fused optimizer do.
            self.optimizer.step_with_grads(task_grads, distill_grads, track_cosine=self._track_cosine,
                                           found_inf=found_inf)
            self.scaler.update(found_inf)
        return grad_max

    def stats(self):
        cosines = self.optimizer.cosines
        if cosines is None:
            return {}
        return {"dot/cos_task": cosines[0], "dot/cos_distill": cosines[1]}
