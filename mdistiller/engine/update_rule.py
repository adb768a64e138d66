"""Update rules (SOLVER.UPDATE_RULE): how a step's loss terms become a parameter update.

The loop (trainer.py) runs the training forward inside `forward_context`, asks the rule for the losses it needs
(`losses`, computed under the run's autocast), then hands them to `apply`, which computes the gradients and
updates the parameters. A rule owns its optimizer and its fp16 loss scaler and saves both in `state_dict`, so a
resumed run continues exactly. "vanilla" is plain SGD with momentum on the sum of all terms; DOT (dot.py) keeps
one momentum buffer per kind of term. A new rule is one file with `@UPDATE_RULE_REGISTRY.register("name")`.
"""

import contextlib

import torch

from ..config.registry import Registry
from ..distillers.losses import total_loss
from .finite_guard import largest_abs

# SOLVER.UPDATE_RULE -> UpdateRule subclass
UPDATE_RULE_REGISTRY = Registry("update rule", key="SOLVER.UPDATE_RULE", task=None)  # every task's loop


class UpdateRule:
    """Base class. Subclasses build `self.optimizer` (and `self.scaler` for fp16) and implement `apply`."""

    optimizer = None
    scaler = None

    @classmethod
    def from_config(cls, cfg, device, fp16):
        """The keyword arguments of `__init__` besides `params`, from SOLVER (and the rule's own section);
        `fp16`: the run trains under fp16 autocast, so the rule needs a loss scaler on `device`."""
        raise NotImplementedError

    @classmethod
    def build(cls, cfg, params, device, fp16):
        """The rule a run with `cfg` uses for `params`."""
        return cls(params=params, **cls.from_config(cfg, device, fp16))

    @classmethod
    def validate_config(cls, cfg):
        """Raise ConfigError for settings this rule cannot run; nothing to check by default."""

    def forward_context(self, model):
        """Context for the training forward (DOT: DDP's no_sync, since it averages its own gradients)."""
        return contextlib.nullcontext()

    def losses(self, terms):
        """{name: scalar tensor} the rule needs from the terms; "total" always (computed under autocast)."""
        return {"total": total_loss(terms)}

    def apply(self, losses):
        """Gradients and update; returns {gradient set: largest |g| applied} (0-dim tensors, no sync)."""
        raise NotImplementedError

    def stats(self):
        """Per-step diagnostics of the update (DOT's gradient cosines): {name: scalar tensor}."""
        return {}

    def set_lr(self, lr):
        for group in self.optimizer.param_groups:
            if torch.is_tensor(group["lr"]):
                group["lr"].fill_(lr)  # a kernel on the device, no wait: a captured update reads it there
            else:
                group["lr"] = lr

    def use_device_lr(self, device):
        """Keep the LR in a device tensor that `set_lr` fills, so an update captured in a CUDA graph
        (cuda_graph.py) reads the current value instead of the one captured. Checkpoints keep a float."""
        for group in self.optimizer.param_groups:
            if not torch.is_tensor(group["lr"]):
                group["lr"] = torch.tensor(float(group["lr"]), dtype=torch.float32, device=device)

    def params(self):
        return [p for group in self.optimizer.param_groups for p in group["params"]]

    def state_dict(self):
        """The checkpoint's "optimizer", "scaler" and "trainer" (rule-specific extra state) entries."""
        optimizer = self.optimizer.state_dict()
        for group in optimizer["param_groups"]:  # the same file whether or not the LR lives on the device
            if torch.is_tensor(group["lr"]):
                group["lr"] = float(group["lr"])
        return {"optimizer": optimizer, "trainer": {},
                "scaler": self.scaler.state_dict() if self.scaler is not None else None}

    def load_state_dict(self, state):
        devices = [g["lr"].device if torch.is_tensor(g["lr"]) else None for g in self.optimizer.param_groups]
        self.optimizer.load_state_dict(state["optimizer"])
        for group, device in zip(self.optimizer.param_groups, devices):
            if device is not None:
                group["lr"] = torch.tensor(float(group["lr"]), dtype=torch.float32, device=device)
        if self.scaler is not None and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])


@UPDATE_RULE_REGISTRY.register("vanilla")
class SGDRule(UpdateRule):
    """SGD with momentum (optionally Nesterov) on the sum of all loss terms; fp16 through torch's GradScaler. Under
    DDP the backward averages the gradients over the ranks.

    On a GPU torch's fused SGD kernel makes the update one launch, reads a device-tensor LR without a host wait,
    and skips an fp16 step whose gradients overflowed on the device (GradScaler hands it the flag); it rounds as
    the multi-tensor kernel does up to float32 reassociation. On the CPU the multi-tensor path stays, so CPU runs
    are bit-identical to earlier ones."""

    def __init__(self, *, params, lr, momentum, weight_decay, nesterov=False, scaler=None, fused=False):
        self.optimizer = torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay,
                                         nesterov=nesterov, fused=fused or None)
        self.scaler = scaler

    @classmethod
    def from_config(cls, cfg, device, fp16):
        s = cfg.SOLVER
        device = torch.device(device)
        scaler = torch.amp.GradScaler(device.type) if fp16 else None
        return {"lr": s.LR, "momentum": s.MOMENTUM, "weight_decay": s.WEIGHT_DECAY, "nesterov": s.NESTEROV,
                "scaler": scaler, "fused": device.type == "cuda"}

    def apply(self, losses):
        loss = losses["total"]
        self.optimizer.zero_grad(set_to_none=True)
        params = self.params()
        if self.scaler is None:
            loss.backward()
            grad_max = {"all": largest_abs(p.grad for p in params)}
            self.optimizer.step()
        else:
            self.scaler.scale(loss).backward()
            self.scaler.unscale_(self.optimizer)  # what scaler.step would do first; the check sees true gradients
            grad_max = {"all": largest_abs(p.grad for p in params)}
            self.scaler.step(self.optimizer)
            self.scaler.update()
        return grad_max
