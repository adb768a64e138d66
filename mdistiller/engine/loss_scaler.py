"""Dynamic loss scaling (SPEED.AMP fp16) for an update made from explicit gradient lists: the DOT trainer.

torch.amp.GradScaler works on `.grad` and `optimizer.step()`; DOT computes its two gradients with
`torch.autograd.grad` and applies them with `DOTOptimizer.step_with_grads`, so it gets the same algorithm here,
built on the same kernels GradScaler uses and with GradScaler's state_dict format:
  - both losses are multiplied by the scale before their gradients are taken;
  - all gradients (task and distillation) are divided by it, and checked for inf/NaN in the same pass;
  - if any is non-finite the step is skipped (weights and momentum buffers untouched) and the scale is multiplied
    by `backoff_factor`; after `growth_interval` finite steps in a row it is multiplied by `growth_factor`.
"""

import torch


class LossScaler:
    def __init__(self, device, init_scale=2.0**16, growth_factor=2.0, backoff_factor=0.5, growth_interval=2000):
        self.device = torch.device(device)
        self.growth_factor, self.backoff_factor, self.growth_interval = growth_factor, backoff_factor, growth_interval
        self._scale = torch.full((), float(init_scale), dtype=torch.float32, device=self.device)
        self._growth_tracker = torch.zeros((), dtype=torch.int32, device=self.device)

    def get_scale(self):
        return float(self._scale)

    def scale(self, loss):
        """`loss` times the current scale (None stays None: a loss kind the method does not have)."""
        return None if loss is None else loss * self._scale  # as GradScaler.scale: a float32 product

    @torch.no_grad()
    def unscale_(self, grads):
        """Divide the gradients (None entries skipped) by the scale in place; returns a one-element float tensor,
        1.0 when some gradient holds inf or NaN. No device sync."""
        found_inf = torch.zeros(1, dtype=torch.float32, device=self.device)
        inv_scale = self._scale.double().reciprocal().float()  # as GradScaler: 1/scale rounded once
        groups = {}
        for g in grads:
            if g is not None:
                groups.setdefault((g.device, g.dtype), []).append(g)
        for (device, _), group in groups.items():
            found = found_inf.to(device)
            torch._amp_foreach_non_finite_check_and_unscale_(group, found, inv_scale.to(device))
            if found is not found_inf:
                found_inf += found.to(self.device)
        return found_inf.clamp_(max=1.0)

    def update(self, found_inf):
        """Back off after a non-finite step, grow after `growth_interval` finite ones (GradScaler.update)."""
        torch._amp_update_scale_(self._scale, self._growth_tracker, found_inf.to(self.device), self.growth_factor,
                                 self.backoff_factor, self.growth_interval)

    def state_dict(self):
        return {"scale": self.get_scale(), "growth_factor": self.growth_factor,
                "backoff_factor": self.backoff_factor, "growth_interval": self.growth_interval,
                "_growth_tracker": int(self._growth_tracker)}

    def load_state_dict(self, state):
        self._scale.fill_(float(state["scale"]))
        self._growth_tracker.fill_(int(state["_growth_tracker"]))
        self.growth_factor, self.backoff_factor = state["growth_factor"], state["backoff_factor"]
        self.growth_interval = state["growth_interval"]
