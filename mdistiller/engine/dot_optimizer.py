"""The DOT update rule (DOT appendix, Algorithm 2) as an optimizer that takes its two gradients explicitly.

For a parameter reached by both the task and the distillation loss:
    v_task    <- (g_task + wd * theta) + (mu - Delta) v_task
    v_distill <-  g_distill            + (mu + Delta) v_distill
    theta     <- theta - lr (v_task + v_distill)
Weight decay is applied exactly once, with the task gradient (it regularises the student, not the match to the
teacher; the reference implementation makes the same choice). A parameter reached by only one of the two
losses (a projector, CRD's heads, a classifier that a feature loss never sees) gets plain SGD with momentum mu
on that one gradient (appendix A.7): giving it a Delta-shifted momentum would only rescale its step, since there
is no second loss for it to be balanced against. A parameter reached by neither is left alone, as torch's SGD
leaves a parameter without a gradient.

With Delta = 0 the two buffers sum to SGD's single buffer (the recursion is linear), so DOT is plain SGD up to
float rounding; for single-loss parameters the operations are SGD's own, bit for bit.

Buffers live in `self.state[p]` ("task_buffer", "distill_buffer", or "momentum_buffer" for single-loss
parameters), so `state_dict()` carries them into checkpoints and resume is exact. Updates use torch's
multi-tensor (`_foreach`) kernels: one launch per operation over all parameters, not one per tensor.
"""

import torch
from torch.optim import Optimizer


class DOTOptimizer(Optimizer):
    def __init__(self, params, lr, momentum, delta, weight_decay=0.0):
        if not 0.0 <= momentum - delta < 1.0 or not 0.0 <= momentum + delta < 1.0:
            raise ValueError(f"momentum +- delta must lie in [0, 1), got {momentum} +- {delta}")
        super().__init__(params, dict(lr=lr, momentum=momentum, delta=delta, weight_decay=weight_decay))
        self.cosines = None

    def params(self):
        return [p for group in self.param_groups for p in group["params"]]

    def step(self, closure=None):
        raise RuntimeError("DOTOptimizer needs the two gradients: call step_with_grads(task_grads, distill_grads)")

    def _buffers(self, params, key):
        bufs = []
        for p in params:
            state = self.state[p]
            if key not in state:
                state[key] = torch.zeros_like(p, memory_format=torch.preserve_format)
            bufs.append(state[key])
        return bufs

    @torch.no_grad()
    def step_with_grads(self, task_grads, distill_grads, track_cosine=False, found_inf=None):
        """Apply one update. `task_grads` / `distill_grads`: one entry per parameter, in `params()` order, None
        where that loss does not reach the parameter. With `track_cosine`, `self.cosines` becomes
        (cos(v_task, v), cos(v_distill, v)) over the parameters both losses reach (DOT fig. 5). `found_inf`: a
        one-element device tensor, non-zero when the fp16 gradients overflowed; the step is then undone on the
        device (weights, buffers and cosines keep their bits), with no host wait."""
        if found_inf is None:
            return self._step(task_grads, distill_grads, track_cosine)
        touched = self._touched(task_grads, distill_grads)
        before = [t.clone() for t in touched]
        cosines = self.cosines
        self._step(task_grads, distill_grads, track_cosine)
        skip = found_inf.reshape(()) != 0
        for t, old in zip(touched, before):
            t.copy_(torch.where(skip, old, t))
        if self.cosines is not None and cosines is not None:
            self.cosines = tuple(torch.where(skip, old, new) for old, new in zip(cosines, self.cosines))

    def _touched(self, task_grads, distill_grads):
        """The parameters and buffers an update with these gradients writes (buffers created now if new)."""
        touched, offset = [], 0
        for group in self.param_groups:
            for p in group["params"]:
                a, b = task_grads[offset], distill_grads[offset]
                offset += 1
                if a is not None and b is not None:
                    touched += [p] + self._buffers([p], "task_buffer") + self._buffers([p], "distill_buffer")
                elif (a is None) != (b is None):
                    touched += [p] + self._buffers([p], "momentum_buffer")
        return touched

    def _step(self, task_grads, distill_grads, track_cosine):
        task_grads, distill_grads = list(task_grads), list(distill_grads)
        offset = 0
        both_task, both_distill = [], []
        for group in self.param_groups:
            params = group["params"]
            gt = task_grads[offset:offset + len(params)]
            gd = distill_grads[offset:offset + len(params)]
            offset += len(params)
            lr, mu, delta, wd = group["lr"], group["momentum"], group["delta"], group["weight_decay"]
            both = [(p, a, b) for p, a, b in zip(params, gt, gd) if a is not None and b is not None]
            single = [(p, a if a is not None else b) for p, a, b in zip(params, gt, gd) if (a is None) != (b is None)]
            if both:
                ps, ga, gb = map(list, zip(*both))
                vt, vd = self._buffers(ps, "task_buffer"), self._buffers(ps, "distill_buffer")
                if wd:
                    ga = torch._foreach_add(ga, ps, alpha=wd)
                torch._foreach_mul_(vt, mu - delta)
                torch._foreach_add_(vt, ga)
                torch._foreach_mul_(vd, mu + delta)
                torch._foreach_add_(vd, gb)
                step = torch._foreach_add(vt, vd)
                _descend(ps, step, lr)
                if track_cosine:
                    both_task += vt
                    both_distill += vd
            if single:
                ps, gs = map(list, zip(*single))
                bufs = self._buffers(ps, "momentum_buffer")
                if wd:
                    gs = torch._foreach_add(gs, ps, alpha=wd)
                torch._foreach_mul_(bufs, mu)
                torch._foreach_add_(bufs, gs)
                _descend(ps, bufs, lr)
        if offset != len(task_grads) or len(task_grads) != len(distill_grads):
            raise ValueError(f"expected {offset} gradients per loss, got {len(task_grads)} and {len(distill_grads)}")
        self.cosines = _cosines(both_task, both_distill) if track_cosine else None


def _descend(params, steps, lr):
    """params -= lr * steps; a device-tensor LR (cuda_graph.py) is multiplied in on the device rather than read
    back as an alpha (a host wait)."""
    if torch.is_tensor(lr):
        torch._foreach_sub_(params, torch._foreach_mul(steps, lr))
    else:
        torch._foreach_add_(params, steps, alpha=-lr)


def _cosines(task_bufs, distill_bufs):
    """(cos(v_task, v), cos(v_distill, v)) with v = v_task + v_distill, over all the given tensors at once."""
    if not task_bufs:
        return None
    vt = torch.cat([b.reshape(-1) for b in task_bufs]).double()
    vd = torch.cat([b.reshape(-1) for b in distill_bufs]).double()
    v = vt + vd
    norm_v = v.norm().clamp_min(1e-30)
    return (vt @ v) / (vt.norm().clamp_min(1e-30) * norm_v), (vd @ v) / (vd.norm().clamp_min(1e-30) * norm_v)
